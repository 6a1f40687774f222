"""docker-compose.yml: the compose check works with Compose v2, v1 or none (scripts/compose_check.py)
and catches broken files; the whole `.env` reaches the gateway and the published port follows PORT."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from scripts import compose_check

ROOT = Path(__file__).resolve().parent.parent
GATEWAYS = ("gateway-dev", "gateway-prod", "gateway-cost")

GOOD = """
services:
  db:
    image: postgres
    profiles: [p]
  app:
    image: app
    profiles: [p]
    env_file: .env
    ports: ["${PORT:-8080}:${PORT:-8080}"]
    depends_on: {db: {condition: service_healthy}}
    healthcheck:
      test: ["CMD", "true"]
      retries: 3
"""

BROKEN = {
    "unknown key": (GOOD.replace("image: app", "image: app\n    imagee: x"), "imagee"),
    "wrong type": (GOOD.replace("profiles: [p]\n    env_file", "profiles: p\n    env_file"), "profiles"),
    "undefined service": (GOOD.replace("{db:", "{dbb:"), "undefined service 'dbb'"),
    "bad interpolation": (GOOD.replace("${PORT:-8080}:", "${PORT:-8080:"), "invalid interpolation"),
    "not a port after interpolation": (
        GOOD.replace("${PORT:-8080}:${PORT", "${PORT:-eighty}:${PORT"),
        "port",
    ),
    "required variable": (GOOD.replace("image: app", "image: ${APP_IMAGE:?set APP_IMAGE}"), "APP_IMAGE"),
    "missing env file": (GOOD.replace("env_file: .env", "env_file: missing.env"), "missing.env"),
    "not an integer": (GOOD.replace("retries: 3", "retries: ${RETRIES:-three}"), "not an integer"),
}


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / ".env").write_text("")
    path = tmp_path / "docker-compose.yml"
    path.write_text(textwrap.dedent(text))
    return path


def real_compose() -> list[str] | None:
    return compose_check.find_compose()


@pytest.fixture
def no_compose(monkeypatch, tmp_path):
    """A PATH with no Compose at all (neither `docker compose` nor `docker-compose`)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("COMPOSE_CMD", raising=False)


def test_the_project_file_passes_without_any_compose(no_compose, capsys):
    assert compose_check.find_compose() is None
    assert (
        compose_check.main([str(ROOT / "docker-compose.yml"), "--env", "GATEWAY_ENV_FILE=.env.example"]) == 0
    )
    out = capsys.readouterr().out
    assert "layer 1 skipped" in out and "schema (compose-spec, as written): ok" in out and "0 problems" in out


def test_the_project_file_passes_with_the_compose_on_path(capsys):
    assert (
        compose_check.main([str(ROOT / "docker-compose.yml"), "--env", "GATEWAY_ENV_FILE=.env.example"]) == 0
    )
    out = capsys.readouterr().out
    if real_compose() is not None:
        assert all(f"profile {p}: ok" in out for p in ("dev", "prod", "cost-optimized", "ollama"))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_fail_without_compose(case, tmp_path, no_compose, capsys):
    text, needle = BROKEN[case]
    assert compose_check.main([str(write(tmp_path, text))]) == 1
    assert needle in capsys.readouterr().out


@pytest.mark.skipif(real_compose() is None, reason="no Compose (v1 or v2) on PATH")
@pytest.mark.parametrize("case", ["unknown key", "undefined service", "missing env file"])
def test_broken_files_fail_with_the_real_compose(case, tmp_path, capsys):
    text, _ = BROKEN[case]
    assert compose_check.main([str(write(tmp_path, text)), "--profile", "p"]) == 1
    assert "profile p: FAILED" in capsys.readouterr().out


def test_good_file_passes_in_python(tmp_path):
    assert compose_check.python_check(write(tmp_path, GOOD), {"PORT": "9000"}) == []


@pytest.fixture
def user_env(tmp_path) -> Path:
    env = tmp_path / "my.env"
    env.write_text(
        "COST_WEIGHT=-0.5\nPORT=9000\nHOST=127.0.0.1\nDATA_DIR=./data\nOPENROUTER_API_KEY=sk-or-x\n"
    )
    return env


def test_the_whole_env_file_reaches_the_gateway_and_the_port_follows_port(user_env, monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    path = ROOT / "docker-compose.yml"
    env = {**compose_check.environment(path), "GATEWAY_ENV_FILE": str(user_env), "PORT": "9000"}
    doc, errors = compose_check.render(path, env)
    assert errors == []
    for name in GATEWAYS:
        svc = doc["services"][name]
        environment = svc["environment"]
        assert environment["COST_WEIGHT"] == "-0.5"  # any knob of .env, not a fixed list
        assert environment["OPENROUTER_API_KEY"] == "sk-or-x"
        if name == "gateway-prod":  # replicas: no host port; lb publishes PORT and finds them on 8080
            assert environment["PORT"] == "8080" and "ports" not in svc
            assert doc["services"]["lb"]["ports"] == ["9000:8080"]
        else:
            assert environment["PORT"] == "9000" and svc["ports"] == ["9000:9000"]
        # what wires the gateway to this file's services wins over .env
        assert environment["HOST"] == "0.0.0.0" and environment["DATA_DIR"] == "/data"
        assert "@postgres:5432/" in environment["DATABASE_URL"]


@pytest.mark.skipif(real_compose() is None, reason="no Compose (v1 or v2) on PATH")
def test_the_real_compose_agrees(user_env):
    compose = real_compose()
    assert compose is not None
    out = subprocess.run(
        [*compose, "-f", str(ROOT / "docker-compose.yml"), "--profile", "dev", "config"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "GATEWAY_ENV_FILE": str(user_env), "PORT": "9000"},
    ).stdout
    svc = yaml.safe_load(out)["services"]["gateway-dev"]
    assert svc["environment"]["COST_WEIGHT"] == "-0.5" and svc["environment"]["HOST"] == "0.0.0.0"
    assert [str(p["published"]) for p in svc["ports"]] == ["9000"] and svc["ports"][0]["target"] == 9000


def test_ci_installs_no_compose():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in commands if "install" in line and "docker-compose" in line]
    assert "compose_check.py" in (ROOT / "Makefile").read_text()


def test_which_compose(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("COMPOSE_CMD", raising=False)
    assert compose_check.find_compose() is None
    fake_v1 = bin_dir / "docker-compose"
    fake_v1.write_text("#!/bin/sh\nexit 0\n")
    fake_v1.chmod(0o755)
    assert compose_check.find_compose() == ["docker-compose"]
    docker = bin_dir / "docker"
    docker.write_text('#!/bin/sh\n[ "$1" = compose ] && exit 0\nexit 1\n')
    docker.chmod(0o755)
    assert compose_check.find_compose() == ["docker", "compose"]
    monkeypatch.setenv("COMPOSE_CMD", "none")
    assert compose_check.find_compose() is None
    assert shutil.which("docker-compose") == str(fake_v1)
