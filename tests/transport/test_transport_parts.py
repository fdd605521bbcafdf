"""Small parts of the wire on their own: the receive-buffer pool, the inbox, the counters."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import torch

from p2ptrain._errors import TransportError
from p2ptrain.kernels import get_codec
from p2ptrain.transport._bufpool import BufferPool
from p2ptrain.transport._inbox import Inbox
from p2ptrain.transport._stats import OTHER_PEERS, StatsBook

MiB = 1 << 20


def test_pool_recycles_a_block_once_every_tensor_over_it_is_gone() -> None:
    pool = BufferPool(max_bytes=8 * MiB)
    lease = pool.take(2 * MiB)
    view = lease.data.cast("B")
    del lease
    t = get_codec("none").decode({}, [view[: 4 * 1000]], (1000,), torch.float32)  # aliases the block
    del view
    gc.collect()
    assert pool.idle_bytes == 0  # the tensor still holds the block
    part = t[10:20]
    del t
    assert pool.idle_bytes == 0  # a view of the tensor holds it too
    del part
    assert pool.idle_bytes == 2 * MiB
    again = pool.take(2 * MiB - 5)  # rounds to the same size class: a hit
    assert pool.hits == 1 and again.nbytes == 2 * MiB - 5


def test_pool_is_bounded_and_small_blocks_bypass_it() -> None:
    pool = BufferPool(max_bytes=3 * MiB)
    leases = [pool.take(2 * MiB) for _ in range(3)]
    del leases
    assert pool.idle_bytes == 2 * MiB  # only one fits under the cap
    small = pool.take(1000)
    del small
    assert pool.idle_bytes == 2 * MiB
    pool.clear()
    assert pool.idle_bytes == 0


async def test_inbox_order_timeout_back_pressure_and_close() -> None:
    inbox: Inbox[int] = Inbox(2, lambda: TransportError("closed"))
    await inbox.put(1)
    await inbox.put(2)
    assert inbox.full()
    blocked = asyncio.ensure_future(inbox.put(3))
    await asyncio.sleep(0)
    assert not blocked.done()  # waits for room: back-pressure
    assert await inbox.get() == 1
    await asyncio.wait_for(blocked, 1.0)
    assert [await inbox.get(), await inbox.get()] == [2, 3]
    with pytest.raises(TimeoutError):
        await inbox.get(timeout=0.01)
    waiter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.close()
    with pytest.raises(TransportError, match="closed"):
        await waiter
    assert not await inbox.put(4)  # dropped once closed


async def test_inbox_hands_an_item_on_when_its_waiter_is_cancelled() -> None:
    inbox: Inbox[str] = Inbox(4, lambda: TransportError("closed"))
    first = asyncio.ensure_future(inbox.get())
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    await inbox.put("x")
    first.cancel()  # woken for "x" but cancelled before it could take it
    assert await asyncio.wait_for(second, 1.0) == "x"


def test_stats_are_bounded_and_logs_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    book = StatsBook(logging.getLogger("test.stats"), max_peers=3, log_interval=60.0)
    for i in range(10):
        book.drop(f"peer{i}", "bad_msgpack")
    assert len(book.snapshot()) == 3 + 1 and book.drops(OTHER_PEERS) == {"bad_msgpack": 7}  # 3 peers + the rest
    assert book.drops() == {"bad_msgpack": 10}
    for _ in range(5):
        book.drop("peer0", "wrong_cluster", "detail")
    assert sum("wrong_cluster" in r.getMessage() for r in caplog.records) == 1
    book.sent("peer0", 10)
    book.received("peer0", 20)
    st = book.snapshot()["peer0"]
    assert (st.sent, st.sent_bytes, st.received, st.received_bytes) == (1, 10, 1, 20)
