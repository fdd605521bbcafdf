"""Static checks, run by the test command: ruff, mypy, and Python 3.10 compatibility.

mypy reads the package as it is installed (``p2ptrain.kernels`` lives in ``kernels/``
and so on, mapped by setuptools' ``package-dir``). It cannot follow the editable
install's import hook, so the check builds a link tree with the installed layout in a
temporary folder and runs ``mypy -p p2ptrain`` there with the project's configuration.

This machine has only Python 3.11, so 3.10 support (``requires-python >= 3.10``, what
JetPack 6 ships) is checked statically with vermin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Installed layout: package name -> source folder.
LAYOUT = {"kernels": REPO / "kernels", "transport": REPO / "transport", "discovery": REPO / "discovery"}
SOURCES = ["p2ptrain", "kernels", "transport", "discovery", "examples"]


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: install the test extra, pip install -e '.[test]'")
    return str(path)


def test_ruff_is_clean() -> None:
    out = _run([_tool("ruff"), "check", "--no-cache", *SOURCES, "tests"], REPO, 120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(600)
def test_mypy_is_clean(tmp_path: Path) -> None:
    tree = tmp_path / "p2ptrain"
    tree.mkdir()
    for entry in (REPO / "p2ptrain").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, tree / entry.name)
    for name, source in LAYOUT.items():
        os.symlink(source, tree / name)
    os.symlink(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    cache = REPO / ".mypy_cache"  # ignored by git; a warm cache makes reruns take seconds
    out = _run([_tool("mypy"), "-p", "p2ptrain", "--cache-dir", str(cache)], tmp_path, 580)
    assert out.returncode == 0, out.stdout + out.stderr


def test_code_runs_on_python_310() -> None:
    argv = [_tool("vermin"), "--target=3.10-", "--no-tips", "--violations", "--eval-annotations", *SOURCES, "tests"]
    out = _run(argv, REPO, 120)
    assert out.returncode == 0, out.stdout + out.stderr
