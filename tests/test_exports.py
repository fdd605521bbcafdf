"""Each package's ``__all__`` is exactly its public surface (no private leaks, no stale names)."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ["p2ptrain", "p2ptrain.kernels", "p2ptrain.transport", "p2ptrain.discovery"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_the_public_surface(name: str) -> None:
    mod = importlib.import_module(name)
    public = {
        k
        for k, v in vars(mod).items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType) and k != "annotations"
    }
    assert set(mod.__all__) - {"__version__"} == public
    for k in mod.__all__:
        assert hasattr(mod, k), k
