"""The pulse: a thread that repeats the owner's last small message while its event loop is silent.

Why: an endpoint's sockets are driven from its event loop, so a loop blocked by host code,
a long CPU-bound step or a slow device sends nothing, and its peers would take the silence
for death. The pulse keeps saying "still here" for it:

- The loop hands over the message to repeat (a heartbeat, already encoded) each time it
  sends one itself (:meth:`Pulse.set`); that also stamps the loop as alive.
- When the loop has sent nothing for ``silent_after`` (1.5 intervals by default: the loop
  beats every interval), the thread sends the last message to every peer, then again every
  ``interval`` while the silence lasts. A healthy loop never lets it fire: no extra traffic.
- It vouches for a bounded time only: once the loop has been silent for ``max_age`` the
  thread stops too, so a loop that is stuck for good (a deadlock) is still declared dead,
  ``max_age`` plus the peers' failure timeout after its last own message.

Wire: the thread owns its sockets (ZeroMQ sockets are not thread-safe), one DEALER per
peer in the endpoint's context, created, used and closed on the thread only. They present
the routing id ``<node id>`` + :data:`PULSE_SUFFIX`, so a peer's ``ROUTER_HANDOVER``
never mistakes them for the loop's own connection; the receiving endpoint accepts that id
for the envelope's sender (``_endpoint``). Same CURVE keys and limits as the loop's
DEALERs (:func:`~p2ptrain.transport._sockets.connect_dealer`); sends never block (a
pulse that finds a full queue is dropped: only the newest matters); nothing is read.

The thread needs the GIL for a few microseconds per send: it covers a loop blocked by
Python code (the interpreter switches threads every 5 ms), by torch kernels or by I/O,
not by a C extension that holds the GIL for longer than the failure timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from p2ptrain._errors import ConfigError, TransportError

from ._curve import CurveKeys
from ._sockets import connect_dealer

__all__ = ["PULSE_SUFFIX", "Pulse", "PulseStats"]

logger = logging.getLogger("p2ptrain.transport")

#: Appended to the node id to make the pulse connections' routing id. NUL cannot occur in
#: a ring node id, so the two never collide.
PULSE_SUFFIX = "\0pulse"
#: Pulses queued per peer: a dead peer holds two stale ones at most.
_PULSE_HWM = 2
#: How long :meth:`Pulse.close` waits for the thread (it only ever waits on its queue).
_JOIN_S = 5.0


@dataclass
class PulseStats:
    """What the pulse thread did (plain ints: read from any thread).

    Attributes:
        sent: messages handed to a peer's socket.
        dropped: messages a full queue refused (peer dead or slow).
        rounds: times the thread spoke for a silent loop (one round reaches every peer).
        expired: times the thread stopped vouching because the loop stayed silent past ``max_age``.
    """

    sent: int = 0
    dropped: int = 0
    rounds: int = 0
    expired: int = 0


@dataclass
class _State:
    """The thread's own state (touched by the thread only)."""

    socks: dict[str, zmq.Socket[Any]] = field(default_factory=dict)
    where: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)  # peer -> (address, server key)
    frames: list[bytes] | None = None
    stamp: float = 0.0  # when the loop last sent (monotonic)
    last_pulse: float = 0.0
    expired: bool = False


