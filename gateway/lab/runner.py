"""Running replays: a real gateway (uvicorn on 127.0.0.1, real routing and embeddings, Postgres or
the memory store, the replay provider as every model) driven with `model="auto"`, feedback posted
with the recorded score of the chosen model for a fraction of the calls; and the baselines on the
same order."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import uvicorn

from gateway.config import Settings, load_settings, setting_key
from gateway.config_errors import ConfigError
from gateway.embedder import Embedder, Encoder, routing_text
from gateway.embedders import embedder_id, open_encoder, serve
from gateway.lab import baselines
from gateway.lab.report import Trace
from gateway.providers.replay import ReplayData
from gateway.routing.bandit import Knobs
from gateway.routing.hcts_policy import default_dial
from gateway.services import Services

log = logging.getLogger("gateway.lab")

# Replay data carries no latencies: a latency weight would only reward noise.
LAB_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",  # the lab's gateway listens on loopback only
    "latency_weight": 0.0,
    "log_level": "warning",
    "duel_rate": 0.0,
    "stats_refresh_s": 3600.0,  # the runner refreshes after every call instead (reproducibility)
}


@dataclass
class Options:
    policy: str | None = None  # ROUTER_POLICY
    strategy: str | None = None  # a per-request strategy (default: the bandit)
    feedback_rate: float = 1.0
    order: str = "shuffle"
    seed: int = 0
    limit: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    store: str = "postgres"  # postgres | memory
    config: str | None = None
    data_dir: Path = Path("./data")


def stream_order(n: int, order: str, seed: int, limit: int | None) -> list[int]:
    idx = list(range(n))
    if order == "shuffle":
        np.random.default_rng(seed).shuffle(idx)
    elif order != "file":
        raise ValueError("order must be shuffle or file")
    return idx[:limit] if limit else idx


def feedback_mask(n: int, rate: float, seed: int) -> list[bool]:
    """Which calls get feedback: the same calls for the router and the baselines."""
    rng = np.random.default_rng(seed + 1)
    return [bool(x) for x in rng.random(n) < rate]


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` (KEY a setting, case-insensitive; VALUE parsed as JSON when it can be).
    An unknown KEY is a ConfigError that names the closest setting."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[setting_key(key, "--set")] = json.loads(value)
        except json.JSONDecodeError:
            out[setting_key(key, "--set")] = value
    return out


def embeddings_for(
    data: ReplayData, cache_dir: Path, max_chars: int, encoder: Encoder, only: list[int] | None = None
) -> tuple[list[str], np.ndarray]:
    """The routing text of every record, and `encoder`'s embeddings of those in `only` (default
    all; the others stay zero), computed once per file, embedder and selection (cached in
    `cache_dir`)."""
    texts = [routing_text(r.messages, max_chars) for r in data.records]
    wanted = sorted(set(only)) if only is not None else list(range(len(texts)))
    joined = "\n\x00".join(texts[i] for i in wanted) + f"|{max_chars}|{encoder.id}"
    key = hashlib.sha256(joined.encode()).hexdigest()[:16]
    path = cache_dir / f"{data.name}-{key}.npy"
    if path.is_file():
        return texts, np.load(path)
    t0 = time.perf_counter()
    vectors = np.zeros((len(texts), 384), dtype=np.float32)
    for start in range(0, len(wanted), 64):
        chunk = wanted[start : start + 64]
        vectors[chunk] = encoder.encode([texts[i] for i in chunk])
    log.info("embedded %d prompts with %s in %.1f s", len(wanted), encoder.id, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return texts, vectors


def lab_settings(data: ReplayData, options: Options, database_url: str | None) -> Settings:
    values: dict[str, Any] = {
        **LAB_DEFAULTS,
        "models": data.catalogue(),
        "default_model": data.models[0],
        "embedding_cache_size": len(data.records) + 1000,
    }
    if options.policy:
        values["router_policy"] = options.policy
    values["enable_persistence"] = options.store == "postgres"
    # Online from nothing: a state `llm-router fit` left in the replay profile's data dir (fitted
    # on this file's outcomes, perhaps) must not leak into the run; --set ROUTER_STATE_PATH=FILE
    # warm-starts on purpose.
    values["router_state_path"] = str(options.data_dir / "lab" / "no-fitted-state.npz")
    values["router_state_keep"] = False  # nor what an earlier run learnt
    if database_url:
        values["database_url"] = database_url
    values.update(options.overrides)
    return load_settings(options.config, **values)


def lab_encoder(data: ReplayData, options: Options) -> Encoder:
    """The model of the embedder the lab's gateway is configured with (EMBEDDER: --set, the config
    file, the environment), from (or built into) the lab's data dir unless MODELS_DIR says where."""
    settings = lab_settings(data, options, None)
    models = settings.models_dir or options.data_dir / "models"
    return open_encoder(settings.model_copy(update={"models_dir": models}), threads=2)


