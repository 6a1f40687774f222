"""Validates a compose file with no Docker engine, whichever Compose is installed: v2, v1, or none.

    python scripts/compose_check.py [FILE] [--profile P ...] [--env KEY=VALUE ...]

FILE defaults to docker-compose.yml; the profiles to every profile the file names; `--env` adds
variables to the environment the file is rendered with (the shell's and `.env` beside the file are
read as Compose reads them). COMPOSE_CMD=none skips layer 1; COMPOSE_CMD="docker compose" forces a
Compose. Exit status 1 when a layer that ran found a problem.

1. A real Compose, when one is on PATH (`docker compose` v2, else `docker-compose`, v1 or v2):
   `config -q` per profile: its own interpolation, merge keys, profiles, references, env files.
2. The compose specification's JSON schema (`check-jsonschema --builtin-schema vendor.compose-spec`)
   on the file as written: structure, unknown keys, types.
3. Python: the file rendered as Compose would (interpolation: ${V} ${V:-d} ${V-d} ${V:?e} ${V?e}
   ${V:+a} ${V+a} $V $$; env files read and merged under `environment`), the same schema on the
   result, and what the schema cannot see: interpolation syntax, required variables, references
   between services, port mappings and integers after interpolation. This layer always runs; with
   no Compose installed it is the check.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from dotenv import dotenv_values

VAR = re.compile(r"\$(?:(?P<esc>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^}]*)\}|(?P<bad>\{|))")
BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)
PORT = re.compile(r"^(?:(?:\[?[0-9a-fA-F.:]+\]?:)?(?:\d+(?:-\d+)?)?:)?\d+(?:-\d+)?(?:/(?:tcp|udp|sctp))?$")


def environment(path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What Compose interpolates with: `.env` beside the file, the shell over it, then `extra`."""
    env: dict[str, str] = {}
    dotenv = path.parent / ".env"
    if dotenv.is_file():
        env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ)
    env.update(extra or {})
    return env


