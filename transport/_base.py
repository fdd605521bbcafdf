"""What every endpoint shares: identity checks, the bounded receive queue, counters, and
encoding (off the event loop when a lossy codec has real work to do).

:class:`Endpoint` (ZeroMQ) and :class:`FakeEndpoint` (in memory) subclass it and
supply the wire: ``start``/``close``/``add_peer``/``remove_peer``, ``_transmit`` and
``_try_transmit``. Both run every message through the same encoder and decoder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import torch

from p2ptrain._errors import ConfigError, ProtocolError, TransportError
from p2ptrain.kernels import Codec

from ._bufpool import BufferPool
from ._codecs import resolve_codec
from ._deferred import Deferred, read_deferred
from ._envelope import Envelope, Limits, Message, reason_of
from ._frames import decode_buffers, encode_message
from ._inbox import Inbox
from ._landing import INLINE_BYTES, Landing, Landings, land_frames
from ._pulse import PulseStats
from ._stats import PeerStats, StatsBook

__all__ = ["HELD_GRACE_S", "BaseEndpoint", "FutureCancelled", "check_id", "wait_owned"]

logger = logging.getLogger("p2ptrain.transport")

#: Encode/decode of a lossy codec moves off the event loop above this many tensor bytes.
#: int8 quantisation runs ~0.7 GB/s per thread here (DESIGN.md): 1 MiB is ~1.5 ms of
#: loop time, ~20x the cost of a thread hand-off.
OFFLOAD_BYTES = 1 << 20
#: A message holding the reader longer than this (s) keeps every later one unread for the
#: rest (a 140 MB replica on a quarter-core device: seconds); shorter is a message's cost.
HELD_GRACE_S = 0.1

T = TypeVar("T")


class FutureCancelled(Exception):
    """The awaited future was cancelled by whoever completes it (a closed socket, a shut-down
    executor), while the awaiting task itself was not cancelled."""


async def wait_owned(fut: asyncio.Future[T], timeout: float | None = None) -> T:
    """Await ``fut`` like :func:`asyncio.wait_for`, telling its owner's cancellation from this task's.

    After a bare ``await fut`` a ``CancelledError`` means either; only Python 3.11+ can
    ask ``Task.cancelling()`` which it was. :func:`asyncio.wait` never cancels or raises
    for the futures it watches, so here the two cases stay apart on every version.

    Raises:
        asyncio.CancelledError: this task was cancelled (``fut`` is cancelled too).
        FutureCancelled: ``fut`` was cancelled by its owner.
        asyncio.TimeoutError: ``fut`` was not done within ``timeout`` seconds (it is cancelled).
    """
    try:
        done, _ = await asyncio.wait((fut,), timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        raise asyncio.TimeoutError
    if fut.cancelled():
        raise FutureCancelled
    return fut.result()


def check_id(value: object, what: str, limits: Limits) -> str:
    """Validate a node id or cluster name: a non-empty str of at most ``max_id_bytes`` UTF-8 bytes.

    Raises:
        ConfigError: naming the bad value.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8")) > limits.max_id_bytes:
        raise ConfigError(f"{what} {value[:40]!r}... is longer than {limits.max_id_bytes} UTF-8 bytes")
    if value[0] == "\0":
        raise ConfigError(f"{what} {value!r} may not start with a NUL byte (ZeroMQ reserves such routing ids)")
    return value


def is_passthrough(codec: str | Codec | Sequence[str | Codec]) -> bool:
    """True when encoding is free (the ``none`` codec only)."""
    if isinstance(codec, (list, tuple)):
        return all(is_passthrough(c) for c in codec)
    spec = codec.spec if isinstance(codec, Codec) else codec
    return spec == "none"


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def needs_thread(env: Envelope) -> bool:
    """True when decoding ``env`` is real work (a lossy codec over OFFLOAD_BYTES)."""
    return env.nbytes >= OFFLOAD_BYTES and any(h.codec.spec != "none" for h in env.tensors)


