"""The membership state machine, driven by a simulated clock and network (no sockets)."""

from __future__ import annotations

import itertools

import pytest

from p2ptrain._errors import ConfigError, MembershipError, ProtocolError
from p2ptrain.ring._membership import Beat, Membership, MemberState
from p2ptrain.ring._view import View

HB = 0.25  # heartbeat period of the simulation


class Sim:
    """N state machines exchanging beats every HB seconds; links can be cut."""

    def __init__(self, ids: list[str], timeout: float = 2.0) -> None:
        self.now = 0.0
        self.nodes = {i: Membership(i, incarnation=1, failure_timeout=timeout) for i in ids}
        self.cut: set[frozenset[str]] = set()
        self.dead: set[str] = set()

    def add(self, node_id: str, incarnation: int = 1) -> None:
        self.nodes[node_id] = Membership(node_id, incarnation=incarnation, failure_timeout=2.0)
        self.dead.discard(node_id)

    def kill(self, node_id: str) -> None:
        self.dead.add(node_id)

    def partition(self, a: set[str], b: set[str]) -> None:
        self.cut |= {frozenset((x, y)) for x in a for y in b}

    def heal(self) -> None:
        self.cut.clear()

    def step(self) -> None:
        self.now += HB
        live = [n for n in self.nodes if n not in self.dead]
        beats = {n: self.nodes[n].beat(self.now) for n in live}
        for src, dst in itertools.permutations(live, 2):
            if frozenset((src, dst)) not in self.cut:
                self.nodes[dst].on_beat(src, beats[src], self.now)
        for n in live:
            self.nodes[n].tick(self.now)

    def run_until(self, cond, seconds: float) -> float:
        start = self.now
        while self.now - start <= seconds:
            if cond():
                return self.now - start
            self.step()
        raise AssertionError(f"condition not met within {seconds} simulated s; views: {self.views()}")

    def views(self) -> dict[str, View]:
        return {n: m.view for n, m in self.nodes.items() if n not in self.dead}

    def agreed(self, members: set[str]) -> bool:
        vs = {self.nodes[n].view for n in members}
        return len(vs) == 1 and set(next(iter(vs)).members) == members


def test_four_nodes_agree_on_one_ring() -> None:
    sim = Sim(["d", "b", "a", "c"])
    sim.run_until(lambda: sim.agreed({"a", "b", "c", "d"}), 2.0)
    v = sim.nodes["a"].view
    assert v.members == ("a", "b", "c", "d") and v.epoch >= 1
    assert v.successor("d") == "a" and v.predecessor("a") == "d"
    assert all(m.state is MemberState.MEMBER for m in sim.nodes.values())


def test_crash_is_detected_within_failure_timeout() -> None:
    sim = Sim(["a", "b", "c", "d"])
    sim.run_until(lambda: sim.agreed({"a", "b", "c", "d"}), 2.0)
    e0 = sim.nodes["a"].view.epoch
    sim.kill("c")
    took = sim.run_until(lambda: sim.agreed({"a", "b", "d"}), 3.0)
    assert took <= 2.0 + 2 * HB
    assert sim.nodes["a"].view.epoch > e0


def test_graceful_leave_shrinks_at_once() -> None:
    sim = Sim(["a", "b", "c"])
    sim.run_until(lambda: sim.agreed({"a", "b", "c"}), 2.0)
    sim.kill("b")
    for n in ("a", "c"):
        sim.nodes[n].on_leave("b", incarnation=1)
    took = sim.run_until(lambda: sim.agreed({"a", "c"}), 1.0)
    assert took <= 2 * HB


def test_leave_of_one_in_two_keeps_the_survivor_running() -> None:
    sim = Sim(["a", "b"])
    sim.run_until(lambda: sim.agreed({"a", "b"}), 2.0)
    sim.kill("b")
    sim.nodes["a"].on_leave("b", incarnation=1)
    sim.run_until(lambda: sim.nodes["a"].view.members == ("a",), 1.0)
    assert sim.nodes["a"].state is MemberState.ALONE


