"""``gather_within``: several waits at once, nothing left running or unretrieved."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from p2ptrain.ring import gather_within


async def _collecting(body: Any) -> list[Any]:
    """Run ``body()`` and return what asyncio's exception handler was given meanwhile."""
    errors: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("message")))
    try:
        await body()
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    return errors


async def test_all_finish_in_time() -> None:
    done: list[int] = []

    async def one(i: int) -> None:
        await asyncio.sleep(0.01 * i)
        done.append(i)

    assert await gather_within((one(i) for i in range(3)), 5) is True
    assert sorted(done) == [0, 1, 2]
    assert await gather_within([], 0) is True


async def test_a_timeout_returns_false_and_cancels_the_rest() -> None:
    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def body() -> None:
        assert await gather_within([forever(), asyncio.sleep(0)], 0.05) is False
        await asyncio.sleep(0)

    assert await _collecting(body) == []
    assert cancelled == [True]


async def test_the_first_error_ends_the_wait_and_is_raised() -> None:
    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("no answer")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ValueError, match="no answer"):
            await gather_within([fails(), asyncio.sleep(3600)], 30)
        assert loop.time() - t0 < 5  # it did not wait out the slow one

    assert await _collecting(body) == []


async def test_cancelled_from_outside_leaves_nothing_behind() -> None:
    # What asyncio.wait_for(gather(...)) did when the host's own timeout cancelled it.
    async def body() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gather_within([asyncio.sleep(3600), asyncio.sleep(3600)], 30), 0.05)
        await asyncio.sleep(0)

    assert await _collecting(body) == []