class BaseEndpoint(ABC):
    """The async messaging API the rest of p2ptrain codes against.

    An async context manager; :meth:`close` is idempotent. All methods run on the
    event-loop thread that called :meth:`start`.

    Args:
        node_id: this node's id (the sender of everything it sends).
        cluster: the cluster id; messages of other clusters are dropped.
        limits: what a peer may send (and what this side will send).
        recv_queue: decoded messages held for :meth:`recv`; when full, the reader stops
            taking from the wire and senders feel back-pressure.
        pool_bytes: idle receive buffers kept for reuse (see ``_bufpool``).
    """

    def __init__(self, node_id: str, cluster: str, *, limits: Limits | None = None, recv_queue: int = 64,
                 pool_bytes: int = 256 << 20) -> None:
        self.limits = limits if limits is not None else Limits()
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
        self.node_id = check_id(node_id, "node_id", self.limits)
        self.cluster = check_id(cluster, "cluster", self.limits)
        if not isinstance(recv_queue, int) or recv_queue < 1:
            raise ConfigError(f"recv_queue must be a positive int, got {recv_queue!r}")
        self._inbox: Inbox[Message] = Inbox(recv_queue, self._closed_while_waiting)
        self._codecs: dict[str, Codec] = {}
        self._book = StatsBook(logging.getLogger("p2ptrain.transport"))
        self._pool = BufferPool(pool_bytes)
        self._landings = Landings()
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._closed = False
        self._held_since: float | None = None  # reader_held_s: since when, and how long before
        self._held_s = 0.0
        # Called with a peer id when its connection drops (the peer's process died, or it
        # closed its socket): a hint, faster than any heartbeat timeout, that the peer may
        # be gone. Endpoints without connections (the in-memory one) never call it.
        self.on_peer_lost: Callable[[str], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BaseEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_base(self) -> None:
        self._started = True

    def _close_base(self) -> None:
        self._closed = True
        self._inbox.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._pool.clear()

    @abstractmethod
    async def start(self) -> None:
        """Bind and start serving. Idempotent."""

    @abstractmethod
    async def close(self, *, linger: float = 0.0) -> None:
        """Stop serving and release every socket and thread. Idempotent.

        Args:
            linger: seconds to keep sending what is still queued; 0 drops it.
        """

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"endpoint {self.node_id!r} is closed")
        if not self._started:
            raise TransportError(f"endpoint {self.node_id!r} is not started; call `await endpoint.start()` or use `async with`")

    # --- peers -----------------------------------------------------------------------------

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this endpoint."""

    @property
    def public_key(self) -> bytes | None:
        """This endpoint's CURVE public key (Z85), or None without CURVE."""
        return None

    @abstractmethod
    def add_peer(self, peer_id: str, address: str, *, server_key: bytes | None = None) -> None:
        """Connect to ``peer_id`` at ``address``; idempotent, a new address replaces the old."""

    @abstractmethod
    def remove_peer(self, peer_id: str) -> None:
        """Forget ``peer_id`` and drop what is queued for it."""

    @property
    @abstractmethod
    def peers(self) -> dict[str, str]:
        """Known peers: node id -> address."""

    # --- sending ---------------------------------------------------------------------------

    def _executor_for_codecs(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"p2ptrain-codec-{self.node_id}")
        return self._executor

    async def _encode(self, kind: str, epoch: int, tag: Any, meta: dict[str, Any] | None, tensors: Sequence[torch.Tensor],
                      codec: Any, feedback: Any) -> list[Any]:
        job = partial(encode_message, sender=self.node_id, cluster=self.cluster, kind=kind, epoch=epoch, tag=tag, meta=meta,
                      tensors=list(tensors), codec=codec, feedback=feedback, limits=self.limits)
        if is_passthrough(codec) or _tensor_bytes(tensors) < OFFLOAD_BYTES:
            return job()
        try:
            return await wait_owned(asyncio.get_running_loop().run_in_executor(self._executor_for_codecs(), job))
        except FutureCancelled:  # close() shut the executor down under us
            if self._closed:
                raise TransportError(f"endpoint {self.node_id!r} closed while encoding") from None
            raise asyncio.CancelledError() from None

    async def send(self, peer_id: str, kind: str, *, epoch: int = 0, tag: Any = 0, meta: dict[str, Any] | None = None,
                   tensors: Sequence[torch.Tensor] = (), codec: str | Codec | Sequence[str | Codec] = "none",
                   feedback: Any = None, timeout: float | None = None) -> None:
        """Send one message, waiting while the peer's queue is full (back-pressure).

        Returns once the wire no longer needs ``tensors`` (they may be changed after).

        Args:
            peer_id: a peer added with :meth:`add_peer`.
            kind: what the message is.
            epoch: the sender's view epoch.
            tag: msgpack scalar or short list of scalars.
            meta: small msgpack-able map.
            tensors: CPU tensors (any wire dtype; non-contiguous is fine).
            codec: spec or Codec for all tensors, or one per tensor. Lossy codecs apply
                to floating tensors only. A Codec instance may keep scratch buffers:
                do not share one between concurrent sends.
            feedback: error-feedback state for lossy codecs (one, or one per tensor).
            timeout: seconds to wait in total; None waits as long as it takes.

        Raises:
            TransportError: unknown peer, closed endpoint, timeout (the message may still
                be delivered later), or a socket error.
            ProtocolError: the message breaks the wire rules (too big, bad meta ...).
            CodecError: unknown codec.
        """
        self._check_open()
        self._check_peer(peer_id)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        frames = await self._encode(kind, epoch, tag, meta, tensors, codec, feedback)
        await self._transmit(peer_id, frames, deadline)

    def try_send(self, peer_id: str, kind: str, *, epoch: int = 0, tag: Any = 0, meta: dict[str, Any] | None = None,
                 tensors: Sequence[torch.Tensor] = (), codec: str | Codec | Sequence[str | Codec] = "none",
                 feedback: Any = None) -> bool:
        """Send without waiting; False when the peer's queue is full (it is not queued).

        Meant for small messages (heartbeats) to peers that may be dead. Tensors are
        copied. While ``send`` calls wait for room it returns False: it never
        overtakes them.

        Raises:
            TransportError: unknown peer or closed endpoint.
            ProtocolError: the message breaks the wire rules.
        """
        self._check_open()
        self._check_peer(peer_id)
        frames = encode_message(sender=self.node_id, cluster=self.cluster, kind=kind, epoch=epoch, tag=tag, meta=meta,
                                tensors=list(tensors), codec=codec, feedback=feedback, limits=self.limits)
        return self._try_transmit(peer_id, frames)

    def _check_peer(self, peer_id: str) -> None:
        if not self._has_peer(peer_id):
            raise TransportError(f"unknown peer {peer_id!r}; call add_peer({peer_id!r}, address) first")

    @abstractmethod
    def _has_peer(self, peer_id: str) -> bool:
        """True when ``peer_id`` was added."""

    @abstractmethod
    async def _transmit(self, peer_id: str, frames: list[Any], deadline: float | None) -> None:
        """Hand ``frames`` to the wire (taking ownership: the list is emptied); return when it no longer needs them."""

    @abstractmethod
    def _try_transmit(self, peer_id: str, frames: list[Any]) -> bool:
        """Hand ``frames`` (copied) to the wire now, or return False."""

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until messages handed to the wire have left (bounded by ``timeout``).

        Returns:
            True when everything left in time.
        """
        return True  # the fake delivers synchronously

    # --- pulse: liveness that does not wait for the event loop ------------------------------

    def start_pulse(self, *, interval: float, max_age: float) -> bool:
        """Start repeating the message given to :meth:`pulse` from a thread while the loop is silent.

        See ``_pulse``: once the loop has sent no pulse message for 1.5 ``interval``, a
        thread with its own sockets sends the last one to every peer every ``interval``,
        until the loop speaks again or ``max_age`` seconds of silence have passed.

        Returns:
            True when this endpoint has a pulse thread. The in-memory fake has none (its
            wire is the event loop itself) and returns False.

        Raises:
            ConfigError: ``interval`` not > 0, or ``max_age`` shorter than 1.5 intervals.
            TransportError: not started, or closed.
        """
        self._check_open()
        return False

    def pulse(self, kind: str, *, epoch: int = 0, meta: dict[str, Any] | None = None) -> None:
        """Set the message the pulse repeats, and mark the loop alive now. Loop thread only.

        Call it whenever the loop sends that message itself (each heartbeat). Does nothing
        before :meth:`start_pulse` or after :meth:`stop_pulse`.

        Raises:
            ProtocolError: the message breaks the wire rules.
        """
        return  # no pulse thread here (the in-memory fake)

    def stop_pulse(self) -> None:
        """Stop the pulse thread (before a goodbye, so no pulse can follow it). Idempotent."""
        return  # no pulse thread here

    @property
    def pulse_stats(self) -> PulseStats | None:
        """What the pulse thread did (sent, dropped, rounds, expired); None without one."""
        return None

    # --- receiving -------------------------------------------------------------------------

    def expect(self, kind: str, *, epoch: int, tag: Any, sender: str, into: torch.Tensor, add: bool = False) -> None:
        """Receive the message ``(kind, epoch, tag)`` from ``sender`` straight into ``into``. Loop thread only.

        When that message carries one tensor of ``into``'s dtype and shape with the
        ``none`` codec, its bytes are added to ``into`` (``add=True``) or copied there,
        without a receive buffer in between, and off the event loop (see ``_landing``);
        it is then delivered with ``landed=into`` and no tensors. Any other message with
        that key is delivered as usual. ``into`` must not be read or written until the
        message is delivered or :meth:`forget` is called.

        Raises:
            ConfigError: ``into`` is not a contiguous CPU tensor, or too many landings
                are armed (4096).
        """
        self._landings.arm(kind, epoch, tag, Landing(sender, into, add))

    def forget(self, kind: str, *, epoch: int, tag: Any) -> None:
        """Disarm :meth:`expect` for ``(kind, epoch, tag)`` (a no-op once it landed)."""
        self._landings.disarm(kind, epoch, tag)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this endpoint's worker thread, the one that lands and decodes messages.

        For tensor work that must not hold the event loop (reducing, encoding). Jobs run
        one at a time, in order, with the landings of messages read before.

        Raises:
            TransportError: the endpoint closed before the job ran.
        """
        self._check_open()
        try:
            return await wait_owned(asyncio.get_running_loop().run_in_executor(self._executor_for_codecs(), fn, *args))
        except FutureCancelled:  # close() shut the executor down under us
            raise TransportError(f"endpoint {self.node_id!r} closed while work was queued") from None

    async def _land(self, landing: Landing, frames: list[memoryview]) -> None:
        """Apply a claimed landing: on the loop for small pieces, in the codec thread otherwise."""
        if landing.into.numel() * landing.into.element_size() <= INLINE_BYTES:
            land_frames(landing, frames)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor_for_codecs(), land_frames, landing, frames)
        self._landings.landed += 1

    def reader_held_s(self) -> float:
        """Seconds the reader was held past :data:`HELD_GRACE_S` a message by messages it took
        (their copy, decode or landing in the codec thread, room in the inbox), the one it
        holds now included. Later messages (heartbeats too) waited unread: the membership
        clock leaves this out, up to its limit (:mod:`p2ptrain.ring._liveness`, rule 3).
        Non-decreasing; loop thread."""
        held = self._held_s
        if self._held_since is not None:
            held += _held_part(time.monotonic() - self._held_since)
        return held

    async def _complete(self, msg: Message, env: Envelope | None, bufs: Any, landing: Landing | None = None) -> None:
        """:meth:`_finish`, timed for :meth:`reader_held_s`."""
        self._held_since = since = time.monotonic()
        try:
            await self._finish(msg, env, bufs, landing)
        finally:
            self._held_since = None
            self._held_s += _held_part(time.monotonic() - since)

    async def _finish(self, msg: Message, env: Envelope | None, bufs: Any, landing: Landing | None = None) -> None:
        """Finish a message a reader has taken off the wire, then deliver it.

        With a ``landing``, ``bufs`` are its validated frames (see ``_landing``); with an
        ``env``, ``bufs`` are receive buffers to decode in the codec thread, or the
        message's own frames (:class:`Deferred`) to check, copy and decode there; with
        neither, ``msg`` is complete. A failure drops and counts the message.
        """
        if landing is not None:
            try:
                await self._land(landing, bufs)
            except Exception:  # a bug must cost one message, never the reader
                logger.exception("endpoint %r: could not land a message from %r", self.node_id, msg.sender)
                self._book.drop(msg.sender, "internal_error")
                return
            finally:
                del bufs
        elif env is not None:
            loop = asyncio.get_running_loop()
            job = (partial(read_deferred, env, bufs.frames, self._pool.take) if isinstance(bufs, Deferred)
                   else partial(decode_buffers, env, bufs))
            try:
                msg.tensors = await loop.run_in_executor(self._executor_for_codecs(), job)
            except ProtocolError as exc:
                self._book.drop(msg.sender, reason_of(exc), str(exc))
                return
            except MemoryError:
                self._book.drop(msg.sender, "no_memory", "could not allocate the receive buffers or decoded tensors")
                return
            except Exception:  # a bug must cost one message, never the reader
                logger.exception("endpoint %r: could not read a message from %r", self.node_id, msg.sender)
                self._book.drop(msg.sender, "internal_error")
                return
            finally:
                del bufs
        await self._deliver(msg)

    async def _deliver(self, msg: Message) -> None:
        """Queue a decoded message for :meth:`recv`, waiting while the queue is full."""
        self._book.received(msg.sender, msg.nbytes)
        await self._inbox.put(msg)

    def _codec_for(self, spec: str) -> Codec:
        """The reader's codec for ``spec``: one instance per spec, reused (kernels' advice:
        codecs keep scratch memory, so keep one per stream). Decodes run one at a time."""
        codec = self._codecs.get(spec)
        if codec is None:
            codec = resolve_codec(spec)
            if len(self._codecs) >= 64:  # bounded: a peer naming many specs cannot grow it
                self._codecs.clear()
            self._codecs[spec] = codec
        return codec

    def _closed_while_waiting(self) -> TransportError:
        return TransportError(f"endpoint {self.node_id!r} closed while waiting in recv")

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message from any peer.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            TransportError: the endpoint is closed (or closes while waiting).
        """
        self._check_open()
        return await self._inbox.get(timeout)

    # --- counters --------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, PeerStats]:
        """Per-peer counters (a snapshot): received, sent, dropped by reason."""
        return self._book.snapshot()

    def drops(self, peer: str | None = None) -> dict[str, int]:
        """Dropped messages (and refused connections) by reason, for one peer or all."""
        return self._book.drops(peer)


def _held_part(seconds: float) -> float:
    """The part of a hold of ``seconds`` that :meth:`BaseEndpoint.reader_held_s` counts."""
    return max(0.0, seconds - HELD_GRACE_S)