class Pulse:
    """One endpoint's pulse thread and its sockets.

    All methods may be called from any thread; they queue a command and return at once
    (except :meth:`close`, which waits for the thread to end).

    Args:
        ctx: the endpoint's ZeroMQ context (thread-safe; the sockets end with it).
        node_id: the endpoint's node id (the envelope's sender).
        curve: the CURVE keypair, or None for plain TCP.
        interval: seconds between two pulses while the loop is silent (the heartbeat interval).
        max_age: seconds of loop silence after which the thread stops vouching.
        silent_after: seconds of loop silence before the first pulse (default 1.5 intervals).
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(self, ctx: zmq.Context[Any], node_id: str, *, curve: CurveKeys | None, interval: float, max_age: float,
                 silent_after: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not interval > 0:
            raise ConfigError(f"pulse interval must be > 0 seconds, got {interval!r}")
        silent_after = 1.5 * interval if silent_after is None else silent_after
        if not 0 < silent_after <= max_age:
            raise ConfigError(f"pulse max_age ({max_age!r}s) must be at least silent_after ({silent_after!r}s)")
        self._ctx = ctx
        self._routing_id = (node_id + PULSE_SUFFIX).encode("utf-8")
        self._curve = curve
        self.interval = interval
        self.max_age = max_age
        self.silent_after = silent_after
        self._clock = clock
        self.stats = PulseStats()
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"p2ptrain-pulse-{node_id}", daemon=True)
        self._closed = False

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    # --- commands (any thread) -------------------------------------------------------------

    def add(self, peer_id: str, address: str, server_key: bytes | None) -> None:
        """Connect (or reconnect, at a new address) a pulse socket to ``peer_id``."""
        self._put(("add", peer_id, address, server_key))

    def remove(self, peer_id: str) -> None:
        """Close the pulse socket to ``peer_id``."""
        self._put(("remove", peer_id))

    def set(self, frames: list[bytes]) -> None:
        """The message to repeat from now on; also marks the owner's loop alive now.

        Args:
            frames: an encoded message (immutable ``bytes`` frames, as the thread keeps them).
        """
        self._put(("set", frames, self._clock()))

    def _put(self, cmd: tuple[Any, ...]) -> None:
        # Only a running thread drains the queue: commands for a thread that ended (closed,
        # or failed) are dropped, so the queue stays bounded.
        if not self._closed and self._thread.is_alive():
            self._commands.put(cmd)

    def close(self) -> None:
        """Stop the thread and close its sockets (linger 0). Idempotent.

        Raises:
            TransportError: the thread did not end within 5 s (its sockets may still be open).
        """
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            return
        self._commands.put(("stop",))
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            raise TransportError(f"pulse thread {self._thread.name} did not stop within {_JOIN_S}s")

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        st = _State()
        try:
            while True:
                timeout = self._wait_for(st)
                try:
                    cmd = self._commands.get(timeout=timeout)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if not self._apply(st, cmd):
                        return
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                self._maybe_pulse(st)
        except Exception:  # a bug must not go unnoticed; the peers will then see the loop's silence
            logger.exception("pulse thread %s failed; heartbeats now depend on the event loop alone", self._thread.name)
        finally:
            for sock in st.socks.values():
                sock.close(linger=0)
            st.socks.clear()

    def _wait_for(self, st: _State) -> float | None:
        """Seconds until the next pulse may be due (None: nothing to do until a command)."""
        if st.frames is None or st.expired:
            return None
        now = self._clock()
        due = max(st.stamp + self.silent_after, st.last_pulse + self.interval)
        return max(0.0, due - now)

    def _apply(self, st: _State, cmd: tuple[Any, ...]) -> bool:
        """Carry out one command; False on stop."""
        what = cmd[0]
        if what == "stop":
            return False
        if what == "set":
            st.frames, st.stamp = cmd[1], cmd[2]
            if st.expired:
                logger.info("pulse %s: the event loop speaks again", self._thread.name)
            st.expired = False
        elif what == "add":
            _, peer_id, address, server_key = cmd
            if peer_id in st.socks and st.where.get(peer_id) == (address, server_key):
                return True  # already connected there (add_peer is idempotent, so is this)
            self._close(st, peer_id)
            sock: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.DEALER)
            try:
                connect_dealer(sock, peer_id, address, routing_id=self._routing_id, curve=self._curve,
                               server_key=server_key, send_hwm=_PULSE_HWM)
            except TransportError as exc:  # the loop's own connect already reported it
                logger.debug("pulse %s: %s", self._thread.name, exc)
                return True
            st.socks[peer_id] = sock
            st.where[peer_id] = (address, server_key)
        elif what == "remove":
            self._close(st, cmd[1])
        return True

    @staticmethod
    def _close(st: _State, peer_id: str) -> None:
        st.where.pop(peer_id, None)
        sock = st.socks.pop(peer_id, None)
        if sock is not None:
            sock.close(linger=0)

    def _maybe_pulse(self, st: _State) -> None:
        if st.frames is None or st.expired:
            return
        now = self._clock()
        silent = now - st.stamp
        if silent < self.silent_after or now - st.last_pulse < self.interval:
            return
        if silent > self.max_age:
            st.expired = True
            self.stats.expired += 1
            logger.warning("pulse %s: the event loop has been silent for %.1fs (limit %.1fs); no longer "
                           "vouching for it, peers will declare this node dead", self._thread.name, silent, self.max_age)
            return
        st.last_pulse = now
        self.stats.rounds += 1
        for sock in st.socks.values():
            try:
                sock.send_multipart(st.frames, flags=zmq.NOBLOCK, copy=True)
                self.stats.sent += 1
            except zmq.ZMQError:  # EAGAIN: queue full (dead or slow peer); the next pulse tries again
                self.stats.dropped += 1
