"""Every step's metrics carry every member's joules, labelled measured or estimated."""

from __future__ import annotations

import asyncio

import pytest

from p2ptrain.train import JobService, JobSpec, StepMetrics

from _ring import fake_ring


@pytest.mark.parametrize("strategy", ["data", "pipeline"])
async def test_each_step_reports_every_members_joules(strategy: str) -> None:
    spec = JobSpec(model="mlp", strategy=strategy, global_batch=24, steps=6, seed=1, lr=1e-2, digest_every=0,
                   micro_batches=4 if strategy == "pipeline" else 1, model_kwargs={"depth": 4})
    seen: list[StepMetrics] = []
    async with fake_ring(3) as (_, nodes):
        services = [JobService(n) for n in nodes]
        services[0].on_step = seen.append
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        await asyncio.wait_for(asyncio.gather(services[0].submit(spec), *serving), 60)
    assert len(seen) == spec.steps
    for m in seen:
        assert len(m.joules) == 3 and len(m.measured) == 3
        assert all(j > 0 for j in m.joules), m.joules  # at least the idle power of the step's time
    # This machine has no sensor the meter can read, so every figure is an estimate.
    assert services[0]._meter().sensor_source is not None or not any(any(m.measured) for m in seen)
