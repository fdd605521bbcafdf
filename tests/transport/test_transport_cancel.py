"""Telling "this task was cancelled" from "the future it awaited was cancelled", on 3.10 too.

``Task.cancelling()`` arrived in Python 3.11; the endpoint must not need it. Each test
runs twice: with the loop's own tasks, and with tasks that lack ``cancelling`` as on 3.10.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from p2ptrain._errors import TransportError
from p2ptrain.transport import Endpoint
from p2ptrain.transport._base import FutureCancelled, wait_owned

from conftest import until

T = 10.0


class _Py310Task(asyncio.Task):  # type: ignore[type-arg]
    """A task as p2ptrain sees it on Python 3.10: no ``cancelling()``.

    asyncio 3.11 itself (task repr, ``asyncio.timeout``) and pytest-asyncio still call
    it, so only calls from p2ptrain's own modules fail.
    """

    def cancelling(self) -> int:
        if sys._getframe(1).f_globals.get("__name__", "").startswith("p2ptrain."):
            raise AttributeError("'_asyncio.Task' object has no attribute 'cancelling' (Python 3.10)")
        return super().cancelling()


def _py310_factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any) -> asyncio.Task[Any]:
    return _Py310Task(coro, loop=loop, **kw)


@pytest.fixture(params=["native", "py310"])
async def tasks(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()
    if request.param == "py310":
        loop.set_task_factory(_py310_factory)
    yield request.param
    loop.set_task_factory(old)


async def test_the_owner_cancelling_the_future_is_not_a_cancellation_of_the_task(tasks: str) -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_owned(fut))
    await asyncio.sleep(0)
    fut.cancel()  # what a closing DEALER does to a send still waiting for room
    with pytest.raises(FutureCancelled):
        await asyncio.wait_for(waiting, T)


async def test_cancelling_the_task_cancels_the_future_and_stays_a_cancellation(tasks: str) -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_owned(fut))
    await asyncio.sleep(0)
    waiting.cancel()
    fut.cancel()  # both at once: the task's own cancellation wins
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert fut.cancelled()


async def test_a_result_and_a_timeout_behave_like_wait_for(tasks: str) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    loop.call_soon(fut.set_result, 7)
    assert await asyncio.create_task(wait_owned(fut, T)) == 7
    slow: asyncio.Future[int] = loop.create_future()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.create_task(wait_owned(slow, 0.01))
    assert slow.cancelled()


async def _stuck_send(a: Endpoint, dead: str) -> asyncio.Task[None]:
    """A send to ``dead`` (nobody listens there) waiting for room in its full queue."""
    a.add_peer("b", dead)
    for _ in range(100):
        if not a.try_send("b", "fill"):
            break
    sending = asyncio.create_task(a.send("b", "stuck", timeout=T))
    dealer = a._dealers.get("b") if a._dealers is not None else None
    assert dealer is not None
    await until(lambda: len(dealer.queue) == 1, T, "the send to wait for room")
    return sending


@pytest.fixture
async def dead_address() -> str:
    async with Endpoint("gone", "t") as gone:
        return gone.address


async def test_removing_a_peer_fails_the_send_waiting_on_it(tasks: str, dead_address: str) -> None:
    async with Endpoint("a", "t", send_hwm=1) as a:
        sending = await _stuck_send(a, dead_address)
        a.remove_peer("b")
        with pytest.raises(TransportError, match="removed while sending"):
            await asyncio.wait_for(sending, T)


async def test_cancelling_a_send_while_its_peer_is_removed_is_a_cancellation(tasks: str, dead_address: str) -> None:
    async with Endpoint("a", "t", send_hwm=1) as a:
        sending = await _stuck_send(a, dead_address)
        sending.cancel()
        a.remove_peer("b")
        with pytest.raises(asyncio.CancelledError):
            await sending