@contextlib.asynccontextmanager
async def lab_database(options: Options) -> AsyncIterator[str | None]:
    """A fresh, empty database for one run (embedded PostgreSQL unless DATABASE_URL is set)."""
    if options.store != "postgres":
        yield None
        return
    from gateway.store.embedded import EmbeddedPostgres

    root = options.data_dir / "lab"
    embedded = EmbeddedPostgres(root, database="lab")
    await embedded.start()
    name = "replay_" + uuid.uuid4().hex[:10]
    await embedded.create_database(name)
    try:
        yield embedded.dsn(name)
    finally:
        await embedded.drop_database(name)
        await embedded.stop()


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, embedder: Embedder | None, seed: int | None, port: int = 0
) -> AsyncIterator[tuple[str, Services]]:
    """The gateway on a loopback port (default: a free one), in this event loop: its URL and its
    parts (without an embedder, the gateway loads its own)."""
    from gateway.app import create_app

    started: list[Services] = []
    app = create_app(settings, embedder=embedder, seed=seed, on_start=started.append)
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )  # asyncio sets TCP_NODELAY only then
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", started[0]
    finally:
        server.should_exit = True
        await task


async def drive(
    settings: Settings,
    embedder: Embedder,
    data: ReplayData,
    order: list[int],
    mask: list[bool] | None,
    seed: int,
    *,
    strategy: str | None = None,
    first: int = 0,
    progress: Callable[[int, str], None] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """Send the prompts of `order` through a real gateway with `model="auto"`, request ids
    `r{first + t}`, and rate the picks `mask` says (no mask: the gateway learns nothing, nor
    refreshes what it knows). The picks, and how many calls each layer decided."""
    picks: list[str] = []
    layers: dict[str, int] = {}
    # A spool of its own: each run has a fresh database, and records another run's gateway left in
    # a shared spool would be written into this one's (the replay profile's data dir is shared).
    with tempfile.TemporaryDirectory(prefix="llm-router-lab-spool-") as spool:
        settings = settings.model_copy(update={"spool_dir": Path(spool)})
        async with serving(settings, embedder, seed) as (url, gw), aiohttp.ClientSession() as http:
            for t, i in enumerate(order):
                record = data.records[i]
                body: dict[str, Any] = {
                    "model": "auto",
                    "messages": record.messages,
                    "metadata": {"replay_id": record.id},
                }
                if strategy:
                    body["router"] = {"strategy": strategy}
                headers = {"x-request-id": f"r{first + t}"}
                async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"the gateway answered {resp.status}: {payload[:300]!r}")
                    chosen = resp.headers["x-router-model"]
                    request_id = resp.headers["x-request-id"]
                    layer = resp.headers.get("x-router-layer", "")
                layers[layer] = layers.get(layer, 0) + 1
                picks.append(chosen)
                # A re-clustering the call started (HCTS, in a thread) is applied before its rating
                # is posted, not before or after it as the thread's speed decides: under load the
                # two orders gave different runs (the rating is read against the clusters of then)
                await gw.router.policy.settle()
                if mask is not None and mask[t]:
                    fb = {"request_id": request_id, "score": record.outcomes[chosen].score}
                    async with http.post(url + "/feedback", json=fb) as resp:
                        if resp.status != 200:
                            said = (await resp.read())[:300]
                            raise RuntimeError(f"feedback failed: {resp.status} {said!r}")
                # Reproducible runs: each decision sees every earlier call and rating, whatever the
                # timing of the write-behind recorder and of the statistics refresh.
                await gw.recorder.flush()
                if mask is not None:
                    await gw.router.refresh_stats()
                if progress is not None:
                    progress(t, chosen)
    return picks, layers


