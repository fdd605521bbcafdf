"""A member that joins the ring during a job is brought into it, and the job still ends where one process ends.

The job's members stop at their next collective (the view changed), ask the newcomer in
(it builds the workload and accepts), put the state together at one step with it, and
go on, re-planned over one more member. Transparency: the final parameters equal those
of one process training the whole job (rtol 1e-4), and the newcomer trained steps too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from p2ptrain.ring._node import Node
from p2ptrain.train import JobService, JobSpec

from _ring import FAST, fake_ring
from _transparency import Reference
from _wait import until


async def _job_with_a_newcomer(spec: JobSpec, *, admit: bool = True,
                               on_plan: Callable[[Any], Any] | None = None) -> tuple[list[JobService], list[object]]:
    async with fake_ring(3) as (net, nodes):
        services = [JobService(n, admit=admit) for n in nodes]
        services[0].on_plan = on_plan
        late = Node(cluster="c", node_id="n9", network=net, **FAST)
        joined = asyncio.Event()

        def on_step(m: object) -> None:
            time.sleep(0.01)  # a slower step, so the join lands mid-job
            if getattr(m, "step", 0) == 3:
                joined.set()

        services[0].on_step = on_step
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        await asyncio.wait_for(joined.wait(), 30)
        await late.start()
        late.connect(nodes[0].address)
        newcomer = JobService(late, admit=admit)
        joining = asyncio.ensure_future(newcomer.serve(once=True))
        try:
            results = await asyncio.wait_for(asyncio.gather(submitted, *serving), 60)
            if admit and spec.admit:
                results.append(await asyncio.wait_for(joining, 30))
        finally:
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
            await late.close()
        return [*services, newcomer], results


@pytest.mark.parametrize("strategy", ["data", "pipeline"])
async def test_a_member_that_joins_mid_job_is_brought_in(strategy: str) -> None:
    spec = JobSpec(model="mlp", strategy=strategy, global_batch=24, steps=60, seed=5, lr=1e-2, digest_every=0,
                   micro_batches=4 if strategy == "pipeline" else 1, model_kwargs={"depth": 4})
    plans: list[Any] = []
    services, results = await _job_with_a_newcomer(spec, on_plan=plans.append)
    newcomer = services[-1].last_trainer
    assert newcomer is not None and results[-1].steps == spec.steps  # type: ignore[attr-defined]
    assert 0 < results[-1].first_step < spec.steps, "the newcomer did not train steps of the job"  # type: ignore[attr-defined]
    trainers = [s.last_trainer for s in services]
    assert all(t.recoveries for t in trainers[:3]) and len(trainers[0].view) == 4
    # A join held the job up for the old view's drain (the failure timeout): data in 4 runs of 5 (a
    # member refused a call in the old view), pipeline in 4 of 6 (the join met the measured move).
    slow = [(t.node.node_id, round(r.total_s, 3), r.cause) for t in trainers[:3] for r in t.recoveries
            if r.total_s >= FAST["failure_timeout"] / 2]
    assert not slow, f"recoveries took {slow} s"
    ref = Reference(spec)  # as close to the float64 run as one float32 process (see _transparency)
    if strategy == "data":
        for t in trainers:
            ref.assert_close(t.w.model, ref.model, ref.exact)
    else:
        covered = set()
        units = list(ref.units())
        for t in trainers:
            covered |= set(t.units)
            for u in t.units:
                ref.assert_close(t.layers[u], *units[u])
        assert covered == set(range(len(units)))
        # The submitter shows (and `train` records) the plan the newcomer was admitted with too;
        # a five-device walkthrough saw the stages change with no plan line after a join.
        # (A measured re-plan at the check's step shows its plan as well.)
        assert len(plans) == 2 + len(trainers[0].moved_at) and len(plans[-1].stages) == trainers[0].n_stages


@pytest.mark.parametrize("where", ["service", "job"])
async def test_with_admit_off_the_job_goes_on_without_the_newcomer(where: str) -> None:
    spec = JobSpec(model="mlp", global_batch=24, steps=40, seed=5, lr=1e-2, digest_every=0, admit=where != "job")
    services, results = await _job_with_a_newcomer(spec, admit=where != "service")
    assert all(r.steps == spec.steps for r in results)  # type: ignore[attr-defined]
    assert len(services[0].last_trainer.view) == 3 and services[-1].last_trainer is None


async def test_the_minority_side_of_a_partition_stops_then_is_brought_back_when_it_heals() -> None:
    spec = JobSpec(model="mlp", global_batch=30, steps=150, seed=6, lr=1e-2, digest_every=0)
    async with fake_ring(5) as (net, nodes):
        services = [JobService(n) for n in nodes]
        at: dict[int, asyncio.Event] = {3: asyncio.Event(), 60: asyncio.Event()}

        def on_step(m: object) -> None:
            time.sleep(0.02)
            step = getattr(m, "step", 0)
            if step in at:
                at[step].set()

        services[2].on_step = on_step
        serving = [asyncio.ensure_future(s.serve()) for i, s in enumerate(services) if i != 2]
        submitted = asyncio.ensure_future(services[2].submit(spec))
        try:
            await asyncio.wait_for(at[3].wait(), 30)
            net.partition(["n0", "n1"], ["n2", "n3", "n4"])
            await asyncio.wait_for(at[60].wait(), 60)
            minority = [services[0].last_trainer, services[1].last_trainer]
            assert all(t is not None and t.next_step < 60 for t in minority), "the minority kept training"
            net.heal()
            result = await asyncio.wait_for(submitted, 90)
        finally:
            for s in serving:
                s.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
    assert result.steps == spec.steps
    back = [s.last_trainer for s in services[:2]]
    assert all(t is not None and t is not m and t.next_step == spec.steps for t, m in zip(back, minority)), \
        "the healed members were not brought back into the job"
    ref = Reference(spec)
    for t in [*back, services[2].last_trainer]:
        ref.assert_close(t.w.model, ref.model, ref.exact)


async def test_a_stop_reaches_a_member_that_joined_mid_job() -> None:
    # The abort used to go only to the members of the view the job started in: a newcomer
    # trained on alone (found in review).
    from p2ptrain import JobStopped

    spec = JobSpec(model="mlp", global_batch=25, steps=100_000, seed=5, digest_every=0, model_kwargs={"depth": 2})
    async with fake_ring(2) as (net, nodes):
        services = [JobService(n) for n in nodes]
        steps: list[int] = []
        services[0].on_step = lambda m: (time.sleep(0.01), steps.append(m.step))
        serving = asyncio.ensure_future(services[1].serve(once=True))
        submitted = asyncio.ensure_future(services[0].submit(spec))
        await until(lambda: len(steps) >= 3, 30, "the first steps")
        late = Node(cluster="c", node_id="n9", network=net, **FAST)
        await late.start()
        late.connect(nodes[0].address)
        newcomer = JobService(late)
        joining = asyncio.ensure_future(newcomer.serve(once=True))
        try:
            await until(lambda: newcomer.last_trainer is not None and newcomer.last_trainer.next_step > 0, 30,
                        "the newcomer training")
            assert services[0].stop("stopped by its submitter")
            with pytest.raises(JobStopped):
                await asyncio.wait_for(submitted, 30)
            for other in (serving, joining):
                with pytest.raises(JobStopped, match="stopped on member n0: stopped by its submitter"):
                    await asyncio.wait_for(other, 30)
        finally:
            for t in (joining, serving, submitted):
                t.cancel()
            await asyncio.gather(joining, serving, submitted, return_exceptions=True)
            await late.close()
