"""The node's plain parts, without a network: the peer table, the heartbeat record, the
stall-aware clock and the view feed."""

from __future__ import annotations

import asyncio

import pytest

from p2ptrain._errors import ProtocolError
from p2ptrain.discovery import Resources
from p2ptrain.ring._feed import ViewFeed
from p2ptrain.ring._heartbeat import Heartbeat, StallClock
from p2ptrain.ring._membership import MAX_MEMBERS, Beat
from p2ptrain.ring._peers import PeerTable, Refusal, peer_host
from p2ptrain.ring._view import View

BEAT = Beat(epoch=3, members=("a", "b"), proposal=("a", "b"), incarnation=7)
RES = Resources(cores=4, memory_bytes=1 << 30, accelerator="cpu", gflops=12.5)


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "host"), [
    ("tcp://127.0.0.1:5555", "127.0.0.1"),
    ("tcp://[::1]:80", "::1"),
    ("fake://n1", "127.0.0.1"),
    ("tcp://127.0.0.1:notaport", None),
    ("tcp://127.0.0.1:0", None),
    ("tcp://127.0.0.1:65536", None),
    ("tcp://127.0.0.1:²", None),
    ("tcp://999.1.1.1:5", None),
    ("tcp://example.com:5", None),
])
def test_peer_host_accepts_ip_and_port_only(address: str, host: str | None) -> None:
    assert peer_host(address) == host


def test_vet_names_why_an_address_is_not_dialled() -> None:
    table = PeerTable("me", remote=False)
    assert table.vet("b", "tcp://127.0.0.1:5") is None
    assert table.vet("me", "tcp://127.0.0.1:5") is Refusal.IGNORED
    assert table.vet("b", 42) is Refusal.IGNORED
    assert table.vet("b", "fake://b") is Refusal.IGNORED
    assert table.vet("b", "tcp://127.0.0.1:" + "9" * 200) is Refusal.IGNORED
    assert table.vet("b", "tcp://127.0.0.1:x") is Refusal.BAD_ADDRESS
    assert table.vet("b", "tcp://10.0.0.2:5") is Refusal.NOT_LOOPBACK
    assert PeerTable("me", remote=True).vet("b", "tcp://10.0.0.2:5") is None
    table.add("b", "tcp://127.0.0.1:5", now=0.0)
    assert table.vet("b", "tcp://127.0.0.1:5") is Refusal.IGNORED  # already known there
    assert table.vet("b", "tcp://127.0.0.1:6") is None  # moved


# --- the peer table ----------------------------------------------------------------------


def test_hearsay_is_evicted_oldest_first_and_first_hand_peers_are_kept() -> None:
    table = PeerTable("me", capacity=3)
    table.add("x", "tcp://127.0.0.1:1", now=1.0)
    table.add("y", "tcp://127.0.0.1:2", now=0.5)
    table.add("z", "tcp://127.0.0.1:3", now=2.0)
    table.heard_from("y")
    assert table.is_full_for("new") and not table.is_full_for("x")
    assert table.oldest_hearsay() == "x"  # y is older but spoke itself
    assert table.remove("x") and not table.remove("x")
    assert table.ids() == ["y", "z"] and len(table) == 2 and "y" in table


def test_a_peer_heard_before_its_address_is_not_hearsay() -> None:
    table = PeerTable("me")
    table.heard_from("p")  # its own address was refused
    table.add("p", "tcp://127.0.0.1:1", now=0.0)  # later learned from gossip
    assert table.oldest_hearsay() is None
    assert table.stale_hearsay(now=100.0, max_age=1.0) == []


def test_stale_hearsay_and_gossip() -> None:
    table = PeerTable("me")
    table.add("old", "tcp://127.0.0.1:1", now=0.0)
    table.add("new", "tcp://127.0.0.1:2", now=9.0)
    assert table.stale_hearsay(now=10.0, max_age=5.0) == ["old"]
    assert table.gossip({"new", "gone"}) == {"new": "tcp://127.0.0.1:2"}
    table.remove("old")
    assert table.addresses() == {"new": "tcp://127.0.0.1:2"}


def test_static_peers_are_forgotten_once_a_node_answers_from_their_address() -> None:
    table = PeerTable("me")
    pseudo = table.add_static("tcp://127.0.0.1:9")
    assert table.static_ids() == [pseudo] and table.static_address(pseudo) == "tcp://127.0.0.1:9"
    assert table.answered("tcp://127.0.0.1:8") == []
    assert table.answered("tcp://127.0.0.1:9") == [pseudo]
    assert table.static_ids() == []


def test_member_rows_say_what_is_known() -> None:
    table = PeerTable("me")
    table.add("b", "tcp://127.0.0.1:1", now=0.0)
    table.set_resources("b", RES)
    row = table.member("b", Beat(epoch=4, members=("b",), proposal=("b",), incarnation=1, paused=True))
    assert (row.address, row.resources, row.state, row.epoch) == ("tcp://127.0.0.1:1", RES, "paused", 4)
    assert table.member("c", None).state == "member" and table.member("c", None).epoch == -1


# --- the heartbeat record ----------------------------------------------------------------


