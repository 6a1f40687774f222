"""`llm-router evaluate` (off-policy evaluation on the gateway's own logged calls) and
`llm-router evaluate-lab` (the check of those estimates against replayed candidates): their commands
and their arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.config import Settings

SettingsOf = Callable[[argparse.Namespace], Settings]


def evaluate_cmd(args: argparse.Namespace, settings_of: SettingsOf) -> int:
    from gateway.evaluation.command import run
    from gateway.logs import setup_logging

    settings = settings_of(args)
    setup_logging("warning", "text", settings.secrets())
    if not settings.enable_persistence:
        print("llm-router: ENABLE_PERSISTENCE is false: no calls were logged to evaluate on", file=sys.stderr)
        return 1
    return run(settings, args)


def evaluate_lab_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.lab.offpolicy import LabOptions, evaluate_lab, parse
    from gateway.lab.runner import parse_set
    from gateway.logs import setup_logging

    setup_logging("warning", "text", [])
    options = LabOptions(
        seed=args.seed,
        limit=args.limit,
        candidates=[parse(c) for c in args.candidate],
        interval=args.interval,
        data_dir=Path(args.data_dir),
        config=args.config,
    )
    options.logging.update(parse_set(args.set))
    evaluate_lab(args.file, options, args.out)
    return 0


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], settings_of: SettingsOf) -> None:
    p = sub.add_parser(
        "evaluate",
        help="off-policy evaluation: what candidate settings would have scored and cost on logged calls",
    )
    common(p)
    p.add_argument("--since", required=True, help="the window's start (ISO 8601; UTC unless it says)")
    p.add_argument("--until", help="the window's end (default: now)")
    p.add_argument("--caller", help="only this caller's calls (a key id, key_..., as call records show)")
    p.add_argument(
        "--train-since", help="the state is learned from the calls since then (default: since - RECENCY_DAYS)"
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="'[NAME:] KEY=VALUE ...'",
        help="settings overrides, e.g. 'cheap: COST_WEIGHT=-0.8 EXPLORATION_RATE=0' (repeatable)",
    )
    p.add_argument("--candidates", metavar="FILE", help="a JSON or YAML list of {name, settings}")
    p.add_argument("--confidence", type=float, default=0.9, help="the intervals' confidence (default 0.9)")
    p.add_argument(
        "--interval",
        choices=["clt", "bootstrap"],
        default="clt",
        help="normal approximation on the per-call terms, or a bootstrap over calls",
    )
    p.add_argument(
        "--min-propensity",
        type=float,
        default=0.01,
        help="warn about picks the logs made less often than this",
    )
    p.add_argument("--no-current", action="store_true", help="do not evaluate the current settings too")
    p.add_argument("--out", help="output directory (default out/evaluate-<time>)")
    p.set_defaults(func=partial(evaluate_cmd, settings_of=settings_of))

    p = sub.add_parser(
        "evaluate-lab",
        help="check off-policy evaluation against the truth: log, estimate, replay each candidate for real",
    )
    common(p)
    p.add_argument("file", help="a replay file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N prompts (after shuffling)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the logging gateway (default EXPLORATION_RATE=0.3; repeatable)",
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="'[NAME:] KEY=VALUE ...'",
        help="a candidate (repeatable; default: greedy, quality, thrifty, knn_ts)",
    )
    p.add_argument("--interval", choices=["clt", "bootstrap"], default="clt")
    p.add_argument("--data-dir", default="./data", help="embedding cache and the lab's embedded PostgreSQL")
    p.add_argument("--out", help="output directory (default out/evaluate-lab-<time>)")
    p.set_defaults(func=evaluate_lab_cmd)
