"""A host program's lifecycle around a job: cancelling it, closing the node under it.

Found by embedding the library as a robot program would: a cancelled ``submit()`` froze
every other member at its step, and a node closed under ``submit()`` or ``serve()`` left
both waiting forever.
"""

from __future__ import annotations

import asyncio

import pytest

from p2ptrain import JobError, MembershipError, PeerFailedError
from p2ptrain.train import JobService, JobSpec

from _ring import fake_ring
from _wait import until

_LONG = JobSpec(model="mlp", global_batch=24, steps=100_000, seed=1, digest_every=0)


async def _at_step(service: JobService, step: int) -> asyncio.Event:
    reached = asyncio.Event()
    service.on_step = lambda m: reached.set() if m.step >= step else None
    return reached


async def test_cancelling_a_submit_stops_the_other_members() -> None:
    async with fake_ring(3) as (_net, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        reached = await _at_step(services[0], 5)
        submitted = asyncio.ensure_future(services[0].submit(_LONG))
        await asyncio.wait_for(reached.wait(), 60)
        submitted.cancel()
        results = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
        assert all(isinstance(r, JobError) and "cancelled on this member" in str(r) for r in results), results
        await until(lambda: not any(s.running for s in services), 10, "every member's training to end")


async def test_closing_the_node_ends_submit_and_serve() -> None:
    async with fake_ring(3) as (_net, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve()) for s in services[1:]]
        reached = await _at_step(services[0], 5)
        submitted = asyncio.ensure_future(services[0].submit(_LONG))
        await asyncio.wait_for(reached.wait(), 60)
        await nodes[0].close()
        with pytest.raises((MembershipError, PeerFailedError), match="closed"):
            await asyncio.wait_for(submitted, 30)
        await until(lambda: not services[0].running, 10, "the closed member's training to end")
        # An idle serve() on a closed node returns instead of waiting for offers forever.
        await nodes[1].close()
        assert await asyncio.wait_for(serving[0], 30) is None
        serving[1].cancel()
        await asyncio.gather(serving[1], return_exceptions=True)