class Renderer:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def text(self, s: str, where: str) -> str:
        env = self.env

        def one(m: re.Match[str]) -> str:
            if m["esc"]:
                return "$"
            if m["bare"]:
                return env.get(m["bare"], "")
            braced = BRACED.match(m["braced"]) if m["braced"] is not None else None
            if braced is None:
                raise ValueError(f"{where}: invalid interpolation format in {s!r}")
            name, op, arg = braced["name"], braced["op"], self.text(braced["arg"] or "", where)
            value, is_set = env.get(name), name in env
            if op == ":-":
                return value or arg
            if op == "-":
                return value if is_set and value is not None else arg
            if op in (":?", "?") and not (value if op == ":?" else is_set):
                raise ValueError(f"{where}: required variable {name} is missing: {arg}")
            if op == ":+":
                return arg if value else ""
            if op == "+":
                return arg if is_set else ""
            return value or ""

        return VAR.sub(one, s)

    def walk(self, node: Any, where: str = "$") -> Any:
        if isinstance(node, dict):
            return {k: self.walk(v, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [self.walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            try:
                return self.text(node, where)
            except ValueError as exc:
                self.errors.append(str(exc))
        return node


def _env_files(value: Any) -> list[tuple[str, bool]]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append((str(item.get("path")), bool(item.get("required", True))))
        else:
            out.append((str(item), True))
    return out


def _as_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in value or []:
        key, sep, val = str(item).partition("=")
        out[key] = val if sep else None
    return out


def render(path: Path, env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The file as Compose renders it (each service's env files merged under its `environment`,
    which wins; a variable listed without a value takes the shell's, else the env file's), and the
    problems found on the way."""
    raw = yaml.safe_load(path.read_text())  # PyYAML resolves anchors and `<<` merge keys
    renderer = Renderer(env)
    doc = renderer.walk({k: v for k, v in raw.items() if not str(k).startswith("x-")})
    errors = renderer.errors
    for name, svc in (doc.get("services") or {}).items():
        if "env_file" not in svc:
            continue
        merged: dict[str, Any] = {}
        for file, required in _env_files(svc["env_file"]):
            env_path = (path.parent / file).resolve()
            if env_path.is_file():
                merged.update({k: v or "" for k, v in dotenv_values(env_path).items()})
            elif required:
                errors.append(f"services.{name}.env_file: {file} does not exist")
        for key, value in _as_mapping(svc.get("environment")).items():
            if value is not None:
                merged[key] = value
            elif key in os.environ:
                merged[key] = os.environ[key]
        svc["environment"] = merged
    return doc, errors


def semantic_errors(doc: dict[str, Any]) -> list[str]:
    """What the schema cannot check: references between services, ports and integers."""
    errors = []
    services = doc.get("services") or {}
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            if dep not in services:
                errors.append(f"services.{name}.depends_on: undefined service {dep!r}")
        for i, port in enumerate(svc.get("ports") or []):
            if isinstance(port, str) and not PORT.match(port):
                errors.append(f"services.{name}.ports[{i}]: not a port mapping: {port!r}")
            if isinstance(port, dict):
                for key in ("target", "published"):
                    if key in port and not re.fullmatch(r"\d+(-\d+)?", str(port[key])):
                        errors.append(f"services.{name}.ports[{i}].{key}: not a port: {port[key]!r}")
        integers = {
            "scale": svc.get("scale"),
            "deploy.replicas": (svc.get("deploy") or {}).get("replicas"),
            "healthcheck.retries": (svc.get("healthcheck") or {}).get("retries"),
        }
        for key, value in integers.items():
            if value is not None and not re.fullmatch(r"\d+", str(value)):
                errors.append(f"services.{name}.{key}: not an integer: {value!r}")
    return errors


def python_check(path: Path, env: dict[str, str]) -> list[str]:
    doc, errors = render(path, env)
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.Draft202012Validator(schema)
    errors += [f"rendered {e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + semantic_errors(doc)


def find_compose() -> list[str] | None:
    """`docker compose` (v2) if it answers, else `docker-compose` on PATH (v1 or v2), else None."""
    forced = os.environ.get("COMPOSE_CMD")
    if forced:
        return None if forced == "none" else forced.split()
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def profiles_of(path: Path) -> list[str]:
    services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
    return sorted({p for svc in services.values() for p in (svc.get("profiles") or [])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", nargs="?", default="docker-compose.yml")
    parser.add_argument("--profile", action="append", default=[], help="default: every profile in the file")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    path = Path(args.file)
    extra = dict(item.partition("=")[::2] for item in args.env)
    env = environment(path, extra)
    profiles = args.profile or profiles_of(path)
    status = 0

    compose = find_compose()
    if compose is None:
        print("compose: none found (docker compose, docker-compose): layer 1 skipped")
    else:
        version = subprocess.run([*compose, "version"], capture_output=True, text=True, check=False)
        print(f"compose: {' '.join(compose)} ({(version.stdout or version.stderr).strip().splitlines()[0]})")
        for profile in profiles:
            run = subprocess.run(
                [*compose, "-f", str(path), "--profile", profile, "config", "-q"],
                capture_output=True,
                text=True,
                env={**os.environ, **extra},
                check=False,
            )
            ok = run.returncode == 0
            status |= not ok
            print(f"  profile {profile}: {'ok' if ok else 'FAILED'}")
            for line in [] if ok else (run.stderr or run.stdout).strip().splitlines():
                print(f"    {line}")

    raw = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    status |= raw.returncode != 0
    print(f"schema (compose-spec, as written): {'ok' if raw.returncode == 0 else 'FAILED'}")
    for line in [] if raw.returncode == 0 else (raw.stdout + raw.stderr).strip().splitlines():
        print(f"    {line}")

    errors = python_check(path, env)
    status |= bool(errors)
    print(f"rendered (interpolation, env files, schema, references, ports): {len(errors)} problems")
    for error in errors:
        print(f"    {error}")
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
