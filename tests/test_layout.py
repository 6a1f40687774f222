"""The house's layout rules: no import cycle inside `gateway/` (imports under TYPE_CHECKING and
inside functions included), no module past 400 lines, and the core never imports the lab."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, anywhere in it, and the packages those run first."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                name = ".".join(parts[:i])
                if name in known and name != this and not this.startswith(name + "."):
                    found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == white and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle_in_gateway():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_core_never_imports_the_lab():
    graph = import_graph()
    # the command line (gateway.cli and its gateway.cli_* parts) is the front door to both
    core = [m for m in graph if not m.startswith(("gateway.lab", "gateway.cli"))]
    offenders = {m: sorted(d for d in graph[m] if d.startswith("gateway.lab")) for m in core}
    assert not {m: d for m, d in offenders.items() if d}


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT.parent)} has {lines} lines (at most 400)"


# Revisions that have shipped on main, with their parents: a database stamped with one of them
# counts every ancestor as applied, so a migration inserted below it would never run there.
PUBLISHED = {"0001": None, "0002": "0001", "0003_i15_tenancy": "0002", "0005_i18_trace": "0003_i15_tenancy"}


def test_published_migrations_keep_their_parents_and_new_ones_chain_after_them():
    import re

    found: dict[str, str | None] = {}
    for path in (ROOT.parent / "migrations" / "versions").glob("*.py"):
        text = path.read_text()
        rev = re.search(r'^revision: str = "([^"]+)"', text, re.M)
        down = re.search(r'^down_revision: str \| None = (?:"([^"]+)"|None)', text, re.M)
        assert rev and down, path
        found[rev.group(1)] = down.group(1)
    for rev, parent in PUBLISHED.items():
        assert found.get(rev, "missing") == parent, f"{rev} must keep its parent {parent}"
    children = [r for r, p in found.items() if p is not None]
    assert len(set(found.values()) - {None}) == len(children), "the chain must not branch"
