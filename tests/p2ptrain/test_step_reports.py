"""A pipeline trainer reports each step as soon as its loss sum is in, in step order.

Before, a step was reported only after the next step had computed, so a job's first
step (the end of its start) and every progress line came a whole step late: 3.5 s for
the 15 M-parameter model on hetero4.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from p2ptrain._errors import PeerFailedError
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train.pipeline._reports import StepReports
from p2ptrain.train.pipeline._trainer import PipelineTrainer, Stage

from _ring import started_ring


def _recorder() -> tuple[list[tuple[int, Any]], Any]:
    seen: list[tuple[int, Any]] = []

    async def report(step: int, dt: float, busy: float, closing: asyncio.Future[Any]) -> None:
        seen.append((step, await closing))

    return seen, report


async def test_a_step_is_reported_as_soon_as_its_sum_is_in() -> None:
    seen, report = _recorder()
    reports = StepReports(report)
    s0: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await reports.add(0, 0.1, 0.1, s0)
    s0.set_result("loss 0")
    await asyncio.sleep(0.01)
    assert seen == [(0, "loss 0")]  # no next step needed
    await reports.finish()


async def test_steps_are_reported_in_order_even_when_a_later_sum_comes_first() -> None:
    seen, report = _recorder()
    reports = StepReports(report)
    loop = asyncio.get_running_loop()
    s0, s1 = loop.create_future(), loop.create_future()
    await reports.add(0, 0.1, 0.1, s0)
    adding = asyncio.ensure_future(reports.add(1, 0.1, 0.1, s1))  # waits for step 0's report
    s1.set_result("loss 1")
    await asyncio.sleep(0.01)
    assert seen == [] and not adding.done()
    s0.set_result("loss 0")
    await adding
    await reports.finish()
    assert seen == [(0, "loss 0"), (1, "loss 1")]


async def test_a_lost_sum_fails_the_next_add_and_settle_drops_it() -> None:
    seen, report = _recorder()
    reports = StepReports(report)
    loop = asyncio.get_running_loop()
    s0, s1 = loop.create_future(), loop.create_future()
    await reports.add(0, 0.1, 0.1, s0)
    s0.set_exception(PeerFailedError("gone"))
    with pytest.raises(PeerFailedError):
        await reports.add(1, 0.1, 0.1, s1)
    s1.set_exception(PeerFailedError("gone too"))
    await reports.settle()  # step 1's sum was lost too: dropped, not raised
    assert seen == []


async def test_cancel_cancels_the_sums_in_flight() -> None:
    seen, report = _recorder()
    reports = StepReports(report)
    loop = asyncio.get_running_loop()
    s0, s1 = loop.create_future(), loop.create_future()
    await reports.add(0, 0.1, 0.1, s0)
    adding = asyncio.ensure_future(reports.add(1, 0.1, 0.1, s1))
    await asyncio.sleep(0.01)
    adding.cancel()
    await asyncio.gather(adding, return_exceptions=True)
    await reports.cancel()
    await asyncio.sleep(0.01)
    assert s1.cancelled() and seen == []


async def test_a_pipeline_reports_its_first_step_before_the_second_ends() -> None:
    spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=4, seed=4, lr=1e-2, micro_batches=4,
                   model_kwargs={"depth": 4})
    nodes = await started_ring(2)
    reported: dict[int, float] = {}
    second_done: list[float] = []
    try:
        n_layers = len(resolve(spec).layers())
        a, b = nodes[0].view.members
        layout = [Stage(0, 1, ((a, 6),)), Stage(2, n_layers - 1, ((b, 6),))]
        trainers = [PipelineTrainer(x, resolve(spec), stages=layout, global_batch=24, micro_batches=4, steps=4, seed=4,
                                    lr=1e-2) for x in nodes]
        first = next(t for t, x in zip(trainers, nodes) if x.node_id == a)
        first.on_step = lambda m: reported.setdefault(m.step, time.perf_counter())
        run_step = first.step

        async def slow_second(step: int) -> Any:
            if step == 1:
                await asyncio.sleep(1.0)  # a long second step: step 0's sum is in long before it ends
            closing = await run_step(step)
            if step == 1:
                second_done.append(time.perf_counter())
            return closing

        first.step = slow_second  # type: ignore[method-assign]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    assert sorted(reported) == [0, 1, 2, 3]
    assert reported[0] < second_done[0] - 0.5, (reported[0], second_done[0])
    assert all(len(r.losses) == 4 for r in results)


async def test_cancel_cancels_a_sum_whose_report_has_not_started() -> None:
    seen, report = _recorder()
    reports = StepReports(report)
    loop = asyncio.get_running_loop()
    s0, s1 = loop.create_future(), loop.create_future()
    await reports.add(0, 0.1, 0.1, s0)
    s0.set_result("loss 0")
    await asyncio.sleep(0.01)
    await reports.add(1, 0.1, 0.1, s1)  # returns at once: step 1's report task has not run yet
    await reports.cancel()
    assert s1.cancelled() and seen == [(0, "loss 0")]


async def test_the_wait_for_a_late_loss_sum_is_the_steps_closing_phase() -> None:
    # One trainer, one member left out whose part of step 1's sum comes half a second late:
    # the trainer's third step waits for that sum, and says so in its phases.
    spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=4, seed=4, lr=1e-2, micro_batches=1,
                   model_kwargs={"depth": 4})
    nodes = await started_ring(2)
    try:
        n_layers = len(resolve(spec).layers())
        a, b = nodes[0].view.members
        layout = [Stage(0, n_layers - 1, ((a, 24),))]
        trainers = [PipelineTrainer(x, resolve(spec), stages=layout, global_batch=24, micro_batches=1, steps=4, seed=4,
                                    lr=1e-2) for x in nodes]
        lone = next(t for t, x in zip(trainers, nodes) if x.node_id == a)
        idle = next(t for t, x in zip(trainers, nodes) if x.node_id == b)
        run_step = idle.step

        async def late_sum(step: int) -> Any:
            if step == 1:
                await asyncio.sleep(0.5)
            return await run_step(step)

        idle.step = late_sum  # type: ignore[method-assign]
        await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    waits = [p["closing"] for p in lone.phase_log]
    assert len(waits) == 4 and waits[2] > 0.3, waits
    assert lone.phase_s["closing"] == pytest.approx(sum(waits))
