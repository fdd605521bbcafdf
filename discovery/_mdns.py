"""The mDNS adapter: announce this node and browse for peers with python-zeroconf (asyncio).

:class:`MdnsDiscovery` owns the zeroconf sockets and nothing else; what the records mean
is decided by :class:`~p2ptrain.discovery._table.PeerTable`.

Timing, and why it converges in well under a second:

- **No conflict probing.** zeroconf's default registration waits a random 150-250 ms,
  then sends three probes 500 ms apart (RFC 6762 §8.1 asks for 250 ms): ~1.2 s before the
  first announcement (the baseline's 1.2 s convergence). We register with
  ``cooperating_responders=True``, which in zeroconf 0.154 only skips that probe loop
  (``Zeroconf.async_check_service`` returns early; the name is still validated and the
  announcements are unchanged; ``strict=False`` would only relax the name syntax checks,
  not skip probing). Probing exists to pick a free name among strangers; ours is a
  function of (cluster, node id), so the only possible conflict is the same node
  restarting, which must *replace* the old records, not rename itself. The incarnation
  and announcement number in the TXT record settle which record wins.
- **Announcements** go out at once and twice more 225 ms apart (zeroconf's
  ``_REGISTER_TIME``; RFC 6762 §8.3 asks for at least two), so a node that starts a moment
  later still hears one.
- **Browsing** starts before announcing, so a node's first query (sent 20-120 ms after
  start, RFC 6762 §5.2) collects the peers already up, and every later peer's
  announcement reaches it. Queries are QM (multicast answers): RFC 6762 §5.4's QU
  (unicast answers) saves bandwidth on big networks, but on a host where several
  responders share UDP 5353 (SO_REUSEPORT: tests, the demo, several nodes per machine)
  the kernel hands a unicast answer to one of them only, and a multicast answer teaches
  every starting node at once.
- **Welcome announcements.** A node that starts less than a second after another learns
  of it slowly: answers to its queries are held back until a record has not been
  multicast for 1 s (RFC 6762 §6 rate limit; zeroconf's protected queue), measured here
  at ~0.95 s for a node joining 0.3 s after three others. So when a node finds a new
  peer (or a restarted one) it multicasts its own records once, unsolicited, like an
  announcement (RFC 6762 §8.3): the newcomer then knows everyone in ~0.15 s. Bursts are
  coalesced (one packet 20 ms after the first find, at most one per 250 ms), so a join
  costs each member one packet and a steady cluster sends nothing extra.
- **TTL** of every record is 120 s (RFC 6762 §10's value for host records) rather than 75
  minutes for PTR/TXT: a node that crashes without a goodbye leaves the view within two
  minutes, while the browser refreshes live peers at 80% of the TTL (RFC 6762 §5.2).
- **Goodbyes** (TTL 0, RFC 6762 §10.1) go out on close, so peers see ``lost`` at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from zeroconf import DNSQuestionType, ServiceStateChange, Zeroconf
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2ptrain._errors import ConfigError, DiscoveryError, ProtocolError

from ._events import PeerEvent, PeerEventStream
from ._interfaces import plan_interfaces
from ._records import (
    SERVICE_TYPE,
    PeerRecord,
    check_cluster,
    encode_txt,
    instance_label,
    parse_seq,
    parse_txt,
    service_name,
)
from ._table import DEFAULT_MAX_PEERS, PeerTable

__all__ = ["MdnsDiscovery"]

log = logging.getLogger(__name__)

# RFC 6762 §10: 120 s for records naming a host; we use it for all (see module docstring).
_RECORD_TTL_S = 120
# A peer's records arrive in one announcement, so a resolve normally answers from the
# cache at once; when they do not, 1 s covers a query and its 20-120 ms delayed answer
# (RFC 6762 §6) several times over without holding a task for long.
_RESOLVE_TIMEOUT_MS = 1000
# Welcome announcements (see module docstring): wait 20 ms to coalesce the finds of a
# burst of joiners into one packet, and send at most one per 250 ms (zeroconf's own
# announcement spacing) however fast peers appear.
_WELCOME_DELAY_S = 0.02
_WELCOME_MIN_INTERVAL_S = 0.25
# Resolves in flight at once. Beyond it a name is skipped (counted as ignored_busy) and
# picked up again by the peer's next announcement or our next refresh query.
_MAX_RESOLVES = 64


class MdnsDiscovery:
    """Announce one node and follow the announced peers of its cluster.

    An async context manager; several may run in one process (each has its own sockets).
    All methods run on the event loop that called :meth:`start`.

    Args:
        record: This node's record to announce, or ``None`` to browse only (e.g.
            ``p2ptrain status``). With empty ``addresses``, the addresses of the chosen
            interfaces are announced.
        cluster: The cluster to follow; must equal ``record.cluster``.
        interfaces: ``None`` for all interfaces, or IP addresses / interface names
            (``["127.0.0.1"]`` in tests).
        max_peers: Capacity of the peer table.

    Raises:
        ConfigError: Bad cluster, a record of another cluster, or an unknown interface.

    Example::

        async with MdnsDiscovery(rec, cluster="lab", interfaces=["127.0.0.1"]) as disc:
            async with disc.events() as stream:
                async for kind, peer in stream:
                    ...
    """

    def __init__(
        self,
        record: PeerRecord | None,
        *,
        cluster: str,
        interfaces: list[str] | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        check_cluster(cluster)
        if not isinstance(max_peers, int) or max_peers < 1:
            raise ConfigError(f"max_peers={max_peers!r} must be a positive int")
        if record is not None and record.cluster != cluster:
            raise ConfigError(f"record is for cluster {record.cluster!r} but discovery follows {cluster!r}")
        self._plan = plan_interfaces(interfaces)
        if record is not None and not record.addresses:
            record = _with_addresses(record, self._plan.announce)
        self._record = record
        self._cluster = cluster
        self._table = PeerTable(
            cluster=cluster, self_id=record.node_id if record else None, max_peers=max_peers, self_record=record
        )
        self._streams: set[PeerEventStream] = set()
        self._waiters: set[asyncio.Future[None]] = set()
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._seq = 0  # announcement number, see parse_seq
        self._welcome: asyncio.TimerHandle | None = None
        self._last_welcome = -1e9
        self._broadcasts: set[asyncio.Future[object]] = set()
        self._started = False
        self._closed = False

    @property
    def record(self) -> PeerRecord | None:
        """The record announced (addresses filled in), or ``None`` when browsing only."""
        return self._record

    @property
    def cluster(self) -> str:
        """The cluster followed."""
        return self._cluster

    @property
    def stats(self) -> dict[str, int]:
        """Counters: found, updated, lost, malformed, unresolved, ignored_*, welcomes_sent (a copy)."""
        return dict(self._table.stats)

    def peers(self) -> dict[str, PeerRecord]:
        """The announced peers of this cluster, excluding this node: node id to record."""
        return self._table.peers()

    def other_clusters(self) -> dict[str, int]:
        """Other clusters heard on the same interfaces: name to the number of members heard."""
        return self._table.other_clusters()

    async def start(self) -> None:
        """Open the sockets, start browsing, then announce; returns without waiting for peers.

        Raises:
            DiscoveryError: The mDNS sockets could not be opened or the service announced.
        """
        if self._closed:
            raise DiscoveryError("this MdnsDiscovery is closed; create a new one")
        if self._started:
            return
        self._started = True
        try:
            self._azc = AsyncZeroconf(
                interfaces=self._plan.zeroconf_interfaces, ip_version=self._plan.ip_version
            )
            # Browse first: see the module docstring (fast convergence).
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf,
                [SERVICE_TYPE],
                handlers=[self._on_service_state_change],
                question_type=DNSQuestionType.QM,
            )
            if self._record is not None:
                self._info = _service_info(self._record, self._seq)
                broadcast = await self._azc.async_register_service(self._info, cooperating_responders=True)
                self._track(broadcast)
        except (OSError, ZeroconfError, RuntimeError) as exc:
            await self.close()
            raise DiscoveryError(
                f"mDNS could not start on {self._plan.zeroconf_interfaces!r}: {exc}"
            ) from exc
        log.debug(
            "mDNS started for cluster %r on %s as %s",
            self._cluster,
            self._plan.announce,
            self._record.node_id if self._record else "(browse only)",
        )

    async def update(self, record: PeerRecord) -> None:
        """Announce a changed record (resources, port, incarnation) under the same name.

        Args:
            record: The new record; same node id and cluster. Empty ``addresses`` means
                the chosen interfaces' addresses.

        Raises:
            ConfigError: Browsing only, or the node id or cluster changed.
            DiscoveryError: Not started, or already closed.
        """
        if self._record is None:
            raise ConfigError("a browse-only MdnsDiscovery has no record to update")
        if (record.node_id, record.cluster) != (self._record.node_id, self._record.cluster):
            raise ConfigError(
                f"update must keep node id {self._record.node_id!r} and cluster "
                f"{self._record.cluster!r}; start a new MdnsDiscovery for another identity"
            )
        if self._azc is None or self._closed:
            raise DiscoveryError("update() needs a started, open MdnsDiscovery")
        if not record.addresses:
            record = _with_addresses(record, self._plan.announce)
        self._seq += 1
        info = _service_info(record, self._seq)
        try:
            self._track(await self._azc.async_update_service(info))
        except (OSError, ZeroconfError) as exc:
            raise DiscoveryError(f"mDNS could not re-announce {record.node_id!r}: {exc}") from exc
        self._record, self._info = record, info
        self._table.set_self(record)

    def events(self) -> PeerEventStream:
        """Subscribe to peer events, starting with ``found`` for each peer known now.

        Each call returns an independent stream; its buffer holds at most one event per
        peer (see :class:`PeerEventStream`). Close it with ``aclose()`` or ``async with``.
        """
        stream = PeerEventStream(self._streams.discard)
        for record in self._table.peers().values():
            stream._push(PeerEvent("found", record))
        if self._closed:
            stream._end()
        else:
            self._streams.add(stream)
        return stream

    async def wait_for_peers(self, count: int, *, timeout: float) -> dict[str, PeerRecord]:
        """Wait until at least ``count`` peers are known.

        Args:
            count: Peers to wait for (not counting this node).
            timeout: Seconds to wait at most.

        Returns:
            The peers at that moment.

        Raises:
            TimeoutError: Fewer than ``count`` peers within ``timeout``; the message lists
                the ones seen.
            DiscoveryError: The discovery was closed meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._table.peers()) < count:
            if self._closed:
                raise DiscoveryError("MdnsDiscovery closed while waiting for peers")
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = sorted(self._table.peers())
                raise TimeoutError(
                    f"saw {len(seen)} of {count} peers of cluster {self._cluster!r} "
                    f"within {timeout:g} s: {seen}"
                )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                self._waiters.discard(waiter)
        return self._table.peers()

    async def close(self) -> None:
        """Say goodbye, stop browsing and close the sockets; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._welcome is not None:
            self._welcome.cancel()
            self._welcome = None
        tasks: list[asyncio.Future[Any]] = [*self._resolving.values(), *self._broadcasts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        self._broadcasts.clear()
        if self._azc is not None:
            try:
                # Cancels the browser and sends goodbyes (TTL 0, RFC 6762 §10.1) for our
                # service: three packets 125 ms apart, so close takes ~0.25 s.
                if self._browser is not None:
                    await self._browser.async_cancel()
                await self._azc.async_close()
            except Exception:  # noqa: BLE001 - close must finish; the sockets go either way
                log.warning("error while closing mDNS", exc_info=True)
        self._browser = None
        self._azc = None
        self._table.clear()
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()
        self._wake_waiters()

    async def __aenter__(self) -> MdnsDiscovery:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- zeroconf side (all on the loop thread) ---------------------------------------

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback (loop thread): resolve added/updated names, drop removed ones."""
        if self._closed:
            return
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            # A resolve still in flight must not bring the peer back after its goodbye.
            task = self._resolving.pop(key, None)
            if task is not None:
                task.cancel()
            self._dirty.discard(key)
            self._publish(self._table.remove(name))
            return
        if key in self._resolving:
            self._dirty.add(key)  # more records arrived: resolve again once this one ends
            return
        if len(self._resolving) >= _MAX_RESOLVES:
            self._table.stats["ignored_busy"] += 1
            return
        self._resolving[key] = asyncio.ensure_future(self._resolve(name, key))

    async def _resolve(self, name: str, key: str) -> None:
        """Fetch a service's SRV/TXT/A records (usually from the cache) and take them."""
        try:
            while True:
                self._dirty.discard(key)
                assert self._azc is not None
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                complete = await info.async_request(
                    self._azc.zeroconf, _RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM
                )
                if self._closed:
                    return
                self._take(name, info, complete)
                if key not in self._dirty:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one peer's records must never stop discovery
            self._table.stats["malformed"] += 1
            self._dirty.discard(key)
            log.debug("resolving %r failed", name, exc_info=True)
        finally:
            if self._resolving.get(key) is asyncio.current_task():
                del self._resolving[key]

    def _take(self, name: str, info: AsyncServiceInfo, complete: bool) -> None:
        """Decode a resolved service and feed the table; bad records are counted, not raised."""
        if not complete or info.text is None or info.port is None:
            self._table.stats["unresolved"] += 1
            log.debug("no complete records for %r", name)
            return
        try:
            txt = parse_txt(info.text)
            record = PeerRecord.from_txt(txt, addresses=info.parsed_scoped_addresses()[:32])
            seq = parse_seq(txt)
            if not record.addresses:
                raise ProtocolError("no address records")
        except (ProtocolError, ConfigError) as exc:
            self._table.stats["malformed"] += 1
            log.debug("ignoring malformed announcement %r: %s", name, exc)
            return
        if record.port != info.port:
            # The TXT record is authoritative (it is versioned by inc/seq); the SRV record
            # in the cache can lag behind when a port changes back within a second.
            log.debug("%r: SRV port %s, TXT port %s; using TXT", name, info.port, record.port)
        before = self._table.get(record.node_id)
        event = self._table.apply(name, record, seq)
        self._publish(event)
        if event is not None and (before is None or before.incarnation < record.incarnation):
            self._schedule_welcome()  # a newcomer's cache is empty: tell it about us now

    def _schedule_welcome(self) -> None:
        if self._info is None or self._welcome is not None:
            return  # browsing only, or one already pending (coalesced)
        loop = asyncio.get_running_loop()
        delay = max(_WELCOME_DELAY_S, self._last_welcome + _WELCOME_MIN_INTERVAL_S - loop.time())
        self._welcome = loop.call_later(delay, self._send_welcome)

    def _send_welcome(self) -> None:
        """Multicast our records once (loop thread); see the module docstring."""
        self._welcome = None
        if self._closed or self._azc is None or self._info is None:
            return
        self._last_welcome = asyncio.get_running_loop().time()
        zc = self._azc.zeroconf
        zc.async_send(zc.generate_service_broadcast(self._info, None))
        self._table.stats["welcomes_sent"] += 1

    def _publish(self, event: PeerEvent | None) -> None:
        if event is None:
            return
        log.debug("peer %s %s (incarnation %d)", event.record.node_id, event.kind, event.record.incarnation)
        for stream in self._streams:
            stream._push(event)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _track(self, awaitable: Awaitable[object]) -> None:
        """Keep the announcement task referenced until done, and cancellable on close."""
        future = asyncio.ensure_future(awaitable)
        self._broadcasts.add(future)
        future.add_done_callback(self._broadcasts.discard)
        future.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[object]) -> None:
    """Say when an announcement failed (its task is never awaited)."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.warning("an mDNS announcement failed: %s: %s", type(exc).__name__, exc)


def _service_info(record: PeerRecord, seq: int) -> AsyncServiceInfo:
    label = instance_label(record.cluster, record.node_id)
    return AsyncServiceInfo(
        SERVICE_TYPE,
        service_name(record.cluster, record.node_id),
        port=record.port,
        properties=encode_txt(record.to_txt() | {"seq": str(seq)}),
        # A host name per node: several nodes on one machine must not share (and on close
        # say goodbye to) one another's address records.
        server=f"{label}.local.",
        parsed_addresses=list(record.addresses),
        host_ttl=_RECORD_TTL_S,
        other_ttl=_RECORD_TTL_S,
    )


def _with_addresses(record: PeerRecord, addresses: tuple[str, ...]) -> PeerRecord:
    return dataclasses.replace(record, addresses=addresses)
