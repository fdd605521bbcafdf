"""The peer table: what this node believes about the announced peers of its cluster.

A plain state machine with no sockets: the mDNS adapter feeds it decoded records and
removals, and it answers with the events to publish. Its rules:

- records of another cluster, and this node's own record, are ignored (and counted);
- a record with this node's id at addresses that are not this node's, or from a later
  incarnation, is another device running under the same id (a cloned disk image): it is
  ignored too, but counted (``same_id_elsewhere``) and warned about once, since the two
  devices cannot see each other;
- a node id maps to one entry; a record with a higher incarnation replaces it (the node
  restarted), and within an incarnation a higher announcement number (``seq``) does; an
  older one is stale and ignored (a DNS cache may briefly hold both);
- a removal of the service name that carries a node yields ``lost``;
- at most ``max_peers`` entries, so a flood of announcements cannot grow memory.
"""

from __future__ import annotations

import logging
from collections import Counter

from ._events import PeerEvent
from ._records import PeerRecord, instance_label

log = logging.getLogger(__name__)

DEFAULT_MAX_PEERS = 1024
"""Capacity of a peer table: far above a LAN's devices, small enough to bound memory."""

_MAX_OTHER_CLUSTERS = 16

STAT_KEYS = (
    "found",
    "updated",
    "lost",
    "malformed",
    "unresolved",
    "ignored_other_cluster",
    "ignored_self",
    "same_id_elsewhere",
    "ignored_stale",
    "ignored_full",
    "ignored_busy",
    "welcomes_sent",
)


class PeerTable:
    """Peers of one cluster, keyed by node id.

    Args:
        cluster: This node's cluster; other clusters' records are ignored.
        self_id: This node's id (its own announcements are ignored), or ``None``.
        max_peers: Capacity; records of new peers beyond it are ignored and counted.
        self_record: This node's own record (addresses filled in), to tell its own
            announcements from another device's under the same id.
    """

    def __init__(self, *, cluster: str, self_id: str | None, max_peers: int = DEFAULT_MAX_PEERS,
                 self_record: PeerRecord | None = None) -> None:
        self.cluster = cluster
        self.self_id = self_id
        self._self_record: PeerRecord | None = None
        self._own_addresses: set[str] = set()  # every address this node has announced (caches keep old ones)
        if self_record is not None:
            self.set_self(self_record)
        self._twins_warned: set[tuple[int, tuple[str, ...]]] = set()  # (incarnation, foreign addresses) warned
        self.max_peers = max_peers
        self._peers: dict[str, PeerRecord] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # node id -> (incarnation, seq)
        self._name_to_id: dict[str, str] = {}
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        # Clusters heard beside ours (a typo in --cluster is then easy to see): name -> node
        # ids, bounded since the names come from the network.
        self._others: dict[str, set[str]] = {}

    def peers(self) -> dict[str, PeerRecord]:
        """A copy of the table: node id to record."""
        return dict(self._peers)

    def other_clusters(self) -> dict[str, int]:
        """Other clusters whose members announced themselves here: name to members heard
        (at most 16 names, each counted up to ``max_peers``)."""
        return {name: len(ids) for name, ids in sorted(self._others.items())}

    def get(self, node_id: str) -> PeerRecord | None:
        """The record of ``node_id``, or ``None``."""
        return self._peers.get(node_id)

    def apply(self, name: str, record: PeerRecord, seq: int = 0) -> PeerEvent | None:
        """Take a record decoded from the service instance ``name``.

        Args:
            name: The fully qualified service instance name the record came from.
            record: The decoded record.
            seq: Its announcement number within its incarnation.

        Returns:
            The event to publish, or ``None`` when nothing visible changed.
        """
        if record.cluster != self.cluster:
            self.stats["ignored_other_cluster"] += 1
            ids = self._others.get(record.cluster)
            if ids is None and len(self._others) < _MAX_OTHER_CLUSTERS:
                ids = self._others[record.cluster] = set()
            if ids is not None and len(ids) < self.max_peers:
                ids.add(record.node_id)
            return None
        if not _name_matches(name, record):
            # Only a node's own announcement can carry its node id: the name is a function
            # of (cluster, node id), so a mismatch is a forged or broken record.
            self.stats["malformed"] += 1
            log.debug("record for %s announced under foreign name %r", record.node_id, name)
            return None
        if record.node_id == self.self_id:
            if self._is_twin(record):
                self.stats["same_id_elsewhere"] += 1
            else:
                self.stats["ignored_self"] += 1
            return None
        old = self._peers.get(record.node_id)
        if old is None:
            if len(self._peers) >= self.max_peers:
                self.stats["ignored_full"] += 1
                return None
            self._peers[record.node_id] = record
            self._versions[record.node_id] = (record.incarnation, seq)
            self._name_to_id[name.lower()] = record.node_id
            self.stats["found"] += 1
            return PeerEvent("found", record)
        version = (record.incarnation, seq)
        if version < self._versions[record.node_id]:
            self.stats["ignored_stale"] += 1
            return None
        self._versions[record.node_id] = version
        if record == old:
            return None
        self._peers[record.node_id] = record
        self.stats["updated"] += 1
        return PeerEvent("updated", record)

    def set_self(self, record: PeerRecord) -> None:
        """This node now announces ``record`` (an update): its addresses stay its own."""
        self._self_record = record
        self._own_addresses |= {_bare(a) for a in record.addresses}

    def _is_twin(self, record: PeerRecord) -> bool:
        """``record`` carries this node's id but comes from another device (warned once each).

        Another device shows as addresses that are not this node's, or as a later
        incarnation (this node's past lives are all earlier). Both devices announce the
        same service and host names, so a resolve may mix their records: either sign counts.
        """
        me = self._self_record
        if me is None:
            return False
        foreign = tuple(sorted({_bare(a) for a in record.addresses} - self._own_addresses))
        if not foreign and record.incarnation <= me.incarnation:
            return False  # our own announcement, or a past life of this node
        key = (record.incarnation, foreign)
        if key not in self._twins_warned and len(self._twins_warned) < 16:
            self._twins_warned.add(key)
            log.warning(
                "another device announces this node's id %s%s: both run under one id (a cloned disk image or a copied "
                "state folder?) and cannot see each other. On one of them delete the node_id file in the p2ptrain "
                "state folder (~/.local/state/p2ptrain) and restart it, or give it --node-id",
                record.node_id, f" from {', '.join(foreign)}" if foreign else "",
            )
        return True

    def remove(self, name: str) -> PeerEvent | None:
        """The service instance ``name`` is gone (goodbye or expiry).

        Returns:
            ``lost`` for the peer it carried, or ``None`` if it carried none.
        """
        node_id = self._name_to_id.pop(name.lower(), None)
        if node_id is None:
            return None
        record = self._peers.pop(node_id)
        del self._versions[node_id]
        self.stats["lost"] += 1
        return PeerEvent("lost", record)

    def clear(self) -> None:
        """Forget every peer (on close); publishes nothing."""
        self._peers.clear()
        self._versions.clear()
        self._name_to_id.clear()


def _name_matches(name: str, record: PeerRecord) -> bool:
    label = instance_label(record.cluster, record.node_id)
    return name.lower().startswith(label.lower() + ".")


def _bare(address: str) -> str:
    """An address without its IPv6 zone (``fe80::1%eth0``): the zone is the reader's, not the node's."""
    return address.split("%", 1)[0]
