"""Pipeline training over loopback nodes: transparency against one device.

Plain pipelines (both schedules) and hybrid layouts (data-parallel groups inside
stages, uneven sample shares, a member left out) must end with the parameters and
losses of single-process training on the same batches with the same micro-batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from p2ptrain._errors import ConfigError
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._single import train_single
from p2ptrain.train.pipeline._trainer import PipelineTrainer, Stage, even_split

from _ring import started_ring

ring = started_ring

SPEC = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=20, seed=4, lr=1e-2, micro_batches=4,
               model_kwargs={"depth": 4})


async def _train(n: int, layout: Callable[[list[str]], Sequence[Any]], schedule: str = "1f1b",
                 **trainer_kw: Any) -> list[PipelineTrainer]:
    nodes = await ring(n)
    try:
        members = list(nodes[0].view.members)
        trainers = [
            PipelineTrainer(x, resolve(SPEC), stages=layout(members), global_batch=24, micro_batches=4, steps=20,
                            seed=4, lr=1e-2, schedule=schedule, **trainer_kw)
            for x in nodes
        ]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    for t, r in zip(trainers, results):
        t.result = r  # type: ignore[attr-defined]
    return trainers


def _assert_transparent(trainers: list[PipelineTrainer]) -> None:
    ref_model, ref_losses = train_single(SPEC)
    want = list(ref_model.parameters())
    by_stage: dict[int, list[PipelineTrainer]] = {}
    for t in trainers:
        if t.stage_index is not None:
            by_stage.setdefault(t.stage_index, []).append(t)
    for group in by_stage.values():  # replicas of a stage are bit-identical
        assert len({t.result.digest for t in group}) == 1  # type: ignore[attr-defined]
    got = [p for k in sorted(by_stage) for p in by_stage[k][0].stage.parameters()]
    assert len(got) == len(want)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    losses = [t.result.losses for t in trainers]  # type: ignore[attr-defined]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert all(x == losses[0] for x in losses)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
async def test_three_stage_pipeline_is_transparent(schedule: str) -> None:
    n_layers = len(resolve(SPEC).layers())
    _assert_transparent(await _train(3, lambda members: even_split(n_layers, 3), schedule))


async def test_hybrid_groups_with_uneven_shares_are_transparent() -> None:
    # Stage 0 on one member; stage 1 shared 4:2 by two members (micro-batches of 6).
    def layout(m: list[str]) -> list[Stage]:
        return [Stage(0, 3, ((m[1], 6),)), Stage(4, 8, ((m[2], 4), (m[0], 2)))]

    trainers = await _train(3, layout)
    _assert_transparent(trainers)
    assert sum(t.busy_s > 0 for t in trainers) == 3


async def test_one_stage_on_all_members_is_data_parallel() -> None:
    def layout(m: list[str]) -> list[Stage]:
        return [Stage(0, 8, ((m[0], 1), (m[1], 3), (m[2], 2)))]

    _assert_transparent(await _train(3, layout, "gpipe"))


async def test_a_member_left_out_reports_progress_and_trains_nothing() -> None:
    def layout(m: list[str]) -> list[Stage]:
        return [Stage(0, 4, ((m[2], 6),)), Stage(5, 8, ((m[0], 6),))]

    trainers = await _train(3, layout)
    _assert_transparent(trainers)
    idle = [t for t in trainers if t.stage_index is None]
    assert len(idle) == 1 and idle[0].busy_s == 0 and len(idle[0].result.losses) == 20  # type: ignore[attr-defined]


async def test_bad_layouts_are_refused() -> None:
    nodes = await ring(2)
    try:
        m = list(nodes[0].view.members)
        w = resolve(SPEC)
        bad = [
            [Stage(0, 8, ((m[0], 5),))],  # shares do not sum to the micro-batch (6)
            [Stage(0, 2, ((m[0], 6),)), Stage(3, 8, ((m[0], 6),))],  # one member in two stages
            [Stage(0, 2, ((m[0], 6),)), Stage(4, 8, ((m[1], 6),))],  # layer 3 uncovered
            [Stage(0, 8, (("stranger", 6),))],  # not in the view
        ]
        for stages in bad:
            with pytest.raises(ConfigError):
                PipelineTrainer(nodes[0], w, stages=stages, global_batch=24, micro_batches=4, steps=1)
    finally:
        for x in nodes:
            await x.close()


async def test_groups_on_both_sides_of_a_boundary_with_different_splits_are_transparent() -> None:
    # Rows 0-3 / 4-5 on one side, 0 / 1-5 on the other: pieces split and join at the cut,
    # and targets go from a first-stage group to a last-stage group.
    def layout(m: list[str]) -> list[Stage]:
        return [Stage(0, 3, ((m[0], 4), (m[1], 2))), Stage(4, 8, ((m[2], 1), (m[3], 5)))]

    _assert_transparent(await _train(4, layout))


async def test_a_first_stage_of_frozen_layers_trains_the_rest() -> None:
    """A LoRA job's first stage (a frozen embedding) has no graph to run backward through."""
    nodes = await ring(2)
    try:
        workloads = [resolve(SPEC) for _ in nodes]
        for w in workloads:
            w.model[0].requires_grad_(False)
        trainers = [PipelineTrainer(x, w, stages=[(0, 0), (1, len(w.layers()) - 1)], global_batch=24, micro_batches=4,
                                    steps=5, seed=4, lr=1e-2) for x, w in zip(nodes, workloads)]
        await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    ref = resolve(SPEC)
    ref.model[0].requires_grad_(False)
    model, _ = train_single(SPEC, 5, workload=ref)
    got = [p for t in sorted(trainers, key=lambda t: t.stage_index) for p in t.stage.parameters()]
    assert len(got) == len(list(model.parameters()))
    for p, q in zip(got, model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


async def test_a_member_left_out_reports_the_rings_step_time_not_its_own() -> None:
    nodes = await ring(3)
    try:
        n_layers = len(resolve(SPEC).layers())
        members = list(nodes[0].view.members)
        layout = [Stage(0, 1, ((members[0], 6),)), Stage(2, n_layers - 1, ((members[1], 6),))]  # members[2] left out
        seen: dict[str, list[float]] = {m: [] for m in members}
        trainers = []
        for x in nodes:
            t = PipelineTrainer(x, resolve(SPEC), stages=layout, global_batch=24, micro_batches=4, steps=8, seed=4, lr=1e-2)
            t.on_step = lambda m, me=x.node_id: seen[me].append(m.step_s)
            trainers.append(t)
        await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    idle, busy = sorted(seen[members[2]][2:]), sorted(seen[members[0]][2:])
    # The idle member's steps take no time of their own: it reports the ring's period.
    assert idle[len(idle) // 2] >= 0.5 * busy[len(busy) // 2], (idle, busy)


async def test_a_piece_without_its_tensor_stops_the_step_with_a_clear_error_at_once() -> None:
    # A malformed activation (a peer's bad input) used to leave the next stage waiting
    # PIECE_TIMEOUT_S (10 minutes) for a piece that had already come.
    import dataclasses

    from p2ptrain._errors import ProtocolError
    from p2ptrain.train.pipeline._layout import ACT

    nodes = await ring(2)
    try:
        members = list(nodes[0].view.members)
        by_id = {x.node_id: x for x in nodes}
        down = by_id[members[1]]
        real_take = down.take

        async def take(kind: str, *a: Any, **k: Any) -> Any:
            msg = await real_take(kind, *a, **k)
            return dataclasses.replace(msg, tensors=[]) if kind == ACT else msg

        down.take = take  # type: ignore[method-assign]
        trainers = {x.node_id: PipelineTrainer(x, resolve(SPEC), stages=even_split(len(resolve(SPEC).layers()), 2),
                                               global_batch=24, micro_batches=4, steps=20, seed=4, lr=1e-2)
                    for x in nodes}
        up_run = asyncio.ensure_future(trainers[members[0]].run())
        with pytest.raises(ProtocolError, match="carries 0 tensors, not 1"):
            await asyncio.wait_for(trainers[members[1]].run(), 30)
        up_run.cancel()
        await asyncio.gather(up_run, return_exceptions=True)
    finally:
        for x in nodes:
            await x.close()
