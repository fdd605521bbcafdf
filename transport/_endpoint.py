"""The ZeroMQ endpoint: one ROUTER to receive, one DEALER per peer to send.

Topology, and why:

- Each endpoint binds one ROUTER. ZeroMQ prefixes every inbound message with the
  connection's routing id, which our DEALERs set to their node id; the reader checks
  that the envelope's sender equals it (``sender_mismatch`` otherwise). One ROUTER fair-
  queues all peers, and ``ROUTER_HANDOVER`` lets a restarted peer take its id back.
- For each peer the endpoint connects a DEALER to the peer's ROUTER. A per-peer socket
  gives a per-peer send queue (``SNDHWM``): a slow or dead peer blocks sends to itself
  only, and :meth:`remove_peer` can drop exactly its queue (linger 0).
- Each endpoint owns its ``zmq.asyncio.Context`` (and so its own ZAP handler): several
  endpoints per process never share state. Works on the default loop and uvloop.

Zero-copy out: chunks are numpy views of the tensors sent with ``copy=False``; a
``weakref.finalize`` on each chunk fires when libzmq releases it (pyzmq drops its last
reference then), so :meth:`send` returns exactly when the tensors may change again.

In place in: the reader takes the routing id and envelope, then (the rest of a multipart
is always present once its first frame is, ZeroMQ delivers messages atomically) receives
each frame with ``recv_into`` straight into a pooled block, without going through futures.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import weakref
from typing import Any, cast

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from p2ptrain._errors import ConfigError, ProtocolError, TransportError
from p2ptrain.transport._base import BaseEndpoint, needs_thread
from p2ptrain.transport._curve import Admit, CurveKeys, admit_any, admit_cluster_key, admit_loopback
from p2ptrain.transport._envelope import Limits, Message, decode_envelope, reason_of, rejected
from p2ptrain.transport._frames import decode_buffers, read_buffers
from p2ptrain.transport._stats import UNKNOWN_PEER
from p2ptrain.transport._zap import ZapResponder

__all__ = ["Endpoint"]

logger = logging.getLogger("p2ptrain.transport")

#: Frames below this are copied by pyzmq anyway (its own default, 64 KiB): copying small
#: frames is cheaper than tracking them. We set it on every socket so it is known.
_COPY_THRESHOLD = 1 << 16
#: Reconnect quickly to a restarted peer on a LAN, backing off to 2 s for a dead one.
_RECONNECT_IVL_MS = 100
_RECONNECT_MAX_MS = 2000
#: Messages read in one go before yielding to the loop, so a flooding peer cannot
#: starve other tasks.
_READ_BATCH = 32
_ZAP_DOMAIN = b"p2ptrain"
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_DISCARD = bytearray()
_FRAME_SLACK = 1024
#: Largest frame a DEALER accepts: ZMTP handshake commands (READY metadata, CURVE
#: WELCOME) are a few hundred bytes; nothing else is expected.
_DEALER_MAX_INBOUND = 1 << 16


class _Completion:
    """Counts zero-copy chunks still held by libzmq; resolves a future when none are."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self._left = count
        self._lock = threading.Lock()
        self.future: asyncio.Future[None] = loop.create_future()

    def release(self) -> None:
        """Called from whichever thread drops a chunk (pyzmq's gc thread, usually)."""
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            try:
                self._loop.call_soon_threadsafe(self._finish)
            except RuntimeError:  # loop closed: nobody waits any more
                pass

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class _SocketFrames:
    """The rest of a multipart message on a (sync shadow of a) socket."""

    __slots__ = ("_sock",)

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock

    def more(self) -> bool:
        return bool(self._sock.get(zmq.RCVMORE))

    def recv_into(self, buf: memoryview) -> int:
        return self._sock.recv_into(buf, flags=zmq.NOBLOCK)


class _Peer:
    __slots__ = ("address", "server_key", "sock", "sync")

    def __init__(self, address: str, server_key: bytes | None, sock: zmq.asyncio.Socket) -> None:
        self.address = address
        self.server_key = server_key
        self.sock = sock
        self.sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)