def trace_of(name: str, data: ReplayData, order: list[int], picks: list[str], meta: dict[str, Any]) -> Trace:
    scores = np.array([data.records[i].outcomes[m].score for i, m in zip(order, picks, strict=True)])
    costs = np.array([data.cost(data.records[i], m) for i, m in zip(order, picks, strict=True)])
    return Trace(name, picks, scores, costs, meta)


async def run_router(
    data: ReplayData,
    order: list[int],
    mask: list[bool],
    options: Options,
    texts: list[str],
    vectors: np.ndarray,
    encoder: Encoder,
    progress: Callable[[int, str], None] | None = None,
) -> Trace:
    """Stream the prompts through a real gateway with `model="auto"` and learn from feedback; the
    gateway's embedder (EMBEDDER) serves `encoder`, primed with the precomputed `vectors`."""
    t0 = time.perf_counter()
    async with lab_database(options) as dsn:
        settings = lab_settings(data, options, dsn)
        if encoder.id != embedder_id(settings):
            raise ValueError(f"the lab's encoder is {encoder.id}, the gateway's EMBEDDER another")
        embedder = serve(settings, encoder, cache_size=len(texts) + 1000)
        embedder.prime([texts[i] for i in order], vectors[order])
        picks, layers = await drive(
            settings, embedder, data, order, mask, options.seed, strategy=options.strategy, progress=progress
        )
    await embedder.aclose()
    elapsed = time.perf_counter() - t0
    meta = {
        "seconds": round(elapsed, 1),
        "ms_per_request": round(elapsed * 1000 / len(order), 2),
        "layers": layers,
        "settings": _knobs(settings),
    }
    return trace_of("auto", data, order, picks, meta)


def _knobs(settings: Settings) -> dict[str, Any]:
    keys = (
        "router_policy",
        "router_dial_mode",
        "router_dial_target",
        "embedder",
        "feedback_weight",
        "latency_weight",
        "cost_weight",
        "exploration_rate",
        "exploration_bonus",
        "similarity_threshold",
        "max_similar_requests",
        "min_similar_requests",
        "min_confidence_score",
        "optimistic_prior",
        "prior_strength",
        "min_requests_for_global",
        "lin_ridge",
        "lin_noise",
    )
    return {k: getattr(settings, k) for k in keys}


def noncontextual_ts(data: ReplayData, order: list[int], mask: list[bool], options: Options) -> Trace:
    """Thompson sampling without context, with the objective the lab's router runs with under
    `options` (HCTS's dial under ROUTER_POLICY=hcts, else the bandit's knobs), on the same order,
    feedback and seed."""
    settings = lab_settings(data, options, None)
    if settings.router_policy == "hcts":
        return baselines.noncontextual_hcts(data, order, mask, options.seed, settings)
    return baselines.noncontextual_ts(data, order, mask, options.seed, Knobs.from_settings(settings))


def objective(data: ReplayData, options: Options) -> Hashable:
    """What the non-contextual baseline depends on besides the stream: runs of a sweep with the
    same objective share one baseline."""
    settings = lab_settings(data, options, None)
    if settings.router_policy == "hcts":
        return ("hcts", default_dial(settings))
    return (settings.router_policy, Knobs.from_settings(settings))


def baseline_traces(
    data: ReplayData, order: list[int], mask: list[bool], vectors: np.ndarray, seed: int
) -> dict[str, Trace]:
    best, cheap = baselines.best_single(data), baselines.cheapest(data)
    return {
        "best_single": baselines.single(data, order, best, "best_single"),
        "cheapest": baselines.single(data, order, cheap, "cheapest"),
        "oracle": baselines.oracle(data, order),
        "random": baselines.random_uniform(data, order, seed),
        "round_robin": baselines.round_robin(data, order),
        "original_proxy": baselines.original_proxy(data, order, vectors, mask, seed),
    }