def test_minority_partition_pauses_and_majority_continues_then_heals() -> None:
    ids = ["a", "b", "c", "d", "e"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    sim.partition({"a", "b"}, {"c", "d", "e"})
    sim.run_until(lambda: sim.agreed({"c", "d", "e"}), 3.0)
    sim.run_until(lambda: sim.nodes["a"].state is MemberState.PAUSED, 3.0)
    # The minority never forms a second ring.
    for _ in range(20):
        sim.step()
        assert set(sim.nodes["a"].view.members) == set(ids)
        assert sim.nodes["b"].state is MemberState.PAUSED
    majority_epoch = sim.nodes["c"].view.epoch
    sim.heal()
    sim.run_until(lambda: sim.agreed(set(ids)), 3.0)
    assert all(m.state is MemberState.MEMBER for m in sim.nodes.values())
    assert len({m.view.epoch for m in sim.nodes.values()}) == 1
    # The minority learns that the ring went on without it; the majority was never left out.
    assert [sim.nodes[n].left_out for n in ids] == [majority_epoch, majority_epoch, 0, 0, 0]


def test_even_split_pauses_both_halves() -> None:
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    sim.partition({"a", "b"}, {"c", "d"})
    sim.run_until(lambda: all(m.state is MemberState.PAUSED for m in sim.nodes.values()), 3.0)


def _half_crashed(expiry: float | None = 30.0) -> Sim:
    """A ring of a, b, c, d whose a and b crashed together: c and d have paused."""
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    for m in sim.nodes.values():
        m.quorum_expiry = expiry
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    for n in ("a", "b"):
        sim.kill(n)
    sim.run_until(lambda: sim.nodes["c"].state is MemberState.PAUSED, 3.0)
    return sim


def test_the_survivors_of_half_a_ring_form_their_own_once_the_dead_are_silent_long_enough() -> None:
    # Two of four members crashed together: the other two paused (no majority) and stayed
    # paused for good, and a newcomer could not use them (seen in a five-robot walkthrough).
    sim = _half_crashed()
    expiry = sim.nodes["c"].quorum_expiry
    assert expiry is not None
    took = sim.run_until(lambda: sim.agreed({"c", "d"}), expiry + 5.0)
    assert expiry - 3.0 <= took <= expiry + 3 * HB, took  # not before the expiry, soon after it
    assert all(sim.nodes[n].state is MemberState.MEMBER for n in ("c", "d"))
    sim.add("e")  # and the ring is usable again
    sim.run_until(lambda: sim.agreed({"c", "d", "e"}), 2.0)


def test_without_expiry_the_survivors_of_half_a_ring_wait_for_the_others() -> None:
    sim = _half_crashed(expiry=None)
    for _ in range(int(120 / HB)):
        sim.step()
    assert sim.nodes["c"].state is MemberState.PAUSED and len(sim.nodes["c"].view) == 4


def test_an_even_split_that_outlasts_the_expiry_forms_two_rings_that_merge_when_it_heals() -> None:
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    sim.partition({"a", "b"}, {"c", "d"})
    expiry = sim.nodes["a"].quorum_expiry
    assert expiry is not None
    sim.run_until(lambda: sim.agreed({"a", "b"}) and sim.agreed({"c", "d"}), expiry + 5.0)
    sim.heal()
    sim.run_until(lambda: sim.agreed(set(ids)), 3.0)
    assert all(m.state is MemberState.MEMBER for m in sim.nodes.values())
    assert all(m.left_out == 0 for m in sim.nodes.values())  # each side's ring never held the other side


def test_a_frozen_member_learns_that_the_ring_went_on_without_it() -> None:
    # SIGSTOP (a suspended laptop): it neither beats nor ticks, then wakes with its old view.
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    before = sim.nodes["d"].view.epoch
    sim.kill("d")
    sim.run_until(lambda: sim.agreed({"a", "b", "c"}), 3.0)
    without = sim.nodes["a"].view.epoch
    assert sim.nodes["d"].view.epoch == before and sim.nodes["d"].left_out == 0
    sim.dead.discard("d")  # it wakes: same state machine, same view
    sim.step()
    assert sim.nodes["d"].left_out == without > before
    sim.run_until(lambda: sim.agreed(set(ids)), 3.0)
    assert sim.nodes["d"].view.epoch > without  # back in, as a newcomer of a newer view
    assert [sim.nodes[n].left_out for n in "abc"] == [0, 0, 0]


def test_a_newcomer_never_installs_a_ring_with_a_paused_member() -> None:
    # The paused member proposed {itself, newcomer} and the newcomer installed that ring,
    # which the paused member could not install back: the newcomer's job offer then waited
    # on a member that refused it from another view.
    sim = _half_crashed()
    sim.add("e")
    for _ in range(int(5 / HB)):
        sim.step()
        assert sim.nodes["e"].view.members == ("e",), sim.views()
    assert sim.nodes["c"].state is MemberState.PAUSED


@pytest.mark.parametrize("after", [0.0, 0.5, 1.0, 1.75])
def test_a_newcomer_never_installs_a_ring_with_members_pausing_as_it_arrives(after: float) -> None:
    # The beat at the moment of detection still said "not paused" (the flag came from the
    # tick before), and a newcomer arriving then installed a broken ring for ~29 s.
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    for n in ("a", "b"):
        sim.kill(n)
    for _ in range(int(after / HB)):
        sim.step()
    sim.add("e")
    for _ in range(int(10 / HB)):
        sim.step()
        assert sim.nodes["e"].view.members == ("e",), sim.views()


@pytest.mark.parametrize("expiry", [0.0, -1.0, 1.5, 2.0])
def test_an_expiry_within_the_failure_timeout_is_refused(expiry: float) -> None:
    # Such an expiry let a minority install its own ring at once: the quorum was off.
    with pytest.raises(ConfigError, match="must be longer than the failure timeout"):
        Membership("a", incarnation=1, failure_timeout=2.0, quorum_expiry=expiry)


def test_join_of_a_new_node_and_restart_with_new_incarnation() -> None:
    sim = Sim(["a", "b"])
    sim.run_until(lambda: sim.agreed({"a", "b"}), 2.0)
    sim.add("c")
    sim.run_until(lambda: sim.agreed({"a", "b", "c"}), 2.0)
    e = sim.nodes["a"].view.epoch
    sim.kill("c")
    for n in ("a", "b"):
        sim.nodes[n].on_leave("c", incarnation=1)
    sim.run_until(lambda: sim.agreed({"a", "b"}), 1.0)
    sim.add("c", incarnation=2)  # restarted, same id
    sim.run_until(lambda: sim.agreed({"a", "b", "c"}), 2.0)
    assert sim.nodes["c"].view.epoch > e


@pytest.mark.parametrize("old_lives_on", [False, True])
def test_a_member_back_with_a_new_incarnation_before_its_death_was_seen_leaves_the_view_and_rejoins(
        old_lives_on: bool) -> None:
    # A restart faster than failure detection, or a second process started with the same
    # --node-id: the new incarnation silently replaced the old one in the view, and a job
    # running there waited forever for the old process's part (found in a walkthrough).
    ids = ["a", "b", "c", "d"]
    sim = Sim(ids)
    sim.run_until(lambda: sim.agreed(set(ids)), 2.0)
    before = sim.nodes["a"].view.epoch
    old = sim.nodes["d"]
    sim.add("d", incarnation=2)
    seen: list[View] = []
    for _ in range(int(3.0 / HB)):
        if old_lives_on:  # the first process still beats, with its old incarnation: ignored
            for n in "abc":
                sim.nodes[n].on_beat("d", old.beat(sim.now), sim.now)
        sim.step()
        seen.append(sim.nodes["a"].view)
        if sim.agreed(set(ids)) and sim.nodes["a"].view.epoch > before + 1:
            break
    assert sim.agreed(set(ids)) and sim.nodes["a"].view.epoch >= before + 2, sim.views()
    # In between, a view without d: a job running in the old view sees d's old process fail.
    assert any("d" not in v.members for v in seen), seen
    assert sim.nodes["d"].view.epoch > before


def test_a_fast_restart_in_a_ring_of_two_does_not_pause_the_survivor() -> None:
    # The restarted member left the proposal but still counted in the quorum: 1 of 2, paused for good.
    sim = Sim(["a", "b"])
    sim.run_until(lambda: sim.agreed({"a", "b"}), 2.0)
    sim.add("b", incarnation=2)
    sim.run_until(lambda: sim.agreed({"a", "b"}) and sim.nodes["b"].view.epoch > 1, 5.0)
    assert sim.nodes["a"].state is MemberState.MEMBER


def test_a_new_incarnation_that_never_knew_this_ring_does_not_mark_it_left_out() -> None:
    m = Membership("a", incarnation=1)
    for peer in ("b", "c"):
        m.on_beat(peer, Beat(0, (peer,), ("a", "b", "c"), incarnation=1), now=0.0)
    m.tick(0.0)
    assert m.view.members == ("a", "b", "c")
    # b restarted (or a second process runs with its id) and sits in another, higher ring
    m.on_beat("b", Beat(m.view.epoch + 5, ("b", "d"), ("b", "d"), incarnation=2), now=0.1)
    assert m.left_out == 0
    m.on_beat("c", Beat(m.view.epoch + 1, ("b", "c"), ("b", "c"), incarnation=1), now=0.2)
    assert m.left_out == m.view.epoch + 1  # the same c, that went on without a: left out


def test_stale_incarnation_is_ignored() -> None:
    m = Membership("a", incarnation=1)
    m.on_beat("b", Beat(0, ("b",), ("a", "b"), incarnation=5), now=0.0)
    m.on_leave("b", incarnation=5)
    m.on_beat("b", Beat(0, ("b",), ("a", "b"), incarnation=4), now=0.1)
    m.on_beat("b", Beat(0, ("b",), ("a", "b"), incarnation=5), now=0.1)
    assert m.alive(0.1) == {"a"}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"e": 1},
        {"e": -1, "m": [], "p": [], "i": 1, "z": False},
        {"e": 1, "m": ["b", "a"], "p": [], "i": 1, "z": False},
        {"e": 1, "m": ["a", "a"], "p": [], "i": 1, "z": False},
        {"e": 1, "m": [1], "p": [], "i": 1, "z": False},
        {"e": 1, "m": ["x" * 500], "p": [], "i": 1, "z": False},
        {"e": 1, "m": [f"n{i:04d}" for i in range(300)], "p": [], "i": 1, "z": False},
        {"e": True, "m": [], "p": [], "i": 1, "z": False},
        {"e": 1, "m": [], "p": [], "i": 1, "z": 0},
    ],
)
def test_malformed_beats_are_refused(bad: object) -> None:
    with pytest.raises(ProtocolError):
        Beat.from_wire(bad)


