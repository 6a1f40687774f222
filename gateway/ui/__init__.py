"""The dashboard: a page at /ui (its assets packaged beside this module, nothing from a CDN) and
the JSON API it reads, /ui/api/... (admin key only; README "Dashboard" documents it).

- `pages`: the page and its static files, with a strict Content-Security-Policy
- `api`: the overview, the calls list and a call, DPO pair counts, what the page needs to know
- `explain`: the router's beliefs, and "why this model" (the real router on a typed prompt)
- `params`: query parameters read once into typed filters
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route

from gateway.ui import api, explain, pages


def ui_routes() -> list[BaseRoute]:
    return [
        Route("/ui", pages.index, methods=["GET"]),
        Route("/ui/", pages.index, methods=["GET"]),
        Mount("/ui/static", app=pages.static(), name="ui-static"),
        Route("/ui/api/meta", api.meta, methods=["GET"]),
        Route("/ui/api/overview", api.overview, methods=["GET"]),
        Route("/ui/api/calls", api.calls, methods=["GET"]),
        Route("/ui/api/calls/{request_id}", api.call, methods=["GET"]),
        Route("/ui/api/dpo", api.dpo, methods=["GET"]),
        Route("/ui/api/router", explain.router, methods=["GET"]),
        Route("/ui/api/explain", explain.explain, methods=["POST"]),
    ]
