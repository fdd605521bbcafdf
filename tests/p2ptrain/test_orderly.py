"""Orderly ends: what a member sent before it left is delivered; outsiders cannot park messages.

Regression for `p2ptrain bench allreduce` failing in 9 of 12 runs with "view changed
from epoch 3 to 4: ... left or failed" in its final barrier: a member that finished the
barrier left the ring, and the view change aborted its successor's wait for a message
that member had already sent.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2ptrain._errors import PeerFailedError
from p2ptrain.ring import Collectives, Node, View
from p2ptrain.ring._router import Router
from p2ptrain.transport import FakeNetwork, Message

from _ring import FAST, fake_ring, started_ring, until


async def _barrier_then_leave(node: Node, coll: Collectives, value: float) -> torch.Tensor:
    """What every bench member does at its end: a last collective, then close at once."""
    out = await coll.all_reduce(torch.full((1000,), value))
    await coll.barrier()
    await node.close()
    return out


@pytest.mark.parametrize("members", [3, 4])
async def test_members_that_leave_right_after_a_barrier_do_not_fail_the_others(members: int) -> None:
    async with fake_ring(members) as (_, nodes):
        colls = [Collectives(x, view=x.view) for x in nodes]
        results = await asyncio.wait_for(
            asyncio.gather(*(_barrier_then_leave(x, c, float(i)) for i, (x, c) in enumerate(zip(nodes, colls)))),
            timeout=10,
        )
        expected = sum(range(members)) / members
        for r in results:
            assert torch.allclose(r, torch.full((1000,), expected))


async def test_the_same_over_real_sockets() -> None:
    nodes = await started_ring(4)
    try:
        colls = [Collectives(x, view=x.view) for x in nodes]
        await asyncio.wait_for(
            asyncio.gather(*(_barrier_then_leave(x, c, float(i)) for i, (x, c) in enumerate(zip(nodes, colls)))),
            timeout=20,
        )
    finally:
        for x in nodes:
            await x.close()


async def test_a_member_that_crashes_still_fails_the_waiters_at_once() -> None:
    async with fake_ring(3) as (net, nodes):
        colls = [Collectives(x, view=x.view) for x in nodes[:2]]
        waiting = [asyncio.ensure_future(c.barrier()) for c in colls]
        net.kill(nodes[2].node_id)
        for w in waiting:
            with pytest.raises(PeerFailedError):
                await asyncio.wait_for(w, timeout=FAST["failure_timeout"] + 3)


async def test_a_leaver_that_sent_nothing_fails_the_waiters_within_the_drain_time() -> None:
    async with fake_ring(3) as (_, nodes):
        colls = [Collectives(x, view=x.view) for x in nodes[:2]]
        waiting = [asyncio.ensure_future(c.barrier()) for c in colls]
        await nodes[2].close()  # orderly, but before its part of the barrier
        for w in waiting:
            with pytest.raises(PeerFailedError):
                await asyncio.wait_for(w, timeout=FAST["failure_timeout"] + 3)


async def test_a_wait_on_a_member_that_left_in_order_ends_at_once_and_what_it_sent_is_kept() -> None:
    # A pipeline's stages sat out the whole drain (the failure timeout) for an activation
    # of a member that had left at a step boundary: its goodbye comes after everything
    # it sent, so what is not here by then never comes.
    async with fake_ring(3) as (_, nodes):
        a, b, leaver = nodes
        epoch = a.view.epoch
        await leaver.endpoint.send(a.node_id, "t", tag=["sent"], epoch=epoch)
        from_leaver = asyncio.ensure_future(a.take("t", ["never"], epoch=epoch, sender=leaver.node_id))
        from_b = asyncio.ensure_future(a.take("t", ["late"], epoch=epoch, sender=b.node_id))
        anonymous = asyncio.ensure_future(a.take("t", ["unsaid"], epoch=epoch))
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        await leaver.close()
        with pytest.raises(PeerFailedError, match="left the ring in order"):
            await asyncio.wait_for(from_leaver, FAST["failure_timeout"])
        assert asyncio.get_running_loop().time() - t0 < FAST["failure_timeout"] / 2
        # What it sent before leaving is still handed out, to a wait that names it too.
        msg = await asyncio.wait_for(a.take("t", ["sent"], epoch=epoch, sender=leaver.node_id), 1)
        assert msg.sender == leaver.node_id
        with pytest.raises(PeerFailedError, match="left the ring in order"):  # asked for after the change
            await asyncio.wait_for(a.take("t", ["after"], epoch=epoch, sender=leaver.node_id), 1)
        # A live member's message of the draining view may still come, and does.
        await b.endpoint.send(a.node_id, "t", tag=["late"], epoch=epoch)
        assert (await asyncio.wait_for(from_b, 1)).sender == b.node_id
        assert not anonymous.done()  # no sender named: it waits out the drain, as before
        with pytest.raises(PeerFailedError):
            await asyncio.wait_for(anonymous, FAST["failure_timeout"] + 3)


async def test_an_outsider_cannot_park_messages_for_the_next_view() -> None:
    """Messages stamped with the next epoch come only from members of the view being agreed."""
    net = FakeNetwork()
    a = Node(cluster="c", node_id="a0", network=net, **FAST)
    b = Node(cluster="c", node_id="b0", network=net, **FAST)
    intruder = net.endpoint("x0", "c")
    await a.start()
    await b.start()
    await intruder.start()
    try:
        b.connect(a.address)
        await a.wait_for_peers(1, timeout=10)
        offers = a.subscribe("job.offer")
        intruder.add_peer(a.node_id, a.address)
        for i in range(50):
            for epoch in (a.view.epoch, a.view.epoch + 1, a.view.epoch + 7):
                await intruder.send(a.node_id, "job.offer", epoch=epoch, meta={"id": f"fake{i}"}, timeout=5)
                await intruder.send(a.node_id, "coll", epoch=epoch, tag=["filler", i], timeout=5)
        await until(lambda: a.stats.get("dropped_not_member", 0) >= 300, 5, "every intruder message refused")
        assert offers.empty()
        assert len(a.mailbox) == 0
        # The real member still gets through.
        b.endpoint.try_send(a.node_id, "job.offer", epoch=a.view.epoch, meta={"id": "real"})
        msg = await asyncio.wait_for(offers.get(), 5)
        assert msg.meta["id"] == "real"
    finally:
        await intruder.close()
        await b.close()
        await a.close()


async def test_messages_of_a_view_stay_takeable_through_several_orderly_changes() -> None:
    """Members leaving one after another at a job's end: 3 -> 4 -> 5 must not end view 3's drain."""
    stats: dict[str, int] = {}
    router = Router(stats, drain_s=5.0)
    v3, v4, v5 = View.of(3, "abcd"), View.of(4, "abc"), View.of(5, "ab")
    router.route(Message("c", "coll", 3, ["t", 1], {}, []), v3, v3.members)
    router.on_view(v3, v4, failed=[])
    router.on_view(v4, v5, failed=[])
    router.route(Message("c", "coll", 3, ["t", 2], {}, []), v5, v5.members)  # in flight from a leaver
    assert (await router.take("coll", 3, ["t", 1], v5)).sender == "c"
    assert (await router.take("coll", 3, ["t", 2], v5)).sender == "c"
    # A failure ends every drain at once.
    router.on_view(v5, View.of(6, "a"), failed=["b"])
    with pytest.raises(PeerFailedError):
        await router.take("coll", 3, ["t", 3], View.of(6, "a"))


async def test_abandoned_work_ends_its_waits_now_and_later_and_nothing_else() -> None:
    """A trainer that knows a step cannot finish ends its collective's waits on live members too."""
    router = Router({}, drain_s=5.0)
    v3, v4 = View.of(3, "abc"), View.of(4, "ab")
    router.route(Message("b", "coll", 3, ["d3/job", 1], {}, []), v3, v3.members)  # already here: still handed out
    router.on_view(v3, v4, failed=[])
    waiting = asyncio.ensure_future(router.take("coll", 3, ["d3/job", 2], v4, "b"))  # on a live member
    other = asyncio.ensure_future(router.take("coll", 3, ["d3/other", 2], v4, "b"))  # another job's
    await asyncio.sleep(0)
    assert router.abandon("d3/job", 3, "c left during step 7") == 1
    with pytest.raises(PeerFailedError, match="c left during step 7"):
        await asyncio.wait_for(waiting, 1)
    assert (await router.take("coll", 3, ["d3/job", 1], v4)).sender == "b"
    with pytest.raises(PeerFailedError, match="c left during step 7"):  # a wait that starts later ends at once
        await asyncio.wait_for(router.take("coll", 3, ["d3/job", 3], v4, "b"), 1)
    assert not other.done()
    router.route(Message("b", "coll", 3, ["d3/other", 2], {}, []), v4, v4.members)
    assert (await asyncio.wait_for(other, 1)).sender == "b"


async def test_a_wait_that_starts_after_its_node_closed_ends_at_once() -> None:
    # Close ended the waits already started; one a trainer began just after waited forever.
    async with fake_ring(2) as (_, nodes):
        await nodes[1].close()
        with pytest.raises(PeerFailedError, match="node n1 closed"):
            await asyncio.wait_for(nodes[1].take("coll", ["t", 1], sender="n0"), 1)
