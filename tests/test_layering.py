"""The package's dependencies point one way (read from the source, every import statement, lazy ones included):

    shapes <- models <- ops (+ kernels) <- distributed <- train, interop, schedule <- cli

``ops`` and ``distributed`` never import ``train``, ``interop`` or ``cli``; ``ops`` never imports
``torch.distributed``, DeepSpeed or megatron; only ``cli.py`` builds argparse; no import cycle between modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "growth_ds"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every module named by an import statement of ``path`` (absolute names; relative ones resolved)."""
    me = _module(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # (``from pkg import module``)
    return out


MODULES = {_module(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer,forbidden", [
    ("growth_ds.shapes", ("growth_ds.models", "growth_ds.ops", "growth_ds.distributed", "growth_ds.train",
                          "growth_ds.interop", "growth_ds.cli", "growth_ds.schedule")),
    ("growth_ds.models", ("growth_ds.ops", "growth_ds.distributed", "growth_ds.train", "growth_ds.interop",
                          "growth_ds.cli")),
    ("growth_ds.ops", ("growth_ds.distributed", "growth_ds.train", "growth_ds.interop", "growth_ds.cli")),
    ("growth_ds.distributed", ("growth_ds.train", "growth_ds.interop", "growth_ds.cli", "growth_ds.demo")),
    ("growth_ds.train", ("growth_ds.cli",)),
    ("growth_ds.interop", ("growth_ds.cli",)),
])
def test_lower_layers_import_nothing_above_them(layer, forbidden):
    bad = sorted(f"{m} -> {i}" for m in MODULES if _under(m, layer) for i in GRAPH[m] if _under(i, *forbidden))
    assert not bad, bad


def test_ops_imports_no_communication_library():
    bad = sorted(f"{m} -> {i}" for m in MODULES if _under(m, "growth_ds.ops")
                 for i in _imports(MODULES[m]) if _under(i, "torch.distributed", "deepspeed", "megatron"))
    assert not bad, bad


def test_only_the_command_line_builds_argparse():
    users = sorted(m for m, p in MODULES.items() if "argparse" in _imports(p))
    assert users == ["growth_ds.cli"], users


def test_no_import_cycle():
    """Depth-first search over the module graph; a back edge is a cycle (printed as the path)."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if _under(m, n) and MODULES[n].name == "__init__.py":
                continue  # a module importing its own package's __init__ is the package, not a cycle
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert not cycles, cycles
