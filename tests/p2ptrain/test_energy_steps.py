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


def test_one_cpu_second_is_a_share_of_the_busy_draw() -> None:
    """``busy_per_cpu_s``: a CPU second over the cores the busy draw counts (scaled on an emulated device)."""
    from types import SimpleNamespace

    from p2ptrain.train._energy import busy_per_cpu_s, device_power

    profile = SimpleNamespace(cores=4, idle_w=2.0, busy_w_per_core=1.5, link_j_per_byte=0.0, link_j_per_frame=0.0)
    node = SimpleNamespace(node_id="n", members=lambda: [SimpleNamespace(node_id="n", resources=SimpleNamespace(
        cores=2, battery=None))])
    real = SimpleNamespace(profile=SimpleNamespace(profile=profile, label="x"), cpu_scale=1.0)
    assert device_power(real, node).busy_w == 3.0 and busy_per_cpu_s(real, node) == 0.5  # 2 cores busy
    emulated = SimpleNamespace(profile=SimpleNamespace(profile=profile, label="x"), cpu_scale=4 / 0.5)  # 0.5 host cores
    assert device_power(emulated, node).busy_w == 6.0 and busy_per_cpu_s(emulated, node) == 2.0  # 1 / 0.5
