"""Pipeline training over loopback nodes: transparency against one device, both schedules."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2ptrain._job import JobSpec, resolve, train_single
from p2ptrain._pipeline import PipelineTrainer, even_split

from _ring import started_ring


ring = started_ring


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
async def test_three_stage_pipeline_is_transparent(schedule: str) -> None:
    spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=20, seed=4, lr=1e-2, micro_batches=4,
                   model_kwargs={"depth": 4})
    ref_model, ref_losses = train_single(spec)
    nodes = await ring(3)
    try:
        w = [resolve(spec) for _ in nodes]
        split = even_split(len(w[0].layers()), 3)
        trainers = [
            PipelineTrainer(x, wk, stages=split, global_batch=24, micro_batches=4, steps=20, seed=4, lr=1e-2, schedule=schedule)
            for x, wk in zip(nodes, w)
        ]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    by_rank = sorted(trainers, key=lambda t: t.rank)
    got = [p for t in by_rank for p in t.stage.parameters()]
    want = list(ref_model.parameters())
    assert len(got) == len(want)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert all(r.losses == results[0].losses for r in results)