def test_beat_wire_round_trip() -> None:
    b = Beat(3, ("a", "b"), ("a", "b", "c"), 7, True, seq=12)
    assert Beat.from_wire(b.to_wire()) == b
    old = {k: v for k, v in b.to_wire().items() if k != "n"}  # a sender that does not count its beats
    assert Beat.from_wire(old).seq == 0
    with pytest.raises(ProtocolError, match="sequence"):
        Beat.from_wire({**b.to_wire(), "n": -1})


def test_a_beat_overtaken_by_a_newer_one_counts_for_liveness_only() -> None:
    """The pulse thread repeats the last beat on its own connection, so it may arrive after a newer one."""
    m = Membership("a", 1, failure_timeout=1.0)
    newer = Beat(2, ("a", "b"), ("a", "b"), 5, seq=8)
    m.on_beat("b", newer, now=0.0)
    m.on_beat("b", Beat(1, ("b",), ("b",), 5, seq=7), now=0.9)
    assert m.last_beat("b") == newer
    assert "b" in m.alive(1.5)  # heard at 0.9
    m.on_beat("b", Beat(0, ("b",), ("b",), 6, seq=1), now=1.6)  # a restart counts from 1 again
    assert m.last_beat("b") is not None and m.last_beat("b").incarnation == 6
    assert [m.beat(2.0).seq for _ in range(3)] == [1, 2, 3]


