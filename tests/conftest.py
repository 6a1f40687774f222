"""Shared fixtures: a fake upstream, a real embedded PostgreSQL, gateways on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gateway.app import create_app
from gateway.catalogue import ModelSpec
from gateway.config import Settings
from gateway.server import uvicorn_config
from tests.fake_upstream import FakeUpstream
from tests.valkey import Valkey


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls `predicate` until it returns something true (a log line is written just after its
    response is sent, a record a moment after that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for a condition")


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


def model(name: str, base_url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai_compatible", "base_url": base_url, **kw}


def make_settings(models: list[dict[str, Any]] | list[ModelSpec], **kw: Any) -> Settings:
    kw.setdefault("enable_persistence", False)
    kw.setdefault("retry_backoff_ms", 1)
    # A test's gateway starts from nothing: what another test's learnt (saved in the shared default
    # DATA_DIR when it stopped) must not carry over. The tests of ROUTER_STATE_KEEP turn it on.
    kw.setdefault("router_state_keep", False)
    if kw["enable_persistence"] and "data_dir" not in kw and "spool_dir" not in kw:
        # Each gateway its own spool: one left by an earlier test must not replay into this one.
        kw["spool_dir"] = Path(tempfile.mkdtemp(prefix="spool-"))
    return Settings(_env_file=None, models=models, **kw)  # type: ignore[call-arg]


class GatewayServer:
    """A gateway app served by uvicorn on a random loopback port, in a thread of its own."""

    def __init__(self, settings: Settings, **app_kw: Any) -> None:
        self.settings = settings
        self.services: Any = None
        self.app = create_app(settings, on_start=self._started, **app_kw)
        sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio sets TCP_NODELAY only then
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, settings, log_level="warning", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _started(self, services: Any) -> None:
        self.services = services

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's own event loop (to inspect or drive its parts)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"gateway failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start in time")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DATA_DIR for the session: the ONNX export of the model (made once) and the lab's caches."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def st_model(data_dir: Path) -> Any:
    """The real all-MiniLM-L6-v2 (ONNX), loaded once per test session (EMBEDDER=minilm)."""
    from gateway.embedders.minilm import load_encoder

    return load_encoder(data_dir / "models")


@dataclass(frozen=True)
class StaticBuild:
    """The session's build of the static embedder: where, what it logged, its (empty) hub home."""

    models_dir: Path
    log: str
    hf_home: Path
    env: dict[str, str]


def offline_env(hf_home: Path) -> dict[str, str]:
    """No network and no Hugging Face hub cache: hub access refused, any HTTP through a proxy
    that does not exist (the discard port), HF_HOME an empty directory."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "HF_HUB_CACHE")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }


@pytest.fixture(scope="session")
def static_build(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StaticBuild:
    """The static embedder (EMBEDDER=static, the default), built once per test session into the
    session's DATA_DIR/models from the packaged weights, in a process with no network and no hub
    cache (about 30-60 s of CPU: MiniLM's ONNX export, then 30,000 short MiniLM runs)."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    env = offline_env(hf_home)
    code = (
        "import logging, sys; from pathlib import Path; "
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
        "from gateway.embedders.static import load_model; load_model(Path(sys.argv[1]))"
    )
    models = data_dir / "models"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(models)], env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return StaticBuild(models, proc.stderr, hf_home, env)


@pytest.fixture(scope="session")
def static_model(static_build: StaticBuild) -> Any:
    """The session's static embedder, loaded (built by `static_build`)."""
    from gateway.embedders.static import load_model

    return load_model(static_build.models_dir)


@pytest.fixture
def gateway(static_model: Any) -> Iterator[Callable[..., GatewayServer]]:
    """`gateway(settings, **app_kw)` starts a gateway with the default embedder (the session's
    static model; pass `embedder=` for another); all are stopped at the end of the test."""
    from gateway.embedders.static import StaticEmbedder

    started: list[GatewayServer] = []
    embedders: list[StaticEmbedder] = []

    def start(settings: Settings, **app_kw: Any) -> GatewayServer:
        if "embedder" not in app_kw:
            app_kw["embedder"] = StaticEmbedder(static_model)
            embedders.append(app_kw["embedder"])
        server = GatewayServer(settings, **app_kw).__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__()
    for embedder in embedders:
        embedder.worker.shutdown(wait=True)


# --- PostgreSQL: one embedded server per test session, a fresh migrated database per test


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class PG:
    def __init__(self, root: Path) -> None:
        from gateway.store.embedded import EmbeddedPostgres

        self.embedded = EmbeddedPostgres(root, database="template_migrated")
        self.template = "template_migrated"

    def start(self) -> None:
        from gateway.store.factory import migrate

        async def go() -> None:
            dsn = await self.embedded.start()
            await migrate(dsn)

        run_async(go())

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        run_async(self.embedded.create_database(name, template=self.template))
        return self.embedded.dsn(name)

    def stop(self) -> None:
        run_async(self.embedded.stop())


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PG]:
    server = PG(tmp_path_factory.mktemp("pg"))
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.stop()


def asyncpg_dsn(dsn: str) -> str:
    return dsn.replace("postgresql+asyncpg://", "postgresql://")


def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one query, straight from the database (not through the gateway)."""
    import asyncpg

    async def go() -> list[Any]:
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return list(run_async(go()))


@pytest.fixture
def dsn(pg: PG) -> str:
    """A fresh database, migrated to head (cloned from a migrated template)."""
    return pg.new_database()


# --- a Redis-protocol server (Valkey): one per session, emptied for each test that asks for it


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Valkey]:
    server = Valkey(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture
def valkey(valkey_server: Valkey) -> Valkey:
    if not valkey_server.ping():  # a test stopped it
        valkey_server.restart()
    valkey_server.flush()
    return valkey_server
