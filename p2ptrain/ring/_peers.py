"""The peer table: what a node knows of each peer it connects to, and how it learned it.

A plain record with no sockets: :class:`~p2ptrain.ring._node.Node` opens and closes the
connections it names. Liveness and incarnations are the membership's business
(:class:`~p2ptrain.ring._membership.Membership`); this table holds where peers are.

An address comes first-hand (the peer's own heartbeat, mDNS) or as hearsay (gossip from
a third node). The table is bounded (:data:`~p2ptrain.ring._membership.MAX_MEMBERS`):
hearsay only takes a free slot, a peer that speaks for itself may evict the oldest
hearsay, and hearsay nobody answers from is forgotten, so made-up gossip cannot crowd
out real peers.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from p2ptrain.discovery import Resources, StaticPeer
from p2ptrain.ring._membership import MAX_MEMBERS, Beat

__all__ = ["MemberInfo", "PeerTable", "Refusal", "advertised_address", "bracket", "is_loopback", "peer_host"]

#: Longest address accepted from the network (an IPv6 ``tcp://[...]:port`` fits easily).
MAX_ADDRESS = 128


@dataclass
class MemberInfo:
    """What this node knows about one member, for tables and planners."""

    node_id: str
    address: str | None
    resources: Resources | None
    state: str
    epoch: int


class Refusal(enum.Enum):
    """Why an address is not dialled; the value names the node's counter ("" counts nothing)."""

    IGNORED = ""  # not an address of this network, this node itself, or already known
    BAD_ADDRESS = "bad_address"
    NOT_LOOPBACK = "non_loopback_refused"


