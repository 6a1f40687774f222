"""A replay gateway (`serve --replay FILE`, `demo FILE`): the file's models, served by the `replay`
provider, replace the catalogue.

The profile's keyword rules, semantic routes and policies name its own catalogue's models, so they
do not apply. Its virtual models do, as far as they can: each keeps its strategy and constraints;
a policy is dropped (the virtual model then routes over the file's models), and so are the
models of a `models` list that the file does not have. `auto-cheap`, `auto-fast` and
`auto-quality` are always there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gateway.config import config_values
from gateway.config_sources import environ
from gateway.providers.replay import ReplayData

log = logging.getLogger("gateway")

STANDARD_VIRTUAL_MODELS: dict[str, dict[str, Any]] = {
    "auto-cheap": {"strategy": "cost_optimized"},
    "auto-fast": {"strategy": "latency_optimized"},
    "auto-quality": {"strategy": "quality_optimized"},
}


def config_file(explicit: str | None) -> str | None:
    """The config file Settings will read: `--config`, else CONFIG_FILE (environment, then .env)."""
    return explicit or os.environ.get("CONFIG_FILE") or environ().get("CONFIG_FILE") or None


def virtual_models(data: ReplayData, profile: str | None) -> dict[str, dict[str, Any]]:
    """The profile's virtual models, adapted to the file's models (see the module's doc)."""
    raw = config_values(profile).get("virtual_models") if profile else None
    out = {name: dict(v) for name, v in STANDARD_VIRTUAL_MODELS.items()}
    for name, value in (raw or {}).items():
        vm = dict(value) if isinstance(value, dict) else {}
        if vm.pop("policy", None) is not None:
            log.info("replay: virtual model %s routes over the file's models (its policy names others)", name)
        if "models" in vm:
            names = vm["models"] if isinstance(vm["models"], list) else str(vm["models"]).split(",")
            kept = [m for m in names if m in data.models]
            if kept:
                vm["models"] = kept
            else:
                del vm["models"]
        out[str(name)] = vm
    return out


def replay_overrides(data: ReplayData, profile: str | None) -> dict[str, Any]:
    """The settings a replay gateway overrides (as command-line values: they beat every source)."""
    return {
        "models": data.catalogue(),
        "default_model": data.models[0],
        "latency_weight": 0.0,  # replayed answers come at once: latency would be noise
        "rules": [],
        "routes": [],
        "policies": {},
        "virtual_models": virtual_models(data, profile),
    }
