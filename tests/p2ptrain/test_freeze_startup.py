"""A member process keeps what its start-up left alive out of the garbage collector's full passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import p2ptrain.train
from p2ptrain.cli import _join
from p2ptrain.train import freeze_startup


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    """Give the test process its objects back to the collector afterwards."""
    yield
    gc.unfreeze()


def _tracked(obj: Any) -> bool:
    """Whether a full collection walks ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.usefixtures("thawed")
def test_garbage_is_freed_first_and_the_living_leave_the_full_passes() -> None:
    dead = _Cycle()
    gone = weakref.ref(dead)
    del dead
    alive = _Cycle()
    before = len(gc.get_objects())

    freeze_startup()

    assert gone() is None, "cyclic garbage from start-up must be collected, not frozen for good"
    assert gc.get_freeze_count() > 0
    assert not _tracked(alive)
    # A full pass now walks what was made since, not the imports (torch's alone are ~100k objects).
    assert len(gc.get_objects()) < before / 10
    made_later = _Cycle()
    assert _tracked(made_later)
    later = weakref.ref(made_later)
    del made_later
    gc.collect()
    assert later() is None, "a job's cyclic garbage is still collected after the freeze"


async def test_join_settles_after_its_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    class Service:
        async def warm_up(self) -> None:
            order.append("warm_up")

    monkeypatch.setattr(p2ptrain.train, "freeze_startup", lambda: order.append("freeze"))
    await _join.settle(Service())
    assert order == ["warm_up", "freeze"]


async def test_train_and_demo_settle_without_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(p2ptrain.train, "warm_process", lambda: order.append("warm_process"))
    monkeypatch.setattr(p2ptrain.train, "freeze_startup", lambda: order.append("freeze"))
    await _join.settle()
    assert order == ["warm_process", "freeze"]
