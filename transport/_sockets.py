"""The sockets of an :class:`~p2ptrain.transport.Endpoint` and how each is configured.

- :func:`open_router`: the one ROUTER it binds. ``ROUTER_HANDOVER`` lets a restarted
  peer take its id back; ``MAXMSGSIZE`` makes libzmq drop an oversized frame before
  buffering it.
- :class:`HandshakeMonitor`: the ROUTER's socket monitor. A wrong server key, or a plain
  client at a CURVE server, fails the ZMTP handshake before libzmq would ask ZAP
  (``_zap``), so no ``admit`` call sees it; the monitor reports those failures.
- :class:`Dealers`: one DEALER per peer. A per-peer socket gives a per-peer send queue
  (``SNDHWM``): a slow or dead peer blocks sends to itself only, and
  :meth:`Dealers.remove` drops exactly its queue (linger 0). Each DEALER presents the
  node id as its routing id, which the peer's ROUTER checks against the envelope's sender.
  Each DEALER's socket monitor reports when its connection drops (``on_lost``): when a
  peer's process dies its kernel closes the TCP connection at once, long before a
  heartbeat timeout would notice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from p2ptrain._errors import ConfigError, TransportError

from ._curve import CurveKeys
from ._zerocopy import COPY_THRESHOLD

__all__ = ["Dealer", "Dealers", "HandshakeMonitor", "bind_address", "connect_dealer", "open_router"]

logger = logging.getLogger(__name__)

#: CURVE boxes each wire frame (~33 bytes): the ROUTER's frame limit needs this slack.
_FRAME_SLACK = 1024
_ZAP_DOMAIN = b"p2ptrain"
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL

#: Reconnect quickly to a restarted peer on a LAN, backing off to 2 s for a dead one.
_RECONNECT_IVL_MS = 100
_RECONNECT_MAX_MS = 2000
#: Largest frame a DEALER accepts: ZMTP handshake commands (READY metadata, CURVE
#: WELCOME) are a few hundred bytes; nothing else is expected.
_DEALER_MAX_INBOUND = 1 << 16


def bind_address(host: str, port: int) -> tuple[str, bool]:
    """The ``tcp://`` address to bind for ``host`` and ``port``, and whether it is IPv6.

    Raises:
        ConfigError: ``host`` is not an IP address, or ``port`` is out of range.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"host {host!r} must be an IP address (e.g. 127.0.0.1); names are resolved by discovery") from exc
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port {port!r} must be an int in [0, 65535] (0 picks a free one)")
    where = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"tcp://{where}:{port or '*'}", ip.version == 6


def open_router(ctx: zmq.asyncio.Context, bind: str, *, ipv6: bool, curve: CurveKeys | None, zap: bool, recv_hwm: int,
                max_frame: int) -> tuple[zmq.Socket[bytes], str]:
    """Bind the endpoint's ROUTER; return it with the address it got (``tcp://HOST:PORT``).

    A plain (sync) socket on the async context: the endpoint's reader drives it from the
    loop itself, bypassing pyzmq's per-call future machinery.

    Raises:
        zmq.ZMQError: the address could not be bound (the socket is closed again).
    """
    router: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.ROUTER)
    try:
        router.linger = 0
        router.copy_threshold = COPY_THRESHOLD
        router.rcvhwm = recv_hwm
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # libzmq drops a connection whose single frame exceeds this, before buffering it.
        # It checks wire frames, so CURVE's per-frame box needs slack.
        router.setsockopt(zmq.MAXMSGSIZE, max_frame + _FRAME_SLACK)
        if zap:
            router.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)  # makes libzmq ask ZAP for NULL too
        if ipv6:
            router.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            router.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        router.bind(bind)
    except zmq.ZMQError:
        router.close(linger=0)
        raise
    value = router.getsockopt(zmq.LAST_ENDPOINT)
    return router, value.decode() if isinstance(value, bytes) else str(value)


