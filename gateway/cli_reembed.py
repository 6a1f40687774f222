"""`llm-router reembed`: after a change of EMBEDDER, the stored rated calls embedded again with the
current embedder (gateway.embedders.reembed), with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.config import Settings

SettingsOf = Callable[[argparse.Namespace], Settings]


def reembed_cmd(args: argparse.Namespace, settings_of: SettingsOf) -> int:
    from tqdm import tqdm

    from gateway.embedders import open_encoder
    from gateway.embedders.reembed import reembed
    from gateway.logs import setup_logging
    from gateway.store.factory import open_store

    settings = settings_of(args)
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


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None], settings_of: SettingsOf) -> None:
    p = sub.add_parser(
        "reembed", help="after a change of EMBEDDER: embed the stored rated calls with the current one"
    )
    common(p)
    p.set_defaults(func=partial(reembed_cmd, settings_of=settings_of))