def _needs_zap(curve: CurveKeys | None, admit: Admit | None, host: str) -> bool:
    """Whether connections must be put to ZAP.

    Not for the default plain endpoint bound to loopback: the kernel already admits only
    local peers there, which is exactly the default policy, and libzmq with ZAP active
    receives large messages measurably slower (here: 1700 instead of 490 page faults and
    +5 ms of I/O-thread time per 64 MiB message). Nor for :func:`admit_any`. Always with
    CURVE: without ZAP libzmq would accept any client key.
    """
    if curve is not None:
        return True
    if admit is admit_any:
        return False
    if admit is not None:
        return True
    return not ipaddress.ip_address(host).is_loopback


def _bind_address(host: str, port: int) -> tuple[str, bool]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"host {host!r} must be an IP address (e.g. 127.0.0.1); names are resolved by discovery") from exc
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port {port!r} must be an int in [0, 65535] (0 picks a free one)")
    where = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"tcp://{where}:{port or '*'}", ip.version == 6


class Endpoint(BaseEndpoint):
    """An async ZeroMQ endpoint: bind once, add peers, send and receive messages.

    Args:
        node_id: this node's id; also the routing id its DEALERs present.
        cluster: the cluster id; messages of other clusters are dropped.
        host: IP address to bind (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`address`).
        curve: a CURVE keypair: encrypt everything, act as CURVE server on the ROUTER and
            client on the DEALERs. With the shared cluster keypair all keys are the same.
        admit: ``admit(ip, client_key_z85 or None) -> bool`` for each new inbound
            connection. Default: with ``curve``, only the cluster public key; without,
            only loopback addresses (bound to loopback, the kernel already ensures it).
            Pass :func:`admit_any` to admit every address without CURVE (insecure).
        limits: what a peer may send.
        recv_queue: decoded messages held for :meth:`recv`.
        send_hwm: messages queued per peer before :meth:`send` waits.
        recv_hwm: messages per peer ZeroMQ holds before it stops reading that peer.
    """

    def __init__(self, node_id: str, cluster: str, *, host: str = "127.0.0.1", port: int = 0, curve: CurveKeys | None = None,
                 admit: Admit | None = None, limits: Limits | None = None, recv_queue: int = 64, send_hwm: int = 16,
                 recv_hwm: int = 16, pool_bytes: int = 256 << 20) -> None:
        super().__init__(node_id, cluster, limits=limits, recv_queue=recv_queue, pool_bytes=pool_bytes)
        self._bind, self._ipv6 = _bind_address(host, port)
        if curve is not None and not isinstance(curve, CurveKeys):
            raise ConfigError(f"curve must be CurveKeys, got {type(curve).__name__}")
        for name, hwm in (("send_hwm", send_hwm), ("recv_hwm", recv_hwm)):
            if not isinstance(hwm, int) or hwm < 1:
                raise ConfigError(f"{name} must be a positive int, got {hwm!r}")
        self._curve = curve
        self._admit: Admit = admit or (admit_cluster_key(curve) if curve is not None else admit_loopback)
        self._use_zap = _needs_zap(curve, admit, host)
        self._send_hwm = send_hwm
        self._recv_hwm = recv_hwm
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._zap: ZapResponder | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: dict[str, _Peer] = {}
        self._inflight: set[asyncio.Future[None]] = set()
        self._address = ""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the ROUTER (and the ZAP handler) and start reading. Idempotent.

        Raises:
            TransportError: the address could not be bound.
        """
        if self._started or self._closed:
            return
        self._open_base()
        loop = asyncio.get_running_loop()
        self._ctx = ctx = zmq.asyncio.Context()
        try:
            if self._use_zap:
                self._zap = ZapResponder(ctx, self._admit, self._on_refused)
                self._zap.start()
            router = self._router = ctx.socket(zmq.ROUTER)
            router.linger = 0
            router.copy_threshold = _COPY_THRESHOLD
            router.rcvhwm = self._recv_hwm
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # libzmq drops a connection whose single frame exceeds this, before buffering it.
            # It checks wire frames, so CURVE's per-frame box (~33 bytes) needs slack.
            router.setsockopt(zmq.MAXMSGSIZE, max(self.limits.frame_bytes, self.limits.max_envelope_bytes) + _FRAME_SLACK)
            if self._use_zap:
                router.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)  # makes libzmq ask ZAP for NULL too
            if self._ipv6:
                router.setsockopt(zmq.IPV6, 1)
            if self._curve is not None:
                router.setsockopt(zmq.CURVE_SERVER, 1)
                router.setsockopt(zmq.CURVE_PUBLICKEY, self._curve.public)
                router.setsockopt(zmq.CURVE_SECRETKEY, self._curve.secret)
            router.bind(self._bind)
            self._address = _last_endpoint(router)
            self._monitor = router.get_monitor_socket(_HANDSHAKE_EVENTS)
        except zmq.ZMQError as exc:
            await self.close()
            raise TransportError(f"endpoint {self.node_id!r} could not bind {self._bind}: {exc}") from exc
        self._tasks.append(loop.create_task(self._read_loop(), name=f"p2ptrain-read-{self.node_id}"))
        self._tasks.append(loop.create_task(self._monitor_loop(), name=f"p2ptrain-monitor-{self.node_id}"))

    async def close(self, *, linger: float = 0.0) -> None:
        """Stop reading, close every socket, end the context. Idempotent.

        Args:
            linger: seconds to keep sending what is still queued (a goodbye, say);
                0 drops it at once. The wait runs off the event loop.
        """
        if self._closed:
            return
        self._close_base()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._zap is not None:
            await self._zap.close()
        linger_ms = max(0, int(linger * 1000))
        for peer in self._peers.values():
            peer.sock.close(linger=linger_ms)
        self._peers.clear()
        for sock in (self._monitor, self._router):
            if sock is not None:
                sock.close(linger=0)
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            if linger_ms:
                await _term_off_loop(ctx)  # blocks up to the linger while queues drain
            else:
                ctx.term()  # every socket is closed with linger 0: returns at once
        for fut in self._inflight:
            if not fut.done():
                fut.set_result(None)
        self._inflight.clear()

    # --- peers -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` this endpoint listens on (after :meth:`start`)."""
        if not self._address:
            raise TransportError(f"endpoint {self.node_id!r} is not started")
        return self._address

    @property
    def public_key(self) -> bytes | None:
        """This endpoint's CURVE public key (Z85), or None without CURVE."""
        return self._curve.public if self._curve is not None else None

    @property
    def peers(self) -> dict[str, str]:
        """Known peers: node id -> address."""
        return {k: p.address for k, p in self._peers.items()}

    def add_peer(self, peer_id: str, address: str, *, server_key: bytes | None = None) -> None:
        """Connect a DEALER to ``peer_id``'s ROUTER at ``address``. Loop thread only.

        Idempotent; a new address or key replaces the connection (queued messages for the
        old one are dropped).

        Args:
            server_key: the peer's CURVE public key; defaults to this endpoint's own
                (the shared cluster key).

        Raises:
            TransportError: not started, or the address is invalid.
        """
        self._check_open()
        if not isinstance(peer_id, str) or not peer_id:
            raise ConfigError(f"peer_id must be a non-empty string, got {peer_id!r}")
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"peer address {address!r} must look like tcp://HOST:PORT")
        if self._curve is not None:
            server_key = server_key or self._curve.public
        old = self._peers.get(peer_id)
        if old is not None:
            if old.address == address and old.server_key == server_key:
                return
            self.remove_peer(peer_id)
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            sock.copy_threshold = _COPY_THRESHOLD
            sock.setsockopt(zmq.ROUTING_ID, self.node_id.encode("utf-8"))
            sock.sndhwm = self._send_hwm
            # Nothing is ever read from a DEALER: a peer writing to it fills one slot and
            # stops. (MAXMSGSIZE also bounds handshake commands, so it cannot be tiny.)
            sock.rcvhwm = 1
            sock.setsockopt(zmq.MAXMSGSIZE, _DEALER_MAX_INBOUND)
            sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
            if "[" in address:
                sock.setsockopt(zmq.IPV6, 1)
            if self._curve is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key or self._curve.public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve.secret)
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot connect to peer {peer_id!r} at {address!r}: {exc}") from exc
        self._peers[peer_id] = _Peer(address, server_key, sock)

    def remove_peer(self, peer_id: str) -> None:
        """Close the connection to ``peer_id`` (linger 0: queued messages are dropped).

        Sends waiting on it raise :class:`TransportError`. Unknown ids are ignored.
        """
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.sock.close(linger=0)

    # --- sending ---------------------------------------------------------------------------

    def _track(self, frames: list[Any]) -> _Completion | None:
        """A completion that resolves when libzmq has released every zero-copy chunk.

        Only the last zero-copy chunk is watched: libzmq frees the frames of a message in
        order (the engine writes them in order; a dropped pipe is drained in order) and
        pyzmq's gc thread handles the frees in order, so the last release implies all.
        Measured: one finalizer per 1 MiB chunk cost ~0.5 ms per 64 MiB message.
        """
        last = None
        for f in reversed(frames):
            if isinstance(f, np.ndarray) and f.nbytes >= _COPY_THRESHOLD:
                last = f
                break
        if last is None:
            return None
        done = _Completion(asyncio.get_running_loop(), 1)
        fin = weakref.finalize(last, done.release)
        fin.atexit = False
        return done

    async def _transmit(self, peer_id: str, frames: list[Any], deadline: float | None) -> None:
        peer = self._peers[peer_id]
        loop = asyncio.get_running_loop()
        nbytes = sum(f.nbytes for f in frames[1:])
        done = self._track(frames)
        try:
            fut = cast("asyncio.Future[Any]", peer.sock.send_multipart(list(frames), copy=False))
            frames.clear()  # the caller's list too: from here on only pyzmq/libzmq hold the chunks
            if not fut.done():
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(fut, remaining)
            else:
                fut.result()
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise TransportError(f"send to {peer_id!r} timed out: its queue stayed full (peer down, slow or refusing us)") from exc
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {peer_id!r} failed: {exc}") from exc
        except asyncio.CancelledError:
            if peer.sock.closed and not _cancelling():
                raise TransportError(f"peer {peer_id!r} was removed while sending to it") from None
            raise
        self._book.sent(peer_id, nbytes)
        if done is None:
            return
        self._inflight.add(done.future)
        try:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(asyncio.shield(done.future), remaining)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise TransportError(f"send to {peer_id!r} timed out while the wire still held the tensors; "
                                 "the message may still be delivered") from exc
        finally:
            if done.future.done():
                self._inflight.discard(done.future)
            else:
                done.future.add_done_callback(self._inflight.discard)
        if peer.sock.closed:
            raise TransportError(f"peer {peer_id!r} was removed before the message left")

    def _try_transmit(self, peer_id: str, frames: list[Any]) -> bool:
        peer = self._peers[peer_id]
        nbytes = sum(memoryview(f).nbytes for f in frames[1:])
        # Copy everything (the caller may reuse its tensors at once), and send the last
        # frame from a private array watched by a finalizer, so flush() can tell when
        # this message has left. Costs ~50 us per message: fine for heartbeats.
        tail = np.array(memoryview(frames[-1]).cast("B"), dtype=np.uint8)
        done = _Completion(asyncio.get_running_loop(), 1)
        fin = weakref.finalize(tail, done.release)
        fin.atexit = False
        parts = [*frames[:-1], zmq.Frame(tail, copy=False, copy_threshold=0)]
        frames.clear()
        del tail
        try:
            peer.sync.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {peer_id!r} failed: {exc}") from exc
        finally:
            parts.clear()
        self._inflight.add(done.future)
        done.future.add_done_callback(self._inflight.discard)
        self._book.sent(peer_id, nbytes)
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every ``try_send`` and every zero-copy ``send`` so far has left.

        Small ``send`` messages (all frames under 64 KiB) are not tracked; they leave in
        order, before any later tracked message to the same peer. To make sure those
        leave too, use ``close(linger=...)``.

        Returns:
            True when nothing was left in flight in time.
        """
        pending = [f for f in self._inflight if not f.done()]
        if not pending:
            return True
        done, rest = await asyncio.wait(pending, timeout=timeout)
        return not rest

    # --- receiving -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        router = self._router
        assert router is not None
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(router.underlying)
        source = _SocketFrames(sync)
        env_buf = memoryview(bytearray(self.limits.max_envelope_bytes))
        while True:
            ident: bytes = await router.recv()
            count = 0
            while True:
                got = self._read_one(ident, sync, source, env_buf)
                if got is not None:
                    await self._finish(*got)
                    got = None
                count += 1
                if count % _READ_BATCH == 0:
                    await asyncio.sleep(0)
                try:
                    ident = sync.recv(zmq.NOBLOCK)  # the next message, without a future
                except zmq.Again:
                    break

    async def _finish(self, msg: Message, env: Any, bufs: Any) -> None:
        if bufs is not None:
            loop = asyncio.get_running_loop()
            try:
                msg.tensors = await loop.run_in_executor(self._executor_for_codecs(), decode_buffers, env, bufs)
            except ProtocolError as exc:
                self._book.drop(msg.sender, reason_of(exc), str(exc))
                return
            finally:
                del bufs
        await self._deliver(msg)

    def _read_one(self, ident: bytes, sync: zmq.Socket[Any], source: _SocketFrames,
                  env_buf: memoryview) -> tuple[Message, Any, Any] | None:
        """Read the rest of one message (sync: all its frames are already here)."""
        peer = UNKNOWN_PEER
        try:
            try:
                peer = ident.decode("utf-8")
            except UnicodeDecodeError:
                raise rejected("bad_identity", f"routing id {ident[:32]!r} is not UTF-8") from None
            if not source.more():
                raise rejected("truncated", "message has no envelope frame")
            n = sync.recv_into(env_buf, flags=zmq.NOBLOCK)
            if n > len(env_buf):
                raise rejected("envelope_too_large", f"envelope of {n} bytes exceeds {len(env_buf)}")
            env = decode_envelope(env_buf[:n], self.limits, self.cluster)
            if env.sender != peer:
                raise rejected("sender_mismatch", f"envelope says sender {env.sender!r} but the connection is {peer!r}")
            bufs = read_buffers(env, source, self._pool.take)
            msg = Message(env.sender, env.kind, env.epoch, env.tag, env.meta, [], env.nbytes)
            if needs_thread(env):
                return msg, env, bufs
            msg.tensors = decode_buffers(env, bufs)
            return msg, None, None
        except ProtocolError as exc:
            self._book.drop(peer, reason_of(exc), str(exc))
        except zmq.Again:  # cannot happen for an atomic multipart; counted if it ever does
            self._book.drop(peer, "truncated", "frames missing from a multipart")
        try:
            while sync.get(zmq.RCVMORE):
                sync.recv_into(_DISCARD, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        return None

    def _on_refused(self, ip: str, identity: str, why: str) -> None:
        self._book.drop(ip, "refused", f"connection claiming to be {identity!r} refused: {why}")

    async def _monitor_loop(self) -> None:
        mon = self._monitor
        assert mon is not None
        while True:
            frames = await mon.recv_multipart()
            try:
                event = parse_monitor_message(frames)
            except Exception:  # pragma: no cover - libzmq's own format
                continue
            self._book.drop(UNKNOWN_PEER, "handshake_failed",
                            f"handshake failed on {event.get('endpoint', b'?')!r} (event {event.get('event')}, code {event.get('value')})")


async def _term_off_loop(ctx: zmq.asyncio.Context) -> None:
    """``ctx.term()`` in a short-lived thread (it blocks while sockets linger)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            ctx.term()
        finally:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # loop already closed
                pass

    thread = threading.Thread(target=run, name="p2ptrain-zmq-term", daemon=True)
    thread.start()
    await done
    thread.join()


def _last_endpoint(sock: zmq.Socket[Any]) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
