"""The embeddable node: transport + discovery + membership, on the host's event loop.

``Node`` is a thin adapter: it owns the sockets and the mDNS service and feeds what they hear
into the plain :class:`~p2ptrain.ring._membership.Membership` state machine.

    async with p2ptrain.Node(cluster="lab", secret=b"...") as node:
        view = await node.wait_for_peers(2, timeout=10)

Nothing here takes over the event loop or keeps global state: several nodes can share a process.
Liveness does not wait behind the event loop: a pulse thread beats for a blocked loop, for a bounded
time, and a loop that wakes does not count its stall against its peers (:mod:`p2ptrain.ring._liveness`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError, P2PTrainError, PeerFailedError, ProtocolError
from p2ptrain.discovery import MdnsDiscovery, PeerRecord, Resources, StaticPeer, check_cluster, interface_addresses
from p2ptrain.ring._feed import ViewFeed, wait_failed
from p2ptrain.ring._heartbeat import Heartbeat
from p2ptrain.ring._identity import check_secret, claim_node_id
from p2ptrain.ring._liveness import Liveness
from p2ptrain.ring._local import local_resources
from p2ptrain.ring._membership import Membership, MemberState, check_expiry
from p2ptrain.ring._peers import MemberInfo, PeerTable, Refusal, advertised_address, bracket
from p2ptrain.ring._router import Router
from p2ptrain.ring._view import View
from p2ptrain.transport import BaseEndpoint, CurveKeys, Endpoint, FakeNetwork, Message, admit_any

__all__ = ["MemberInfo", "Node"]

logger = logging.getLogger(__name__)

PROTOCOL = 1
# Membership message kinds; everything else is application traffic (collectives, jobs).
_HB, _BYE, _HELLO = "hb", "bye", "hello"


class Node:
    """One member of a p2ptrain cluster.

    Args:
        cluster: cluster name; nodes of other clusters are ignored.
        secret: the cluster secret (surrounding whitespace, e.g. a file's trailing newline, is stripped, as ``--secret-file``
            does). With it all traffic is CURVE-encrypted and only peers that prove the secret are admitted. Without it only
            loopback peers are admitted unless ``insecure`` is set.
        interfaces: addresses to bind and announce on; None means all interfaces (tests and the demo: ``["127.0.0.1"]``).
        port: TCP port for the ring (0 picks a free one). peers: static peers (``"HOST:PORT"``) for networks that block multicast.
        node_id: explicit id; by default the device's persisted id, held while the node runs (a second
            node on the device gets a fresh id and a warning), or a fresh one when ``ephemeral`` is set.
        ephemeral: do not read or write the persisted id.
        state_dir: where the persisted id lives (default ``~/.local/state/p2ptrain``); jobs keep this
            device's profile cache there too (ephemeral nodes included).
        insecure: admit non-loopback peers without a secret (loudly logged). mdns: announce and browse over mDNS (off: static peers only).
        failure_timeout: seconds without a heartbeat before a peer is declared dead. heartbeat_interval: between heartbeats.
        quorum_expiry: seconds after which a silent member stops counting toward the quorum, so
            the survivors of half a ring form one again; None: they wait for it (``Membership``).
        stall_limit: seconds of a blocked event loop that the pulse thread covers for (keeps
            heartbeating); None means 10 failure timeouts, 0 turns the pulse off.
        resources: what this device announces; measured when omitted.
        network: an in-memory :class:`~p2ptrain.transport.FakeNetwork` instead of sockets (tests, faults); implies ``mdns=False``.
    """

    def __init__(
        self,
        *,
        cluster: str = "default",
        secret: bytes | str | None = None,
        interfaces: Sequence[str] | None = None,
        port: int = 0,
        peers: Sequence[str] = (),
        node_id: str | None = None,
        ephemeral: bool = False,
        state_dir: str | Path | None = None,
        insecure: bool = False,
        mdns: bool = True,
        failure_timeout: float = 2.0,
        quorum_expiry: float | None = 30.0,
        heartbeat_interval: float = 0.25,
        stall_limit: float | None = None,
        resources: Resources | None = None,
        network: FakeNetwork | None = None,
    ) -> None:
        if not cluster or len(cluster) > 63:
            raise ConfigError(f"cluster name {cluster!r} must be 1-63 characters")
        check_cluster(cluster)  # here, not at start(): "w21 space" was accepted until then (a walkthrough)
        self.cluster = cluster
        if isinstance(interfaces, (str, bytes)):  # list("127.0.0.1") is its characters: a bind to every interface
            raise ConfigError(f"interfaces must be a list of addresses, e.g. [{interfaces!r}], not a string")
        self.interfaces = interface_addresses(list(interfaces)) if interfaces is not None else None  # names: bind their addresses
        self._port = port
        self._static = [StaticPeer.parse(p) for p in peers]
        secret = check_secret(secret)  # stripped as --secret-file reads it; at least 16 bytes
        check_expiry(quorum_expiry, failure_timeout)  # before the persisted id is held
        # The persisted id is held (a lock) until close(): a second node on this device gets a fresh one.
        self._id = claim_node_id(node_id, ephemeral=ephemeral, state_dir=Path(state_dir) if state_dir else None)
        self.node_id = self._id.node_id
        self.state_dir: Path | None = Path(state_dir) if state_dir else None  # None: the default one
        self.incarnation = time.time_ns()
        self.stats: dict[str, int] = {"bad_heartbeat": 0, "foreign_key": 0, "non_loopback_refused": 0}
        self._liveness = Liveness(interval=heartbeat_interval, failure_timeout=failure_timeout, stall_limit=stall_limit,
                                  name=self.node_id, stats=self.stats)
        self._curve = CurveKeys.from_secret(secret) if secret else None
        self._insecure = insecure
        self._network = network
        self._mdns_enabled = mdns and network is None
        self._resources = resources
        self.membership = Membership(self.node_id, self.incarnation, failure_timeout, quorum_expiry=quorum_expiry)
        self._endpoint: BaseEndpoint | None = None
        self._discovery: MdnsDiscovery | None = None
        self._peers = PeerTable(self.node_id, scheme="fake://" if network is not None else "tcp://",
                                remote=self._curve is not None or insecure)
        self._tasks: list[asyncio.Task[None]] = []
        self._feed = ViewFeed()
        self._router = Router(self.stats, drain_s=failure_timeout)
        self.mailbox = self._router.mailbox
        self._last_proposal: tuple[str, ...] = ()
        self._last_beat_view: View | None = None
        self._last_hello = 0.0
        self._closed = False
        self._started = False

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind, announce, and start heartbeating.

        Raises:
            TransportError: the port could not be bound.
            DiscoveryError: mDNS could not start on the chosen interfaces.
            P2PTrainError: the node was closed (a closed node cannot start again: make a new one).
        """
        if self._closed:  # it did nothing, and the node went on reporting its old view and address
            raise P2PTrainError(f"node {self.node_id} is closed; create a new Node to join again")
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        if self._curve is None and self._insecure:
            logger.warning(
                "INSECURE: cluster %r runs without a secret and admits peers from any address; "
                "anyone on this network can join and read tensors", self.cluster,
            )
        host = self.interfaces[0] if self.interfaces and len(self.interfaces) == 1 else "0.0.0.0"
        admit = admit_any if (self._insecure and self._curve is None) else None
        if self._network is not None:
            self._endpoint = self._network.endpoint(self.node_id, self.cluster)
        else:
            self._endpoint = Endpoint(self.node_id, self.cluster, host=host, port=self._port, curve=self._curve, admit=admit)
        await self._endpoint.start()
        if self._resources is None:
            self._resources = await asyncio.get_running_loop().run_in_executor(None, local_resources)
        self._liveness.start(self._endpoint, self.membership.suspect)
        self._last_hello = self._clock()
        self._tasks.append(asyncio.create_task(self._receive_loop(), name=f"p2ptrain-recv-{self.node_id}"))
        self._tasks.append(asyncio.create_task(self._liveness.run(self._heartbeat), name=f"p2ptrain-hb-{self.node_id}"))
        if self._mdns_enabled:
            self._discovery = MdnsDiscovery(self._record(), cluster=self.cluster, interfaces=self.interfaces)
            await self._discovery.start()
            self._tasks.append(asyncio.create_task(self._discovery_loop(), name=f"p2ptrain-mdns-{self.node_id}"))
        for sp in self._static:
            self.connect(f"tcp://{bracket(sp.host)}:{sp.port}")
        logger.info("node %s of cluster %r listening on %s", self.node_id, self.cluster, self.address)

    async def close(self) -> None:
        """Leave gracefully (peers shrink the ring at once) and release everything. Idempotent."""
        self._id.release()
        was, self._closed = self._closed, True
        if was or not self._started:
            return
        self._router.mailbox.fail(PeerFailedError(f"node {self.node_id} closed"))  # nothing awaited can come now
        self._feed.wake()  # and whoever waits for a view change looks at `closed`
        ep = self._endpoint
        if ep is not None:
            self._liveness.stop()  # no pulse may follow the goodbye
            for peer in self._peers.ids():
                ep.try_send(peer, _BYE, epoch=self.view.epoch, meta={"i": self.incarnation})
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._discovery is not None:
            await self._discovery.close()
        if ep is not None:
            # Give the goodbyes a moment to leave the socket (bounded; linger is 0 after).
            await ep.flush(timeout=0.2)
            await ep.close()

    def step_out(self) -> None:
        """Leave the view and come back as a newcomer, staying open (``JobService.leave``): the others drop this
        incarnation at once, as after a fast restart (:class:`Membership`), ending a job's wait for it; then take it in."""
        self.incarnation = self.membership.incarnation = max(time.time_ns(), self.incarnation + 1)

    # --- public state ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """:meth:`close` was called: the node takes and sends nothing more."""
        return self._closed

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` peers reach this node at."""
        if self._endpoint is None:
            raise P2PTrainError("node not started")
        return str(self._endpoint.address)

    @property
    def endpoint(self) -> BaseEndpoint:
        """The transport endpoint (for collectives built on this node)."""
        if self._endpoint is None:
            raise P2PTrainError("node not started")
        return self._endpoint

    @property
    def view(self) -> View:
        """The currently agreed view."""
        return self.membership.view

    @property
    def state(self) -> MemberState:
        """alone, member or paused."""
        return self.membership.state

    @property
    def _addresses(self) -> dict[str, str]:
        """Peer id -> address of every connected peer (a copy; the fault tests bound its size)."""
        return self._peers.addresses()

    def members(self) -> list[MemberInfo]:
        """Every member of the current view with what is known about it."""
        me = MemberInfo(self.node_id, self._advertised() if self._endpoint else None, self._resources, self.state.value,
                        self.view.epoch)  # where the others dial it, not tcp://0.0.0.0 when bound to every interface
        return [me if m == self.node_id else self._peers.member(m, self.membership.last_beat(m)) for m in self.view.members]

    async def wait_for_peers(self, n: int, timeout: float | None = None) -> View:
        """Wait until the agreed view holds this node and at least ``n`` others.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds (the message says what was seen).
        """
        try:  # a view that already holds them is returned at once, whatever the timeout
            if len(self.view) < n + 1:
                await asyncio.wait_for(self._feed.until(lambda: len(self.view) >= n + 1), timeout)
            return self.view
        except asyncio.TimeoutError:
            raise TimeoutError(wait_failed(
                self.node_id, timeout, n, self.view, self.membership.heard(), foreign=sorted(self._peers.foreign),
                others=self._discovery.other_clusters() if self._discovery is not None else {},  # a typo in --cluster?
                silent=[self._peers.static_address(p) for p in self._peers.static_ids()], secret=self._curve is not None)) from None

    def views(self) -> AsyncIterator[View]:
        """Yield every newly agreed view (latest first if the consumer falls behind)."""
        return self._feed.views()

    def on_view_change(self, callback: Callable[[View], Any]) -> None:
        """Call ``callback(view)`` on the event loop for every newly agreed view."""
        self._feed.on_change(callback)

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next view change or pause (for racing long sends)."""
        return self._feed.changed()

    def subscribe(self, kind: str, maxsize: int = 16) -> asyncio.Queue[Message]:
        """A bounded queue receiving every message of ``kind`` (instead of the keyed mailbox), for unsolicited
        messages such as job offers. When it is full, new ones are dropped and counted (``stats["subscriber_full"]``)."""
        return self._router.subscribe(kind, maxsize)

    async def take(self, kind: str, tag: Any, *, epoch: int | None = None, sender: str | None = None) -> Message:
        """Wait for the application message ``(kind, epoch, tag)`` (one of an older view while it drains).

        ``epoch``: the view epoch it belongs to (default: the current one); ``sender``: who sends it, when known
        (a wait on one that left in order ends at once).

        Raises:
            PeerFailedError: a member of the message's view failed, or it ended without it; this node closed.
        """
        e = self.view.epoch if epoch is None else epoch
        if self._closed or self.state is MemberState.PAUSED:  # closed: nothing can come (its waits ended at close)
            raise PeerFailedError(f"node {self.node_id} closed" if self._closed else
                                  f"{self.node_id} is paused: it lost the majority of view {self.view.epoch}")
        return await self._router.take(kind, e, tag, self.view, sender)

    def draining(self, epoch: int) -> bool:
        """Whether work of the older view ``epoch`` may still finish (nobody in it failed)."""
        return self._router.draining(epoch)

    def abandon(self, head: str, epoch: int, why: str) -> int:
        """End the waits for work that cannot finish: :meth:`p2ptrain.ring._router.Router.abandon`."""
        return self._router.abandon(head, epoch, why)

    # --- internals -------------------------------------------------------------------------

    def _record(self) -> PeerRecord:
        assert self._resources is not None and self._endpoint is not None
        port = int(self._endpoint.address.rsplit(":", 1)[1])
        return PeerRecord(
            node_id=self.node_id,
            cluster=self.cluster,
            addresses=(),
            port=port,
            incarnation=self.incarnation,
            key_fingerprint=self._fingerprint(),
            resources=self._resources,
            protocol=PROTOCOL,
        )

    def _clock(self) -> float:
        """The membership clock: monotonic time without the loop's stalls (see :mod:`._liveness`)."""
        return self._liveness.now()

    def _advertised(self) -> str:
        """The address peers should dial: the bound one, or the announced one when bound to all."""
        record = self._discovery.record if self._discovery is not None else None
        return advertised_address(self.address, record.addresses if record is not None else (), self._static)

    def _fingerprint(self) -> str:
        return self._curve.fingerprint() if self._curve else "none"

    def connect(self, address: str) -> None:
        """Say hello to a node at ``address`` whose id is not known yet (static peers).

        The hello is repeated every second until a node answers from that address, so
        the order in which devices start does not matter.
        """
        self._hello(self._peers.add_static(address))

    def _hello(self, pseudo: str) -> None:
        assert self._endpoint is not None
        key = self._curve.public if self._curve else None
        self._endpoint.add_peer(pseudo, self._peers.static_address(pseudo), server_key=key)
        self._endpoint.try_send(pseudo, _HELLO, meta=self._hb_meta(self._clock()))

    def _hb_meta(self, now: float) -> dict[str, object]:
        # Gossip the addresses of the view so static peers learn the whole ring
        # (alive peers, not only the view: a view cannot form before they meet).
        gossip = self._peers.gossip(self.membership.alive(now))
        beat = self.membership.beat(now)
        return Heartbeat(beat, self._advertised(), self._resources, tuple(gossip.items())).to_wire()

    def _learn(self, peer: str, address: object, *, direct: bool = True) -> None:
        """Connect to ``peer`` at ``address``.

        ``direct`` is False for addresses gossiped by a third node: those take a free slot
        only, and are forgotten if the peer never speaks to us itself (see :class:`PeerTable`).
        """
        refusal = self._peers.vet(peer, address)
        if refusal is not None:
            if refusal.value:
                self.stats[refusal.value] = self.stats.get(refusal.value, 0) + 1
            if refusal is Refusal.NOT_LOOPBACK:
                logger.warning("ignoring peer %s at %s: without a cluster secret only loopback peers are admitted "
                               "(give --secret-file, or --insecure on a trusted network)", peer, address)
            return
        assert isinstance(address, str)
        if self._peers.is_full_for(peer):
            # Bounded: a flood of made-up ids must not open unbounded sockets.
            evict = self._peers.oldest_hearsay() if direct else None
            if evict is None:
                self.stats["peer_table_full"] = self.stats.get("peer_table_full", 0) + 1
                return
            self._drop_peer(evict)
        assert self._endpoint is not None
        try:
            self._endpoint.add_peer(peer, address, server_key=self._curve.public if self._curve else None)
        except P2PTrainError as exc:
            self.stats["bad_address"] = self.stats.get("bad_address", 0) + 1
            logger.debug("cannot connect to %s at %s: %s", peer, address, exc)
            return
        self._peers.add(peer, address, self._clock())
        for pseudo in self._peers.answered(address):  # the static peer answered: its real id takes over
            self._endpoint.remove_peer(pseudo)
        self._endpoint.try_send(peer, _HB, epoch=self.view.epoch, meta=self._hb_meta(self._clock()))

    def _drop_peer(self, peer: str) -> None:
        """Close the connection to a peer that left the view (a send waiting on it fails)."""
        if self._peers.remove(peer) and self._endpoint is not None:
            self._endpoint.remove_peer(peer)

    def _beat_all(self, now: float) -> None:
        assert self._endpoint is not None
        meta = self._hb_meta(now)
        self._last_proposal = self.membership.proposal(now)
        self._last_beat_view = self.view
        for peer in self._peers.ids():
            self._endpoint.try_send(peer, _HB, epoch=self.view.epoch, meta=meta)
        self._liveness.beat(_HB, self.view.epoch, meta)  # repeated by the pulse if the loop falls silent

    def _after_change(self) -> None:
        old, was = self.view, self.state
        now = self._clock()
        view = self.membership.tick(now)
        if self._endpoint is not None and (self.membership.proposal(now) != self._last_proposal or self.view != self._last_beat_view):
            # Tell everyone at once when what we propose (or hold) changes: agreement then
            # takes one message delay instead of up to a heartbeat interval per round.
            self._beat_all(now)
        if self.state is MemberState.PAUSED and was is not MemberState.PAUSED:
            missing = sorted(set(old.members) - self.membership.alive(now))
            self._router.pause(PeerFailedError(f"quorum lost: {', '.join(missing)} unreachable; this node paused (view {old.epoch})"))
            self._feed.wake()
        if view is None:
            return
        gone = sorted(set(old.members) - set(view.members))
        self._feed.wake()
        for g in gone:
            if g not in self.membership.alive(now):
                self._drop_peer(g)  # it will be re-learned from its heartbeats if it returns
        self._router.on_view(old, view, [g for g in gone if g not in self.membership.left()])
        self._feed.publish(view)

    async def _receive_loop(self) -> None:
        assert self._endpoint is not None
        while True:
            msg = await self._endpoint.recv()
            try:
                self._dispatch(msg)
            except ProtocolError as exc:
                self.stats["bad_heartbeat"] += 1
                logger.debug("dropped %s from %s: %s", msg.kind, msg.sender, exc)
            except Exception:  # one bad message must never leave the node deaf
                self.stats["dispatch_error"] = self.stats.get("dispatch_error", 0) + 1
                logger.exception("error handling %s from %s; message dropped", msg.kind, msg.sender)

    def _dispatch(self, msg: Message) -> None:
        now = self._clock()
        if msg.kind in (_HB, _HELLO):
            hb = Heartbeat.from_wire(msg.meta)
            self._learn(msg.sender, hb.address)
            if hb.resources is not None:
                self._peers.set_resources(msg.sender, hb.resources)
            for pid, addr in hb.gossip:
                if pid not in self._peers:
                    self._learn(pid, addr, direct=False)
            self.membership.on_beat(msg.sender, hb.beat, now)
            self._peers.heard_from(msg.sender)
            if msg.kind == _HELLO:
                assert self._endpoint is not None
                self._endpoint.try_send(msg.sender, _HB, epoch=self.view.epoch, meta=self._hb_meta(now))
            self._after_change()
        elif msg.kind == _BYE:
            inc = msg.meta.get("i") if isinstance(msg.meta, dict) else None
            if isinstance(inc, int):
                self.membership.on_leave(msg.sender, inc)
                logger.info("%s left the ring", msg.sender)
                self._after_change()
        else:
            self._router.route(msg, self.view, self.membership.proposal(now))

    def _heartbeat(self, now: float) -> None:
        """One heartbeat round (run every interval by :meth:`Liveness.run`). Loop thread only."""
        statics = self._peers.static_ids()
        if statics and now - self._last_hello >= 1.0:
            self._last_hello = now
            for pseudo in statics:
                self._hello(pseudo)
        self._beat_all(now)
        # Gossiped addresses nobody answers from are forgotten after two failure timeouts.
        for p in self._peers.stale_hearsay(now, 2 * self.membership.failure_timeout):
            self._drop_peer(p)
        self._after_change()
        self._router.expire(self.view)

    async def _discovery_loop(self) -> None:
        assert self._discovery is not None
        async for event, rec in self._discovery.events():
            if event == "lost" or rec.node_id == self.node_id:
                continue
            if rec.key_fingerprint != self._fingerprint():
                self.stats["foreign_key"] += 1
                self._peers.heard_with_another_key(rec.node_id)
                logger.warning("node %s announces key %s but this node's is %s: %s; not connecting", rec.node_id, rec.key_fingerprint,
                               self._fingerprint(), "a different secret?" if self._curve else "this node has no secret (--secret-file)")
                continue
            if rec.addresses:
                try:
                    self._peers.set_resources(rec.node_id, rec.resources)
                    self._learn(rec.node_id, f"tcp://{bracket(rec.addresses[0])}:{rec.port}")
                except Exception:  # one bad record must never end discovery for the node's lifetime
                    self.stats["discovery_error"] = self.stats.get("discovery_error", 0) + 1
                    logger.exception("could not take %s's announcement; ignored", rec.node_id)
