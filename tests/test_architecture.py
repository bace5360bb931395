"""The package's shape (issue 16): no import cycle anywhere (function-level imports included),
modules under 400 lines, and the layers below the engine import neither torch nor the manager."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "shardckpt"
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, at any depth of its code (``from . import x``
    counts as importing ``x`` when ``x`` is a module, else the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    # A package's __init__ runs before any of its modules: importing shardckpt.x.y imports
    # shardckpt and shardckpt.x first. Those edges are implied, not written; leave them out.
    return graph


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    cycles = find_cycles(package_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_nothing_below_the_manager_imports_it() -> None:
    graph = package_graph()
    below = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in
             ("format", "storage", "policy", "planning", "engine", "catalog")]
    offenders = {m: "shardckpt.manager" for m in below if "shardckpt.manager" in graph[m]}
    assert offenders == {}


def test_modules_are_small() -> None:
    big = {name: n for name, path in modules().items()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("module", ["shardckpt.format", "shardckpt.storage", "shardckpt.policy",
                                    "shardckpt.catalog", "shardckpt.storage.probe",
                                    "shardckpt.storage.lease"])
def test_lower_layers_never_import_torch(module: str) -> None:
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "", f"{module} imports {out}"


def test_import_shardckpt_is_cheap_until_a_torch_name_is_used() -> None:
    code = ("import sys, shardckpt; before = 'torch' in sys.modules; "
            "shardckpt.CheckpointManager; print(before, 'torch' in sys.modules, "
            "'CheckpointManager' in dir(shardckpt))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_cli_starts_and_lists_without_torch(tmp_path: Path) -> None:
    """``--help``, ``ls``, ``show`` and ``prune`` never import torch (nor fsspec, locally); the
    commands that need tensors import it when they run."""
    import torch

    import shardckpt

    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)}, metrics={"loss": 1.0})
        mgr.save(2, {"w": torch.ones(3)}, metrics={"loss": 0.5})
    script = (
        "import sys, json\n"
        "from shardckpt.cli.main import main\n"
        "code = main(json.loads(sys.argv[1]))\n"
        "print(json.dumps([code, [m for m in ('torch', 'fsspec') if m in sys.modules]]),"
        " file=sys.stderr)\n")
    cases = {"--help": ["--help"], "ls": ["ls", str(root)], "show": ["show", str(root)],
             "prune": ["prune", str(root), "--keep-last", "1", "--dry-run"],
             "verify --help": ["verify", "--help"]}
    for name, argv in cases.items():
        import json

        done = subprocess.run([sys.executable, "-c", script, json.dumps(argv)],
                              capture_output=True, text=True, timeout=120)
        code, loaded = json.loads(done.stderr.strip().splitlines()[-1])
        assert (code, loaded) == (0, []), (name, done.stderr)
