"""A good guest on a host's event loop: no coroutine of the runtime copies, packs or hashes
a model-sized state itself (DESIGN.md: tensor work runs off the loop).

On a 0.25-core member, 250 ms of CPU on the loop is a second of silence for the host's own
tasks and for heartbeats: the 15 M-parameter bench logged stalls of 1.06 s and 1.43 s when
a received replica was turned into ``bytes`` inside the coroutine that took it. Such calls
belong in a function handed to an executor (a lambda or a nested def is fine: it runs
where it is sent).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The embeddable runtime. The CLI and the benches own their process and their loop.
ROOTS = ["transport", "kernels", "p2ptrain/ring", "p2ptrain/plan", "p2ptrain/train", "p2ptrain/dashboard"]

# Calls whose cost grows with the model: whole-state copies, (de)serialisation, hashing.
MODEL_SIZED = {"tobytes", "deepcopy", "pack_units", "pack_units_tensor", "unpack_units", "unpack_units_tensor",
               "write_blob", "read_blob", "param_digest", "st_save", "st_load", "save_file", "load_file"}


def _called_in_body(fn: ast.AsyncFunctionDef) -> list[tuple[str, int]]:
    """Names of MODEL_SIZED calls made by ``fn`` itself (not by the functions it defines)."""
    found: list[tuple[str, int]] = []
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # handed elsewhere (an executor) or checked on its own
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in MODEL_SIZED:
                found.append((name, node.lineno))
        todo.extend(ast.iter_child_nodes(node))
    return found


def loop_work(source: str, where: str) -> list[str]:
    out = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.AsyncFunctionDef):
            out += [f"{where}:{line} {fn.name}() calls {name}() on the event loop" for name, line in _called_in_body(fn)]
    return out


def test_no_coroutine_does_model_sized_work_itself() -> None:
    found = [v for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))
             for v in loop_work(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []


def test_the_check_sees_a_copy_in_a_coroutine_and_not_one_sent_to_an_executor() -> None:
    planted = (
        "async def take(msg, loop):\n"
        "    blob = msg.tensors[0].numpy().tobytes()\n"
        "    return await loop.run_in_executor(None, lambda: unpack_units(msg.tensors[0].numpy().tobytes()))\n"
    )
    assert loop_work(planted, "x.py") == ["x.py:2 take() calls tobytes() on the event loop"]
