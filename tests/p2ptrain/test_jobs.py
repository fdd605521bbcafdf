"""Leaderless jobs: offered by any member, accepted by all, refused with a reason the submitter sees."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2ptrain import JobError, JobService, JobSpec, JobStopped, Node

from _ring import cluster_name, fake_ring, loopback_node, started_ring
from _wait import until


@contextlib.asynccontextmanager
async def ring_of(n: int) -> AsyncIterator[list[Node]]:
    """``n`` started loopback members that agree on a view, closed on exit."""
    nodes = await started_ring(n)
    try:
        yield nodes
    finally:
        for x in nodes:
            await x.close()


async def test_a_job_offered_by_one_member_trains_on_all() -> None:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(3)]
    for n in nodes:
        await n.start()
    try:
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        serving = [asyncio.ensure_future(JobService(n).serve(once=True)) for n in nodes[1:]]
        spec = JobSpec(model="mlp", global_batch=24, steps=5, seed=2, digest_every=0)
        mine = await asyncio.wait_for(JobService(nodes[0]).submit(spec), 60)
        theirs = await asyncio.wait_for(asyncio.gather(*serving), 30)
        assert {r.digest for r in [mine, *theirs]} == {mine.digest}
        assert mine.steps == 5 and mine.losses == theirs[0].losses
    finally:
        for n in nodes:
            await n.close()


async def test_a_batch_smaller_than_the_ring_is_refused_by_every_member() -> None:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(3)]
    for n in nodes:
        await n.start()
    try:
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        serving = [asyncio.ensure_future(JobService(n).serve(once=True)) for n in nodes[1:]]
        with pytest.raises(JobError, match="global_batch 2 is smaller than the 3 members"):
            await asyncio.wait_for(JobService(nodes[0]).submit(JobSpec(model="mlp", global_batch=2, steps=2)), 30)
        for s in serving:
            with pytest.raises(JobError):
                await asyncio.wait_for(s, 10)
    finally:
        for n in nodes:
            await n.close()


@pytest.mark.slow
async def test_a_member_that_cannot_import_the_entry_point_refuses_and_the_submitter_sees_why(tmp_path, monkeypatch) -> None:
    mod = tmp_path / "p2pt_user_job.py"
    mod.write_text(textwrap.dedent("""
        import p2ptrain
        from p2ptrain.zoo import mlp

        @p2ptrain.workload_entry
        def make(seed=0):
            return mlp(seed)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not in the child process
    cl = cluster_name()
    me = loopback_node(cl)
    await me.start()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2ptrain", "join", "--cluster", cl, "--interface", "127.0.0.1", "--ephemeral",
        "--json", "--duration", "60", "--allow-entry", "p2pt_user_job",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
        cwd=str(tmp_path.parent),
    )
    try:
        await me.wait_for_peers(1, timeout=30)
        with pytest.raises(JobError, match=r"refused .*cannot import job entry point 'p2pt_user_job:make'.*ModuleNotFoundError"):
            await asyncio.wait_for(JobService(me).submit(JobSpec(model="p2pt_user_job:make", global_batch=8, steps=2)), 60)
    finally:
        child.kill()
        await child.wait()
        await me.close()


def test_a_module_the_node_does_not_allow_is_never_imported() -> None:
    import sys

    from p2ptrain import resolve

    spec = JobSpec(model="antigravity:fly", global_batch=8, steps=1)
    with pytest.raises(JobError, match="does not allow; start the node with --allow-entry antigravity"):
        resolve(spec, allowed_modules=())
    assert "antigravity" not in sys.modules


async def test_a_pipeline_job_is_planned_alike_everywhere_and_trains() -> None:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(3)]
    for n in nodes:
        await n.start()
    plans: list = []
    try:
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        services = [JobService(n, on_plan=plans.append) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, micro_batches=4, steps=6, seed=1,
                       model_kwargs={"depth": 3})
        mine = await asyncio.wait_for(services[0].submit(spec), 60)
        theirs = await asyncio.wait_for(asyncio.gather(*serving), 30)
    finally:
        for n in nodes:
            await n.close()
    assert len(plans) == 3 and plans[0] == plans[1] == plans[2]
    # The planner may group members into a stage or leave a slow one out; never invents one.
    assert set(plans[0].members) <= {n.node_id for n in nodes} and plans[0].members
    for st in plans[0].stages:
        assert sum(st.shares) == plans[0].micro_batch_size and len(st.shares) == len(st.node_ids)
    layers = [i for s in plans[0].stages for i in range(s.first_layer, s.last_layer + 1)]
    assert layers == list(range(len(layers)))
    assert mine.losses == theirs[0].losses == theirs[1].losses and len(mine.losses) == 6
    assert mine.losses[-1] < mine.losses[0]


