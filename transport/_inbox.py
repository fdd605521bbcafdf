"""The bounded queue between an endpoint's reader and its ``recv`` callers.

Like ``asyncio.Queue`` with a fixed capacity, minus its per-call costs: ``get`` with a
timeout waits on one future, where ``asyncio.wait_for``/``asyncio.wait`` over
``Queue.get`` create a task and several callbacks per call (together with the reader in
``_endpoint`` this took a small message round trip from ~330 to ~150 us of CPU here).
When the queue is full the reader waits in :meth:`Inbox.put`, which stops it taking
from the wire: that is the back-pressure.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded FIFO for one event loop; :meth:`close` wakes every waiter.

    Args:
        maxsize: items held before :meth:`put` waits.
        closed_error: makes what waiters raise once the inbox is closed.
    """

    def __init__(self, maxsize: int, closed_error: Callable[[], Exception]) -> None:
        self._max = maxsize
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putter: asyncio.Future[None] | None = None
        self._closed_error = closed_error
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        """True when :meth:`put` would wait."""
        return len(self._items) >= self._max

    async def put(self, item: T) -> bool:
        """Append ``item``, waiting while full. Returns False (item dropped) once closed."""
        while len(self._items) >= self._max and not self._closed:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if self._closed:
            return False
        self._items.append(item)
        self._wake_getter()
        return True

    async def get(self, timeout: float | None = None) -> T:
        """The oldest item, waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: nothing arrived in time.
            Exception: ``closed_error()`` once the inbox is closed and empty.
        """
        while True:
            if self._items:
                item = self._items.popleft()
                self._wake_putter()
                return item
            if self._closed:
                raise self._closed_error()
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._getters.append(fut)
            timer = loop.call_later(timeout, _expire, fut, timeout) if timeout is not None else None
            try:
                await fut
            except BaseException:
                if fut in self._getters:
                    self._getters.remove(fut)
                elif self._items:
                    self._wake_getter()  # we were woken for an item we will not take
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def close(self) -> None:
        """Wake every waiter: getters raise ``closed_error()``, a waiting put drops its item."""
        self._closed = True
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_exception(self._closed_error())
        self._wake_putter()

    def _wake_getter(self) -> None:
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_putter(self) -> None:
        if self._putter is not None and not self._putter.done():
            self._putter.set_result(None)
        self._putter = None


def _expire(fut: asyncio.Future[None], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no message within {timeout}s"))
