"""Each package's ``__all__`` is exactly its public surface (no private leaks, no stale names)."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = [
    "p2ptrain",
    "p2ptrain.kernels",
    "p2ptrain.transport",
    "p2ptrain.discovery",
    "p2ptrain.energy",
    "p2ptrain.ring",
    "p2ptrain.zoo",
    "p2ptrain.plan",
    "p2ptrain.train",
    "p2ptrain.train.pipeline",
    "p2ptrain.testbed",
    "p2ptrain.bench",
    "p2ptrain.dashboard",
    "p2ptrain.cli",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_the_public_surface(name: str) -> None:
    mod = importlib.import_module(name)
    # dir(), not vars(): p2ptrain's names are lazy (PEP 562) and absent until first use
    names = [k for k in dir(mod) if not k.startswith("_") and k != "annotations"]
    public = {k for k in names if not isinstance(getattr(mod, k), types.ModuleType)}
    assert set(mod.__all__) - {"__version__"} == public
    for k in mod.__all__:
        assert hasattr(mod, k), k
