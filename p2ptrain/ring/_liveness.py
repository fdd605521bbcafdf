"""Liveness: how a node keeps being heard while its event loop is busy, and how it judges its peers.

The rules (issue 11, "no false alarms"):

1. *A busy member is not dead.* The node's loop sends a heartbeat every interval and
   hands the same beat to its endpoint's pulse thread (``transport/_pulse.py``). While the
   loop is blocked (host code, a CPU-bound step, a GC pass, a slow 1/8-core device) the
   thread repeats that last beat with its own sockets, so peers keep hearing the member.
   The beat is the last one the loop computed: it says "alive", and repeats the view and
   proposal the member held when its loop stopped. It travels on the pulse's own
   connection, so it may arrive after a newer beat; receivers then count it for liveness
   only (``Beat.seq``). A healthy loop never lets the pulse fire. The thread needs the GIL
   for microseconds: it covers Python code, torch kernels and I/O, not a C extension
   holding the GIL for longer than the failure timeout.
2. *Vouching is bounded.* The thread stops once the loop has been silent for
   ``stall_limit`` seconds (:data:`STALL_LIMIT_TIMEOUTS` failure timeouts by default), so a
   member whose loop is stuck for good (a deadlock) is still removed, ``stall_limit`` +
   ``failure_timeout`` after its loop last beat. While a member's loop is stuck the ring
   cannot agree on other changes (the stuck member repeats its old proposal); those go
   through when it wakes or once its stall limit has passed.
3. *A member that wakes does not blame others for its own stall.* Its membership clock
   (:class:`~p2ptrain.ring._heartbeat.StallClock`) leaves the blocked time out, so the
   peers whose heartbeats waited unread in its socket meanwhile are still alive to it.
   The same for the time its endpoint's reader was held by a large message's copy and
   decode in the codec thread while the loop ran on: every later message, heartbeats
   included, waited unread behind it (``BaseEndpoint.reader_held_s``).

4. *A dropped connection is a strong hint.* When a member's process dies, its kernel
   closes its TCP connections at once; each peer's socket monitor sees the drop and
   suspects it (:meth:`~p2ptrain.ring._membership.Membership.suspect`): unless it is heard
   again within a quarter of the failure timeout, it is dead. A live member whose
   connection dropped reconnects and beats again well within that (rule 1 keeps its
   beats coming even while its loop is blocked). A member cut off without a drop (a
   cable pulled, Wi-Fi out of range) is still found by the failure timeout.

Why no SWIM-style indirect probes (memberlist, Lifeguard): they protect against false
suspicion caused by a lossy path or by the *suspecting* node's slowness. Here every pair
of members talks over TCP (a lost path is a broken ring link, which a view change must
route around anyway), the suspecting node's slowness is rule 3 (Lifeguard's "local health
awareness"), and the suspected node's slowness is rule 1. Detection stays one failure
timeout plus one agreement round.

:class:`Liveness` holds the policy and the clock; :class:`~p2ptrain.ring._node.Node` calls
it. It has no sockets: the pulse thread belongs to the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from p2ptrain._errors import ConfigError, TransportError, worth_logging
from p2ptrain.ring._heartbeat import StallClock
from p2ptrain.transport import BaseEndpoint

__all__ = ["STALL_LIMIT_TIMEOUTS", "Liveness"]

logger = logging.getLogger(__name__)

#: Default stall limit, in failure timeouts (20 s with the default 2 s): longer than any
#: GC pause or CPU-bound step expected of a healthy member, short enough that a deadlocked
#: one is not carried for long.
STALL_LIMIT_TIMEOUTS = 10


class Liveness:
    """The liveness timers of one node, checked eagerly, and its stall-aware clock.

    Args:
        interval: seconds between heartbeats.
        failure_timeout: seconds without a heartbeat before a peer is declared dead.
        stall_limit: seconds of loop silence the pulse thread covers for; None means
            :data:`STALL_LIMIT_TIMEOUTS` failure timeouts, 0 turns the pulse off.
        name: the node, for the logs.
        stats: the node's counters; ``loop_stalls`` is kept there.

    Raises:
        ConfigError: the failure timeout does not exceed two intervals, or the stall
            limit is neither 0 nor at least the failure timeout.
    """

    def __init__(self, *, interval: float, failure_timeout: float, stall_limit: float | None, name: str,
                 stats: dict[str, int]) -> None:
        if not interval > 0:
            raise ConfigError(f"heartbeat_interval must be > 0 seconds, got {interval!r}")
        if not failure_timeout > 2 * interval:
            raise ConfigError(
                f"failure_timeout ({failure_timeout}s) must exceed two heartbeat intervals ({interval}s each)"
            )
        limit = STALL_LIMIT_TIMEOUTS * failure_timeout if stall_limit is None else stall_limit
        if limit != 0 and not limit >= failure_timeout:
            raise ConfigError(
                f"stall_limit ({limit}s) must be 0 (no pulse) or at least the failure timeout ({failure_timeout}s)"
            )
        self.interval = interval
        self.failure_timeout = failure_timeout
        self.stall_limit = limit
        self._stats = stats
        self._clock = StallClock(interval, warn_after=failure_timeout / 2, name=name)
        self._endpoint: BaseEndpoint | None = None

    def now(self) -> float:
        """The membership clock: monotonic time without the loop's stalls. Loop thread only."""
        t = self._clock()
        if self._clock.stalls:
            self._stats["loop_stalls"] = self._clock.stalls
        return t

    def start(self, endpoint: BaseEndpoint, suspect: Callable[[str, float], None] | None = None) -> None:
        """Forget the set-up time and start ``endpoint``'s pulse (unless the stall limit is 0).

        ``suspect(peer, now)`` is called when a connection to ``peer`` drops (rule 4).
        """
        self._clock.restart()
        # Rule 3 for heartbeats queued behind large messages, excused as long as a stall is vouched for.
        self._clock.attach(endpoint.reader_held_s, self.stall_limit or STALL_LIMIT_TIMEOUTS * self.failure_timeout)
        self._endpoint = endpoint
        if suspect is not None:
            endpoint.on_peer_lost = lambda peer: suspect(peer, self.now())
        if self.stall_limit:
            endpoint.start_pulse(interval=self.interval, max_age=self.stall_limit)

    async def run(self, heartbeat: Callable[[float], None]) -> None:
        """Call ``heartbeat(now)`` every interval until cancelled; the pulse ends with it.

        A round that raises is logged and counted (``heartbeat_error``) and the next one
        runs as usual. A node whose heartbeat task is gone (cancelled) has nobody beating
        for it, so the pulse thread must not vouch for it either.
        """
        try:
            while True:
                try:
                    heartbeat(self.now())
                except Exception:  # a failed round must not leave the node unheard while it runs on
                    n = self._stats["heartbeat_error"] = self._stats.get("heartbeat_error", 0) + 1
                    if worth_logging(n):
                        logger.exception("%s: a heartbeat round failed (%d so far); beating on", self._clock.name, n)
                await asyncio.sleep(self.interval)
        finally:
            self.stop()

    def beat(self, kind: str, epoch: int, meta: dict[str, Any]) -> None:
        """The loop just sent this heartbeat: the pulse repeats it if the loop falls silent."""
        if self._endpoint is not None:
            self._endpoint.pulse(kind, epoch=epoch, meta=meta)

    def stop(self) -> None:
        """Stop the pulse (before goodbyes: no pulse may follow them). Idempotent; never raises."""
        if self._endpoint is not None:
            try:
                self._endpoint.stop_pulse()
            except TransportError as exc:  # its thread only ever waits on its queue; logged if it ever hangs
                logger.error("%s: %s", self._clock.name, exc)
