"""Router.decide: explicit model -> that model; `auto` and virtual models -> DEFAULT_MODEL."""

from __future__ import annotations

from gateway.config import Settings
from gateway.errors import ServiceUnavailable
from gateway.routing import Decision, RouteContext
from gateway.upstreams import Upstreams


class Router:
    def __init__(self, settings: Settings, upstreams: Upstreams) -> None:
        self.settings = settings
        self.upstreams = upstreams

    async def decide(self, ctx: RouteContext) -> Decision:
        spec = self.settings.model(ctx.requested_model)
        if spec is not None:
            return Decision(model=spec.name, layer="explicit", fallbacks=list(spec.fallbacks))
        default = self.settings.default_model
        if default is None:
            raise ServiceUnavailable("no model is configured: the catalogue is empty")
        spec = self.settings.model(default)
        assert spec is not None
        return Decision(model=default, layer="default", fallbacks=list(spec.fallbacks))
