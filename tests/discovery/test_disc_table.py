"""The peer table and event streams, without a network."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from p2ptrain.discovery import PeerEvent, PeerEventStream
from p2ptrain.discovery._events import merge
from p2ptrain.discovery._records import service_name
from p2ptrain.discovery._table import PeerTable

from _disc_helpers import make_record


def rec(node: str, cluster: str = "lab", **kw: object):  # type: ignore[no-untyped-def]
    return make_record(cluster, node, addresses=("10.0.0.1",), **kw)  # type: ignore[arg-type]


def name(node: str, cluster: str = "lab") -> str:
    return service_name(cluster, node)


def test_found_updated_lost_and_counters() -> None:
    t = PeerTable(cluster="lab", self_id="me")
    assert t.apply(name("a"), rec("a")) == PeerEvent("found", rec("a"))
    assert t.apply(name("a"), rec("a")) is None  # re-announcement, nothing new
    moved = rec("a", port=7001)
    assert t.apply(name("a"), moved) == PeerEvent("updated", moved)
    assert t.remove(name("a").upper()) == PeerEvent("lost", moved)  # DNS names: any case
    assert t.remove(name("a")) is None
    assert t.peers() == {}
    assert (t.stats["found"], t.stats["updated"], t.stats["lost"]) == (1, 1, 1)


def test_filters() -> None:
    t = PeerTable(cluster="lab", self_id="me")
    assert t.apply(name("b", "other"), rec("b", "other")) is None
    assert t.apply(name("me"), rec("me")) is None
    assert t.apply(name("x"), rec("a")) is None  # a record must come under its own name
    assert t.peers() == {}
    assert (t.stats["ignored_other_cluster"], t.stats["ignored_self"], t.stats["malformed"]) == (1, 1, 1)
    assert t.other_clusters() == {"other": 1}


def test_other_clusters_are_named_and_bounded() -> None:
    t = PeerTable(cluster="lab", self_id="me", max_peers=3)
    for k in range(40):
        for node in ("a", "b", "c", "d", "a"):
            t.apply(name(node, f"c{k:02d}"), rec(node, f"c{k:02d}"))
    heard = t.other_clusters()
    assert len(heard) == 16 and set(heard.values()) == {3}  # 16 names, each counted up to max_peers
    assert t.stats["ignored_other_cluster"] == 200 and t.peers() == {}


def test_higher_incarnation_replaces_lower_is_stale() -> None:
    t = PeerTable(cluster="lab", self_id=None)
    t.apply(name("a"), rec("a", incarnation=5))
    restarted = rec("a", incarnation=6, port=9000)
    assert t.apply(name("a"), restarted) == PeerEvent("updated", restarted)
    assert t.apply(name("a"), rec("a", incarnation=5)) is None
    assert t.peers() == {"a": restarted}
    assert t.stats["ignored_stale"] == 1


def test_announcement_number_orders_records_of_one_incarnation() -> None:
    t = PeerTable(cluster="lab", self_id=None)
    t.apply(name("a"), rec("a"), seq=0)
    newer, older = rec("a", port=2), rec("a", port=1)
    assert t.apply(name("a"), newer, seq=2) == PeerEvent("updated", newer)
    assert t.apply(name("a"), older, seq=1) is None  # a cache still held it
    assert t.peers()["a"] == newer and t.stats["ignored_stale"] == 1
    restarted = rec("a", incarnation=2, port=3)
    assert t.apply(name("a"), restarted, seq=0) == PeerEvent("updated", restarted)


def test_capacity() -> None:
    t = PeerTable(cluster="lab", self_id=None, max_peers=2)
    for node in "abc":
        t.apply(name(node), rec(node))
    assert sorted(t.peers()) == ["a", "b"] and t.stats["ignored_full"] == 1


def test_merge_rules() -> None:
    a1, a2 = rec("a"), rec("a", port=2)
    assert merge(PeerEvent("found", a1), PeerEvent("updated", a2)) == PeerEvent("found", a2)
    assert merge(PeerEvent("found", a1), PeerEvent("lost", a1)) is None
    assert merge(PeerEvent("updated", a1), PeerEvent("lost", a2)) == PeerEvent("lost", a2)
    assert merge(PeerEvent("lost", a1), PeerEvent("found", a2)) == PeerEvent("updated", a2)
    assert merge(PeerEvent("updated", a1), PeerEvent("updated", a2)) == PeerEvent("updated", a2)


async def test_stream_is_bounded_by_peers_and_ends() -> None:
    closed: list[PeerEventStream] = []
    s = PeerEventStream(closed.append)
    for port in range(1, 1001):  # a flapping peer: 1000 events, one pending entry
        s._push(PeerEvent("updated", dataclasses.replace(rec("a"), port=port)))
    s._push(PeerEvent("found", rec("b")))
    s._push(PeerEvent("found", rec("c")))
    s._push(PeerEvent("lost", rec("c")))
    assert len(s._pending) == 2
    assert await s.__anext__() == PeerEvent("updated", dataclasses.replace(rec("a"), port=1000))
    assert (await s.__anext__()).record.node_id == "b"
    waiting = asyncio.ensure_future(s.__anext__())
    await asyncio.sleep(0)
    s._end()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1.0)
    assert [e async for e in s] == []
    await s.aclose()
    await s.aclose()
    assert closed == []  # ended streams have nothing to unsubscribe


def test_this_nodes_id_from_another_device_is_counted_not_taken(caplog) -> None:
    me = rec("me", incarnation=10)
    t = PeerTable(cluster="lab", self_id="me", self_record=me)
    assert t.apply(name("me"), me) is None
    assert t.apply(name("me"), rec("me", incarnation=9)) is None  # a past life of this node
    assert (t.stats["ignored_self"], t.stats["same_id_elsewhere"]) == (2, 0)
    with caplog.at_level("WARNING", logger="p2ptrain.discovery._table"):
        elsewhere = make_record("lab", "me", incarnation=3, addresses=("10.0.0.9", "fe80::1%eth0"))
        for _ in range(3):  # re-announced: counted every time, warned once
            assert t.apply(name("me"), elsewhere) is None
        assert t.apply(name("me"), rec("me", incarnation=11)) is None  # started later, records mixed with ours
    assert t.stats["same_id_elsewhere"] == 4 and t.peers() == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "10.0.0.9, fe80::1" in warnings[0] and "cloned" in warnings[1]


def test_an_updated_record_keeps_the_addresses_this_node_announced_before() -> None:
    # Caches keep a node's old address records for a while after it moves (update()).
    me = rec("me", incarnation=10)
    t = PeerTable(cluster="lab", self_id="me", self_record=me)
    moved = make_record("lab", "me", incarnation=11, addresses=("10.0.0.2",))
    t.set_self(moved)
    assert t.apply(name("me"), me) is None and t.apply(name("me"), moved) is None
    assert t.stats["same_id_elsewhere"] == 0
