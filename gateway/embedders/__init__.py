"""The routing embedders, by name (EMBEDDER): how each is opened (its model, built or exported
once into MODELS_DIR, default DATA_DIR/models) and served (its cache, its threading).

- `static` (default): `gateway.embedders.static`, distilled from all-MiniLM-L6-v2; inline.
- `minilm`: `gateway.embedders.minilm`, all-MiniLM-L6-v2 on ONNX Runtime; a batching worker thread.

Semantic routes, neighbour search, the linear policy and DPO near-duplicate pairing all use the one
configured embedder, and compare only embeddings of its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gateway.config import Settings
from gateway.embedder import Embedder, Encoder
from gateway.embedders import minilm, static

log = logging.getLogger("gateway.embedder")


class ServedEmbedder(Embedder, Protocol):
    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Kind:
    id: str
    open: Callable[[Path, Settings, int], Encoder]  # models dir, settings, threads -> the model
    serve: Callable[[Encoder, Settings, int], ServedEmbedder]  # model, settings, cache size


def _open_minilm(models: Path, settings: Settings, threads: int) -> Encoder:
    return minilm.load_encoder(models, settings.embedding_backend, threads)


def _serve_minilm(model: Encoder, settings: Settings, cache_size: int) -> ServedEmbedder:
    return minilm.MiniLMEmbedder(model, cache_size=cache_size, max_batch=settings.embedding_max_batch)


def _serve_static(model: Encoder, settings: Settings, cache_size: int) -> ServedEmbedder:
    assert isinstance(model, static.StaticModel)
    return static.StaticEmbedder(model, cache_size=cache_size)


EMBEDDERS: dict[str, Kind] = {
    "static": Kind(static.ID, lambda models, settings, threads: static.load_model(models), _serve_static),
    "minilm": Kind(minilm.ID, _open_minilm, _serve_minilm),
}


def models_dir(settings: Settings) -> Path:
    return settings.models_dir or settings.data_dir / "models"


def embedder_id(settings: Settings) -> str:
    """The id of the configured embedder (without loading it)."""
    return EMBEDDERS[settings.embedder].id


@contextlib.contextmanager
def _building(models: Path) -> Iterator[None]:
    """One process at a time builds into `models` (several gateways, lab runs or tests starting at
    once on a fresh directory): the others wait, then find the model made. A lock file's flock,
    released by the kernel if its holder dies."""
    try:
        models.mkdir(parents=True, exist_ok=True)
        lock = open(models / ".build.lock", "a")  # noqa: SIM115 (held across the yield)
    except OSError:  # a read-only models dir (the Docker image's, baked at build): nothing to build
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_encoder(settings: Settings, threads: int | None = None) -> Encoder:
    """The configured embedder's model, synchronously (built or exported first if need be, by one
    process at a time)."""
    kind = EMBEDDERS[settings.embedder]
    models = models_dir(settings)
    with _building(models):
        return kind.open(models, settings, threads or settings.embedding_threads)


def serve(settings: Settings, model: Encoder, cache_size: int | None = None) -> ServedEmbedder:
    kind = EMBEDDERS[settings.embedder]
    return kind.serve(model, settings, settings.embedding_cache_size if cache_size is None else cache_size)


async def load_embedder(settings: Settings) -> ServedEmbedder:
    """The configured embedder, ready to serve (its model opened off the event loop, warmed up)."""
    t0 = time.perf_counter()
    model = await asyncio.to_thread(open_encoder, settings)
    await asyncio.to_thread(model.encode, ["warm up"])  # the first call pays one-off costs
    embedder = serve(settings, model)
    log.info(
        "embedder %s (EMBEDDER=%s) ready in %.1f s", embedder.id, settings.embedder, time.perf_counter() - t0
    )
    return embedder
