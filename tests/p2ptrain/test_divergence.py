"""A job whose loss stops being a number stops on every member with the step and a remedy.

A walkthrough trained a workload whose loss went NaN: 30 steps of "loss nan", an all-NaN
model written and exit 0. The loss of a step is the same bits on every member (summed
over the ring), so every member stops at the same step.
"""

from __future__ import annotations

import asyncio

import pytest

from p2ptrain._errors import JobError
from p2ptrain.train import DataParallelTrainer, JobSpec, resolve
from p2ptrain.train.pipeline._trainer import PipelineTrainer, even_split
from p2ptrain.zoo import Workload

from _ring import fake_ring

DIVERGES = JobSpec(model="mlp", global_batch=24, steps=30, seed=3, lr=1e-2)


def poisoned(spec: JobSpec) -> Workload:
    """``spec``'s workload with every tenth target NaN: the first step that draws one has a NaN loss."""
    w = resolve(spec)
    w.dataset.y[::10] = float("nan")  # type: ignore[attr-defined]
    return w


async def test_a_data_parallel_job_whose_loss_is_not_finite_stops_on_every_member() -> None:
    async with fake_ring(3) as (_, nodes):
        trainers = [DataParallelTrainer(x, poisoned(DIVERGES), global_batch=24, steps=DIVERGES.steps, seed=3,
                                        lr=DIVERGES.lr) for x in nodes]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers), return_exceptions=True), 60)
    assert all(isinstance(r, JobError) for r in results), results
    messages = {str(r) for r in results}
    assert len(messages) == 1, messages  # the same step on every member
    (message,) = messages
    assert message.startswith("training diverged at step ") and "lower the learning rate (--lr)" in message
    step = int(message.split("at step ")[1].split(":")[0])
    assert 0 <= step < DIVERGES.steps - 1, "a poisoned sample is drawn early"


async def test_a_pipeline_job_whose_loss_is_not_finite_stops_on_every_member() -> None:
    spec = JobSpec(**{**DIVERGES.to_wire_fields(), "strategy": "pipeline", "micro_batches": 4,
                      "model_kwargs": {"depth": 4}})
    n_layers = len(resolve(spec).layers())
    async with fake_ring(3) as (_, nodes):
        ids = list(nodes[0].view.members)
        trainers = [PipelineTrainer(x, poisoned(spec), stages=even_split(n_layers, 3), global_batch=24, micro_batches=4,
                                    steps=spec.steps, seed=3, lr=spec.lr)
                    for x in sorted(nodes, key=lambda n: ids.index(n.node_id))]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers), return_exceptions=True), 60)
    assert all(isinstance(r, JobError) and str(r).startswith("training diverged at step ") for r in results), results
    assert len({str(r) for r in results}) == 1


def test_a_finite_loss_passes() -> None:
    from p2ptrain.train._dataparallel import check_finite

    check_finite(2.5, 0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(JobError, match="training diverged at step 7"):
            check_finite(bad, 7)
