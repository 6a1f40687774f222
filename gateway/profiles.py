"""Where a gateway keeps its state by default: a data directory per profile or replay file, so
that gateways started from one checkout (`make run`, `serve --replay FILE`, another profile) never
share learning or exports by accident."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from gateway.catalogue import ModelSpec

DATA_ROOT = Path("./data")


def profile_name(config_file: str | None, models: Iterable[ModelSpec]) -> str:
    """The name of a gateway's default data directory under ./data: `replay-<file>` for a gateway
    that serves one replay file, else the config file's (`config.dev.yaml` -> `dev`), else
    `default`."""
    specs = list(models)
    replay_files = {m.replay_file for m in specs if m.provider == "replay"}
    if specs and len(replay_files) == 1 and all(m.provider == "replay" for m in specs):
        name = "replay-" + Path(str(replay_files.pop())).name.removesuffix(".jsonl")
    elif config_file:
        name = Path(config_file).name
        for suffix in (".yaml", ".yml"):
            name = name.removesuffix(suffix)
        name = name.removeprefix("config.") or "default"
    else:
        name = "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "default"