async def test_a_member_failing_without_leaving_stops_every_member() -> None:
    # Member 2's host callback breaks at step 2: its node stays in the ring, so only the
    # job.abort message can tell the others; they must stop at once, naming it.
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(3)]
    for n in nodes:
        await n.start()

    def broken(m: Any) -> None:
        if m.step == 2:
            raise RuntimeError("host callback broke")

    try:
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        services = [JobService(n, on_step=broken if i == 2 else None) for i, n in enumerate(nodes)]
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, micro_batches=4, steps=500, seed=1,
                       model_kwargs={"depth": 3})
        runs = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        runs.insert(0, asyncio.ensure_future(services[0].submit(spec)))
        results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 60)
    finally:
        for n in nodes:
            await n.close()
    assert isinstance(results[2], RuntimeError)
    for r in results[:2]:
        assert isinstance(r, JobError) and f"member {nodes[2].node_id} failed: RuntimeError: host callback broke" in str(r)


async def test_a_member_still_warming_up_answers_a_job_once_warm(monkeypatch) -> None:
    # `p2ptrain join` warms up while the ring forms; a job offered meanwhile must not have
    # the members' speed probes run beside that warm-up (it read the demo's devices 8x slow).
    import time as _time

    import p2ptrain.train._jobs as jobs_mod

    done: list[float] = []

    def slow_warm() -> None:
        _time.sleep(2.0)
        done.append(_time.monotonic())

    import p2ptrain.plan._probe as probe_mod

    monkeypatch.setattr(jobs_mod, "warm_process", slow_warm)
    monkeypatch.setattr(probe_mod, "SPEED_PROBE_S", 0.05)  # an agreement well inside the warm-up
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(2)]
    for n in nodes:
        await n.start()
    planned: list[float] = []
    try:
        await asyncio.gather(*(n.wait_for_peers(1, timeout=15) for n in nodes))
        services = [JobService(n, on_plan=lambda p: planned.append(_time.monotonic())) for n in nodes]
        warming = asyncio.ensure_future(services[1].warm_up())
        serving = asyncio.ensure_future(services[1].serve(once=True))
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=8, micro_batches=2, steps=2, seed=1)
        await asyncio.wait_for(services[0].submit(spec), 60)
        await asyncio.wait_for(serving, 30)
        await warming
        await services[1].warm_up()  # once warm, again is free
    finally:
        for n in nodes:
            await n.close()
    assert len(done) == 1 and planned and min(planned) > done[0]


async def test_a_serving_member_whose_job_breaks_logs_it_and_serves_the_next(caplog: pytest.LogCaptureFixture) -> None:
    # `p2ptrain join` serves forever: an error that is not ours to expect (the host's
    # hook, the workload, a bug) must end that job only, never the service.
    broke: list[int] = []

    def broken_once(m: Any) -> None:
        if m.step == 2 and not broke:
            broke.append(1)
            raise RuntimeError("host callback broke")

    async with ring_of(2) as nodes:
        submitter, server = JobService(nodes[0]), JobService(nodes[1], on_step=broken_once)
        serving = asyncio.ensure_future(server.serve())
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, micro_batches=4, steps=6, seed=1,
                       model_kwargs={"depth": 3})
        with pytest.raises(JobError, match="host callback broke"):
            await asyncio.wait_for(submitter.submit(spec), 60)
        res = await asyncio.wait_for(submitter.submit(spec), 60)
        assert res.steps == 6 and not serving.done()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert "failed" in caplog.text and "RuntimeError: host callback broke" in caplog.text


