"""Faults found in review: hostile heartbeats, joins during a job, sends to dead peers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2ptrain import Collectives, DataParallelTrainer, JobSpec, PeerFailedError, resolve
from p2ptrain.ring._membership import MAX_MEMBERS

from _ring import FAST, cluster_name, loopback_node, started_ring
from _wait import until

ring = started_ring


def crash(node) -> None:
    """Like kill -9: no goodbye, the sockets just vanish."""
    node._closed = True
    for t in node._tasks:
        t.cancel()


async def test_bad_addresses_and_gossip_floods_do_not_hurt_the_node() -> None:
    a, b = await ring(2)
    try:
        beat = b.membership.beat(b._clock()).to_wire()
        flood = {f"fake-{i}": f"tcp://127.0.0.1:{1000 + i}" for i in range(MAX_MEMBERS)}
        for meta in (
            {"b": beat, "a": "tcp://127.0.0.1:notaport", "g": {}},
            {"b": beat, "a": "tcp://999.1.1.1:5", "g": {"x": "tcp://[::1:zz]:1"}},
            {"b": beat, "a": b.address, "g": flood},
            {"b": beat, "a": b.address, "g": {f"more-{i}": "tcp://127.0.0.1:9" for i in range(MAX_MEMBERS)}},
        ):
            await b.endpoint.send(a.node_id, "hb", epoch=b.view.epoch, meta=meta)
        # The floods leave no trace to wait on, so a marker follows them on the same
        # connection: a heartbeat with no beat, counted as bad. Messages of one sender are
        # handled in order, so once the marker is counted all four above were handled.
        marked = a.stats["bad_heartbeat"]
        await b.endpoint.send(a.node_id, "hb", epoch=b.view.epoch, meta={"a": b.address, "g": {}})
        await until(lambda: a.stats["bad_heartbeat"] > marked, 5, "the marker heartbeat handled")
        assert a.stats.get("bad_address", 0) >= 2
        assert len(a._addresses) <= MAX_MEMBERS
        assert all(not t.done() for t in a._tasks), "receive/heartbeat tasks must survive"
        # Still a working member: a fresh node can join.
        c = loopback_node(a.cluster)
        await c.start()
        try:
            await c.wait_for_peers(2, timeout=10)
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


async def test_a_join_during_training_is_a_clear_error_not_a_hang() -> None:
    cl = cluster_name()
    nodes = await ring(2, cl)
    spec = JobSpec(model="mlp", global_batch=16, steps=100_000, seed=0)
    started = asyncio.Event()
    trainers = [DataParallelTrainer(x, resolve(spec), global_batch=16, steps=100_000,
                                    on_step=lambda m: started.set()) for x in nodes]
    tasks = [asyncio.ensure_future(t.run()) for t in trainers]
    newcomer = loopback_node(cl)
    try:
        await asyncio.wait_for(started.wait(), 30)
        await newcomer.start()
        with pytest.raises(PeerFailedError, match="changed|moved|joined"):
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await newcomer.close()
        for x in nodes:
            await x.close()


async def test_a_big_send_to_a_dead_peer_fails_within_the_detection_time() -> None:
    nodes = await ring(3)
    try:
        view = nodes[0].view
        root = view.members[0]
        by_id = {x.node_id: x for x in nodes}
        victim = by_id[view.successor(root)]
        # Send once the root's socket has seen the connection drop: the message then waits
        # for a reconnect that never comes. Sent in the moment before (a loaded host), it
        # went out on the dying connection, libzmq dropped it, and the send returned.
        ep = by_id[root].endpoint
        lost, chained = asyncio.Event(), ep.on_peer_lost

        def on_lost(peer: str) -> None:  # the socket monitor's task, on the loop
            if chained is not None:
                chained(peer)
            if peer == victim.node_id:
                lost.set()

        ep.on_peer_lost = on_lost
        crash(victim)
        await victim.endpoint.close()
        await asyncio.wait_for(lost.wait(), FAST["failure_timeout"])
        coll = Collectives(by_id[root])
        t = torch.zeros(1 << 20)  # 4 MiB: tracked by the transport until the wire releases it
        with pytest.raises(PeerFailedError):
            await asyncio.wait_for(coll.broadcast(t, root), FAST["failure_timeout"] + 5)
    finally:
        for x in nodes:
            await x.close()


async def test_a_failed_heartbeat_round_is_logged_and_the_node_keeps_its_place(
        caplog: pytest.LogCaptureFixture) -> None:
    from _ring import fake_ring

    async with fake_ring(3) as (_, nodes):
        n0 = nodes[0]
        real = n0._router.expire
        failed: list[int] = []

        def expire_once(*a, **k):  # a bug of ours in one round
            if not failed:
                failed.append(1)
                raise RuntimeError("planted")
            return real(*a, **k)

        n0._router.expire = expire_once
        await until(lambda: failed, timeout=5)
        await asyncio.sleep(3 * FAST["failure_timeout"])  # long enough for the others to drop a silent n0
        assert all(len(x.view) == 3 for x in nodes)
        assert n0.stats["heartbeat_error"] == 1
        assert all(not t.done() for t in n0._tasks)
    assert "a heartbeat round failed" in caplog.text and "planted" in caplog.text


async def test_one_announcement_that_cannot_be_taken_does_not_end_discovery(
        caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    node = loopback_node(cluster_name(), mdns=False)
    await node.start()
    try:
        def rec(node_id: str, port: int) -> SimpleNamespace:
            return SimpleNamespace(node_id=node_id, key_fingerprint=node._fingerprint(), addresses=["127.0.0.1"],
                                   port=port, resources=None)

        class Announcements:
            async def events(self):  # what MdnsDiscovery.events yields: (event, record)
                yield "found", rec("bad", 1)
                yield "found", rec("good", 2)

        learned: list[str] = []

        def learn(peer: str, address: str, **kw: object) -> None:
            if peer == "bad":
                raise RuntimeError("planted")
            learned.append(peer)

        node._learn = learn  # type: ignore[method-assign]
        node._discovery = Announcements()  # type: ignore[assignment]
        await asyncio.wait_for(node._discovery_loop(), 5)
    finally:
        node._discovery = None
        await node.close()
    assert learned == ["good"] and node.stats["discovery_error"] == 1
    assert "could not take bad's announcement" in caplog.text


async def test_the_survivors_of_half_a_ring_train_again_with_a_newcomer() -> None:
    # Two of four members were killed together. The survivors paused for good, a newcomer's
    # `train --peers 2` installed a ring with a paused member, offered it a job, and hung:
    # the paused member refused from its old view, and the refusal never reached it.
    from p2ptrain.ring._node import Node
    from p2ptrain.train import JobService, JobSpec

    from _ring import FAST, fake_ring, until

    async with fake_ring(4, quorum_expiry=3.0) as (net, nodes):
        net.kill("n0")
        net.kill("n1")
        await until(lambda: nodes[2].state.value == "paused" and nodes[3].state.value == "paused", 10, "the survivors to pause")
        newcomer = Node(cluster="c", node_id="n4", network=net, quorum_expiry=3.0, **FAST)
        await newcomer.start()
        try:
            newcomer.connect(nodes[2].address)
            with pytest.raises(TimeoutError, match=r"n2 \(paused\)"):
                await newcomer.wait_for_peers(1, timeout=1.0)  # no ring with a paused member
            view = await newcomer.wait_for_peers(2, timeout=15)  # the dead expire: a ring of three
            assert view.members == ("n2", "n3", "n4")
            serving = [asyncio.ensure_future(JobService(x).serve(once=True)) for x in nodes[2:]]
            spec = JobSpec(model="mlp", global_batch=24, steps=5, seed=1, digest_every=0)
            result = await asyncio.wait_for(JobService(newcomer).submit(spec), 60)
            assert result.steps == 5
            await asyncio.wait_for(asyncio.gather(*serving), 30)
        finally:
            await newcomer.close()
