"""The peer table: what this node believes about the announced peers of its cluster.

A plain state machine with no sockets: the mDNS adapter feeds it decoded records and
removals, and it answers with the events to publish. Its rules:

- records of another cluster, and this node's own record, are ignored (and counted);
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

STAT_KEYS = (
    "found",
    "updated",
    "lost",
    "malformed",
    "unresolved",
    "ignored_other_cluster",
    "ignored_self",
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
    """

    def __init__(self, *, cluster: str, self_id: str | None, max_peers: int = DEFAULT_MAX_PEERS) -> None:
        self.cluster = cluster
        self.self_id = self_id
        self.max_peers = max_peers
        self._peers: dict[str, PeerRecord] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # node id -> (incarnation, seq)
        self._name_to_id: dict[str, str] = {}
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})

    def peers(self) -> dict[str, PeerRecord]:
        """A copy of the table: node id to record."""
        return dict(self._peers)

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
            return None
        if not _name_matches(name, record):
            # Only a node's own announcement can carry its node id: the name is a function
            # of (cluster, node id), so a mismatch is a forged or broken record.
            self.stats["malformed"] += 1
            log.debug("record for %s announced under foreign name %r", record.node_id, name)
            return None
        if record.node_id == self.self_id:
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
