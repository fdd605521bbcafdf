"""The heartbeat record: what a node tells every peer each interval, and the clock it beats by.

A heartbeat (and a static peer's ``hello``) carries, in its ``meta`` map:

- ``b``: the membership :class:`~p2ptrain.ring._membership.Beat` (view, proposal, pause),
- ``a``: the address the sender wants to be dialled at,
- ``r``: the sender's :class:`~p2ptrain.discovery.Resources` as TXT strings,
- ``g``: gossip, the addresses of the peers the sender hears, so static peers learn the
  whole ring.

:meth:`Heartbeat.from_wire` is the one place a received heartbeat is checked. Only a
missing map or a bad beat rejects it; the rest is advisory and a bad part is dropped
on its own (the addresses are checked again where they are dialled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from p2ptrain._errors import ConfigError, ProtocolError
from p2ptrain.discovery import Resources
from p2ptrain.ring._identity import validate_node_id
from p2ptrain.ring._membership import MAX_MEMBERS, Beat

__all__ = ["Heartbeat", "StallClock"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat's meta, decoded.

    Attributes:
        beat: the sender's membership beat.
        address: where to dial the sender (None when it sent no string).
        resources: what the sender announced (None when absent or malformed).
        gossip: ``(node id, address)`` pairs the sender vouches for, well-formed ids only.
    """

    beat: Beat
    address: str | None = None
    resources: Resources | None = None
    gossip: tuple[tuple[str, str], ...] = ()

    def to_wire(self) -> dict[str, object]:
        """The ``meta`` map of a heartbeat message."""
        return {
            "b": self.beat.to_wire(),
            "a": self.address,
            "r": self.resources.to_txt() if self.resources else {},
            "g": dict(self.gossip),
        }

    @classmethod
    def from_wire(cls, meta: object) -> Heartbeat:
        """Decode a received heartbeat's ``meta``.

        Raises:
            ProtocolError: ``meta`` is not a map, or its beat is malformed.
        """
        if not isinstance(meta, dict):
            raise ProtocolError("heartbeat meta is not a map")
        beat = Beat.from_wire(meta.get("b"))
        address = meta.get("a")
        resources = None
        txt = meta.get("r")
        if isinstance(txt, dict):
            try:
                resources = Resources.from_txt(txt)
            except (ValueError, TypeError, KeyError):
                pass
        return cls(beat, address if isinstance(address, str) else None, resources, _gossip(meta.get("g")))


def _gossip(value: object) -> tuple[tuple[str, str], ...]:
    """The well-formed ``(id, address)`` pairs of a gossip map; none when it is not one or too big."""
    if not isinstance(value, dict) or len(value) > MAX_MEMBERS:
        return ()
    pairs = []
    for pid, addr in value.items():
        if not isinstance(pid, str) or not isinstance(addr, str):
            continue
        try:
            validate_node_id(pid)
        except ConfigError:
            continue
        pairs.append((pid, addr))
    return tuple(pairs)


class StallClock:
    """The membership clock: monotonic time that does not advance while the loop is stalled,
    nor while the endpoint's reader is held by a message it took.

    When host code, the GC or an overloaded CPU blocks the event loop for seconds, the
    peers' heartbeats wait unread in the socket; judging liveness on wall time right
    after would declare healthy peers dead. The heartbeat loop reads the clock every
    interval, so a gap of more than three intervals between reads is a stall, and it is
    taken out of the clock. A dead peer is then detected that much later, never wrongly.
    Read it on the loop thread only: a reader that is not blocked with the loop (the
    pulse thread, say) would see no gap and hide the stall.

    The same holds when the loop runs but the endpoint's reader waits on a large message's
    copy and decode in the codec thread (seconds for a 140 MB replica on a quarter-core
    device): heartbeats queue unread behind it. :meth:`attach` gives the clock the
    reader's held seconds (:meth:`~p2ptrain.transport.BaseEndpoint.reader_held_s`) to
    leave out too. Where a stall and a hold overlap, that time is left out once.

    Args:
        interval: the heartbeat interval, in seconds.
        warn_after: a stall longer than this is logged as a warning (shorter: info).
        name: who is stalled, for the log.
    """

    def __init__(self, interval: float, *, warn_after: float, name: str) -> None:
        self.interval = interval
        self.warn_after = warn_after
        self.name = name
        self.stalls = 0
        self._last_real = time.monotonic()
        self._offset = 0.0
        self._held: Callable[[], float] | None = None
        self._held_at = 0.0  # the held seconds last read (since attach)
        self._held_run = 0.0  # held over the reads since the reader was last free
        self._held_limit = 0.0
        self._last = -float("inf")

    def restart(self) -> None:
        """Forget the time before now (a node starting after a slow set-up)."""
        self._last_real = time.monotonic()

    def attach(self, held: Callable[[], float], limit: float) -> None:
        """Leave out, from now on, what ``held()`` (cumulative, non-decreasing seconds) adds,
        at most ``limit`` seconds of it while the reader is never free for a whole interval
        between reads: back-to-back large messages must not freeze the clock, or a peer that
        died meanwhile would never be found (the live ones are heard between the messages)."""
        self._held, self._held_at, self._held_limit = held, held(), limit

    def __call__(self) -> float:
        """The clock's time, in seconds."""
        real = time.monotonic()
        gap = real - self._last_real
        if gap > 3 * self.interval:
            self._offset += gap - self.interval
            self.stalls += 1
            # Routine on a CPU-capped device; worth a warning only when it nears the timeout.
            level = logging.WARNING if gap > self.warn_after else logging.INFO
            logger.log(level, "%s: event loop stalled for %.2fs; not counted against peers", self.name, gap)
        self._last_real = real
        if self._held is not None:
            held = self._held()
            step, self._held_at = max(0.0, held - self._held_at), held
            self._offset += min(step, max(0.0, self._held_limit - self._held_run))
            if step:
                self._held_run += step
            elif self._held_run:  # the reader was free for a whole read: one line for the run
                level = logging.WARNING if self._held_run > self.warn_after else logging.INFO
                logger.log(level, "%s: large messages held the reader for %.2fs; %.2fs of it not counted against peers",
                           self.name, self._held_run, min(self._held_run, self._held_limit))
                self._held_run = 0.0
        # A stall and a hold that overlapped were left out twice: count that time once (the
        # clock stands still over it), never backwards and no longer than it lasted.
        if real - self._offset < self._last:
            self._offset = real - self._last
        self._last = real - self._offset
        return self._last
