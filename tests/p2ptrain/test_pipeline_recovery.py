"""Pipeline and hybrid jobs go on after a member is lost, and end where a fault-free run ends.

Every stage's state is copied to another member every ``replica_every`` steps (and a
data-parallel group's members hold it anyway). After a kill the survivors re-plan,
put the state of every layer together at the latest step they hold in common, and
replay from there with the same samples; their final parameters must equal those of
one process training the same job with no fault (rtol 1e-4).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from p2ptrain._errors import JobError
from p2ptrain.ring import View
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._single import train_single
from p2ptrain.train._state import pack_units_tensor
from p2ptrain.train._store import StateStore
from p2ptrain.train.pipeline import _keeper
from p2ptrain.train.pipeline._keeper import StageKeeper
from p2ptrain.train.pipeline._trainer import PipelineTrainer, Stage, even_split

from _ring import fake_ring

SPEC = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=16, seed=4, lr=1e-2, micro_batches=4,
               model_kwargs={"depth": 4})
N_LAYERS = len(resolve(SPEC).layers())


def _even(view: View) -> tuple[list[tuple[int, int]], int]:
    return even_split(N_LAYERS, len(view)), 4


async def _run(members: int, layout: Callable[[list[str]], Sequence[Any]], victim: int, fault_at: int,
               replica_every: int = 3, fault: str = "kill", marks: dict[str, float] | None = None) -> list[PipelineTrainer]:
    async with fake_ring(members) as (net, nodes):
        ids = list(nodes[0].view.members)
        order = {m: k for k, m in enumerate(ids)}
        nodes = sorted(nodes, key=lambda x: order[x.node_id])
        trainers = [PipelineTrainer(x, resolve(SPEC), stages=layout(ids), global_batch=24, micro_batches=4, steps=SPEC.steps,
                                    seed=4, lr=1e-2, recover=True, replan=_even, replica_every=replica_every)
                    for x in nodes]
        hit = asyncio.Event()
        watcher = next(t for k, t in enumerate(trainers) if k != victim)
        watcher.on_step = lambda m: hit.set() if watcher.next_step >= fault_at else None
        tasks = [asyncio.ensure_future(t.run()) for t in trainers]
        await asyncio.wait_for(hit.wait(), 30)
        if fault == "kill":
            net.kill(nodes[victim].node_id)
            tasks[victim].cancel()
        elif fault == "handover":  # Ctrl-C of `p2ptrain join`: stop at a step boundary, hand over, leave
            trainers[victim].leave()
            await asyncio.wait_for(asyncio.shield(tasks[victim]), 30)
            if marks is not None:
                marks["leaving"] = time.monotonic()
            await nodes[victim].close()
        else:
            tasks[victim].cancel()
            await nodes[victim].close()
        survivors = [t for k, t in enumerate(trainers) if k != victim]
        results = await asyncio.wait_for(asyncio.gather(*(tasks[k] for k in range(members) if k != victim)), 60)
        await asyncio.gather(tasks[victim], return_exceptions=True)
        for t, r in zip(survivors, results):
            t.result = r  # type: ignore[attr-defined]
        return survivors


def _assert_like_fault_free(survivors: list[PipelineTrainer]) -> None:
    ref, ref_losses = train_single(SPEC)
    ref_layers = list(ref)
    covered: set[int] = set()
    for t in survivors:
        assert t.recoveries, "the fault went unnoticed"
        assert t.result.steps == SPEC.steps  # type: ignore[attr-defined]
        for u in t.units:
            covered.add(u)
            for (name, got), (_, want) in zip(t.layers[u].named_parameters(), ref_layers[u].named_parameters()):
                torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6, msg=f"layer {u} {name}")
    assert covered == set(range(N_LAYERS))
    losses = torch.tensor(survivors[0].result.losses)  # type: ignore[attr-defined]
    known = ~torch.isnan(losses)
    torch.testing.assert_close(losses[known], torch.tensor(ref_losses)[known], rtol=1e-4, atol=1e-6)


def _plain(ids: list[str]) -> list[tuple[int, int]]:
    return even_split(N_LAYERS, len(ids))


@pytest.mark.parametrize(("victim", "fault_at"), [(1, 4), (3, 7), (0, 2)])
async def test_a_plain_pipeline_survives_a_killed_stage(victim: int, fault_at: int) -> None:
    survivors = await _run(4, _plain, victim, fault_at)
    _assert_like_fault_free(survivors)
    rec = survivors[0].recoveries[0]
    assert fault_at - 3 <= rec.resume_step <= fault_at + 2  # at most replica_every steps replayed
    assert len(survivors[0].layout) == 3


def _hybrid(ids: list[str]) -> list[Stage]:
    a, b, c, d = ids
    return [Stage(0, 1, ((a, 3), (b, 3))), Stage(2, 3, ((c, 6),)), Stage(4, N_LAYERS - 1, ((d, 6),))]


async def test_a_hybrid_job_survives_losing_a_group_member() -> None:
    survivors = await _run(4, _hybrid, victim=1, fault_at=5)
    _assert_like_fault_free(survivors)


async def test_a_hybrid_job_survives_losing_a_lone_stage_and_an_orderly_leave() -> None:
    _assert_like_fault_free(await _run(4, _hybrid, victim=2, fault_at=6))
    _assert_like_fault_free(await _run(4, _hybrid, victim=3, fault_at=3, fault="leave"))


async def test_without_replicas_a_lost_lone_stage_stops_the_job_with_a_clear_error() -> None:
    async with fake_ring(3) as (net, nodes):
        ids = list(nodes[0].view.members)
        order = {m: k for k, m in enumerate(ids)}
        nodes = sorted(nodes, key=lambda x: order[x.node_id])
        trainers = [PipelineTrainer(x, resolve(SPEC), stages=_plain(ids), global_batch=24, micro_batches=4, steps=40,
                                    seed=4, lr=1e-2, recover=True, replan=_even, replica_every=0) for x in nodes]
        started = asyncio.Event()
        trainers[0].on_step = lambda m: started.set() if m.step >= 2 else None
        tasks = [asyncio.ensure_future(t.run()) for t in trainers]
        await asyncio.wait_for(started.wait(), 30)
        net.kill(nodes[1].node_id)
        tasks[1].cancel()
        for k in (0, 2):
            with pytest.raises(JobError, match="no survivor holds a copy"):
                await asyncio.wait_for(tasks[k], 30)
        await asyncio.gather(tasks[1], return_exceptions=True)


async def test_a_member_that_leaves_in_order_hands_its_state_over_and_nothing_is_replayed() -> None:
    # No replicas at all: only the handover can save the leaver's layers.
    survivors = await _run(4, _plain, victim=2, fault_at=5, replica_every=0, fault="handover")
    _assert_like_fault_free(survivors)
    rec = survivors[0].recoveries[0]
    assert rec.resume_step >= 5
    assert all(t.recoveries[0].resume_step == rec.resume_step for t in survivors)


async def test_the_others_recover_from_an_orderly_leave_at_once_not_after_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    # A walkthrough: Ctrl-C on a stage's `join` stalled the ring 2.2 s (the failure
    # timeout: the old view's drain), where a kill -9 cost 0.7 s. A stage that waited on
    # a live member, itself waiting on the leaver, sat the drain out.
    started: list[float] = []
    real = PipelineTrainer._recover

    async def timed(self: PipelineTrainer, cause: Any) -> None:
        started.append(time.monotonic())
        await real(self, cause)

    monkeypatch.setattr(PipelineTrainer, "_recover", timed)
    marks: dict[str, float] = {}
    survivors = await _run(4, _plain, victim=1, fault_at=5, replica_every=0, fault="handover", marks=marks)
    _assert_like_fault_free(survivors)
    assert len(started) == 3, started
    from _ring import FAST

    late = [round(t - marks["leaving"], 3) for t in started]
    assert max(late) < FAST["failure_timeout"] / 2, f"recoveries began {late} s after the leave"


@pytest.mark.parametrize("victim", [2, 1])
async def test_an_orderly_leave_beside_a_member_left_out_of_the_plan_is_recovered_from_at_once(
        monkeypatch: pytest.MonkeyPatch, victim: int) -> None:
    # The same on `p2ptrain join` processes: a member the plan leaves out finishes each
    # step at once and waits in its loss sum along the ring, behind live members that
    # wait on the leaver; it sat the drain out (2.2 s a ring change, against 0.15 s now).
    started: list[float] = []
    real = PipelineTrainer._recover

    async def timed(self: PipelineTrainer, cause: Any) -> None:
        started.append(time.monotonic())
        await real(self, cause)

    monkeypatch.setattr(PipelineTrainer, "_recover", timed)

    def three_of_four(ids: list[str]) -> list[Stage]:  # ids[2] left out: the closing sum's path is 0, 2, 1, 3
        cuts = even_split(N_LAYERS, 3)
        return [Stage(a, b, ((m, 6),)) for (a, b), m in zip(cuts, (ids[0], ids[1], ids[3]))]

    marks: dict[str, float] = {}
    survivors = await _run(4, three_of_four, victim=victim, fault_at=5, replica_every=0, fault="handover", marks=marks)
    _assert_like_fault_free(survivors)
    from _ring import FAST

    late = [round(t - marks["leaving"], 3) for t in started]
    assert late and max(late) < FAST["failure_timeout"] / 2, f"recoveries began {late} s after the leave"


def _keeper_of_two(nodes: Sequence[Any], every: int) -> tuple[Any, Any, StageKeeper]:
    """(sender, holder, the holder's keeper): one layer each, so each keeps the other's copies."""
    sender, holder = sorted(nodes, key=lambda x: x.view.rank(x.node_id))
    layout = [Stage(0, 0, ((sender.node_id, 1),)), Stage(1, 1, ((holder.node_id, 1),))]
    keeper = StageKeeper(holder, holder.view, layout, job="j", store=StateStore(), capture=dict, every=every,
                         checkpoints=None, checkpoint_every=0, steps=4)
    return sender, holder, keeper


async def test_a_replica_that_fails_to_read_is_logged_and_the_next_one_is_kept(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = _keeper.unpack_units_tensor
    calls = []

    def flaky(wire: Any, what: str) -> Any:  # an unexpected error, not a refused blob
        calls.append(what)
        if len(calls) == 1:
            raise RuntimeError("planted")
        return real(wire, what)

    monkeypatch.setattr(_keeper, "unpack_units_tensor", flaky)
    async with fake_ring(2) as (_, nodes):
        sender, holder, keeper = _keeper_of_two(nodes, every=2)
        view = holder.view
        assert keeper.senders == [sender.node_id]
        keeper.start(2)
        units = {0: {"p/w": torch.arange(6.0)}}
        for step in (2, 4):
            await sender.endpoint.send(holder.node_id, _keeper.REPLICA, epoch=view.epoch,
                                       tag=["j", view.digest, sender.node_id, step],
                                       tensors=[pack_units_tensor(units, step)])
        await asyncio.wait_for(asyncio.gather(*keeper._receivers[:1]), 10)
        await keeper.close(wait=True)
    assert len(calls) == 2 and keeper.received == 1
    assert keeper.store.holdings() == {4: {0}}
    assert "reading the replica from" in caplog.text and "planted" in caplog.text


async def test_a_handover_that_cannot_be_read_is_logged_and_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_ring(2) as (_, nodes):
        sender, holder, keeper = _keeper_of_two(nodes, every=0)
        view = holder.view
        keeper.start(0)
        junk = torch.frombuffer(bytearray(b"\xff" * 64), dtype=torch.uint8)  # not a state blob
        await sender.endpoint.send(holder.node_id, _keeper.HANDOVER, epoch=view.epoch,
                                   tag=["j", view.digest, sender.node_id], tensors=[junk])
        await asyncio.wait_for(asyncio.gather(*keeper._receivers), 10)
        await keeper.close(wait=True)
    assert keeper.store.holdings() == {}
    assert f"handover from {sender.node_id}" in caplog.text and "dropped" in caplog.text


async def test_closing_a_keeper_for_recovery_still_logs_a_checkpoint_that_had_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    async with fake_ring(2) as (_, nodes):
        _, _, keeper = _keeper_of_two(nodes, every=0)
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(OSError(28, "No space left on device"))
        keeper._writing = failed  # a write that failed before the view changed
        await keeper.close(wait=False)
        await keeper.close(wait=False)  # the trainer's run closes again on its way out
    assert "checkpoint write failed: OSError" in caplog.text and "No space left" in caplog.text
    assert caplog.text.count("checkpoint write failed") == 1