class PeerTable:
    """Peers by node id: address, when it was learned, whether the peer spoke itself.

    Also the static pseudo-peers (``static:ADDRESS``) a node greets until a real node
    answers from that address, and the resources each peer announced.

    Args:
        node_id: this node (never its own peer).
        scheme: the address scheme of the network: ``tcp://``, or ``fake://`` in memory.
        remote: admit addresses other than loopback (with a cluster secret, or insecure).
        capacity: most peers with an address at once.
    """

    def __init__(self, node_id: str, *, scheme: str = "tcp://", remote: bool = True, capacity: int = MAX_MEMBERS) -> None:
        self.node_id = node_id
        self.scheme = scheme
        self.remote = remote
        self.capacity = capacity
        self._addresses: dict[str, str] = {}
        self._learned_at: dict[str, float] = {}
        # Every peer heard first-hand. It may name peers without an address (theirs was
        # refused): one later learned from gossip is then not hearsay.
        self._heard: set[str] = set()
        self._resources: dict[str, Resources] = {}
        self._static: dict[str, str] = {}
        self.foreign: set[str] = set()  # members of this cluster heard announcing another key (bounded below)

    # --- peers -----------------------------------------------------------------------------

    def __contains__(self, peer: object) -> bool:
        return peer in self._addresses

    def __len__(self) -> int:
        return len(self._addresses)

    def ids(self) -> list[str]:
        """The peers with an address, in the order learned (a copy)."""
        return list(self._addresses)

    def address(self, peer: str) -> str | None:
        """Where ``peer`` is, or None when unknown."""
        return self._addresses.get(peer)

    def addresses(self) -> dict[str, str]:
        """Node id -> address of every peer (a copy)."""
        return dict(self._addresses)

    def vet(self, peer: str, address: object) -> Refusal | None:
        """Why ``address`` (from the network: anything) is not to be dialled for ``peer``; None when it may be."""
        if not isinstance(address, str) or not address.startswith(self.scheme) or len(address) > MAX_ADDRESS:
            return Refusal.IGNORED
        if peer == self.node_id or self._addresses.get(peer) == address:
            return Refusal.IGNORED
        host = peer_host(address)
        if host is None:
            return Refusal.BAD_ADDRESS
        if not self.remote and not is_loopback(host):
            return Refusal.NOT_LOOPBACK
        return None

    def add(self, peer: str, address: str, now: float) -> None:
        """Record ``peer`` at ``address``, learned at clock time ``now`` (a new address replaces the old)."""
        self._addresses[peer] = address
        self._learned_at[peer] = now

    def remove(self, peer: str) -> bool:
        """Forget ``peer``'s address and that it was heard; True when it had an address."""
        self._learned_at.pop(peer, None)
        self._heard.discard(peer)
        return self._addresses.pop(peer, None) is not None

    def heard_with_another_key(self, peer: str) -> None:
        """``peer`` announced this cluster with another key (a different secret): named when a wait times out."""
        if len(self.foreign) < self.capacity:
            self.foreign.add(peer)

    def heard_from(self, peer: str) -> None:
        """``peer`` spoke to this node itself."""
        self._heard.add(peer)

    def is_full_for(self, peer: str) -> bool:
        """True when ``peer`` is new and the table has no free slot."""
        return peer not in self._addresses and len(self._addresses) >= self.capacity

    def oldest_hearsay(self) -> str | None:
        """The peer learned longest ago only from gossip, or None."""
        hearsay = [p for p in self._learned_at if p not in self._heard]
        return min(hearsay, key=self._learned_at.__getitem__) if hearsay else None

    def stale_hearsay(self, now: float, max_age: float) -> list[str]:
        """Peers learned from gossip more than ``max_age`` ago that never spoke themselves."""
        return [p for p, t in self._learned_at.items() if p not in self._heard and now - t > max_age]

    def gossip(self, alive: Collection[str]) -> dict[str, str]:
        """The addresses to gossip: those of the ``alive`` peers."""
        return {m: a for m, a in self._addresses.items() if m in alive}

    def member(self, peer: str, beat: Beat | None) -> MemberInfo:
        """What is known of member ``peer``, whose last beat was ``beat``."""
        state = "paused" if beat and beat.paused else "member"
        return MemberInfo(peer, self.address(peer), self.resources(peer), state, beat.epoch if beat else -1)

    # --- what peers announce ---------------------------------------------------------------

    def set_resources(self, peer: str, resources: Resources) -> None:
        """Remember what ``peer`` announced (kept after it leaves, for tables)."""
        self._resources[peer] = resources

    def resources(self, peer: str) -> Resources | None:
        """What ``peer`` announced last, or None."""
        return self._resources.get(peer)

    # --- static peers ----------------------------------------------------------------------

    def add_static(self, address: str) -> str:
        """Greet ``address`` until a node answers from it; returns its pseudo id."""
        pseudo = f"static:{address}"
        self._static[pseudo] = address
        return pseudo

    def static_ids(self) -> list[str]:
        """The pseudo ids still waiting for an answer (a copy)."""
        return list(self._static)

    def static_address(self, pseudo: str) -> str:
        """The address of a pseudo id from :meth:`add_static`."""
        return self._static[pseudo]

    def answered(self, address: str) -> list[str]:
        """Forget the static peers at ``address`` (a real node answered from it); their pseudo ids."""
        found = [pseudo for pseudo, addr in self._static.items() if addr == address]
        for pseudo in found:
            del self._static[pseudo]
        return found


def is_loopback(host: str) -> bool:
    """True for a loopback IP address or ``localhost``."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bracket(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def peer_host(address: str) -> str | None:
    """The host of a ``tcp://IP:PORT`` address (``127.0.0.1`` for ``fake://``), or None when malformed."""
    if not address.startswith("tcp://"):
        return "127.0.0.1"
    host, _, port = address[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        ok_port = port.isdigit() and 0 < int(port) < 65536
    except ValueError:  # also a digit int() does not take, such as "²"
        return None
    return host if ok_port else None


def advertised_address(bound: str, announced: Sequence[str], static: Sequence[StaticPeer]) -> str:
    """The address peers should dial: the bound one, or the announced one when bound to all.

    Args:
        bound: the ``tcp://HOST:PORT`` the node's endpoint is bound to.
        announced: the addresses mDNS announces for this node (first one wins).
        static: the static peers; without mDNS, the local address the OS routes toward
            the first one is used. (A UDP connect only picks a route; it sends nothing.)
    """
    if "://0.0.0.0:" not in bound:
        return bound
    port = bound.rsplit(":", 1)[1]
    if announced:
        return f"tcp://{bracket(announced[0])}:{port}"
    if static:
        sp = static[0]
        try:
            with socket.socket(socket.AF_INET6 if ":" in sp.host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((sp.host, sp.port))
                return f"tcp://{bracket(s.getsockname()[0])}:{port}"
        except OSError:
            pass
    return bound