@pytest.mark.parametrize("strategy", ["data", "pipeline"])
async def test_the_submitter_stops_a_job_and_every_member_stops_with_it(strategy: str) -> None:
    # Ctrl-C on `p2ptrain train`: the others must not go on training for nobody.
    async with ring_of(3) as nodes:
        steps: list[int] = []
        submitter = JobService(nodes[0], on_step=lambda m: steps.append(m.step))
        serving = [asyncio.ensure_future(JobService(n).serve(once=True)) for n in nodes[1:]]
        spec = JobSpec(model="mlp", strategy=strategy, global_batch=24, micro_batches=4 if strategy == "pipeline" else 0,
                       steps=100_000, seed=1, model_kwargs={"depth": 3})
        job = asyncio.ensure_future(submitter.submit(spec))
        await until(lambda: len(steps) >= 3, 60, "the first steps")
        assert submitter.stop("stopped by its submitter")
        with pytest.raises(JobStopped, match=r"stopped by its submitter at step \d+") as stopped:
            await asyncio.wait_for(job, 30)
        assert 3 <= stopped.value.step < 100_000
        for s in serving:
            with pytest.raises(JobStopped, match=f"stopped on member {nodes[0].node_id}: stopped by its submitter at step"):
                await asyncio.wait_for(s, 30)
        assert not submitter.stop("again")  # no job runs any more


async def test_a_stop_while_the_plan_is_made_stops_the_job_at_its_first_step() -> None:
    # The trainer did not exist yet: the stop went to the last job's trainer, or nowhere.
    async with ring_of(2) as nodes:
        submitter = JobService(nodes[0])
        serving = asyncio.ensure_future(JobService(nodes[1]).serve(once=True))
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=100_000, seed=1, model_kwargs={"depth": 3})
        job = asyncio.ensure_future(submitter.submit(spec))
        await until(lambda: submitter.running, 30, "the job accepted")
        assert submitter.last_trainer is None  # still planning: no trainer yet
        assert submitter.stop("stopped by its submitter")
        with pytest.raises(JobStopped) as stopped:
            await asyncio.wait_for(job, 60)
        assert stopped.value.step == 0
        with pytest.raises(JobError, match="stopped by its submitter"):
            await asyncio.wait_for(serving, 30)


async def test_the_members_stop_when_the_submitter_crashes() -> None:
    # Only the submitter receives the trained model: after a kill -9 of `p2ptrain train`,
    # the members went on training for nobody (found by a new-user walkthrough).
    async with fake_ring(4) as (net, nodes):
        steps: list[int] = []
        submitter = JobService(nodes[0], on_step=lambda m: steps.append(m.step))
        serving = [asyncio.ensure_future(JobService(n).serve(once=True)) for n in nodes[1:]]
        spec = JobSpec(model="mlp", global_batch=24, steps=100_000, seed=1, model_kwargs={"depth": 2})
        job = asyncio.ensure_future(submitter.submit(spec))
        await until(lambda: len(steps) >= 3, 60, "the first steps")
        net.kill(nodes[0].node_id)  # like kill -9: no goodbye, no abort
        job.cancel()
        for s in serving:
            with pytest.raises(JobError, match=f"its submitter {nodes[0].node_id} left the ring"):
                await asyncio.wait_for(s, 30)
        await asyncio.gather(job, return_exceptions=True)


async def test_a_member_lost_while_the_job_starts_costs_a_second_offer_not_the_job(caplog: pytest.LogCaptureFixture) -> None:
    # A join frozen (SIGSTOP) while the members answered an offer: the job failed on every
    # member ("view changed from epoch 3 to 4"), and the submitter's `train` printed
    # "unknown peer 'vm-…'; call add_peer('vm-…', address) first" (found in a walkthrough).
    # Here n3 never answers the offer (its service does not serve) and then dies.
    async with fake_ring(4) as (net, nodes):
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:3]]
        spec = JobSpec(model="mlp", global_batch=24, steps=5, seed=2, digest_every=0)
        job = asyncio.ensure_future(services[0].submit(spec))
        await until(lambda: services[1].busy_with is not None and services[2].busy_with is not None, 30, "the offer")
        await asyncio.sleep(0.5)  # the others now wait for n3's answer
        net.kill(nodes[3].node_id)
        result = await asyncio.wait_for(job, 60)
        done = await asyncio.wait_for(asyncio.gather(*serving), 60)
    assert result.steps == spec.steps and all(r.steps == spec.steps for r in done)
    assert set(services[0].last_trainer.view.members) == {"n0", "n1", "n2"}
    assert "offering it again" in caplog.text and "unknown peer" not in caplog.text


