"""An in-memory network with the endpoint API, for testing upper layers without sockets.

Every message still goes through the real encoder and decoder: frames are encoded,
copied (the receiver never aliases the sender's tensors, as on a wire), validated and
decoded with the same code as :class:`Endpoint`, so a fake catches wire bugs. Queues are
bounded: a receiver that does not read pushes back on its senders.

Faults are explicit (:class:`Fault`) and seeded, so failures reproduce::

    net = FakeNetwork(seed=1)
    a, b = net.endpoint("a", "c"), net.endpoint("b", "c")
    net.inject(Fault.DROP, src="a", dst="b", probability=0.5)
    net.partition({"a"}, {"b", "c"})
    net.kill("b")
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from p2ptrain._errors import ConfigError, ProtocolError, TransportError

from ._base import BaseEndpoint, needs_thread
from ._envelope import Limits, Message, decode_envelope, reason_of, rejected
from ._frames import ListFrames, decode_buffers, read_buffers
from ._landing import read_frames

__all__ = ["FakeEndpoint", "FakeNetwork", "Fault"]

logger = logging.getLogger(__name__)

_SCHEME = "fake://"


class Fault(enum.Enum):
    """What the fake network may do to a message.

    - ``DROP``: the message vanishes.
    - ``DELAY``: the message arrives ``delay`` seconds late (later ones may overtake it).
    - ``CORRUPT``: the envelope arrives truncated; the receiver drops and counts it.
    - ``PARTITION``: nothing passes between the two sides (see :meth:`FakeNetwork.partition`).
    """

    DROP = "drop"
    DELAY = "delay"
    CORRUPT = "corrupt"
    PARTITION = "partition"


@dataclass
class _Rule:
    fault: Fault
    src: str | None
    dst: str | None
    probability: float
    remaining: int | None
    delay: float

    def matches(self, src: str, dst: str) -> bool:
        return (self.src is None or self.src == src) and (self.dst is None or self.dst == dst)


class FakeNetwork:
    """In-memory transport for one event loop.

    Args:
        seed: seeds the random choices of probabilistic faults.
        limits: default limits of endpoints made here.

    Attributes:
        faults: messages affected, by fault (``Fault.DROP`` also counts messages to
            killed or unknown endpoints).
    """

    def __init__(self, *, seed: int = 0, limits: Limits | None = None) -> None:
        self._rng = random.Random(seed)
        self._limits = limits or Limits()
        self._endpoints: dict[str, FakeEndpoint] = {}
        self._rules: list[_Rule] = []
        self._groups: list[frozenset[str]] = []
        self._dead: set[str] = set()
        self.faults: Counter[Fault] = Counter()

    def endpoint(self, node_id: str, cluster: str, *, limits: Limits | None = None, recv_queue: int = 64,
                 send_queue: int = 16) -> FakeEndpoint:
        """A new endpoint at ``fake://<node_id>`` (start it, or use ``async with``)."""
        if node_id in self._endpoints and not self._endpoints[node_id].closed:
            raise ConfigError(f"fake endpoint {node_id!r} exists already")
        ep = FakeEndpoint(self, node_id, cluster, limits=limits or self._limits, recv_queue=recv_queue, send_queue=send_queue)
        self._endpoints[node_id] = ep
        return ep

    # --- faults ----------------------------------------------------------------------------

    def inject(self, fault: Fault, *, src: str | None = None, dst: str | None = None, probability: float = 1.0,
               count: int | None = None, delay: float = 0.05) -> None:
        """Apply ``fault`` to messages from ``src`` to ``dst`` (None: any).

        Args:
            probability: chance per message.
            count: affect at most this many messages, then the rule expires.
            delay: seconds, for :attr:`Fault.DELAY`.
        """
        if not isinstance(fault, Fault):
            raise ConfigError(f"fault must be a Fault, got {fault!r}")
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"probability {probability} must lie in [0, 1]")
        if delay < 0 or delay > 60:
            raise ConfigError(f"delay {delay}s must lie in [0, 60]")
        self._rules.append(_Rule(fault, src, dst, probability, count, delay))

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: nodes in different groups cannot reach each other.

        Nodes named in no group can reach only each other.
        """
        self._groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        """Remove the partition and every injected fault (killed nodes stay dead)."""
        self._groups = []
        self._rules.clear()

    def kill(self, node_id: str) -> None:
        """``node_id`` falls silent: nothing it sends or is sent arrives (like a crash)."""
        self._dead.add(node_id)

    def revive(self, node_id: str) -> None:
        """Undo :meth:`kill`."""
        self._dead.discard(node_id)

    def deliver_raw(self, dst: str, frames: Sequence[Any], *, identity: str) -> bool:
        """Put raw ``frames`` in ``dst``'s inbox as if peer ``identity`` had sent them.

        For tests of the validation path. Returns False when the inbox is full.
        """
        ep = self._endpoints.get(dst)
        if ep is None or ep.closed or not ep._started:
            raise TransportError(f"fake endpoint {dst!r} is not running")
        return ep._wire_put_nowait(identity, [bytes(memoryview(f).cast("B")) for f in frames])

    def _group_of(self, node: str) -> int:
        for i, g in enumerate(self._groups):
            if node in g:
                return i
        return -1

    def _fate(self, src: str, dst: str) -> tuple[Fault | None, float]:
        if src in self._dead or dst in self._dead:
            return Fault.DROP, 0.0
        if self._groups and self._group_of(src) != self._group_of(dst):
            return Fault.PARTITION, 0.0
        for rule in list(self._rules):
            if not rule.matches(src, dst) or self._rng.random() >= rule.probability:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rules.remove(rule)
            return rule.fault, rule.delay
        return None, 0.0

    def _admit(self, src: str, address: str, wire: list[bytes]) -> FakeEndpoint | None:
        """Apply faults to one message; the endpoint to queue it at, or None when it is gone or late."""
        dst = self._endpoints.get(address[len(_SCHEME):])
        if dst is None or dst.closed or not dst._started:
            self.faults[Fault.DROP] += 1  # like TCP to nobody: it never arrives
            return None
        fault, delay = self._fate(src, dst.node_id)
        if fault is not None:
            self.faults[fault] += 1
        if fault in (Fault.DROP, Fault.PARTITION):
            return None
        if fault is Fault.CORRUPT:
            wire[0] = wire[0][: len(wire[0]) // 2]
        elif fault is Fault.DELAY:
            asyncio.get_running_loop().call_later(delay, dst._wire_put_nowait, src, wire)
            return None
        return dst


class FakeEndpoint(BaseEndpoint):
    """An endpoint on a :class:`FakeNetwork` (make it with :meth:`FakeNetwork.endpoint`).

    Same async API as :class:`Endpoint`; the address is ``fake://<node_id>``.
    """

    def __init__(self, network: FakeNetwork, node_id: str, cluster: str, *, limits: Limits, recv_queue: int,
                 send_queue: int) -> None:
        super().__init__(node_id, cluster, limits=limits, recv_queue=recv_queue, pool_bytes=0)
        self._net = network
        self._send_queue = send_queue
        self._wire_in: asyncio.Queue[tuple[str, list[bytes]]] | None = None
        self._peers: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reading the inbox. Idempotent."""
        if self._started or self._closed:
            return
        self._open_base()
        self._wire_in = asyncio.Queue(self._send_queue)
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"p2ptrain-fake-{self.node_id}")

    async def close(self, *, linger: float = 0.0) -> None:
        """Stop; frames waiting in the inbox are dropped. Idempotent.

        Args:
            linger: ignored: the fake hands messages over at once.
        """
        if self._closed:
            return
        self._close_base()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def address(self) -> str:
        """``fake://<node_id>``."""
        return _SCHEME + self.node_id

    @property
    def peers(self) -> dict[str, str]:
        """Known peers: node id -> address."""
        return dict(self._peers)

    def _has_peer(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def add_peer(self, peer_id: str, address: str, *, server_key: bytes | None = None) -> None:
        """Remember where ``peer_id`` is; idempotent."""
        self._check_open()
        if not isinstance(address, str) or not address.startswith(_SCHEME):
            raise ConfigError(f"fake peer address {address!r} must look like fake://NODE")
        self._peers[peer_id] = address

    def remove_peer(self, peer_id: str) -> None:
        """Forget ``peer_id``."""
        self._peers.pop(peer_id, None)

    async def _transmit(self, peer_id: str, frames: list[Any], deadline: float | None) -> None:
        address = self._peers.get(peer_id)
        if address is None:  # removed while the message was being encoded
            raise TransportError(f"peer {peer_id!r} was removed before the message could be sent")
        wire = [bytes(memoryview(f).cast("B")) for f in frames]  # the copy a wire makes
        frames.clear()
        dst = self._net._admit(self.node_id, address, wire)
        if dst is not None:
            try:
                await dst._wire_put(self.node_id, wire, deadline)
            except (TimeoutError, asyncio.TimeoutError) as exc:
                raise TransportError(f"send to {peer_id!r} timed out: its queue stayed full") from exc
        self._book.sent(peer_id, sum(len(w) for w in wire[1:]))

    def _try_transmit(self, peer_id: str, frames: list[Any]) -> bool:
        address = self._peers[peer_id]
        target = self._net._endpoints.get(address[len(_SCHEME):])
        if target is not None and target._wire_in is not None and target._wire_in.full():
            return False
        wire = [bytes(memoryview(f).cast("B")) for f in frames]
        dst = self._net._admit(self.node_id, address, wire)
        if dst is not None and not dst._wire_put_nowait(self.node_id, wire):
            return False
        self._book.sent(peer_id, sum(len(w) for w in wire[1:]))
        return True

    # --- frames in -------------------------------------------------------------------------

    def _wire_put_nowait(self, identity: str, wire: list[bytes]) -> bool:
        if self._wire_in is None or self._closed:
            return False
        try:
            self._wire_in.put_nowait((identity, wire))
        except asyncio.QueueFull:
            return False
        return True

    async def _wire_put(self, identity: str, wire: list[bytes], deadline: float | None) -> None:
        if self._wire_in is None or self._closed:
            return
        if deadline is None:
            await self._wire_in.put((identity, wire))
        else:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait_for(self._wire_in.put((identity, wire)), remaining)

    async def _read_loop(self) -> None:
        assert self._wire_in is not None
        while True:
            identity, wire = await self._wire_in.get()
            if identity in self._net._dead or self.node_id in self._net._dead:
                continue
            try:
                if not wire:
                    raise rejected("truncated", "a message needs at least the envelope frame")
                env = decode_envelope(wire[0], self.limits, self.cluster, get_codec=self._codec_for)
                if env.sender != identity:
                    raise rejected("sender_mismatch", f"envelope says sender {env.sender!r} but the connection is {identity!r}")
                msg = Message(env.sender, env.kind, env.epoch, env.tag, env.meta, [], env.nbytes)
                landing = self._landings.claim(env)
                if landing is not None:
                    try:
                        frames = read_frames(env, ListFrames(wire[1:]))
                    except ProtocolError:
                        self._landings.rearm(env, landing)  # the destination was not touched
                        raise
                    msg.landed = landing.into
                    await self._complete(msg, None, frames, landing)
                    continue
                bufs = read_buffers(env, ListFrames(wire[1:]), self._pool.take)
                del wire
                if needs_thread(env):  # decoded in the codec thread while the reader waits, as the real one
                    await self._complete(msg, env, bufs)
                    continue
                tensors = decode_buffers(env, bufs)
                del bufs
            except ProtocolError as exc:
                self._book.drop(identity, reason_of(exc), str(exc))
                continue
            except MemoryError:
                self._book.drop(identity, "no_memory", "could not allocate the receive buffers")
                continue
            except Exception:  # as the real endpoint: a bug costs one message, never the reader
                logger.exception("fake endpoint %r: unexpected error reading a message from %r", self.node_id, identity)
                self._book.drop(identity, "internal_error")
                continue
            msg.tensors = tensors
            await self._deliver(msg)
