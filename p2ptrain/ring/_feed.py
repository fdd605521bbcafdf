"""Telling the host about view changes: futures, an event, queues and callbacks.

:class:`ViewFeed` is the plain fan-out behind :meth:`Node.changed`, :meth:`Node.views`,
:meth:`Node.on_view_change` and :meth:`Node.wait_for_peers`; the node calls
:meth:`ViewFeed.wake` and :meth:`ViewFeed.publish` when its membership moves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from p2ptrain.ring._view import View

__all__ = ["ViewFeed", "wait_failed"]

logger = logging.getLogger(__name__)


_PRUNE_AT = 64  # waiters kept before done ones are dropped


class ViewFeed:
    """Everyone waiting for the next view. Loop thread only."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._queues: list[asyncio.Queue[View]] = []
        self._callbacks: list[Callable[[View], Any]] = []

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next :meth:`wake` (a view change or a pause)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._waiters) >= _PRUNE_AT:
            # Callers that stopped waiting (a send that finished first cancels its future)
            # leave done futures behind; drop them, so a long stable view cannot grow the
            # list without bound.
            self._waiters = [f for f in self._waiters if not f.done()]
        self._waiters.append(fut)
        return fut

    def wake(self) -> None:
        """Resolve every future from :meth:`changed`."""
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    def publish(self, view: View) -> None:
        """Hand a newly agreed view to :meth:`until`, :meth:`views` and the callbacks."""
        self._event.set()
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(view)
        for cb in self._callbacks:
            try:
                cb(view)
            except Exception:  # a host callback must not kill the node
                logger.exception("view-change callback failed")

    async def until(self, cond: Callable[[], bool]) -> None:
        """Return once ``cond()`` holds, checking it after each published view."""
        while not cond():
            self._event.clear()
            await self._event.wait()

    async def views(self) -> AsyncIterator[View]:
        """Yield every published view (latest first if the consumer falls behind)."""
        q: asyncio.Queue[View] = asyncio.Queue(maxsize=8)
        self._queues.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.remove(q)

    def on_change(self, callback: Callable[[View], Any]) -> None:
        """Call ``callback(view)`` for every published view."""
        self._callbacks.append(callback)


def wait_failed(me: str, timeout: float | None, n: int, view: View, heard: Sequence[str], *,
                others: Mapping[str, int], silent: Sequence[str], foreign: Sequence[str] = (), secret: bool = True) -> str:
    """Why :meth:`Node.wait_for_peers` timed out: the view, who was heard, and the likely causes
    (members of this cluster that announced another key: another secret; clusters heard beside
    this one: a typo in ``--cluster``; static peers that never answered)."""
    text = (f"{me}: waited {timeout}s for {n} peers; the view has {len(view) - 1} besides this node "
            f"({', '.join(m for m in view.members if m != me) or 'none'}); heard from: {', '.join(heard) or 'nobody'}")
    if foreign:  # the likeliest cause first: they were heard, and not connected to
        text += (f"; {', '.join(foreign[:8])}{' …' if len(foreign) > 8 else ''} announced this cluster with another key "
                 + ("(a different secret?)" if secret else "(they have a secret and this node has none)")
                 + ", so this node did not connect to them")
    if others:
        text += f"; heard other clusters: {', '.join(f'{c!r} ({k})' for c, k in others.items())}"
    if silent:
        text += f"; no answer from static peer(s) {', '.join(silent)}"
    return text