async def test_a_second_offer_from_the_same_submitter_waits_behind_the_first(caplog: pytest.LogCaptureFixture) -> None:
    # A submitter offers again once a view change interrupted the first start; a member that
    # has not noticed yet must not refuse it as "busy with" the job its submitter gave up.
    from p2ptrain.train._serve import ACK, OFFER

    async with fake_ring(3) as (net, nodes):
        member = JobService(nodes[1])
        serving = asyncio.ensure_future(member.serve())
        spec = JobSpec(model="mlp", global_batch=24, steps=3, seed=2, digest_every=0)
        job = asyncio.ensure_future(JobService(nodes[0]).submit(spec))  # n2 never answers: the start hangs
        try:
            await until(lambda: member.busy_with is not None, 30, "the first offer")
            epoch, second = nodes[0].view.epoch, f"n0/{spec.digest()}/beef01"
            await nodes[0].endpoint.send("n1", OFFER, epoch=epoch, meta={"id": second, "job": spec.to_wire()})
            with pytest.raises(asyncio.TimeoutError):  # no refusal at once: it waits behind the first
                await asyncio.wait_for(nodes[0].take(ACK, [second, "n1"], epoch=epoch), 1.5)
            net.kill(nodes[2].node_id)
            assert (await asyncio.wait_for(job, 60)).steps == spec.steps
            # and it was taken up once the first ended (refused then: its view is gone), not dropped
            await until(lambda: any(second in r.getMessage() and "offered in view" in r.getMessage()
                                    for r in caplog.records), 30, "the queued offer answered")
        finally:
            serving.cancel()
            job.cancel()
            await asyncio.gather(serving, job, return_exceptions=True)


async def test_an_offer_that_waited_behind_a_serve_once_job_is_there_for_the_next_serve() -> None:
    # bench pipeline's members serve(once=True) twice: its second job's offer arrived while a
    # member the plan had left out was still closing the first, waited behind it, and was
    # dropped when serve() returned; the submitter waited 120 s for an answer that never came
    # (3 runs of 3 on hetero4).
    from p2ptrain.train._serve import ACK, OFFER

    async with fake_ring(2) as (_, nodes):
        member = JobService(nodes[1])
        serving = asyncio.ensure_future(member.serve(once=True))
        spec = JobSpec(model="mlp", global_batch=24, steps=3, seed=2, digest_every=0)
        job = asyncio.ensure_future(JobService(nodes[0]).submit(spec))
        second = f"n0/{spec.digest()}/beef02"
        try:
            await until(lambda: member.busy_with is not None, 30, "the first offer")
            epoch = nodes[0].view.epoch
            await nodes[0].endpoint.send("n1", OFFER, epoch=epoch, meta={"id": second, "job": spec.to_wire()})
            assert (await asyncio.wait_for(job, 60)).steps == spec.steps
            assert (await asyncio.wait_for(serving, 60)).steps == spec.steps
            serving = asyncio.ensure_future(member.serve(once=True))
            answer = await asyncio.wait_for(nodes[0].take(ACK, [second, "n1"], epoch=epoch), 30)
            assert answer.meta["ok"] is True  # the waiting offer, answered by the next serve()
        finally:
            serving.cancel()
            job.cancel()
            await asyncio.gather(serving, job, return_exceptions=True)


async def test_serve_once_gives_up_when_no_second_offer_follows_an_interrupted_start(monkeypatch) -> None:
    # serve(once=True) goes on after an interrupted start, for the submitter's next offer;
    # one that does not retry (recover=False here; or it paused) must not leave it waiting forever.
    from p2ptrain.train import _serve
    from p2ptrain.train._serve import StartInterrupted

    monkeypatch.setattr(_serve, "REOFFER_WAIT", 1.0)
    async with fake_ring(4) as (net, nodes):
        services = [JobService(n, recover=i != 0) for i, n in enumerate(nodes)]
        once = asyncio.ensure_future(services[1].serve(once=True))
        forever = asyncio.ensure_future(services[2].serve())  # as `join` serves
        job = asyncio.ensure_future(services[0].submit(JobSpec(model="mlp", global_batch=24, steps=5, digest_every=0)))
        await until(lambda: all(s.busy_with is not None for s in services[1:3]), 30, "the offer")
        net.kill(nodes[3].node_id)
        with pytest.raises(StartInterrupted):
            await asyncio.wait_for(job, 30)
        with pytest.raises(StartInterrupted):
            await asyncio.wait_for(once, 15)
        await asyncio.sleep(2.5)  # past REOFFER_WAIT: serving forever goes on
        assert not forever.done()
        forever.cancel()
        await asyncio.gather(forever, return_exceptions=True)