class HandshakeMonitor:
    """The monitor socket of one ROUTER, watching for failed handshakes only.

    Args:
        ctx: the ROUTER's context (inproc monitors live in it).
        router: the socket to watch.
        address: a unique ``inproc://`` name for the monitor pair.

    Raises:
        zmq.ZMQError: libzmq refused to start the monitor.
    """

    def __init__(self, ctx: zmq.asyncio.Context, router: zmq.Socket[Any], address: str) -> None:
        router.monitor(address, _HANDSHAKE_EVENTS)
        self._sock = ctx.socket(zmq.PAIR)
        try:
            self._sock.linger = 0
            self._sock.connect(address)
        except zmq.ZMQError:
            self._sock.close(linger=0)
            raise

    async def run(self, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure(description)`` for every failed handshake, until cancelled."""
        while True:
            frames = await self._sock.recv_multipart()
            try:
                event = parse_monitor_message(frames)
            except Exception:  # pragma: no cover - libzmq's own format
                continue
            on_failure(f"handshake failed on {event.get('endpoint', b'?')!r} "
                       f"(event {event.get('event')}, code {event.get('value')})")

    def close(self) -> None:
        """Close the monitor socket (linger 0). Idempotent."""
        self._sock.close(linger=0)


def connect_dealer(sock: zmq.Socket[Any], peer_id: str, address: str, *, routing_id: bytes, curve: CurveKeys | None,
                   server_key: bytes | None, send_hwm: int) -> None:
    """Configure a fresh DEALER ``sock`` for ``peer_id`` and connect it to ``address``.

    Shared by :class:`Dealers` (the loop's sockets) and the pulse thread's own sockets
    (``_pulse``), so both present the same keys and limits.

    Raises:
        TransportError: libzmq refused an option or the address (``sock`` is closed).
    """
    try:
        sock.linger = 0
        sock.copy_threshold = COPY_THRESHOLD
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.sndhwm = send_hwm
        # Nothing is ever read from a DEALER: a peer writing to it fills one slot and
        # stops. (MAXMSGSIZE also bounds handshake commands, so it cannot be tiny.)
        sock.rcvhwm = 1
        sock.setsockopt(zmq.MAXMSGSIZE, _DEALER_MAX_INBOUND)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
        if "[" in address:
            sock.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key or curve.public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        sock.connect(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"cannot connect to peer {peer_id!r} at {address!r}: {exc}") from exc


class _Waiting:
    """A message waiting for room in its peer's queue (compared by identity)."""

    __slots__ = ("frames", "future")

    def __init__(self, frames: list[Any], future: asyncio.Future[None]) -> None:
        self.frames = frames
        self.future = future


class Dealer:
    """One outbound connection: the DEALER, its sync shadow, and the sends waiting for room.

    A send tries the socket at once (``NOBLOCK``); when the peer's queue is full
    (``SNDHWM``) the message waits in :attr:`queue`, in order, and :meth:`_drain` moves
    waiting messages into the socket whenever its FD says the state changed. This is the
    queue pyzmq's asyncio socket keeps, without its costs per waiting send (a timer, a
    future event, and on completion a scan of every waiting send that formats one as
    text: 0.1-0.4 ms of the loop per send once sends queue, measured).
    """

    __slots__ = ("_loop", "_reading", "address", "monitor", "queue", "server_key", "sock", "sync", "watch")

    def __init__(self, address: str, server_key: bytes | None, sock: zmq.asyncio.Socket) -> None:
        self.address = address
        self.server_key = server_key
        self.sock = sock
        self.sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        self.queue: collections.deque[_Waiting] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self.monitor: zmq.asyncio.Socket | None = None  # the socket monitor's reading end (see Dealers)
        self.watch: asyncio.Task[None] | None = None  # reads it

    def enqueue(self, frames: list[Any]) -> asyncio.Future[None]:
        """Queue ``frames`` behind the messages already waiting; the future resolves once
        libzmq has taken them. Cancelling it withdraws a message that has not gone yet
        (a timeout, its sender cancelled): it leaves the queue and its frames are dropped."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(frames, loop.create_future())
        waiting.future.add_done_callback(partial(self._withdraw, waiting))
        self.queue.append(waiting)
        if not self._reading:
            self._loop = loop
            loop.add_reader(self.sync.FD, self._drain)
            self._reading = True
            loop.call_soon(self._drain)  # room may have come before the reader was added
        return waiting.future

    def _withdraw(self, waiting: _Waiting, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            waiting.frames.clear()
            with contextlib.suppress(ValueError):  # already taken off by _drain or close
                self.queue.remove(waiting)

    def _drain(self) -> None:
        queue = self.queue
        try:
            while queue:
                waiting = queue[0]
                if waiting.future.done():  # withdrawn; its callback has not run yet
                    queue.popleft()
                    continue
                try:
                    self.sync.send_multipart(waiting.frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    # Reading EVENTS processes libzmq's pending commands: room may have
                    # come meanwhile; otherwise the FD is clear and fires on the next change.
                    if int(self.sync.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
                        continue
                    return
                except zmq.ZMQError as exc:
                    queue.popleft()
                    waiting.future.set_exception(exc)
                    continue
                queue.popleft()
                waiting.frames.clear()
                waiting.future.set_result(None)
        except zmq.ZMQError:  # the socket was closed under us: close() fails what waits
            return
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._reading = False
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(self.sync.FD)

    def close(self, linger_ms: int = 0) -> None:
        """Close the DEALER and its monitor now (the context's term waits for every socket);
        the sends still waiting for room see their future cancelled."""
        self._stop_reading()
        while self.queue:
            self.queue.popleft().future.cancel()
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=linger_ms)


class Dealers:
    """The DEALERs of one endpoint, by peer id. Loop thread only.

    Args:
        ctx: the endpoint's context (its sockets end with it).
        node_id: the routing id every DEALER presents.
        curve: the CURVE keypair to connect with, or None for plain TCP.
        send_hwm: messages queued per peer before a send waits.
    """

    def __init__(self, ctx: zmq.asyncio.Context, node_id: str, *, curve: CurveKeys | None, send_hwm: int) -> None:
        self._ctx = ctx
        self._routing_id = node_id.encode("utf-8")
        self._curve = curve
        self._send_hwm = send_hwm
        self._peers: dict[str, Dealer] = {}
        self.on_lost: Callable[[str], None] | None = None  # called with a peer id when its connection drops

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: str) -> Dealer | None:
        """The connection to ``peer_id``, or None when it is not (or no longer) known."""
        return self._peers.get(peer_id)

    def addresses(self) -> dict[str, str]:
        """Known peers: node id -> address."""
        return {k: p.address for k, p in self._peers.items()}

    def add(self, peer_id: str, address: str, *, server_key: bytes | None = None) -> None:
        """Connect a DEALER to ``peer_id``'s ROUTER at ``address``.

        Idempotent; a new address or key replaces the connection (queued messages for the
        old one are dropped).

        Raises:
            ConfigError: a malformed id or address.
            TransportError: libzmq refused the address.
        """
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
            self.remove(peer_id)
        dealer = self._peers[peer_id] = Dealer(address, server_key, self._connect(peer_id, address, server_key))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (set-up code): no monitor, heartbeats still detect
            return
        dealer.monitor = dealer.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        dealer.watch = loop.create_task(self._watch(peer_id, dealer.monitor), name=f"p2ptrain-watch-{peer_id}")

    async def _watch(self, peer_id: str, monitor: zmq.asyncio.Socket) -> None:
        """Report every drop of ``peer_id``'s connection until cancelled (its Dealer closes the monitor)."""
        while True:
            try:
                frames = await monitor.recv_multipart()
                event = parse_monitor_message(frames)
            except zmq.ZMQError:  # the monitor was closed under us
                return
            except Exception:  # pragma: no cover - libzmq's own format
                continue
            if event.get("event") == zmq.EVENT_DISCONNECTED and self.on_lost is not None:
                try:
                    self.on_lost(peer_id)
                except Exception:  # the hook's bug must not end this peer's watch
                    logger.exception("handling the lost connection to %r failed", peer_id)

    def _connect(self, peer_id: str, address: str, server_key: bytes | None) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        connect_dealer(sock, peer_id, address, routing_id=self._routing_id, curve=self._curve, server_key=server_key,
                       send_hwm=self._send_hwm)
        return sock

    def remove(self, peer_id: str) -> None:
        """Close the connection to ``peer_id`` (linger 0: queued messages are dropped).

        Sends waiting on it see their future cancelled. Unknown ids are ignored.
        """
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.close()

    def close(self, linger_ms: int = 0) -> None:
        """Close every DEALER, keeping what is queued for up to ``linger_ms``."""
        for peer in self._peers.values():
            peer.close(linger_ms)
        self._peers.clear()
