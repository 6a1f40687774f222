"""`llm-router`: serve, migrate, and (from their modules) the lab and export verbs."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.config import Settings, load_settings
from gateway.routing.policies import POLICIES


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None), **extra}
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except (ValidationError, ValueError) as exc:
        print(f"llm-router: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def serve_settings(args: argparse.Namespace) -> Settings:
    extra: dict[str, object] = {}
    if args.no_migrate:
        extra["run_migrations"] = False
    if args.replay:
        from gateway.providers.replay import load

        data = load(args.replay)
        extra["models"] = data.catalogue()
        extra["default_model"] = data.models[0]
        extra["latency_weight"] = 0.0  # replayed answers come at once: latency would be noise
        # The file's models replace the catalogue, so the config's rules, routes and policies (which
        # name catalogue models) do not apply; virtual models by strategy do.
        extra["rules"], extra["routes"], extra["policies"] = [], [], {}
        extra["virtual_models"] = {
            "auto-cheap": {"strategy": "cost_optimized"},
            "auto-quality": {"strategy": "quality_optimized"},
        }
    return _settings(args, **extra)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import setup_logging
    from gateway.server import uvicorn_config

    settings = serve_settings(args)
    redact = setup_logging(settings.log_level, settings.log_format, settings.secrets())
    app = create_app(settings, redact=redact)
    config = uvicorn_config(
        app,
        settings,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    )
    uvicorn.Server(config).run()
    return 0


def migrate_cmd(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging
    from gateway.store.factory import database, migrate

    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    if not settings.enable_persistence:
        print("llm-router: ENABLE_PERSISTENCE is false; nothing to migrate", file=sys.stderr)
        return 1

    async def run() -> None:
        async with database(settings) as dsn:
            await migrate(dsn, args.revision, ssl=settings.database_ssl_mode, downgrade=args.downgrade)

    asyncio.run(run())
    print(f"database {'downgraded' if args.downgrade else 'upgraded'} to {args.revision}")
    return 0


def export_dpo(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from tqdm import tqdm

    from gateway import dpo
    from gateway.logs import setup_logging
    from gateway.store.factory import open_store

    settings = _settings(args)
    setup_logging("warning", "text", settings.secrets())
    if not settings.enable_persistence:
        print(
            "llm-router: ENABLE_PERSISTENCE is false: pairs live in the gateway's memory only",
            file=sys.stderr,
        )
        return 1
    since = None
    if args.since:
        since = datetime.fromisoformat(args.since)
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
    min_margin = settings.dpo_min_margin if args.min_margin is None else args.min_margin

    async def run() -> int:
        n = 0
        async with open_store(settings) as store:
            # A local file written line by line as the database streams: blocking writes are fine here.
            with open(args.out, "wb") as out, tqdm(desc=f"export {args.kind}", unit=" records") as bar:  # noqa: ASYNC230
                async for record, _ in dpo.export_records(
                    store,
                    kind=args.kind,
                    fmt=args.format,
                    since=since,
                    min_margin=min_margin,
                    specs={m.name: m for m in settings.models},
                    correct=args.correct,
                    incorrect=args.incorrect,
                    caller=args.caller,
                ):
                    out.write(orjson.dumps(record, default=str) + b"\n")
                    n += 1
                    bar.update()
        return n

    n = asyncio.run(run())
    print(f"wrote {n} {args.kind} records ({args.format}) to {args.out}")
    return 0


def reembed_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.embedders import open_encoder
    from gateway.embedders.reembed import reembed
    from gateway.logs import setup_logging
    from gateway.store.factory import open_store

    settings = _settings(args)
    setup_logging("info", "text", settings.secrets())
    if not settings.enable_persistence:
        print("llm-router: ENABLE_PERSISTENCE is false: no stored calls to re-embed", file=sys.stderr)
        return 1

    async def run() -> tuple[str, Any]:
        async with open_store(settings) as store:
            encoder = await asyncio.to_thread(open_encoder, settings, 2)
            with tqdm(desc=f"reembed ({encoder.id})", unit=" calls") as bar:
                done = await reembed(store, encoder, settings.embedding_max_chars, progress=bar.update)
            return encoder.id, done

    eid, done = asyncio.run(run())
    print(f"re-embedded {done.embedded} rated calls with {eid} ({done.skipped} without a user text)")
    return 0


def _lab_options(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from gateway.lab.runner import Options, parse_set

    return Options(
        policy=getattr(args, "policy", None),
        strategy=getattr(args, "strategy", None),
        feedback_rate=args.feedback_rate,
        order=args.order,
        seed=args.seed,
        limit=args.limit,
        overrides=parse_set(args.set),
        store=args.store,
        config=args.config,
        data_dir=Path(args.data_dir),
    )


def replay_cmd(args: argparse.Namespace) -> int:
    from gateway.lab.commands import replay
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    replay(args.file, _lab_options(args), args.out)
    return 0


def sweep_cmd(args: argparse.Namespace) -> int:
    from gateway.lab.commands import sweep
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    sweep(args.file, args.grid, _lab_options(args), args.out)
    return 0


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config file (default: $CONFIG_FILE)")

    p = sub.add_parser("serve", help="run the gateway")
    common(p)
    p.add_argument("--host", help="bind address (default: $HOST or 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default: $PORT or 8080)")
    p.add_argument("--no-migrate", action="store_true", help="do not run database migrations on start")
    p.add_argument(
        "--replay",
        metavar="FILE",
        help="answer from a replay file: every model of the file becomes a `replay` model (no API key)",
    )
    p.set_defaults(func=serve)

    p = sub.add_parser("migrate", help="apply database migrations (Alembic)")
    common(p)
    p.add_argument("--revision", default="head")
    p.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    p.set_defaults(func=migrate_cmd)

    p = sub.add_parser("export-dpo", help="export DPO pairs (TRL-ready) or routing labels as JSONL")
    common(p)
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--since", help="only pairs updated at or after this ISO 8601 time")
    p.add_argument("--min-margin", type=float, help="minimum score margin (default: DPO_MIN_MARGIN)")
    p.add_argument(
        "--kind",
        choices=["responses", "routes"],
        default="responses",
        help="responses: {prompt, chosen, rejected}; routes: {prompt, label, chosen_model, rejected_model}",
    )
    p.add_argument(
        "--format",
        choices=["trl", "jsonl"],
        default="trl",
        help="trl: TRL's conversational preference format; jsonl: everything, with models and scores",
    )
    p.add_argument("--caller", help="one tenant's pairs (a client key id, key_...); default: all")
    p.add_argument("--correct", type=float, default=0.7, help="routes: a score at or above this is correct")
    p.add_argument(
        "--incorrect", type=float, default=0.3, help="routes: a score at or below this is incorrect"
    )
    p.set_defaults(func=export_dpo)

    p = sub.add_parser(
        "reembed", help="after a change of EMBEDDER: embed the stored rated calls with the current one"
    )
    common(p)
    p.set_defaults(func=reembed_cmd)

    def lab(p: argparse.ArgumentParser, store: str) -> None:
        common(p)
        p.add_argument("file", help="a replay file (JSONL; NAME.models.json beside it gives the prices)")
        p.add_argument("--feedback-rate", type=float, default=1.0, help="share of calls that get feedback")
        p.add_argument("--order", choices=["shuffle", "file"], default="shuffle")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--limit", type=int, help="only the first N prompts (after shuffling)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a setting for the gateway, e.g. --set COST_WEIGHT=-0.5 (repeatable)",
        )
        p.add_argument(
            "--store",
            choices=["postgres", "memory"],
            default=store,
            help=f"where the gateway keeps calls and feedback (default {store})",
        )
        p.add_argument(
            "--data-dir", default="./data", help="embedding cache and the lab's embedded PostgreSQL"
        )
        p.add_argument("--out", help="output directory (default out/<verb>-<file>-<time>)")

    p = sub.add_parser("replay", help="stream a replay file through a real gateway and report on the router")
    lab(p, "postgres")
    p.add_argument("--policy", choices=sorted(POLICIES), help="ROUTER_POLICY")
    p.add_argument("--strategy", help="a per-request strategy instead of the bandit (e.g. cost_optimized)")
    p.set_defaults(func=replay_cmd)

    p = sub.add_parser("sweep", help="replays over a grid of settings: cost-quality curve, AIQ, heatmap")
    lab(p, "memory")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=v1,v2,...",
        help="a setting and its values, e.g. --grid COST_WEIGHT=-0.1,-0.3 (policy and strategy too)",
    )
    p.set_defaults(func=sweep_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
