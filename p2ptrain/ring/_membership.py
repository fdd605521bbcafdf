"""Leaderless membership: the state machine that agrees on views (no sockets here).

Every node runs the same rules on the heartbeats it hears:

1. *Liveness.* A peer is alive while its last heartbeat is younger than
   ``failure_timeout``; a peer that said goodbye is dead at once (until it comes
   back with a newer incarnation). A beat overtaken by a newer one of the same
   incarnation (``Beat.seq``) counts for liveness only. How the heartbeats keep coming
   while a member's event loop is blocked is :mod:`p2ptrain.ring._liveness`.
2. *Proposal.* A node proposes the set of members it believes alive (itself included)
   and sends the proposal in every heartbeat along with its installed view.
3. *Agreement.* When every node of a proposed set ``M`` proposes exactly ``M``, each of
   them installs ``View(max(their epochs) + 1, M)``. Everyone computes the same epoch
   from the same heartbeats; a node that lags behind adopts a view with the same
   members and a larger epoch reported by any member of ``M`` (catch-up), so the
   members converge on one view even when they evaluate at different moments.
4. *Quorum.* A node whose installed view has more than one member only installs ``M``
   if ``M`` holds a strict majority of that view (members that left gracefully do not
   count). Otherwise it *pauses*: it keeps heartbeating but forms no ring (until rule 5),
   so a minority side stops its job and never trains it as a second ring. It resumes
   when the partition heals. A paused node's proposal does not count as agreement
   (``Beat.paused``, set as soon as the quorum is gone): a newcomer never installs a
   ring with a member that cannot install it back.
5. *Expiry.* A member silent for ``quorum_expiry`` seconds no longer counts toward the
   quorum: when half a ring crashes at once, the survivors pause, then form a ring of
   their own once the dead have been silent that long, instead of waiting forever for
   them. The price: a side of a partition that lasts longer than that forms its own
   ring too, a minority included (it stopped its job when it paused; the majority's job
   goes on). The rings merge when it heals, as newcomers join. The expiry must be longer
   than the failure timeout, or a minority would never pause at all.

No coordinator is involved: agreement is a fixpoint of identical proposals, which is
enough for the small, trusted rings p2ptrain targets (tens of devices).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from p2ptrain._errors import ConfigError, ProtocolError
from p2ptrain.ring._view import View

__all__ = ["Beat", "Membership", "MemberState", "check_expiry"]

logger = logging.getLogger(__name__)

# A heartbeat names at most this many members; bigger rings are out of scope and a
# larger list from the network is refused before it is used.
MAX_MEMBERS = 256
MAX_ID_LEN = 128


class MemberState(str, Enum):
    """Where this node stands in the ring."""

    ALONE = "alone"  # no peer heard yet; a ring of one
    MEMBER = "member"  # part of an agreed view with others
    PAUSED = "paused"  # lost the majority of its view; waiting for the partition to heal


@dataclass(frozen=True)
class Beat:
    """What a node tells each peer with every heartbeat.

    Attributes:
        epoch: epoch of the sender's installed view.
        members: the sender's installed view (ring order).
        proposal: the member set the sender would agree to now (sorted).
        incarnation: increases when the node restarts with the same id.
        paused: the sender lost its quorum.
        seq: counts the beats of this incarnation. A beat can arrive after a newer one
            (the pulse thread repeats the last beat on its own connection, see
            ``_liveness``); an older one still proves the sender alive but says nothing
            new of what it holds. 0 from senders that do not count.
    """

    epoch: int
    members: tuple[str, ...]
    proposal: tuple[str, ...]
    incarnation: int
    paused: bool = False
    seq: int = 0

    def to_wire(self) -> dict[str, Any]:
        """msgpack-able form."""
        return {"e": self.epoch, "m": list(self.members), "p": list(self.proposal), "i": self.incarnation, "z": self.paused,
                "n": self.seq}

    @classmethod
    def from_wire(cls, d: object) -> Beat:
        """Parse and validate a beat from the network.

        Raises:
            ProtocolError: any field missing, of the wrong type or out of bounds.
        """
        if not isinstance(d, dict):
            raise ProtocolError("heartbeat is not a map")
        try:
            epoch, members, proposal, inc, paused = d["e"], d["m"], d["p"], d["i"], d["z"]
        except KeyError as exc:
            raise ProtocolError(f"heartbeat lacks field {exc}") from None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**62:
            raise ProtocolError(f"heartbeat epoch {epoch!r} out of range")
        if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 2**63:
            raise ProtocolError(f"heartbeat incarnation {inc!r} out of range")
        if not isinstance(paused, bool):
            raise ProtocolError("heartbeat paused flag is not a bool")
        seq = d.get("n", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
            raise ProtocolError(f"heartbeat sequence number {seq!r} out of range")
        return cls(epoch, _ids(members), _ids(proposal), inc, paused, seq)


def _ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_MEMBERS:
        raise ProtocolError(f"member list must be a list of at most {MAX_MEMBERS} ids")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_ID_LEN for v in value):
        raise ProtocolError("member ids must be non-empty strings")
    out = tuple(value)
    if list(out) != sorted(set(out)):
        raise ProtocolError("member list must be sorted and unique")
    return out


def check_expiry(quorum_expiry: float | None, failure_timeout: float) -> None:
    """Refuse a ``quorum_expiry`` that would switch the quorum off (rule 5).

    Raises:
        ConfigError: it is not longer than ``failure_timeout``: a minority would never pause.
    """
    if quorum_expiry is not None and quorum_expiry <= failure_timeout:
        raise ConfigError(f"quorum_expiry {quorum_expiry:g}s must be longer than the failure timeout {failure_timeout:g}s, "
                          "or a minority would never pause (None, or join --quorum-expiry 0: no expiry)")


@dataclass
class _Peer:
    last_heard: float
    beat: Beat
    left: bool = False
    suspected_at: float | None = None  # its connection dropped then; cleared by its next beat


@dataclass
class Membership:
    """Agreement on ring views from heartbeats; pure logic, driven by a clock.

    Feed it ``on_beat`` / ``on_leave`` as messages arrive and call ``tick(now)``
    periodically; ``tick`` returns the newly installed view, if any.

    Args:
        self_id: this node's id.
        incarnation: this node's incarnation (e.g. start time in ns).
        failure_timeout: seconds without a heartbeat after which a peer is dead.
        suspect_grace: seconds a *suspected* peer (its connection dropped, see
            :meth:`suspect`) has to be heard again before it is dead; None means a
            quarter of the failure timeout.
        quorum_expiry: seconds after which a silent member of the view no longer counts
            toward the quorum (rule 5); None keeps it counting forever (a paused node
            then waits for it, or for a restart).
    """

    self_id: str
    incarnation: int
    failure_timeout: float = 2.0
    suspect_grace: float | None = None
    quorum_expiry: float | None = 30.0
    view: View = field(init=False)
    state: MemberState = field(init=False, default=MemberState.ALONE)
    _peers: dict[str, _Peer] = field(init=False, default_factory=dict)
    _left: set[str] = field(init=False, default_factory=set)
    _seq: int = field(init=False, default=0)
    _installed_at: float = field(init=False, default=0.0)  # when this view was installed (tick's clock)
    _last_seen: dict[str, float] = field(init=False, default_factory=dict)  # by member; forget() leaves it
    # The latest epoch a member of this node's view installed without this node (0: none):
    # it was silent past the failure timeout (frozen, suspended) and the others went on.
    left_out: int = field(init=False, default=0)
    # Members of the view heard with a newer incarnation before their old one was seen to die
    # (a restart faster than failure detection, or a second process with the same node id):
    # out of the proposal until a view without them is installed, then back as newcomers.
    _restarted: set[str] = field(init=False, default_factory=set)
    # Member -> the epoch of this node's view when it was last heard with a new life in it (see above): work
    # pinned to that view or an older one must take it for a newcomer, even in a later view that holds it.
    renewed: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.view = View.of(0, [self.self_id])
        check_expiry(self.quorum_expiry, self.failure_timeout)

    # --- inputs --------------------------------------------------------------------------

    def on_beat(self, peer: str, beat: Beat, now: float) -> None:
        """Record a heartbeat from ``peer`` (already authenticated by the transport)."""
        if peer == self.self_id:
            return
        old = self._peers.get(peer)
        if old is not None and beat.incarnation < old.beat.incarnation:
            return  # a stale message from a previous life of that node
        if old is not None and old.left and beat.incarnation == old.beat.incarnation:
            return  # said goodbye; only a restart (new incarnation) brings it back
        self._last_seen[peer] = now
        if old is not None and beat.incarnation == old.beat.incarnation and beat.seq < old.beat.seq:
            old.last_heard = now  # overtaken by a newer beat: alive, but what it held is old news
            old.suspected_at = None
            return
        same_life = old is not None and beat.incarnation == old.beat.incarnation  # not a restart that knows nothing of us
        if same_life and peer in self.view.members and beat.epoch > self.view.epoch and self.self_id not in beat.members:
            self.left_out = max(self.left_out, beat.epoch)
        if old is not None and beat.incarnation > old.beat.incarnation and peer in self.view.members and not old.left:
            if peer not in self._restarted:
                logger.warning("%s: %s is back with a new incarnation while still in view %d (restarted faster than "
                               "failure detection, stepped out of a job it left, or a second process runs with its node "
                               "id); it rejoins as a newcomer", self.self_id, peer, self.view.epoch)
            self._restarted.add(peer)
            self.renewed[peer] = self.view.epoch
        self._peers[peer] = _Peer(now, beat)
        self._left.discard(peer)

    def suspect(self, peer: str, now: float) -> None:
        """``peer``'s connection dropped: unless it is heard within ``suspect_grace``, it is dead.

        A process that dies has its TCP connections closed by its kernel at once, so this
        cuts detection from the failure timeout to the grace. A live peer whose connection
        merely dropped reconnects and beats again well within the grace (its heartbeats
        come every interval, from its pulse thread even while its loop is blocked).
        """
        p = self._peers.get(peer)
        if p is not None and not p.left and p.suspected_at is None:
            p.suspected_at = now

    def on_leave(self, peer: str, incarnation: int) -> None:
        """``peer`` left gracefully: drop it at once and exclude it from the quorum count."""
        p = self._peers.get(peer)
        if p is not None and incarnation >= p.beat.incarnation:
            p.left = True
            self._left.add(peer)

    # --- derived state -------------------------------------------------------------------

    def alive(self, now: float) -> set[str]:
        """Peers heard within the failure timeout and not suspected past the grace, plus this node."""
        out = {self.self_id}
        grace = self.failure_timeout / 4 if self.suspect_grace is None else self.suspect_grace
        for pid, p in self._peers.items():
            if p.left or now - p.last_heard > self.failure_timeout or pid in self._restarted:
                continue
            if p.suspected_at is not None and now - p.suspected_at > grace:
                continue
            out.add(pid)
        return out

    def proposal(self, now: float) -> tuple[str, ...]:
        """The member set this node would agree to now."""
        return tuple(sorted(self.alive(now)))

    def beat(self, now: float) -> Beat:
        """The heartbeat to send now (each call numbers a new one)."""
        self._seq += 1
        proposal = self.proposal(now)
        return Beat(
            epoch=self.view.epoch,
            members=self.view.members,
            proposal=proposal,
            incarnation=self.incarnation,
            # Paused already, or about to be at the next tick: a newcomer must not take this
            # proposal for agreement in between (the beat goes out before the tick).
            paused=self.state is MemberState.PAUSED or not self._has_quorum(proposal, now),
            seq=self._seq,
        )

    def left(self) -> frozenset[str]:
        """Peers that said goodbye (and have not come back since)."""
        return frozenset(self._left)

    def known_peers(self) -> list[str]:
        """Every peer heard from at least once and not gone for good."""
        return [pid for pid, p in self._peers.items() if not p.left]

    def heard(self) -> list[str]:
        """:meth:`known_peers`, each marked "(paused)" when its last beat said so."""
        return [f"{pid} (paused)" if p.beat.paused else pid for pid, p in self._peers.items() if not p.left]

    def last_beat(self, peer: str) -> Beat | None:
        """The latest heartbeat heard from ``peer`` (None if never, or after a goodbye)."""
        p = self._peers.get(peer)
        return None if p is None or p.left else p.beat

    def forget(self, peer: str) -> None:
        """Drop all state about ``peer`` (e.g. it vanished from discovery long ago)."""
        self._peers.pop(peer, None)
        self._left.discard(peer)

    def _has_quorum(self, members: tuple[str, ...], now: float | None) -> bool:
        """``members`` hold a strict majority of the view; ``now`` None counts silent members too (no expiry)."""
        base = [m for m in self.view.members if m == self.self_id or (
            m not in self._left and m not in self._restarted and (now is None or not self._expired(m, now)))]
        if len(base) <= 1:
            return True
        inside = sum(1 for m in base if m in members)
        return 2 * inside > len(base)

    def _expired(self, member: str, now: float) -> bool:
        """``member`` of the view has been silent for ``quorum_expiry`` (rule 5)."""
        if self.quorum_expiry is None:
            return False
        last = max(self._last_seen.get(member, 0.0), self._installed_at)
        return now - last > self.quorum_expiry

    # --- the step ------------------------------------------------------------------------

    def tick(self, now: float) -> View | None:
        """Apply the agreement rules; returns the view installed by this call, if any."""
        proposal = self.proposal(now)
        others = [m for m in proposal if m != self.self_id]
        if not self._has_quorum(proposal, now):
            if self.state is not MemberState.PAUSED:
                logger.warning(
                    "%s: only %d of view %d's %d members reachable; pausing (no split brain)",
                    self.self_id, len(proposal), self.view.epoch, len(self.view.members),
                )
                self.state = MemberState.PAUSED
            return None
        if self.state is MemberState.PAUSED:
            if self._has_quorum(proposal, None):
                logger.info("%s: majority reachable again; resuming", self.self_id)
            else:
                gone = [m for m in self.view.members if m not in proposal and m not in self._left]
                logger.warning("%s: %s silent for over %.0fs; forming a ring without them (view %d had %d members)",
                               self.self_id, ", ".join(gone), self.quorum_expiry, self.view.epoch, len(self.view))
            self.state = MemberState.MEMBER if len(self.view) > 1 else MemberState.ALONE
        beats = {m: self._peers[m].beat for m in others}
        # Catch-up: a member of my proposal already installed it (possibly with a larger epoch).
        installed = [b.epoch for b in beats.values() if b.members == proposal and b.epoch > self.view.epoch and not b.paused]
        if installed:
            return self._install(View(max(installed), proposal), now)
        if proposal == self.view.members:
            return None
        if all(b.proposal == proposal and not b.paused for b in beats.values()):
            epoch = max([self.view.epoch, *(b.epoch for b in beats.values())]) + 1
            return self._install(View(epoch, proposal), now)
        return None

    def _install(self, view: View, now: float) -> View:
        old = self.view
        self.view, self._installed_at = view, now
        self._last_seen = {m: t for m, t in self._last_seen.items() if m in view.members}
        self.state = MemberState.MEMBER if len(view) > 1 else MemberState.ALONE
        self._left &= set(self._peers)  # keep goodbyes until the peer restarts
        self._restarted &= set(view.members)  # a view without it installed: its new incarnation may join
        logger.info("%s: view %d -> %d: %s", self.self_id, old.epoch, view.epoch, ", ".join(view.members))
        return view
