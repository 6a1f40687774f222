"""`llm-router`: serve, migrate, and (from their modules) the lab and export verbs."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson

from gateway.catalogue import STRATEGIES
from gateway.config import Settings, load_settings
from gateway.config_errors import ConfigError, env_near_misses
from gateway.config_sources import environ
from gateway.providers.replay import ReplayFileError
from gateway.routing.policies import POLICIES

log = logging.getLogger("gateway")


class UsageError(Exception):
    """A command line the user must fix (the message is one line)."""


# What the user must fix, not a bug: one line on stderr and exit status 2, never a traceback.
USER_ERRORS = (UsageError, ConfigError, ReplayFileError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's errors as one line (its own print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None), **extra}
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def warn_about_environment(settings: Settings) -> None:
    """Variables of the environment or .env spelt almost like a setting (see env_near_misses)."""
    keys = [m.api_key_env for m in settings.models if m.api_key_env]
    for warning in env_near_misses(environ(), Settings.model_fields, keys):
        log.warning(warning)


def serve_settings(args: argparse.Namespace) -> Settings:
    extra: dict[str, object] = {}
    if args.no_migrate:
        extra["run_migrations"] = False
    if args.replay:
        from gateway.providers.replay import load
        from gateway.replay_mode import config_file, replay_overrides

        extra.update(replay_overrides(load(args.replay), config_file(args.config)))
    return _settings(args, **extra)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import setup_logging
    from gateway.server import freeze_heap, uvicorn_config

    settings = serve_settings(args)
    redact = setup_logging(settings.log_level, settings.log_format, settings.secrets())
    warn_about_environment(settings)
    app = create_app(settings, redact=redact, on_start=lambda _: freeze_heap())
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


def iso_time(value: str) -> datetime:
    """An argparse type: an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-11-01 or 2026-11-01T12:00:00+01:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def export_dpo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway import dpo
    from gateway.logs import setup_logging
    from gateway.store.factory import open_store

    try:
        fmt = dpo.export_format(args.kind, args.format)
    except ValueError as exc:
        raise UsageError(f"--format: {exc}") from exc
    settings = _settings(args)
    setup_logging("warning", "text", settings.secrets())
    if not settings.enable_persistence:
        print(
            "llm-router: ENABLE_PERSISTENCE is false: pairs live in the gateway's memory only",
            file=sys.stderr,
        )
        return 1
    min_margin = settings.dpo_min_margin if args.min_margin is None else args.min_margin
    skips = dpo.RouteSkips()

    async def run() -> int:
        n = 0
        async with open_store(settings) as store:
            # A local file written line by line as the database streams: blocking writes are fine here.
            with open(args.out, "wb") as out, tqdm(desc=f"export {args.kind}", unit=" records") as bar:  # noqa: ASYNC230
                async for record, _ in dpo.export_records(
                    store,
                    kind=args.kind,
                    fmt=fmt,
                    since=args.since,
                    min_margin=min_margin,
                    specs={m.name: m for m in settings.models},
                    correct=args.correct,
                    incorrect=args.incorrect,
                    skips=skips,
                    caller=args.caller,
                ):
                    out.write(orjson.dumps(record, default=str) + b"\n")
                    n += 1
                    bar.update()
        return n

    n = asyncio.run(run())
    source = "DATABASE_URL" if settings.database_dsn() else f"the embedded PostgreSQL in {settings.data_dir}"
    print(f"wrote {n} {args.kind} records ({fmt}) to {args.out}, from {source}")
    if args.kind == "routes" and (n == 0 or skips.same_price or skips.unknown_model):
        print(f"{'no' if n == 0 else 'some'} routing labels: {skips.explain()}")
    elif n == 0:
        print(
            "no pairs: a pair needs two rated answers by different models to the same (or a "
            f"near-identical) prompt, with scores at least {min_margin:g} apart"
        )
    return 0