def test_a_heartbeat_round_trips() -> None:
    hb = Heartbeat(BEAT, "tcp://127.0.0.1:5", RES, (("c", "tcp://127.0.0.1:6"),))
    wire = hb.to_wire()
    assert set(wire) == {"b", "a", "r", "g"}
    assert Heartbeat.from_wire(wire) == hb


@pytest.mark.parametrize("meta", [None, [], "hb", {"a": "tcp://127.0.0.1:5"}, {"b": {"e": 1}}])
def test_a_heartbeat_without_a_good_beat_is_rejected(meta: object) -> None:
    with pytest.raises(ProtocolError):
        Heartbeat.from_wire(meta)


def test_the_advisory_parts_of_a_heartbeat_are_dropped_one_by_one() -> None:
    beat = BEAT.to_wire()
    hb = Heartbeat.from_wire({"b": beat, "a": 5, "r": {"cores": "many"}, "g": {"ok": "tcp://x", 3: "y", "bad id!": "z",
                                                                              "n": 4}})
    assert hb == Heartbeat(BEAT, None, None, (("ok", "tcp://x"),))
    flood = {f"p{i}": "tcp://127.0.0.1:1" for i in range(MAX_MEMBERS + 1)}
    assert Heartbeat.from_wire({"b": beat, "g": flood}).gossip == ()


# --- the clock ---------------------------------------------------------------------------


def test_the_clock_leaves_out_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    t = [100.0]
    monkeypatch.setattr("p2ptrain.ring._heartbeat.time.monotonic", lambda: t[0])
    clock = StallClock(0.25, warn_after=1.0, name="n")
    assert clock() == 100.0
    t[0] += 0.5  # two intervals: normal
    assert clock() == 100.5 and clock.stalls == 0
    t[0] += 10.0  # the loop was blocked: only one interval counts
    assert clock() == pytest.approx(100.75) and clock.stalls == 1


def test_the_clock_leaves_out_a_held_reader_and_never_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    t, held = [100.0], [5.0]
    monkeypatch.setattr("p2ptrain.ring._heartbeat.time.monotonic", lambda: t[0])
    clock = StallClock(0.25, warn_after=1.0, name="n")
    clock.attach(lambda: held[0], 20.0)  # what was held before attaching is not left out
    assert clock() == 100.0
    t[0] += 0.2
    held[0] += 0.2  # the reader held by a large message all along: the clock stands still
    assert clock() == 100.0
    t[0] += 0.2
    held[0] += 0.1
    assert clock() == pytest.approx(100.1)
    t[0] += 10.0  # a stall of the loop while the reader was held: both left out, the clock stands
    held[0] += 10.0
    assert clock() == pytest.approx(100.1) and clock.stalls == 1
    t[0] += 0.2
    assert clock() == pytest.approx(100.3)


def test_back_to_back_holds_are_excused_only_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large messages one after another: the live peers are heard between them, but a dead
    # one must still be found, one failure timeout after the limit at the latest.
    t, held = [0.0], [0.0]
    monkeypatch.setattr("p2ptrain.ring._heartbeat.time.monotonic", lambda: t[0])
    clock = StallClock(0.25, warn_after=1.0, name="n")
    clock.attach(lambda: held[0], 5.0)
    start = clock()
    for _ in range(40):  # 10 s of reads, the reader held 0.24 s of every 0.25 s
        t[0] += 0.25
        held[0] += 0.24
        clock()
    assert clock() - start == pytest.approx(10.0 - 5.0)  # only the first 5 s held were left out
    t[0] += 0.25  # the reader free for a whole read: the next run is excused afresh
    clock()
    t[0] += 0.25
    held[0] += 0.25
    assert clock() - start == pytest.approx(5.25)


# --- the view feed -----------------------------------------------------------------------


async def test_the_feed_wakes_waiters_and_hands_out_views() -> None:
    feed = ViewFeed()
    seen: list[View] = []
    feed.on_change(seen.append)
    feed.on_change(lambda v: 1 / 0)  # a failing callback is logged, not raised
    changed = feed.changed()
    views = feed.views()
    first = asyncio.ensure_future(views.__anext__())
    target = View(2, ("a", "b"))
    current = [View(1, ("a",))]
    waiting = asyncio.ensure_future(feed.until(lambda: current[0] == target))
    await asyncio.sleep(0)  # let the consumers subscribe
    feed.wake()
    await asyncio.wait_for(changed, 5)
    current[0] = target
    feed.publish(target)
    assert await asyncio.wait_for(first, 5) == target
    await asyncio.wait_for(waiting, 5)
    assert seen == [target]
    await views.aclose()


async def test_abandoned_waiters_do_not_pile_up_in_a_stable_view() -> None:
    """Every send waits on ``changed()`` and cancels it when the send wins: a long job with
    no view change used to keep every one of those futures."""
    feed = ViewFeed()
    live = feed.changed()
    for _ in range(10_000):
        feed.changed().cancel()
    assert len(feed._waiters) <= 64 + 1
    feed.wake()
    await asyncio.wait_for(live, 5)  # the one still waiting is woken