async def test_every_job_service_of_a_node_shares_its_one_job_at_a_time() -> None:
    # A walkthrough: a host that submitted through a second JobService of a node whose first one
    # served trained two jobs at once on both members (each instance kept its own busy flag).
    a, b = await started_ring(2)
    try:
        a_serve, a_submit, b_serve = JobService(a), JobService(a), JobService(b)
        serving = [asyncio.ensure_future(s.serve()) for s in (a_serve, b_serve)]
        steps: list[int] = []
        a_submit.on_step = lambda m: steps.append(m.step)
        job1 = asyncio.ensure_future(a_submit.submit(JobSpec(model="mlp", global_batch=12, steps=100000)))
        await until(lambda: len(steps) >= 3, 60, "job 1 training")
        assert a_serve.busy_with == a_submit.busy_with is not None  # one node, one job
        with pytest.raises(JobError, match=rf"{b.node_id} is busy with job {b_serve.busy_with}"):
            await asyncio.wait_for(JobService(b).submit(JobSpec(model="mlp", global_batch=12, steps=3)), 30)
        a_submit.stop("done")
        with pytest.raises(JobStopped):
            await asyncio.wait_for(job1, 30)
        for t in serving:
            t.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
    finally:
        for n in (a, b):
            await n.close()


@pytest.mark.parametrize("strategy", ["data", "pipeline"])
async def test_a_host_that_cancels_its_job_stops_the_others_as_a_stop_does(strategy: str, caplog: pytest.LogCaptureFixture) -> None:
    # A walkthrough: cancelling submit() (what Ctrl-C does to a library host's task) reached the
    # other members as "member ... failed: CancelledError", logged at ERROR on each of them.
    nodes = await started_ring(2)
    try:
        services = [JobService(x) for x in nodes]
        serving = asyncio.ensure_future(services[1].serve(once=True))
        steps: list[int] = []
        services[0].on_step = lambda m: steps.append(m.step)
        spec = JobSpec(model="mlp", strategy=strategy, global_batch=12, steps=100000,
                       micro_batches=0 if strategy == "pipeline" else 1)
        job = asyncio.ensure_future(services[0].submit(spec))
        await until(lambda: len(steps) >= 3, 60, "training")
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        # It names the member whose host cancelled ("the job was cancelled on this member" read, on
        # the others, as if it were the reader).
        with pytest.raises(JobStopped, match=f"stopped on member {nodes[0].node_id}: its host program cancelled the job "
                                             "there") as stopped:
            await asyncio.wait_for(serving, 30)
        assert stopped.value.step >= 3
    finally:
        for n in nodes:
            await n.close()
    import gc

    gc.collect()  # a pipeline's step sum left failing behind the cancel printed "Task exception was never retrieved"
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_closed_or_unstarted_node_says_so_instead_of_running_a_job() -> None:
    # A walkthrough: start() after close() did nothing (the node kept its old view and address),
    # submit() on it offered the job to the stale view for ~20 s; on a node never started it
    # trained alone and reported success.
    from p2ptrain import MembershipError, P2PTrainError

    spec = JobSpec(model="mlp", global_batch=12, steps=2)
    fresh = loopback_node(cluster_name())
    with pytest.raises(MembershipError, match=rf"node {fresh.node_id} is not started; use `async with Node"):
        await JobService(fresh).submit(spec)
    a, b = await started_ring(2)
    await b.close()
    await a.close()
    with pytest.raises(P2PTrainError, match=rf"node {a.node_id} is closed; create a new Node to join again"):
        await a.start()
    with pytest.raises(MembershipError, match=rf"node {a.node_id} is closed; a job needs a running node"):
        await asyncio.wait_for(JobService(a).submit(spec), 5)
