"""The embeddable Node in one process: real sockets and mDNS on 127.0.0.1, or the fake network."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from p2ptrain import PeerFailedError
from p2ptrain.ring._membership import MemberState
from p2ptrain.ring._node import Node
from p2ptrain.transport import FakeNetwork

from _ring import FAST, cluster_name, loopback_node, until


@contextlib.asynccontextmanager
async def started(*nodes: Node):
    try:
        for n in nodes:
            await n.start()
        yield nodes
    finally:
        for n in nodes:
            await n.close()


async def test_four_nodes_agree_and_a_graceful_leave_shrinks_at_once() -> None:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(4)]
    async with started(*nodes):
        views = await asyncio.gather(*(n.wait_for_peers(3, timeout=10) for n in nodes))
        assert len({v for v in views}) == 1
        v = views[0]
        for n in nodes:
            assert n.view.successor(n.node_id) == v.members[(v.rank(n.node_id) + 1) % 4]
        await nodes[0].close()
        took = await until(lambda: all(len(n.view) == 3 for n in nodes[1:]), 3.0, "shrink after leave")
        assert took < FAST["failure_timeout"], "a graceful leave must not wait for failure detection"
        assert len({n.view for n in nodes[1:]}) == 1


async def test_view_iterator_and_callback_see_changes() -> None:
    cl = cluster_name()
    a, b = loopback_node(cl), loopback_node(cl)
    seen: list[int] = []
    a.on_view_change(lambda v: seen.append(len(v)))
    async with started(a):
        it = a.views()
        async with started(b):
            v = await asyncio.wait_for(it.__anext__(), 10)
            assert set(v.members) == {a.node_id, b.node_id}
        v = await asyncio.wait_for(it.__anext__(), 5)
        assert v.members == (a.node_id,)
        await it.aclose()
    assert seen == [2, 1]


async def test_static_peers_without_mdns_learn_the_whole_ring() -> None:
    cl = cluster_name()
    first = loopback_node(cl, mdns=False)
    async with started(first):
        others = [loopback_node(cl, mdns=False, peers=[first.address.removeprefix("tcp://")]) for _ in range(2)]
        async with started(*others):
            # The two static nodes only know `first`; gossip makes them meet each other.
            await asyncio.gather(*(n.wait_for_peers(2, timeout=10) for n in (first, *others)))
            assert len({n.view for n in (first, *others)}) == 1


async def test_a_node_bound_to_every_interface_shows_the_address_its_peers_dial(monkeypatch: pytest.MonkeyPatch) -> None:
    # A walkthrough: `join` without --interface printed "at tcp://0.0.0.0:34025" and listed itself
    # so, while its peers and `status` showed the address they dial (a fault, to a newcomer).
    from types import SimpleNamespace

    from p2ptrain.cli._join import own_address

    node = loopback_node(cluster_name())
    async with started(node):
        port = node.address.rsplit(":", 1)[1]
        # Bound to all (not done here: tests bind loopback only), announced on 127.0.0.1.
        with monkeypatch.context() as patch:
            patch.setattr(type(node.endpoint), "address", property(lambda _: f"tcp://0.0.0.0:{port}"))
            patch.setattr(node, "_discovery", SimpleNamespace(record=SimpleNamespace(addresses=["127.0.0.1"])))
            assert [m.address for m in node.members()] == [f"tcp://127.0.0.1:{port}"]
            assert own_address(node) == f"tcp://127.0.0.1:{port}"


async def test_wrong_secret_is_refused_and_learns_nothing() -> None:
    cl = cluster_name()
    a, b = loopback_node(cl, secret=b"right horse battery staple"), loopback_node(cl, secret=b"right horse battery staple")
    bad = loopback_node(cl, secret=b"wrong battery horse staple")
    async with started(a, b, bad):
        await asyncio.gather(a.wait_for_peers(1, timeout=10), b.wait_for_peers(1, timeout=10))
        # The bad node sees the announcements (public) but is never admitted: the bounded
        # wait below gives it many heartbeat periods and two failure timeouts to try.
        with pytest.raises(TimeoutError) as refused:
            await bad.wait_for_peers(1, timeout=2.5)
        # The count and the names agree: the node itself is neither (it said "has 0 (<itself>)").
        assert "the view has 0 besides this node (none); heard from: nobody" in str(refused.value)
        assert len(a.view) == 2 and bad.node_id not in a.view
        assert bad.membership.known_peers() == []
        assert bad.stats["foreign_key"] >= 1
        # ... and the timeout says why, for a host that does not show warnings (it read "heard from: nobody" only).
        assert "announced this cluster with another key (a different secret?)" in str(refused.value)
        assert a.node_id in str(refused.value) and b.node_id in str(refused.value)


async def test_secret_refusal_also_holds_when_the_intruder_dials_directly() -> None:
    cl = cluster_name()
    a = loopback_node(cl, secret=b"s3cret-s3cret-s3cret", mdns=False)
    async with started(a):
        bad = loopback_node(cl, secret=b"other-other-other-other", mdns=False, peers=[a.address.removeprefix("tcp://")])
        async with started(bad):
            with pytest.raises(TimeoutError):
                await bad.wait_for_peers(1, timeout=2.0)
            assert a.membership.known_peers() == []
            assert sum(a.endpoint.drops().values()) >= 1, a.endpoint.drops()


async def test_another_cluster_is_ignored() -> None:
    a, b = loopback_node(cluster_name()), loopback_node(cluster_name())
    async with started(a, b):
        # The wait names the cluster it heard instead (a typo in --cluster is then plain).
        with pytest.raises(TimeoutError, match=rf"heard other clusters: .*'{b.cluster}' \(1\)"):
            await a.wait_for_peers(1, timeout=1.5)
        assert b.node_id not in a.membership.known_peers()


async def test_a_static_peer_that_never_answers_is_named_when_the_wait_ends() -> None:
    # A walkthrough: a --peer at a dead port ended with "heard from: nobody" only.
    async with started(Node(cluster=cluster_name(), interfaces=["127.0.0.1"], peers=["127.0.0.1:9"], mdns=False,
                            ephemeral=True, **FAST)) as (node,):
        with pytest.raises(TimeoutError, match=r"heard from: nobody; no answer from static peer\(s\) tcp://127\.0\.0\.1:9$"):
            await node.wait_for_peers(1, timeout=1.0)


async def test_minority_partition_pauses_on_the_fake_network() -> None:
    net = FakeNetwork()
    nodes = [Node(cluster="c", node_id=f"n{i}", network=net, **FAST) for i in range(5)]
    async with started(*nodes):
        for n in nodes[1:]:
            n.connect(nodes[0].address)
        await asyncio.gather(*(n.wait_for_peers(4, timeout=10) for n in nodes))
        net.partition(["n0", "n1"], ["n2", "n3", "n4"])
        await until(lambda: all(n.view.members == ("n2", "n3", "n4") for n in nodes[2:]), 5, "majority view")
        await until(lambda: all(n.state is MemberState.PAUSED for n in nodes[:2]), 5, "minority pause")
        assert all(len(n.view) == 5 for n in nodes[:2]), "the minority must not form a second ring"
        net.heal()
        await until(lambda: len({n.view for n in nodes}) == 1 and len(nodes[0].view) == 5, 10, "healed ring")


async def test_waiters_fail_when_a_peer_dies() -> None:
    net = FakeNetwork()
    a, b = (Node(cluster="c", node_id=i, network=net, **FAST) for i in ("a", "b"))
    async with started(a, b):
        b.connect(a.address)
        await a.wait_for_peers(1, timeout=10)
        waiter = asyncio.ensure_future(a.take("coll", [1, 0]))
        net.kill("b")
        with pytest.raises(PeerFailedError, match="b (left or failed|unreachable)"):
            await asyncio.wait_for(waiter, FAST["failure_timeout"] + 2)


async def test_close_twice_and_before_start_are_safe() -> None:
    n = loopback_node(cluster_name())
    await n.close()
    m = loopback_node(cluster_name())
    await m.start()
    await m.close()
    await m.close()


def test_a_short_secret_is_refused_with_the_fix() -> None:
    from p2ptrain import ConfigError

    with pytest.raises(ConfigError, match="at least 16 random"):
        loopback_node(cluster_name(), secret=b"correct horse")


async def test_waiting_for_peers_a_view_already_holds_returns_at_once() -> None:
    # A walkthrough's wait_for_peers(0, timeout=-1) raised TimeoutError with nothing to wait for.
    async with loopback_node(cluster_name(), mdns=False) as node:
        assert (await node.wait_for_peers(0, timeout=-1)).members == (node.node_id,)
        assert (await node.wait_for_peers(0, timeout=0)).members == (node.node_id,)
        with pytest.raises(TimeoutError, match="waited 0.05s for 1 peers"):
            await node.wait_for_peers(1, timeout=0.05)
