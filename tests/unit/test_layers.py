"""Imports flow downward (DESIGN, STYLE "What this suggests for shardfs").

Every module under shardfs/ is parsed with ``ast`` (nothing is imported), and
every import, including ones inside functions, is checked against the layer
table.  A new top-level module or package must be given a row here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "shardfs"

ALL = frozenset({"abi", "codec", "virtq", "fs", "dispatch", "proc", "config", "cli",
                 "__main__", "testing", "bench", "__init__", "sandbox", "compat"})
#: layer -> the shardfs layers it may import.  A layer may always import itself.
ALLOWED: dict[str, frozenset[str]] = {
    "abi": frozenset(),
    "codec": frozenset({"abi"}),
    "virtq": frozenset({"abi"}),
    "fs": frozenset({"abi"}),
    "dispatch": frozenset({"abi", "virtq", "fs"}),
    "config": frozenset({"abi"}),
    "sandbox": frozenset({"abi"}),  # Linux calls only; proc applies it
    "compat": frozenset({"abi", "config"}),  # argv -> Config overrides, nothing more
    "proc": ALL - {"testing", "bench"},
    "cli": ALL - {"testing", "bench"},
    "__main__": frozenset({"cli"}),
    "__init__": frozenset(),
    "testing": ALL - {"bench"},  # test doubles sit on top of the daemon
    "bench": ALL,  # the benchmarks drive the daemon through the test doubles
}


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def package_of(path: Path) -> list[str]:
    """The dotted package a module lives in, as parts (for relative imports)."""
    return ["shardfs", *path.relative_to(PKG).parent.parts]


def imported_layers(path: Path) -> set[tuple[str, int]]:
    """(shardfs layer, line) for every import of shardfs code in the module."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        line = 0
        if isinstance(node, ast.Import):
            targets, line = [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.ImportFrom):
            line = node.lineno
            if node.level:
                base = package_of(path)[:len(package_of(path)) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # ``from shardfs import dispatch`` names the layer in the imported names.
            targets = [f"{mod}.{a.name}" for a in node.names] if mod == "shardfs" else [mod]
        for t in targets:
            parts = t.split(".")
            if parts[0] == "shardfs" and len(parts) > 1:
                found.add((parts[1], line))
    return found


def test_every_module_has_a_layer() -> None:
    layers = {layer_of(p) for p in modules()}
    assert layers <= set(ALLOWED), f"give these a row in ALLOWED: {layers - set(ALLOWED)}"
    assert {"abi", "codec", "virtq", "fs", "dispatch", "proc", "testing"} <= layers


def test_the_parser_sees_imports() -> None:
    # Guard the guard: dispatch really does import the three layers below it.
    below = {lay for lay, _ in imported_layers(PKG / "dispatch" / "__init__.py")}
    assert below == {"abi", "virtq", "fs", "dispatch"}
    assert "config" in {lay for lay, _ in imported_layers(PKG / "cli.py")}


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_go_downward(path: Path) -> None:
    layer = layer_of(path)
    allowed = ALLOWED[layer] | {layer}
    bad = sorted((lay, line) for lay, line in imported_layers(path) if lay not in allowed)
    assert not bad, (f"{path.relative_to(PKG.parent)} ({layer}) imports "
                     + ", ".join(f"shardfs.{lay} (line {line})" for lay, line in bad))


@pytest.mark.parametrize("path", [p for p in modules()
                                  if layer_of(p) not in ("testing", "bench")],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_nothing_outside_testing_imports_testing(path: Path) -> None:
    """The daemon never imports its test doubles or its benchmarks."""
    assert not {"testing", "bench"} & {lay for lay, _ in imported_layers(path)}
