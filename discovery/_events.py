"""Peer events and the bounded stream that delivers them.

A stream never grows past one pending event per peer: a new event for a peer that still
has one pending is merged into it (``found`` then ``updated`` is still ``found``, with the
new record; ``found`` then ``lost`` is nothing at all). So a consumer that falls behind
loses intermediate states, never the final one, and memory stays bounded by the peer
table's capacity whatever the network sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Literal, NamedTuple

from ._records import PeerRecord

__all__ = ["PeerEvent", "PeerEventStream"]

EventKind = Literal["found", "updated", "lost"]


class PeerEvent(NamedTuple):
    """A change in the set of announced peers.

    Attributes:
        kind: ``"found"`` (a new peer), ``"updated"`` (its record changed: resources, port,
            or a higher incarnation, which means it restarted) or ``"lost"`` (it said
            goodbye or its records expired).
        record: The peer's record; for ``"lost"``, the last one known.
    """

    kind: EventKind
    record: PeerRecord


def merge(pending: PeerEvent, new: PeerEvent) -> PeerEvent | None:
    """The single event equivalent to ``pending`` followed by ``new`` for one peer.

    Returns:
        The merged event, or ``None`` when the two cancel out.
    """
    if pending.kind == "found":
        if new.kind == "lost":
            return None  # the consumer never heard of it
        return PeerEvent("found", new.record)
    if pending.kind == "lost" and new.kind == "found":
        return PeerEvent("updated", new.record)  # the consumer still holds the old record
    return new


class PeerEventStream:
    """Async iterator of :class:`PeerEvent`; obtained from ``MdnsDiscovery.events()``.

    It starts with a ``"found"`` event for every peer already known, then follows changes.
    Iteration ends once the discovery is closed and the pending events are delivered.
    Use it as ``async with disc.events() as stream: async for ev in stream: ...`` or
    iterate directly and call :meth:`aclose` when done. Runs on the event loop's thread.
    """

    def __init__(self, unsubscribe: Callable[[PeerEventStream], None]) -> None:
        self._pending: dict[str, PeerEvent] = {}
        self._wakeup = asyncio.Event()
        self._ended = False
        self._unsubscribe = unsubscribe

    def _push(self, event: PeerEvent) -> None:
        """Queue one event, merging with a pending one for the same peer (loop thread only)."""
        if self._ended:
            return
        key = event.record.node_id
        previous = self._pending.pop(key, None)
        merged = event if previous is None else merge(previous, event)
        if merged is not None:
            self._pending[key] = merged
        self._wakeup.set()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()

    def __aiter__(self) -> PeerEventStream:
        return self

    async def __anext__(self) -> PeerEvent:
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        key = next(iter(self._pending))
        return self._pending.pop(key)

    async def aclose(self) -> None:
        """Stop receiving events; idempotent."""
        if not self._ended:
            self._end()
            self._unsubscribe(self)
        self._pending.clear()

    async def __aenter__(self) -> PeerEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
