"""A host program's lifecycle around a job: cancelling it, closing the node under it.

Found by embedding the library as a robot program would: a cancelled ``submit()`` froze
every other member at its step, and a node closed under ``submit()`` or ``serve()`` left
both waiting forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2ptrain import JobError, MembershipError, PeerFailedError
from p2ptrain.train import JobService, JobSpec

from _ring import fake_ring
from _wait import until

_LONG = JobSpec(model="mlp", global_batch=24, steps=100_000, seed=1, digest_every=0)


async def _long_job(nodes: list[Any], *, once: bool) -> tuple[list[JobService], list[asyncio.Future[Any]], asyncio.Future[Any]]:
    """The first node submits a long job the others serve; returns once it has trained 5 steps."""
    services = [JobService(n) for n in nodes]
    serving = [asyncio.ensure_future(s.serve(once=once)) for s in services[1:]]
    reached = asyncio.Event()
    services[0].on_step = lambda m: reached.set() if m.step >= 5 else None
    submitted = asyncio.ensure_future(services[0].submit(_LONG))
    await asyncio.wait_for(reached.wait(), 60)
    return services, serving, submitted


async def test_cancelling_a_submit_stops_the_other_members() -> None:
    async with fake_ring(3) as (_net, nodes):
        services, serving, submitted = await _long_job(nodes, once=True)
        submitted.cancel()
        results = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
        assert all(isinstance(r, JobError) and "its host program cancelled the job there" in str(r) for r in results), results
        await until(lambda: not any(s.running for s in services), 10, "every member's training to end")


async def test_closing_the_node_ends_submit_and_serve() -> None:
    async with fake_ring(3) as (_net, nodes):
        services, serving, submitted = await _long_job(nodes, once=False)
        await nodes[0].close()
        with pytest.raises((MembershipError, PeerFailedError), match="closed"):
            await asyncio.wait_for(submitted, 30)
        await until(lambda: not services[0].running, 10, "the closed member's training to end")
        # A serve() on a closed node returns instead of waiting for offers forever: closed
        # while its part of the job is still stopping (the members stop the job once its
        # submitter is gone), and closed idle once it has stopped.
        await nodes[2].close()
        await until(lambda: not services[1].running, 30, "the job to stop on the member")
        await nodes[1].close()
        assert await asyncio.wait_for(asyncio.gather(*serving), 30) == [None, None]


def test_a_recovery_keeps_one_loss_per_step() -> None:
    # A member's node closed at step 100 of 400: the submitter's losses had 399 entries
    # (its step 100 failed, the survivors had applied it), so losses[i] was no longer the
    # loss of step first_step + i for the rest of the job.
    import math

    from p2ptrain.train._dataparallel import realign

    losses = [1.0, 2.0, 3.0]  # steps 10, 11, 12; step 13 failed here
    realign(losses, 10, 14)  # the survivors resume at 14: step 13 was applied without its loss here
    assert losses[:3] == [1.0, 2.0, 3.0] and len(losses) == 4 and math.isnan(losses[3])
    realign(losses, 10, 12)  # a rollback: steps 12 and 13 are done again, and count once
    assert losses == [1.0, 2.0]


async def test_a_member_closed_mid_job_leaves_the_submitters_losses_aligned() -> None:
    # Real sockets: in about half of the runs the closed member's departure fails a step that
    # the others complete (the fake network's timing never showed it).
    from p2ptrain.ring._node import Node

    from _ring import started_ring

    spec = JobSpec(model="mlp", global_batch=24, steps=150, seed=1, digest_every=0)
    nodes: list[Node] = await started_ring(4)
    try:
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        closing: list[asyncio.Task[None]] = []

        def on_step(m: object) -> None:
            if getattr(m, "step", 0) == 100 and not closing:
                closing.append(asyncio.ensure_future(nodes[1].close()))

        services[0].on_step = on_step
        result = await asyncio.wait_for(services[0].submit(spec), 120)
        await asyncio.gather(*closing, *serving, return_exceptions=True)
    finally:
        for n in nodes:
            await n.close()
    assert services[0].last_trainer.recoveries, "the test must exercise a recovery"
    assert result.steps == spec.steps and len(result.losses) == spec.steps - result.first_step
    assert sum(loss != loss for loss in result.losses) <= 1  # at most the step lost with the member, as NaN


async def test_leave_on_the_submitter_stops_the_job_everywhere() -> None:
    # It returned True and submit() returned 51 of 600 steps as a success, while the other
    # members waited at step 50 until the node closed.
    from p2ptrain import JobStopped

    async with fake_ring(3) as (_net, nodes):
        services, serving, submitted = await _long_job(nodes, once=True)
        assert await services[0].leave(timeout=30) is True
        with pytest.raises(JobStopped, match="submitter left"):
            await submitted
        results = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
        assert all(isinstance(r, JobError) and "submitter left" in str(r) for r in results), results


@pytest.mark.parametrize("strategy", ["data", "pipeline"])
async def test_a_member_that_leaves_its_job_and_keeps_its_node_does_not_hold_the_others_up(strategy: str) -> None:
    # A walkthrough: leave() on a member that kept its node open (a host that still shows the
    # ring) left the others training nothing for 80 s, until that node closed.
    spec = JobSpec(model="mlp", strategy=strategy, global_batch=24, steps=60, seed=1, digest_every=0,
                   micro_batches=0 if strategy == "pipeline" else 1)
    async with fake_ring(3) as (_net, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve()) for s in services[1:]]
        steps: list[int] = []
        services[0].on_step = lambda m: steps.append(m.step)
        submitted = asyncio.ensure_future(services[0].submit(spec))
        await until(lambda: len(steps) >= 5, 60, "the job to train 5 steps")
        assert await services[2].leave(timeout=30) is True
        result = await asyncio.wait_for(submitted, 60)  # waited until the test ended the node, before
        assert result.steps == 60 and nodes[2].node_id not in services[0].last_trainer.view
        assert not services[2].running and not nodes[2].closed
        # Back in the ring as a newcomer, and it declined the job it left rather than joining it again.
        await until(lambda: nodes[2].node_id in nodes[0].view, 30, "the member that left the job back in the ring")
        assert services[2].left_jobs == {services[0].last_trainer.job}
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)


async def test_a_member_runs_one_job_at_a_time() -> None:
    # A member serving offers accepted another member's job while its own submitted job
    # trained: two jobs interleaved their steps, and stop() stopped the wrong one. Then an
    # offer waited behind the running job, past its submitter's patience. A busy member
    # now refuses at once.
    spec_x = JobSpec(model="mlp", global_batch=24, steps=40, seed=1, digest_every=0)
    spec_y = JobSpec(model="mlp", global_batch=24, steps=10, seed=2, digest_every=0)
    async with fake_ring(2) as (_net, nodes):
        a, b = JobService(nodes[0]), JobService(nodes[1])
        steps: list[int] = []
        a.on_step = lambda m: steps.append(m.step)
        a_serving, b_serving = asyncio.ensure_future(a.serve()), asyncio.ensure_future(b.serve())
        reached = asyncio.Event()
        b.on_step = lambda m: reached.set() if m.step >= 3 else None
        x = asyncio.ensure_future(a.submit(spec_x))
        await asyncio.wait_for(reached.wait(), 60)
        assert a.busy_with == b.busy_with and a.busy_with is not None
        with pytest.raises(JobError, match=f"{nodes[1].node_id} is busy with job {a.busy_with}"):
            await asyncio.wait_for(b.submit(spec_y), 5)
        rx = await asyncio.wait_for(x, 120)
        await until(lambda: b.busy_with is None, 10, "b to finish its part of X")
        ry = await asyncio.wait_for(b.submit(spec_y), 60)  # free again once X is done
        for t in (a_serving, b_serving):
            t.cancel()
        await asyncio.gather(a_serving, b_serving, return_exceptions=True)
    assert rx.steps == 40 and ry.steps == 10
    assert steps == list(range(40)) + list(range(10)), steps  # X's steps, then Y's: never interleaved


async def test_two_jobs_submitted_together_are_both_refused_at_once() -> None:
    # Two `p2ptrain train` started together each waited 120 s for the other to answer its
    # offer (a submitter never read offers), then both failed.
    async with fake_ring(3) as (_net, nodes):
        services = [JobService(n) for n in nodes]
        serving = asyncio.ensure_future(services[2].serve())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.wait_for(asyncio.gather(services[0].submit(_LONG), services[1].submit(_LONG),
                                                        return_exceptions=True), 30)
        took = loop.time() - t0
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert all(isinstance(r, JobError) and "is busy with job" in str(r) for r in results), results
    assert took < 15, took
    assert all(s.busy_with is None for s in services)


async def test_a_newcomer_that_submits_during_a_job_is_refused_and_costs_the_job_nothing() -> None:
    # A second `train` started while a job ran: the job's members waited 32 s for it to
    # answer their invitation, and it waited out the whole first job before failing.
    from p2ptrain.ring._node import Node

    from _ring import FAST

    async with fake_ring(3) as (net, nodes):
        services, serving, submitted = await _long_job(nodes, once=True)
        loop = asyncio.get_running_loop()
        gaps, last = [], [loop.time()]

        def on_step(m: Any) -> None:
            now = loop.time()
            gaps.append(now - last[0])
            last[0] = now

        services[0].last_trainer.on_step = on_step  # the running trainer's hook (the service's was copied)
        newcomer = Node(cluster="c", node_id="n9", network=net, **FAST)
        await newcomer.start()
        try:
            late = JobService(newcomer)  # before it is in the ring: the job's invitation finds it
            newcomer.connect(nodes[0].address)
            await newcomer.wait_for_peers(3, timeout=15)
            with pytest.raises(JobError, match="is busy with job"):
                await asyncio.wait_for(late.submit(_LONG), 10)
            await newcomer.close()  # as `train` exits on its error
            n = len(gaps)
            await until(lambda: len(gaps) >= n + 20, 30, "the job to go on")
            assert max(gaps) < 10, max(gaps)  # no 30 s wait for the newcomer's answer
            services[0].stop("done")
            await asyncio.gather(submitted, *serving, return_exceptions=True)
        finally:
            await newcomer.close()


async def test_a_submit_timed_out_while_waiting_for_answers_logs_nothing() -> None:
    # asyncio.wait_for(submit(...), t) that expired while a member had not answered logged
    # "_GatheringFuture exception was never retrieved" when the job's answer-gathering future
    # was collected: a traceback in a host's log for a timeout it had handled.
    import gc

    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with fake_ring(3) as (_net, nodes):
            services = [JobService(n) for n in nodes[:2]]  # nodes[2] has no job service: it never answers
            serving = asyncio.ensure_future(services[1].serve(once=True))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(services[0].submit(_LONG), 2)
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not errors, [c.get("message") for c in errors]


async def test_a_job_stopping_as_its_node_closes_lets_serve_cancel_it() -> None:
    # serve() on a member whose node closed while its part of a job was still stopping did
    # not return: serve() cancels its loops once the node is closed, and the job's guard,
    # waiting for the training to clean up, swallowed that cancellation, raised
    # MembershipError instead, and the serving loop went back to waiting for offers forever.
    from p2ptrain.train._abort import guarded

    async def cleaning_up() -> None:  # a trainer whose cancellation waits for its compute thread
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise

    async with fake_ring(2) as (_net, nodes):
        training = asyncio.ensure_future(cleaning_up())
        guard = asyncio.ensure_future(guarded(nodes[0], "job-1", nodes[0].view, training))
        await asyncio.sleep(0.05)
        await nodes[0].close()
        await asyncio.sleep(0.1)  # the guard saw the close and waits for the training to end
        guard.cancel()
        await asyncio.wait([guard], timeout=5)
        assert guard.cancelled(), guard
        await asyncio.wait([training], timeout=5)  # and the training's clean-up goes on to its end
        assert training.cancelled()


async def test_a_crashed_submitter_stops_the_job_as_a_stop_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    # Its members first logged "recovered: view 3 -> 4 ... resuming at step 113", then
    # "ERROR ... member vm-6bb... failed: JobStopped: its submitter ... left the ring",
    # blaming a healthy member for a stop. A stop relayed by a member is a JobStopped too.
    import logging

    from p2ptrain import JobStopped

    caplog.set_level(logging.WARNING)
    async with fake_ring(3) as (net, nodes):
        services = [JobService(n, recover=True) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        reached = asyncio.Event()
        services[1].on_step = lambda m: reached.set() if m.step >= 5 else None
        submitted = asyncio.ensure_future(services[0].submit(_LONG))
        await asyncio.wait_for(reached.wait(), 60)
        net.kill("n0")
        results = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
        submitted.cancel()
        await asyncio.gather(submitted, return_exceptions=True)
    assert all(isinstance(r, JobStopped) and "its submitter n0 left the ring" in str(r) for r in results), results
    assert not any("recovered" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not any("failed" in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)


async def test_a_stop_relayed_by_a_member_is_a_stop() -> None:
    from p2ptrain import JobStopped

    async with fake_ring(3) as (_net, nodes):
        services, serving, submitted = await _long_job(nodes, once=True)
        assert services[1].stop("the robot needs its CPU back") is True
        results = await asyncio.wait_for(asyncio.gather(submitted, *serving, return_exceptions=True), 30)
    assert all(isinstance(r, JobStopped) and "the robot needs its CPU back" in str(r) for r in results), results


async def test_leave_while_the_training_is_cancelled_returns_false() -> None:
    # Ctrl-C on a join whose job was stuck: its training task was cancelled while leave()
    # waited for it, and the CancelledError came out of leave() as if it had been cancelled
    # itself (a traceback, exit code 1; found in a walkthrough).
    from types import SimpleNamespace

    async with fake_ring(1) as (_, nodes):
        service = JobService(nodes[0])
        service._training = asyncio.ensure_future(asyncio.sleep(60))
        service.last_trainer = SimpleNamespace(job="n7/x/1", leave=lambda: None)
        leaving = asyncio.ensure_future(service.leave(timeout=30))
        await asyncio.sleep(0.05)
        service._training.cancel()
        assert await asyncio.wait_for(leaving, 5) is False
