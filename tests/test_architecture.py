"""The import contract: layers point one way, no cycles, no private names across packages.

Layers, bottom first (DESIGN.md)::

    kernels -> transport -> ring <- discovery
    ring -> zoo -> plan -> train        testbed (beside train, uses only the error tree)
    energy: a leaf beside discovery (sysfs and the error tree only; every layer above may use it)
    bench, dashboard above train; cli on top (its commands serve the dashboard)

``p2ptrain._errors`` and ``p2ptrain._units`` are the shared root every layer may use.
The check walks every ``import`` statement in the source (also those inside functions
and under ``TYPE_CHECKING``: an upward import is wrong wherever it hides).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent

# Where each installed package's source lies (pyproject maps the top-level folders).
SOURCES = {
    "p2ptrain": REPO / "p2ptrain",
    "p2ptrain.kernels": REPO / "kernels",
    "p2ptrain.transport": REPO / "transport",
    "p2ptrain.discovery": REPO / "discovery",
}

# layer -> its rank; a module may import only from layers of a lower rank, or its own.
# Layers of the same rank are siblings and must not import each other.
LAYERS: dict[str, int] = {
    "root": 0,  # p2ptrain/__init__ (lazy, so it names upper layers only as strings), _errors, _units
    "kernels": 1,
    "discovery": 1,
    "energy": 1,  # meters and power profiles: a leaf like discovery, usable by plan/train/testbed/cli
    "transport": 2,
    "ring": 3,
    "zoo": 4,
    "plan": 5,
    "train": 6,
    "testbed": 6,
    "bench": 7,
    "dashboard": 7,  # the live page: reads the job service's metrics; the commands start it
    "cli": 8,
}
# Lower layers may know only some of what lies below them.
FORBIDDEN: dict[str, set[str]] = {
    "discovery": {"kernels", "transport", "torch"},  # discovery knows no tensors
    "energy": {"kernels", "transport", "discovery", "ring", "zoo", "plan", "train", "testbed", "torch", "numpy"},
    "testbed": {"kernels", "transport", "discovery", "ring", "zoo", "plan", "train", "torch"},
}


class Edge(NamedTuple):
    source: str  # importing module, dotted
    target: str  # imported module, dotted (the module part of ``from X import y``)
    names: tuple[str, ...]
    lineno: int
    top_level: bool  # executed on import (not inside a function)
    type_only: bool  # under ``if TYPE_CHECKING:`` (never executed)


def module_files(sources: dict[str, Path] = SOURCES) -> Iterator[tuple[str, Path]]:
    for pkg, root in sources.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path


def edges_of(name: str, path: Path) -> Iterator[Edge]:
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        top = id(node) not in in_function
        typed = id(node) in type_only
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(name, alias.name, (), node.lineno, top, typed)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield Edge(name, target, tuple(a.name for a in node.names), node.lineno, top, typed)


def layer_of(module: str) -> str | None:
    """The layer a dotted module belongs to, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] != "p2ptrain":
        return parts[0] if parts[0] in ("torch", "numpy") else None
    if len(parts) == 1 or parts[1] in ("_errors", "_units", "__main__"):
        return "cli" if parts[1:2] == ["__main__"] else "root"
    return parts[1] if parts[1] in LAYERS else None


def violations(edges: Iterable[Edge]) -> list[str]:
    """Every broken rule, as a readable line; empty when the contract holds."""
    out = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is None or dst is None:
            continue
        where = f"{e.source}:{e.lineno} imports {e.target}"
        if dst in FORBIDDEN.get(src, ()):
            out.append(f"{where}: {src} must not import {dst}")
            continue
        if dst in ("torch", "numpy") or src == dst:
            continue
        if src == "root" and e.type_only:
            continue  # the lazy public API names upper layers for type checkers only
        if LAYERS[dst] >= LAYERS[src] and not (src == "root" and e.target.startswith("p2ptrain._")):
            out.append(f"{where}: layer {src} may not import {dst} (same or higher layer)")
            continue
        # Across packages only public names: p2ptrain.ring, not p2ptrain.ring._node.
        tail = e.target.split(".")[2:] if dst != "root" else []
        private = [p for p in tail if p.startswith("_")] + [n for n in e.names if n.startswith("_")]
        if private:
            out.append(f"{where}: private {'.'.join(private)} of {dst} used from {src}")
    return out