def test_view_contract() -> None:
    v = View.of(2, ["c", "a", "b"])
    assert v.members == ("a", "b", "c") and len(v) == 3 and "b" in v
    assert v.rank("c") == 2 and v.successor("c") == "a"
    with pytest.raises(MembershipError):
        v.rank("zz")
    with pytest.raises(MembershipError):
        View(1, ("b", "a"))
    assert View.of(1, ["a"]).successor("a") == "a"
    assert v.digest == View.of(2, ["a", "b", "c"]).digest != View.of(3, ["a", "b", "c"]).digest


def test_a_suspected_peer_is_dead_after_the_grace_unless_it_beats_again() -> None:
    sim = Sim(["a", "b", "c"])
    sim.run_until(lambda: sim.agreed({"a", "b", "c"}), 2.0)
    # b's connection to a dropped but b lives: its next beat (one interval later) clears it.
    sim.nodes["a"].suspect("b", sim.now)
    sim.step()
    assert "b" in sim.nodes["a"].alive(sim.now + 1.0)
    # c died: a and b suspect it and remove it after the grace, not the failure timeout.
    sim.kill("c")
    for n in ("a", "b"):
        sim.nodes[n].suspect("c", sim.now)
    took = sim.run_until(lambda: sim.agreed({"a", "b"}), 3.0)
    assert took <= 2.0 / 4 + 2 * HB, f"took {took:.2f}s"
