"""Ring collectives on the in-memory fake network: exact results, codec bounds, replicas, faults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from p2ptrain import ConfigError, PeerFailedError
from p2ptrain.ring import Collectives, Node
from p2ptrain.ring._allreduce import Code, Tag

from _ring import FAST, fake_ring, until

LOSSY = ["fp16", "bf16", "int8", "int8:64", "topk:0.1"]
CODECS = ["none", *LOSSY]
# The smallest piece the collectives accept: 1024 float32 values, so a few thousand
# elements already stream every segment in several pieces.
PIECE = 4096

# Worst error of one encode of values with absolute maximum ``a``: fp16 and bf16 round to
# 11 and 8 significant bits (half an ulp: 2**-11, 2**-8 relative); int8 is at most half a
# step of its block's absmax / 127; top-k keeps values exactly but may drop any value not
# above its k-th largest, so one encode can lose up to ``a`` (its real contract, nothing
# lost but only delayed, is tested with error feedback below).
HOP_ERROR: dict[str, Callable[[float], float]] = {
    "fp16": lambda a: a * 2.0**-11,
    "bf16": lambda a: a * 2.0**-8,
    "int8": lambda a: a / 254,
    "int8:64": lambda a: a / 254,
    "topk:0.1": lambda a: a,
}


def sizes(n: int) -> list[int]:
    """Tensor sizes that stress the segment arithmetic for a ring of ``n``."""
    return sorted({
        1,                    # one member owns everything, the others own nothing
        n - 1 or 1,           # fewer elements than members: an empty segment
        7 * n + 3,            # not divisible by the ring size
        (2 * n + 1) * 1024 + 5,  # every segment spans several pieces, the last one short
    })


def inputs(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(seed + 1000 * i + numel)) for i in range(n)]


def assert_replicas_identical(xs: list[torch.Tensor]) -> None:
    first = xs[0].numpy().tobytes()
    for i, x in enumerate(xs[1:], 1):
        assert x.numpy().tobytes() == first, f"replica {i} differs from replica 0"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
async def test_all_reduce_is_exact_or_within_the_codec_bound_and_replicas_match(n: int, codec: str) -> None:
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x, piece_bytes=PIECE) for x in nodes]
        for numel in sizes(n):
            for op in ("sum", "mean"):
                xs = inputs(n, numel)
                exact = torch.stack(xs).double().sum(0)
                if op == "mean":
                    exact /= n
                got = await asyncio.gather(*(c.all_reduce(x, op=op, codec=codec, key=(numel, op)) for c, x in zip(colls, xs)))
                assert all(g is x for g, x in zip(got, xs)), "all_reduce works in place and returns its tensor"
                assert_replicas_identical(xs)
                if codec == "none":
                    torch.testing.assert_close(xs[0].double(), exact, rtol=1e-5, atol=1e-5)
                    continue
                # n encodes on each element's path (n - 1 reduce-scatter hops and the
                # owner's all-gather encode), each of a partial sum at most n * max|x|.
                biggest = n * max(x.abs().max().item() for x in inputs(n, numel))
                bound = n * HOP_ERROR[codec](biggest) * 1.01 + 1e-6
                err = (xs[0].double() - exact).abs().max().item()
                assert err <= bound, f"{codec} over {n} members, numel={numel}, {op}: error {err} > bound {bound}"


@pytest.mark.parametrize("codec", LOSSY)
async def test_lossy_error_is_only_delayed_by_error_feedback(codec: str) -> None:
    # Sum of results over T calls = T * exact - (residuals left), so the mean of the
    # results converges to the exact value like 1/T; without the residuals kept per
    # (key, step, piece) across calls it would stay at the one-call error.
    n, numel, calls = 3, 3 * 1024 + 7, 16
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x, piece_bytes=PIECE) for x in nodes]
        base = inputs(n, numel)
        exact = torch.stack(base).double().sum(0)
        total = torch.zeros(numel, dtype=torch.float64)
        for t in range(calls):
            xs = [x.clone() for x in base]
            await asyncio.gather(*(c.all_reduce(x, op="sum", codec=codec, key="bucket") for c, x in zip(colls, xs)))
            assert_replicas_identical(xs)
            total += xs[0].double()
            if t == 0:
                first = (xs[0].double() - exact).abs().max().item()
        averaged = (total / calls - exact).abs().max().item()
        assert averaged < first / 3, f"{codec}: mean of {calls} calls is off by {averaged}, one call by {first}"


async def test_a_ring_of_one_leaves_the_tensor_alone() -> None:
    async with fake_ring(1) as (_, (node,)):
        coll = Collectives(node, piece_bytes=PIECE)
        x = torch.arange(5.0)
        assert await coll.all_reduce(x, codec="int8") is x
        assert torch.equal(x, torch.arange(5.0))
        assert [t.tolist() for t in await coll.all_gather(x)] == [x.tolist()]
        assert await coll.sum_along(x, [node.node_id]) is x and torch.equal(x, torch.arange(5.0))
        await coll.barrier()


@pytest.mark.parametrize("n", [2, 3, 4, 5])
async def test_all_gather_returns_every_members_tensor_in_ring_order(n: int) -> None:
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        # Different shapes per member: all_gather carries whole tensors of any shape.
        mine = {x.node_id: torch.full((i + 1, 2), float(i)) for i, x in enumerate(nodes)}
        got = await asyncio.gather(*(c.all_gather(mine[x.node_id]) for c, x in zip(colls, nodes)))
        order = nodes[0].view.members
        for per_member in got:
            assert len(per_member) == n
            for member, t in zip(order, per_member):
                assert torch.equal(t, mine[member]), f"slot of {member} holds {t.tolist()}"


@pytest.mark.parametrize("root", [0, -1])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
async def test_broadcast_copies_the_roots_tensor_into_everyone(n: int, root: int) -> None:
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        ts = [torch.full((3, 7), float(i)) for i in range(n)]
        want = ts[root].clone()
        got = await asyncio.gather(*(c.broadcast(t, nodes[root].node_id) for c, t in zip(colls, ts)))
        assert all(g is t for g, t in zip(got, ts)), "broadcast works in place"
        for t in ts:
            assert torch.equal(t, want)


async def test_a_large_broadcast_lands_in_place_and_a_strided_one_is_copied() -> None:
    # Recovery aligns a whole training state with a broadcast: it must land in the
    # destination as it is read (off the loop when large), not be copied on the loop.
    async with fake_ring(3) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        ts = [torch.full(((1 << 19) + 1,), float(i)) for i in range(3)]  # just over 2 MiB: landed off the loop
        before = [x.endpoint._landings.landed for x in nodes]
        await asyncio.gather(*(c.broadcast(t, nodes[0].node_id) for c, t in zip(colls, ts)))
        assert all(torch.equal(t, ts[0]) for t in ts)
        assert [x.endpoint._landings.landed - b for x, b in zip(nodes, before)] == [0, 1, 1]
        strided = [torch.full((64, 4), float(i)).t() for i in range(3)]
        await asyncio.gather(*(c.broadcast(t, nodes[1].node_id) for c, t in zip(colls, strided)))
        assert all(torch.equal(t, strided[1]) for t in strided)


@pytest.mark.parametrize("no_grad", [True, False])
async def test_a_parameter_is_broadcast_whatever_the_grad_mode(no_grad: bool) -> None:
    # Initial weights are an obvious thing to broadcast. The landing copies in the codec
    # thread, whose grad mode is not the caller's: into a parameter that requires grad it
    # failed there, and the broadcast waited for a message that had been dropped.
    async with fake_ring(2) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        ps = [torch.nn.Parameter(torch.full(((1 << 19) + 1,), float(i))) for i in range(2)]  # landed off the loop
        with torch.set_grad_enabled(not no_grad):
            await asyncio.wait_for(asyncio.gather(*(c.broadcast(p, nodes[0].node_id) for c, p in zip(colls, ps))), 10)
        assert torch.equal(ps[1].detach(), ps[0].detach()) and ps[1].requires_grad


@pytest.mark.parametrize("n", [2, 3, 5])
async def test_barrier_waits_for_the_last_member(n: int) -> None:
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        early = [asyncio.ensure_future(c.barrier()) for c in colls[:-1]]
        # A negative check needs a bounded wait: many message round trips on the fake
        # network, and still nobody may pass a barrier the last member has not entered.
        done, _ = await asyncio.wait(early, timeout=0.2)
        assert not done, "a member passed the barrier before the last one entered"
        await asyncio.wait_for(asyncio.gather(colls[-1].barrier(), *early), 5)


@pytest.mark.parametrize("pinned", [False, True], ids=["node-view", "pinned-view"])
@pytest.mark.parametrize(("collective", "how"), [
    ("all_reduce", "leave"),
    ("barrier", "leave"),
    # A crash waits out failure detection (1 s here); one collective shows it is enough.
    ("all_reduce", "crash"),
    ("sum_along", "leave"),
])
async def test_a_peer_leaving_mid_collective_fails_the_others(collective: str, how: str, pinned: bool) -> None:
    async with fake_ring(3) as (net, nodes):
        view = nodes[0].view
        colls = [Collectives(x, piece_bytes=PIECE, view=view if pinned else None) for x in nodes]
        # The last member in ring order never joins the call: its predecessor's first
        # message reaching its mailbox shows the others are mid-collective, waiting on it.
        quitter = next(x for x in nodes if x.node_id == view.members[-1])
        stay = [(c, x) for c, x in zip(colls, nodes) if x is not quitter]

        def call(c: Collectives) -> asyncio.Future[Any]:
            if collective == "barrier":
                return asyncio.ensure_future(c.barrier())
            if collective == "sum_along":  # the chain runs in ring order: its last link is the quitter
                return asyncio.ensure_future(c.sum_along(torch.ones(5), view.members))
            return asyncio.ensure_future(c.all_reduce(torch.ones(5000), codec="int8", key="g"))

        running = [call(c) for c, _ in stay]
        await until(lambda: len(quitter.mailbox) > 0, 5, "a message in flight to the quitter")
        assert not any(t.done() for t in running)
        if how == "leave":
            await quitter.close()
        else:
            net.kill(quitter.node_id)
        results = await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), FAST["failure_timeout"] + 3)
        for r in results:
            assert isinstance(r, PeerFailedError), f"expected PeerFailedError, got {r!r}"


@pytest.mark.parametrize("n", [2, 3, 4, 5])
async def test_a_chain_sum_is_the_paths_sum_everywhere_and_its_ends_send_once(n: int, monkeypatch) -> None:
    import p2ptrain.ring._collectives as coll_mod

    sent: dict[str, int] = {}
    real = coll_mod._NodeChannel.send

    async def counting(self, peer, epoch, tag, tensors, meta=None):
        sent[self._node.node_id] = sent.get(self._node.node_id, 0) + 1
        await real(self, peer, epoch, tag, tensors, meta)

    monkeypatch.setattr(coll_mod._NodeChannel, "send", counting)
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x) for x in nodes]
        path = list(reversed(nodes[0].view.members))[1:] + [nodes[0].view.members[-1]]  # not the ring's order
        xs = {x.node_id: torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
              for i, x in enumerate(nodes)}
        want = xs[path[0]].clone()
        for m in path[1:]:
            want = want + xs[m]
        mine = {k: v.clone() for k, v in xs.items()}
        got = await asyncio.wait_for(asyncio.gather(*(c.sum_along(mine[x.node_id], path) for c, x in zip(colls, nodes))), 5)
        assert all(g is mine[x.node_id] for g, x in zip(got, nodes)), "the sum works in place"
        for t in got:
            assert t.numpy().tobytes() == want.numpy().tobytes()
        assert sent[path[0]] == sent[path[-1]] == 1
        assert all(sent[m] == 2 for m in path[1:-1])
        with pytest.raises(ConfigError, match="not the view's members"):
            await colls[0].sum_along(torch.zeros(3), path[:-1])


async def test_bad_arguments_are_refused_with_the_fix() -> None:
    node = Node(cluster="c", node_id="solo", ephemeral=True, mdns=False)  # never started: validation comes first
    with pytest.raises(ConfigError, match="at least 4096"):
        Collectives(node, piece_bytes=1024)
    coll = Collectives(node)
    with pytest.raises(ConfigError, match="'sum' or 'mean'"):
        await coll.all_reduce(torch.zeros(4), op="max")
    with pytest.raises(ConfigError, match="contiguous"):
        await coll.all_reduce(torch.zeros(4, 4).t())


def test_message_codes_and_tags_keep_their_wire_form() -> None:
    # The numbers are on the wire: peers of an older release must read the same tags.
    assert {c.name: c.value for c in Code} == {
        "REDUCE_SCATTER": 0, "ALL_GATHER": 1, "BROADCAST": 2, "GATHER": 3, "BARRIER": 4, "CHAIN": 5,
    }
    wire = Tag(7, Code.ALL_GATHER, 2, 5).wire()
    assert wire == [7, 1, 2, 5] and all(type(v) is int for v in wire)


@pytest.mark.parametrize("late", [False, True])
async def test_pieces_land_in_place_and_early_pieces_take_the_ordinary_path(late: bool) -> None:
    # Pieces of 3 MiB, above the size reduced off the event loop, and a short last piece
    # of each segment, reduced on it. With ``late``, member 1 calls after its predecessor
    # has sent, so some of its pieces arrive before it armed their landings and are added
    # on arrival instead; the result is the same.
    n, numel = 3, 3 * 800_000 + 1
    async with fake_ring(n) as (_, nodes):
        colls = [Collectives(x, piece_bytes=3 << 20) for x in nodes]
        for op in ("sum", "mean"):
            xs = inputs(n, numel)
            exact = torch.stack(xs).double().sum(0) / (n if op == "mean" else 1)

            async def call(i: int, x: torch.Tensor, op: str) -> torch.Tensor:
                if late and i == 1:
                    await until(lambda: len(nodes[1].mailbox) > 0, 10, "a piece held before the call")
                return await colls[i].all_reduce(x, op=op, key=op)

            await asyncio.gather(*(call(i, xs[i], op) for i in range(n)))
            assert_replicas_identical(xs)
            torch.testing.assert_close(xs[0].double(), exact, rtol=1e-5, atol=1e-5)
        landed = [x.endpoint._landings.landed for x in nodes]
        assert all(landed), landed
        assert [len(x.endpoint._landings) for x in nodes] == [0] * n, "every landing is disarmed when a call ends"


async def test_a_send_abandoned_on_a_view_change_leaves_no_unretrieved_error() -> None:
    # A five-device walkthrough: idle members logged "Task exception was never retrieved ...
    # TransportError: peer ... was removed before the message left" a minute after the
    # trainer died. send_or_fail had cancelled its send on the view change, but a send that
    # was resuming as its peer was removed ends with that error all the same.
    import gc
    from types import SimpleNamespace

    from p2ptrain import TransportError
    from p2ptrain.ring._collectives import send_or_fail
    from p2ptrain.ring._membership import MemberState

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def send(*_: Any, **__: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise TransportError("peer 'b' was removed before the message left") from None

    def changed() -> asyncio.Future[None]:
        fut = loop.create_future()
        fut.set_result(None)  # the view has changed already
        return fut

    node = SimpleNamespace(endpoint=SimpleNamespace(send=send), changed=changed, state=MemberState.MEMBER,
                           view=SimpleNamespace(epoch=2, members=["a"]), draining=lambda _epoch: False)
    try:
        with pytest.raises(PeerFailedError, match="view changed while sending to b"):
            await send_or_fail(node, "b", "piece", epoch=1)  # type: ignore[arg-type]
        for _ in range(3):  # the send task ends with its error, then is dropped
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_a_cancelled_send_or_fail_ends_its_send_and_logs_nothing() -> None:
    # A collective abandoned after a member was killed cancelled its send_or_fail tasks,
    # but the sends inside them went on, and ended minutes later with "Task exception was
    # never retrieved ... TransportError: peer ... was removed before the message left"
    # in the survivors' logs.
    import gc

    from p2ptrain import TransportError
    from p2ptrain.ring import send_or_fail

    async def stuck_send(*_args: Any, **_kw: Any) -> None:  # a send waiting for the wire to a dead peer
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise TransportError("peer 'n1' was removed before the message left") from None

    errors: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("message")))
    try:
        async with fake_ring(2) as (_net, nodes):
            nodes[0].endpoint.send = stuck_send  # type: ignore[method-assign]
            task = asyncio.ensure_future(send_or_fail(nodes[0], "n1", "x", epoch=nodes[0].view.epoch))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.05)
            left = [t for t in asyncio.all_tasks() if not t.done() and "stuck_send" in repr(t.get_coro())]
            assert not left, left
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not errors, errors
