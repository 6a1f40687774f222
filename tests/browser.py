"""Headless Chromium for the dashboard's tests: Debian's `chromium` driven by Playwright (never
`playwright install`: nothing is downloaded). `make test` and `.ci/run` install the browser; with
`CI` set, a missing browser fails the tests instead of skipping them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")
# As root on a closed network: no sandbox, and nothing that phones home. (Playwright adds --headless.)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
OUT = Path(__file__).resolve().parent.parent / "out" / "ui"  # screenshots (gitignored)


def chromium() -> str | None:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    if path is None:
        message = "no Chromium found: `apt-get install chromium` (`make test` and .ci/run install it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=FLAGS)
        try:
            yield launched
        finally:
            launched.close()


def shoot(page: Any, name: str) -> Path:
    """A full-page screenshot under out/ui/, for a person to look at."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
