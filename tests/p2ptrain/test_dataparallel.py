"""Data-parallel training over real loopback nodes: transparency, lossy codecs, failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2ptrain.ring._collectives import Collectives
from p2ptrain.train._dataparallel import DataParallelTrainer, param_digest
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._single import train_single

from _ring import started_ring
from _transparency import Reference

ring = started_ring


async def close(nodes) -> None:
    for x in nodes:
        await x.close()


@pytest.mark.parametrize("codec", ["none", "int8", "fp16"])
async def test_all_reduce_matches_the_exact_sum_and_replicas_agree_bitwise(codec: str) -> None:
    nodes = await ring(3)
    try:
        g = torch.Generator().manual_seed(0)
        # 3 MiB per tensor: several 1 MiB pieces per segment, plus an odd tail.
        data = [torch.randn(786_433, generator=g) for _ in nodes]
        colls = [Collectives(x) for x in nodes]
        outs = [d.clone() for d in data]
        await asyncio.gather(*(c.all_reduce(o, op="sum", codec=codec) for c, o in zip(colls, outs)))
        want = sum(data)
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), "replicas must be bit-identical, also with lossy codecs"
        err = ((outs[0] - want).norm() / want.norm()).item()
        assert err < {"none": 1e-6, "int8": 2e-2, "fp16": 1e-3}[codec], err
    finally:
        await close(nodes)


async def test_all_gather_broadcast_barrier() -> None:
    nodes = await ring(3)
    try:
        colls = [Collectives(x) for x in nodes]
        got = await asyncio.gather(*(c.all_gather(torch.full((i + 1,), float(i))) for i, c in enumerate(colls)))
        order = [nodes[0].view.rank(x.node_id) for x in nodes]
        for g in got:
            assert [t.numel() for t in g] == [order.index(r) + 1 for r in range(3)]
        root = nodes[0].view.members[1]
        ts = [torch.full((5,), float(i)) for i in range(3)]
        await asyncio.gather(*(c.broadcast(t, root) for c, t in zip(colls, ts)))
        src = [x.node_id for x in nodes].index(root)
        assert all(torch.equal(t, torch.full((5,), float(src))) for t in ts)
        await asyncio.gather(*(c.barrier() for c in colls))
    finally:
        await close(nodes)


@pytest.mark.parametrize("global_batch", [48, 32])  # 16 each; 11, 11 and 10: uneven shards weigh by their share
async def test_data_parallel_is_transparent_over_three_members(global_batch: int) -> None:
    spec = JobSpec(model="mlp", global_batch=global_batch, steps=20, seed=3, lr=1e-2, codec="none", digest_every=5)
    ref_model, ref_losses = train_single(spec)
    nodes = await ring(3)
    try:
        trainers = [
            DataParallelTrainer(x, resolve(spec), global_batch=spec.global_batch, steps=spec.steps, seed=spec.seed,
                                lr=spec.lr, codec="none", bucket_bytes=4096, digest_every=spec.digest_every)
            for x in nodes
        ]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        await close(nodes)
    assert len({r.digest for r in results}) == 1
    ref = Reference(spec)  # to float32's own precision on this job (see _transparency)
    ref.assert_close(trainers[0].w.model, ref.model, ref.exact)
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


async def test_int8_with_error_feedback_tracks_fp32_training() -> None:
    spec = JobSpec(model="mlp", global_batch=32, steps=30, seed=1, lr=1e-2, codec="int8", digest_every=10)
    nodes = await ring(2)
    try:
        trainers = [DataParallelTrainer(x, resolve(spec), global_batch=32, steps=30, seed=1, lr=1e-2, codec="int8")
                    for x in nodes]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        await close(nodes)
    _, ref = train_single(spec)
    assert results[0].digest == results[1].digest
    assert abs(results[0].losses[-1] - ref[-1]) <= 0.05 * ref[-1] + 1e-4, (results[0].losses[-1], ref[-1])


async def test_a_member_dying_mid_training_is_an_error_not_a_hang() -> None:
    from p2ptrain import PeerFailedError

    spec = JobSpec(model="mlp", global_batch=30, steps=10_000, seed=0)
    nodes = await ring(3)
    try:
        stepped = asyncio.Event()
        trainers = [DataParallelTrainer(x, resolve(spec), global_batch=30, steps=10_000, on_step=lambda m: stepped.set())
                    for x in nodes]
        tasks = [asyncio.ensure_future(t.run()) for t in trainers[:2]]
        victim = asyncio.ensure_future(trainers[2].run())
        await asyncio.wait_for(stepped.wait(), 30)  # training is under way
        victim.cancel()
        # Simulate a crash: the endpoint vanishes without a goodbye.
        nodes[2]._closed = True
        for t in nodes[2]._tasks:
            t.cancel()
        await nodes[2].endpoint.close()
        with pytest.raises(PeerFailedError):
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        for t in tasks:
            t.cancel()
        await close(nodes[:2])


def test_param_digest_changes_with_one_bit() -> None:
    m = torch.nn.Linear(3, 2)
    d = param_digest(m)
    with torch.no_grad():
        m.weight[0, 0] = torch.nextafter(m.weight[0, 0], torch.tensor(1e9))
    assert param_digest(m) != d


async def test_a_step_cancelled_mid_compute_leaves_no_gradient_sum_running() -> None:
    # The compute thread carries on after its step is cancelled, and the gradient sums it
    # had launched waited for the other member's pieces until the process ended: tasks and
    # buffers of a job that had stopped.
    import threading

    spec = JobSpec(model="mlp", global_batch=32, steps=5, seed=0, digest_every=0)
    nodes = await ring(2)
    a, b = (DataParallelTrainer(x, resolve(spec), global_batch=32, steps=5, bucket_bytes=4096) for x in nodes)
    inside, release, b_waits = threading.Event(), threading.Event(), threading.Event()
    finish, attach = a.grads.finish, b.grads.attach

    def held_finish() -> None:  # a's compute thread, after its backward launched every bucket
        inside.set()
        release.wait(30)
        finish()

    def held_attach(*args: object) -> None:  # b never starts its sums: a's wait for its pieces
        b_waits.wait(30)
        attach(*args)  # type: ignore[arg-type]

    a.grads.finish = held_finish  # type: ignore[method-assign]
    b.grads.attach = held_attach  # type: ignore[method-assign]
    runs = [asyncio.ensure_future(t.run()) for t in (a, b)]
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, inside.wait, 30)
        runs[0].cancel()
        await asyncio.sleep(0.1)
        release.set()  # a's compute thread finishes its step and returns
        await asyncio.wait_for(asyncio.gather(runs[0], return_exceptions=True), 10)

        def sums() -> list[asyncio.Task]:
            return [t for t in asyncio.all_tasks() if not t.done() and "_reduce" in repr(t.get_coro())]

        assert not sums(), sums()
    finally:
        release.set()
        b_waits.set()
        runs[1].cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await close(nodes)
