"""Weights back: the submitter of a job ends with the whole trained model, whatever the strategy.

Three members on the in-memory ring run a job through :class:`JobService`; the
submitter's ``TrainResult.state_dict`` and its workload's model must equal what one
process training the same job ends with (rtol 1e-4): for data parallelism, for the
planner's pipeline, for hybrid layouts (a data-parallel group with the submitter in
it; the submitter left out by the plan) and for a pipeline that a member joined
mid-job. Other members carry no copy.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from p2ptrain.ring._node import Node
from p2ptrain.train import JobService, JobSpec, Stage, TrainResult, _jobs, resolve, train_single
from p2ptrain.train._gather import gather_sources
from p2ptrain.train._job import submitter_of

from _ring import FAST, fake_ring, started_ring
from _transparency import Reference

SPEC = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=12, seed=7, lr=1e-2, micro_batches=4,
               digest_every=0, model_kwargs={"depth": 4})
N_LAYERS = len(resolve(SPEC).layers())  # mlp depth 4: 9 layers


def _assert_whole_model(spec: JobSpec, result: TrainResult, service: JobService) -> None:
    ref = Reference(spec)  # to float32's own precision on this job (see _transparency)
    got = result.state_dict
    assert got is not None, "the submitter got no state_dict"
    ref.assert_state_close(got)
    model = service.last_trainer.w.model  # type: ignore[union-attr]
    ref.assert_state_close(model.state_dict())


async def _run(spec: JobSpec) -> tuple[list[JobService], list[TrainResult]]:
    async with fake_ring(3) as (_, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        mine = await asyncio.wait_for(services[0].submit(spec), 90)
        theirs = await asyncio.wait_for(asyncio.gather(*serving), 30)
    return services, [mine, *theirs]


async def test_a_data_parallel_job_gives_the_submitter_the_model() -> None:
    spec = JobSpec(**{**SPEC.to_wire_fields(), "strategy": "data", "micro_batches": 1})
    services, results = await _run(spec)
    _assert_whole_model(spec, results[0], services[0])
    assert results[1].state_dict is None and results[2].state_dict is None


async def test_a_pipeline_job_gathers_every_stage_on_the_submitter() -> None:
    services, results = await _run(SPEC)
    # The bug this fixes: the submitter's copy of layers it did not run stayed untrained.
    assert len(services[0].last_trainer.units) < N_LAYERS or len(services[0].last_trainer.layout) == 1  # type: ignore[union-attr]
    _assert_whole_model(SPEC, results[0], services[0])
    assert results[1].state_dict is None and results[2].state_dict is None


# Layouts of 6-sample micro-batches (global batch 24, 4 micro-batches) over n0 (the submitter), n1, n2.
HYBRID: dict[str, Callable[[int], list[Stage]]] = {
    "submitter-in-a-group": lambda n: [Stage(0, 3, (("n1", 4), ("n0", 2))), Stage(4, n - 1, (("n2", 6),))],
    "group-sends-once": lambda n: [Stage(0, 4, (("n0", 6),)), Stage(5, n - 1, (("n2", 3), ("n1", 3)))],
    "submitter-left-out": lambda n: [Stage(0, 4, (("n2", 6),)), Stage(5, n - 1, (("n1", 6),))],
}


@pytest.mark.parametrize("layout", sorted(HYBRID))
async def test_a_hybrid_job_gathers_every_stage_on_the_submitter(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stages = HYBRID[layout](N_LAYERS)
    monkeypatch.setattr(_jobs, "layout_from_plan", lambda plan: stages)  # the planner's choice, replaced
    services, results = await _run(SPEC)
    assert services[0].last_trainer.layout == stages  # type: ignore[union-attr]
    _assert_whole_model(SPEC, results[0], services[0])


async def test_the_stages_come_back_over_zeromq(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real sockets on loopback (the blobs are uint8 tensor frames through the transport's checks).
    nodes = await started_ring(3)
    try:
        me, a, b = nodes[0].node_id, nodes[1].node_id, nodes[2].node_id
        stages = [Stage(0, 2, ((a, 6),)), Stage(3, N_LAYERS - 1, ((me, 3), (b, 3)))]
        monkeypatch.setattr(_jobs, "layout_from_plan", lambda plan: stages)
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        mine = await asyncio.wait_for(services[0].submit(SPEC), 90)
        theirs = await asyncio.wait_for(asyncio.gather(*serving), 30)
    finally:
        for n in nodes:
            await n.close()
    assert all(r.state_dict is None for r in theirs)
    _assert_whole_model(SPEC, mine, services[0])


async def test_a_pipeline_job_a_member_joined_gives_the_submitter_the_model() -> None:
    spec = JobSpec(**{**SPEC.to_wire_fields(), "steps": 40})
    async with fake_ring(3) as (net, nodes):
        services = [JobService(n) for n in nodes]
        late = Node(cluster="c", node_id="n9", network=net, **FAST)
        joined = asyncio.Event()

        def on_step(m: Any) -> None:
            time.sleep(0.01)  # a slower step, so the join lands mid-job
            if m.step == 3:
                joined.set()

        services[0].on_step = on_step
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        await asyncio.wait_for(joined.wait(), 30)
        await late.start()
        late.connect(nodes[0].address)
        joining = asyncio.ensure_future(JobService(late).serve(once=True))
        try:
            mine, *_ = await asyncio.wait_for(asyncio.gather(submitted, *serving), 90)
            newcomer = await asyncio.wait_for(joining, 30)
        finally:
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
            await late.close()
    assert newcomer is not None and 0 < newcomer.first_step and newcomer.state_dict is None
    assert len(services[0].last_trainer.view) == 4  # type: ignore[union-attr]
    _assert_whole_model(spec, mine, services[0])


def test_each_stage_sends_once_unless_the_submitter_runs_it() -> None:
    layout = [Stage(0, 1, (("a", 3), ("b", 3))), Stage(2, 2, (("c", 6),)), Stage(3, 4, (("d", 2), ("e", 4)))]
    assert gather_sources(layout, "e") == {0: "a", 1: "a", 2: "c"}
    assert gather_sources(layout, "x") == {0: "a", 1: "a", 2: "c", 3: "d", 4: "d"}
    assert submitter_of("node-1.lab/0123456789abcdef/a1b2c3") == "node-1.lab"


async def test_the_submitter_may_name_its_own_module_without_allowing_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A library host submits `module:function` without having imported the module: it
    # chose the model, so it needs no allow_entry (members it offers the job to do).
    # A ring of one, so no other member in this process imports the module first.
    name = f"p2pt_own_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import p2ptrain
        from p2ptrain.zoo import mlp

        @p2ptrain.workload_entry
        def make(seed=0):
            return mlp(seed)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules
    spec = JobSpec(model=f"{name}:make", global_batch=24, steps=3, digest_every=0)
    try:
        async with fake_ring(1) as (_, nodes):
            mine = await asyncio.wait_for(JobService(nodes[0]).submit(spec), 60)
    finally:
        sys.modules.pop(name, None)
    assert mine.steps == 3 and mine.state_dict is not None


async def test_a_submit_only_member_trains_nothing_and_gets_the_model() -> None:
    from p2ptrain.train import JobService, JobSpec

    from _ring import fake_ring

    spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=6, seed=2, lr=1e-2, micro_batches=4,
                   model_kwargs={"depth": 4}, submitter_trains=False, digest_every=0)
    async with fake_ring(3) as (_, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        result, *_ = await asyncio.wait_for(asyncio.gather(services[0].submit(spec), *serving), 60)
    assert services[0].last_trainer.units == []  # left out of every stage
    assert sorted(u for s in services[1:] for u in s.last_trainer.units) == list(range(len(list(train_single(spec)[0]))))
    assert result.steps == spec.steps and len(result.losses) == spec.steps
    want = train_single(spec)[0].state_dict()
    for name, t in want.items():
        torch.testing.assert_close(result.state_dict[name], t, rtol=1e-4, atol=1e-6)


def test_only_a_pipeline_job_can_leave_its_submitter_out() -> None:
    from p2ptrain import JobError
    from p2ptrain.train import JobSpec

    with pytest.raises(JobError, match="only with the pipeline or auto"):
        JobSpec(model="mlp", strategy="data", submitter_trains=False)