def keys_cmd(args: argparse.Namespace) -> int:
    from gateway.cli_keys import keys_cmd as run
    from gateway.logs import setup_logging

    settings = _settings(args)
    setup_logging("warning", "text", settings.secrets())
    return run(args, settings)


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
    from gateway.lab.warm import replay
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    replay(args.file, _lab_options(args), args.out, args.warm_start)
    return 0


def sweep_cmd(args: argparse.Namespace) -> int:
    from gateway.lab.commands import parse_grid, sweep
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    options = _lab_options(args)
    parse_grid(args.grid)  # a typo fails here, before any work
    sweep(args.file, args.grid, options, args.out)
    return 0


def demo_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.lab.demo import DemoOptions, demo
    from gateway.lab.runner import parse_set
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    options = DemoOptions(
        limit=args.limit,
        feedback_rate=args.feedback_rate,
        seed=args.seed,
        port=args.port,
        store=args.store,
        config=args.config,
        overrides=parse_set(args.set),
        models_dir=Path(args.models_dir) if args.models_dir else None,
    )
    demo(args.file, options)
    return 0


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    p.add_argument("--since", type=iso_time, help="only pairs updated at or after this ISO 8601 time")
    p.add_argument("--min-margin", type=float, help="minimum score margin (default: DPO_MIN_MARGIN)")
    p.add_argument(
        "--kind",
        choices=["responses", "routes"],
        default="responses",
        help="responses: {prompt, chosen, rejected}; routes: {prompt, label, chosen_model, rejected_model}",
    )
    p.add_argument(
        "--format",
        choices=["trl", "labels", "jsonl"],
        help="responses: trl (default; TRL's conversational preference format) or jsonl (everything, "
        "with models and scores); routes: labels (default) or jsonl (everything)",
    )
    p.add_argument("--caller", help="one tenant's pairs (a client key id, key_...); default: all")
    p.add_argument("--correct", type=float, default=0.7, help="routes: a score at or above this is correct")
    p.add_argument(
        "--incorrect", type=float, default=0.3, help="routes: a score at or below this is incorrect"
    )
    p.set_defaults(func=export_dpo)

    from gateway.cli_keys import add_parser

    add_parser(sub, common).set_defaults(func=keys_cmd)
    from gateway.cli_evaluate import add_parsers
    from gateway.cli_reembed import add_parser as add_reembed

    add_parsers(sub, common, _settings)
    add_reembed(sub, common, _settings)

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
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="a per-request strategy instead of the bandit (e.g. cost_optimized)",
    )
    p.add_argument("--warm-start", action="store_true", help="fit the first half, replay the second from it")
    p.set_defaults(func=replay_cmd)

    from gateway.cli_fit import add_parser as add_fit

    add_fit(sub, common, _settings)

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

    p = sub.add_parser(
        "demo",
        help="no API key needed: a replay gateway learns live from a replay file's prompts and scores",
    )
    common(p)
    p.add_argument("file", help="a replay file (JSONL; NAME.models.json beside it gives the prices)")
    p.add_argument("--limit", type=int, default=1000, help="prompts to send (default 1000; 0: all)")
    p.add_argument("--feedback-rate", type=float, default=1.0, help="share of answers rated")
    p.add_argument("--seed", type=int, default=0, help="the prompts' order")
    p.add_argument(
        "--port", type=int, default=0, help="the gateway's port on 127.0.0.1 (default: a free one)"
    )
    p.add_argument(
        "--store",
        choices=["memory", "postgres"],
        default="memory",
        help="memory (default: every demo starts fresh) or postgres (the replay file's own data "
        "directory, as `serve --replay` uses: learning carries over)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, e.g. --set COST_WEIGHT=0"
    )
    p.add_argument("--models-dir", help="the embedding model's ONNX export (default: MODELS_DIR)")
    p.set_defaults(func=demo_cmd)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except USER_ERRORS as exc:
        print(f"llm-router {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
