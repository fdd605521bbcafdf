"""Per-peer counters and rate-limited drop logging.

A hostile or broken peer can make every message it sends a drop; the counters keep
the evidence (``drops()["wrong_cluster"]``) and the log shows it without flooding:
one line per (peer, reason) per interval, with how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["OTHER_PEERS", "UNKNOWN_PEER", "PeerStats", "StatsBook"]

#: Key under which peers beyond ``max_peers`` are counted together, so a flood of
#: made-up identities cannot grow the table without bound.
OTHER_PEERS = "<other>"
#: Key for events that happen before a peer has any identity (handshake failures).
UNKNOWN_PEER = "<unknown>"


@dataclass
class PeerStats:
    """Counters for one peer (a node id, or an IP address for refused connections).

    Attributes:
        received: messages delivered to ``recv``.
        received_bytes: tensor bytes in those messages.
        sent: messages handed to the wire.
        sent_bytes: tensor bytes in those messages.
        dropped: drops by reason, e.g. ``{"wrong_cluster": 2}``.
    """

    received: int = 0
    received_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def copy(self) -> PeerStats:
        """An independent snapshot."""
        return PeerStats(self.received, self.received_bytes, self.sent, self.sent_bytes, Counter(self.dropped))


class StatsBook:
    """The counters of one endpoint, plus its rate-limited drop log.

    Plain methods; call them on the endpoint's event-loop thread.

    Args:
        logger: where drops and refusals are logged.
        max_peers: distinct peer keys tracked before new ones share :data:`OTHER_PEERS`.
        log_interval: seconds between log lines for the same (peer, reason).
    """

    def __init__(self, logger: logging.Logger, *, max_peers: int = 1024, log_interval: float = 10.0) -> None:
        self._log = logger
        self._max = max_peers
        self._interval = log_interval
        self._peers: dict[str, PeerStats] = {}
        self._last_log: dict[tuple[str, str], tuple[float, int]] = {}

    def peer(self, key: str) -> PeerStats:
        """The live counters of ``key`` (created on first use, bounded)."""
        st = self._peers.get(key)
        if st is None:
            if len(self._peers) >= self._max:
                key = OTHER_PEERS
                st = self._peers.get(key)
            if st is None:
                st = self._peers[key] = PeerStats()
        return st

    def sent(self, peer: str, nbytes: int) -> None:
        """Count one message handed to the wire for ``peer``."""
        st = self.peer(peer)
        st.sent += 1
        st.sent_bytes += nbytes

    def received(self, peer: str, nbytes: int) -> None:
        """Count one message delivered from ``peer``."""
        st = self.peer(peer)
        st.received += 1
        st.received_bytes += nbytes

    def drop(self, peer: str, reason: str, detail: str = "", *, level: int = logging.WARNING) -> None:
        """Count a dropped message (or refused connection) and log it, rate-limited."""
        self.peer(peer).dropped[reason] += 1
        key = (peer if peer in self._peers else OTHER_PEERS, reason)
        now = time.monotonic()
        last, suppressed = self._last_log.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            self._last_log[key] = (last, suppressed + 1)
            return
        if len(self._last_log) > 4 * self._max:
            self._last_log.clear()
        self._last_log[key] = (now, 0)
        more = f" ({suppressed} more since last report)" if suppressed else ""
        self._log.log(level, "dropped from %s: %s%s%s", peer, reason, f": {detail}" if detail else "", more)

    def snapshot(self) -> dict[str, PeerStats]:
        """A copy of every peer's counters."""
        return {k: v.copy() for k, v in self._peers.items()}

    def drops(self, peer: str | None = None) -> dict[str, int]:
        """Drops by reason for ``peer``, or summed over all peers when ``None``."""
        if peer is not None:
            st = self._peers.get(peer)
            return dict(st.dropped) if st else {}
        total: Counter[str] = Counter()
        for st in self._peers.values():
            total.update(st.dropped)
        return dict(total)
