"""`llm-router fit FILE ...`: HCTS's starting state from replay-format files (`gateway.lab.fit`):
its command and its arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.config import Settings

SettingsOf = Callable[[argparse.Namespace], Settings]


def fit_cmd(args: argparse.Namespace, settings_of: SettingsOf) -> int:
    from pathlib import Path

    from gateway.lab.fit import fit

    settings = settings_of(args)
    try:
        done = fit(args.files, settings, Path(args.out) if args.out else None, args.seed)
    except (OSError, ValueError) as exc:
        print(f"llm-router fit: {exc}", file=sys.stderr)
        return 2
    print(
        f"fitted {done.prompts} prompts x {len(done.models)} models ({', '.join(done.models)}); "
        f"clusters {done.clusters}, contextual {done.contextual}, lambda {done.lam:.4g}; "
        f"stored in {done.path}: a gateway started with the same --config (data dir "
        f"{settings.data_dir}) or ROUTER_STATE_PATH loads it at start"
    )
    return 0


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None], settings_of: SettingsOf) -> None:
    p = sub.add_parser(
        "fit", help="learn the router's starting state from replay-format files (all outcomes known)"
    )
    common(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="replay files (JSONL), the same models in each")
    p.add_argument(
        "--out", help="where to store it (default ROUTER_STATE_PATH, else DATA_DIR/router_state.npz)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=partial(fit_cmd, settings_of=settings_of))