def cycles(edges: Iterable[Edge], modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module among import-time edges."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if not e.top_level or e.type_only:  # type-only edges never run; mypy resolves those
            continue
        targets = [e.target] + [f"{e.target}.{n}" for n in e.names]
        for t in targets:
            if t in modules and t != e.source:
                graph[e.source].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_upward_or_private_import() -> None:
    edges = [e for name, path in module_files() for e in edges_of(name, path)]
    assert violations(edges) == []


def test_no_import_cycle() -> None:
    files = dict(module_files())
    edges = [e for name, path in files.items() for e in edges_of(name, path)]
    # A package __init__ re-exporting its submodules is not a cycle of the design, so
    # only edges between modules (not package -> own child) count.
    edges = [e for e in edges if not (e.target.startswith(e.source + ".") and files[e.source].name == "__init__.py")]
    assert cycles(edges, set(files)) == []


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(REPO)): n for _, p in module_files() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_the_contract_catches_a_lower_layer_importing_an_upper_one(tmp_path: Path) -> None:
    """The checker is not vacuous: a planted upward import, private import and cycle are reported."""
    root = tmp_path / "p2ptrain"
    (root / "ring").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "__init__.py").write_text("")
    (root / "ring" / "__init__.py").write_text("from p2ptrain.ring._node import Node\n")
    (root / "ring" / "_node.py").write_text("from p2ptrain.train import JobService\nclass Node: ...\n")
    (root / "train" / "__init__.py").write_text("from p2ptrain.train._jobs import JobService\n")
    (root / "train" / "_jobs.py").write_text(
        textwrap.dedent(
            """
            from p2ptrain.ring._node import Node
            from p2ptrain.train import _helper
            class JobService: ...
            """
        )
    )
    (root / "train" / "_helper.py").write_text("from p2ptrain.train._jobs import JobService\n")
    files = dict(module_files({"p2ptrain": root}))
    edges = [e for name, path in files.items() for e in edges_of(name, path)]
    found = violations(edges)
    assert any("layer ring may not import train" in v for v in found), found
    assert any("private _node of ring used from train" in v for v in found), found
    assert cycles(edges, set(files)), "the _jobs <-> _helper cycle went unseen"


# package -> heavy modules it may load. The transport carries tensors as raw frames and
# validates their dtypes, so it knows torch (through kernels) by design; never the ring.
LIGHT = {
    "p2ptrain": set(),
    "p2ptrain.discovery": set(),
    "p2ptrain.energy": set(),
    "p2ptrain.testbed": set(),
    "p2ptrain.transport": {"torch", "zmq.asyncio"},
}


@pytest.mark.parametrize("package", sorted(LIGHT))
def test_light_packages_do_not_load_the_node(package: str) -> None:
    """Robot software that only browses mDNS pays for neither torch nor the ring."""
    code = (
        f"import sys, {package}\n"
        "heavy = sorted(m for m in ('torch', 'p2ptrain.ring', 'zmq.asyncio') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(filter(None, out.stdout.strip().split(",")))
    assert loaded <= LIGHT[package], f"import {package} loaded {sorted(loaded)}"


def test_subpackages_are_attributes_of_a_bare_import_and_load_on_first_use() -> None:
    # The README's `p2ptrain.train.freeze_startup()` after `import p2ptrain` raised
    # AttributeError (a walkthrough); a light subpackage still loads no torch.
    code = (
        "import sys, p2ptrain\n"
        "assert 'p2ptrain.discovery' not in sys.modules and 'torch' not in sys.modules\n"
        "p2ptrain.discovery.PeerRecord\n"
        "assert 'torch' not in sys.modules, 'p2ptrain.discovery loaded torch'\n"
        "print(p2ptrain.train.freeze_startup.__name__, 'discovery' in dir(p2ptrain))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["freeze_startup", "True"], out.stdout + out.stderr
