"""A running pipeline job checks its plan against its measured compute, and moves to a better one.

The pricing (p2ptrain.plan._measured) is checked by hand and against the planner's own
figures; the decision (PlanInputs.rebalance) on the failure that motivated it, a 0.5-core
device probed as fast as the 1.0-core one; the move itself on real loopback nodes, where
the job must still end with single-device training's parameters and losses.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from test_pipeline import SPEC, _assert_transparent, _train

from p2ptrain.plan import (
    CHECK_JOBS,
    CacheEntry,
    CostModel,
    Device,
    LayerCost,
    LocalProfile,
    ProfileCache,
    layout_step_s,
    measured_devices,
    own_ratios,
    plan_for_objective,
    predicted_compute,
)
from p2ptrain.ring import View
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._replan import PlanInputs
from p2ptrain.train.pipeline._measured import MEASURED_STEPS, MeasuredSteps
from p2ptrain.train.pipeline._trainer import PipelineTrainer, Stage, even_split, layout_from_plan

COSTS = [LayerCost(1e-3, 2e-3, 40_000, 4_000, 4_000) for _ in range(6)]  # 18 ms a sample at speed 1
MODEL = CostModel(op_overhead_s=1e-3, update_s_per_byte=1e-9, reduce_s_per_byte=1e-10, closing_hops=4.0)


def _dev(name: str, speed: float, fixed_s: float = 0.0) -> Device:
    return Device(node_id=name, speed=speed, memory_bytes=1 << 30, link_bytes_per_s=125e6, fixed_s=fixed_s, hop_s=1e-3)


def test_predicted_compute_is_the_cost_models_forward_and_backward_per_step() -> None:
    devices = [_dev("a", 2.0, fixed_s=0.006), _dev("b", 1.0, fixed_s=0.012)]
    got = predicted_compute(COSTS, devices, [(0, 1, (("a", 4),)), (2, 5, (("b", 4),))], micro=3)
    # a: 3 micro-batches of 4 samples on 2 of 6 layers (6 ms a sample), and 2/6 of its fixed 6 ms each.
    assert got["a"] == pytest.approx(3 * (4 * 0.006 / 2.0 + 0.006 * 2 / 6))
    assert got["b"] == pytest.approx(3 * (4 * 0.012 / 1.0 + 0.012 * 4 / 6))


def test_a_slow_member_is_scaled_by_what_it_measured_and_the_rest_by_the_median() -> None:
    devices = [_dev("a", 2.0, 0.004), _dev("b", 2.0, 0.004), _dev("c", 1.0, 0.008), _dev("d", 0.5, 0.01)]
    stages = [(0, 5, (("a", 4), ("b", 4)))]
    pred = predicted_compute(COSTS, devices, stages, micro=2)
    got = {d.node_id: d for d in measured_devices(COSTS, devices, stages, 2, {"a": pred["a"] * 1.1, "b": pred["b"] * 2.0})}
    assert got["a"].speed == pytest.approx(2.0 / 1.1) and got["a"].fixed_s == pytest.approx(0.004 * 1.1)
    assert got["b"].speed == pytest.approx(1.0) and got["b"].fixed_s == pytest.approx(0.008)
    # Left out of the layout: the median ratio of those measured (1.55).
    assert got["c"].speed == pytest.approx(1.0 / 1.55) and got["d"].speed == pytest.approx(0.5 / 1.55)
    # A stalled step cannot make a device look more than 4x off; nothing measured changes nothing.
    stalled = measured_devices(COSTS, devices, stages, 2, {"a": pred["a"] * 50, "b": pred["b"]})
    assert stalled[0].speed == pytest.approx(0.5)
    assert measured_devices(COSTS, devices, stages, 2, {}) == devices


def test_a_stage_of_a_few_layers_does_not_rescale_its_device_on_its_own() -> None:
    # b ran one layer of six: its ratio says as much about that layer's profile as about b.
    devices = [_dev("a", 2.0, 0.004), _dev("b", 1.0, 0.008), _dev("c", 1.0, 0.008)]
    stages = [(0, 0, (("b", 4),)), (1, 5, (("a", 4),))]
    pred = predicted_compute(COSTS, devices, stages, micro=2)
    got = {d.node_id: d for d in measured_devices(COSTS, devices, stages, 2, {"a": pred["a"] * 1.2, "b": pred["b"] * 0.3})}
    assert got["a"].speed == pytest.approx(2.0 / 1.2)
    assert got["b"].speed == pytest.approx(1.0 / 1.2) and got["c"].speed == pytest.approx(1.0 / 1.2)
    # No stage carries half the work: every device by the median of all measured.
    even = [(0, 1, (("a", 4),)), (2, 3, (("b", 4),)), (4, 5, (("c", 4),))]
    pred = predicted_compute(COSTS, devices, even, micro=2)
    got = {d.node_id: d for d in measured_devices(COSTS, devices, even, 2,
                                                  {"a": pred["a"] * 1.1, "b": pred["b"] * 3.0, "c": pred["c"] * 1.3})}
    assert [got[m].speed for m in "abc"] == pytest.approx([2.0 / 1.3, 1.0 / 1.3, 1.0 / 1.3])


@pytest.mark.parametrize("batch", [8, 32, 96])
def test_a_plans_own_layout_prices_at_the_planners_step(batch: int) -> None:
    devices = [_dev("a", 3.0, 0.002), _dev("b", 2.0, 0.003), _dev("c", 1.0, 0.006), _dev("d", 1.0, 0.006)]
    for shared in (0.0, 5.0):
        model = MODEL._replace(shared_speed=shared)
        plan = plan_for_objective(COSTS, devices, global_batch=batch, **model._asdict())
        stages = [(st.first_layer, st.last_layer, tuple(zip(st.node_ids, st.shares))) for st in plan.stages]
        got = layout_step_s(COSTS, devices, stages, micro=plan.micro_batches, global_batch=batch, schedule="1f1b",
                            model=model)
        assert got == pytest.approx(plan.step_s, rel=1e-12)


def _inputs(devices: list[Device], split: str = "planned") -> PlanInputs:
    spec = JobSpec(model="tinygpt", strategy="pipeline", global_batch=32, steps=20)
    return PlanInputs(list(COSTS), devices, MODEL, spec, split)


def test_a_group_that_measures_slower_than_probed_moves_to_the_better_plan() -> None:
    # The probes put the 0.5-core device (b) level with the 1.0-core one (a): the plan
    # splits the batch between them. Measured, b computes at half a's speed.
    devices = [_dev("a", 2.0, 0.003), _dev("b", 2.0, 0.003), _dev("c", 0.5, 0.012), _dev("d", 0.5, 0.012)]
    inputs = _inputs(devices)
    view = View(3, ("a", "b", "c", "d"))
    plan = inputs.plan(view)
    layout = layout_from_plan(plan)
    assert {m for st in layout for m, _ in st.members} >= {"a", "b"}
    pred = predicted_compute(COSTS, devices, [(s.first_layer, s.last_layer, s.members) for s in layout], plan.micro_batches)
    measured = {m: pred[m] * (2.0 if m == "b" else 1.0) for m in pred}
    before = layout_step_s(COSTS, measured_devices(COSTS, devices, [(s.first_layer, s.last_layer, s.members) for s in layout],
                                                   plan.micro_batches, measured),
                           [(s.first_layer, s.last_layer, s.members) for s in layout], micro=plan.micro_batches,
                           global_batch=32, schedule="1f1b", model=MODEL)
    new = inputs.rebalance(view, layout, plan.micro_batches, measured)
    assert new is not None and layout_from_plan(new) != layout
    assert new.step_s <= 0.9 * before
    # The job's figures stay as agreed: a recovery re-plans on the same figures on every member.
    assert inputs.devices == devices


def test_a_plan_that_runs_as_predicted_stays_and_baselines_never_move() -> None:
    devices = [_dev("a", 2.0, 0.003), _dev("b", 1.0, 0.006), _dev("c", 0.5, 0.012), _dev("d", 0.5, 0.012)]
    view = View(3, ("a", "b", "c", "d"))
    for split in ("planned", "even"):
        inputs = _inputs(list(devices), split)
        plan = inputs.plan(view)
        layout = layout_from_plan(plan)
        plain = [(s.first_layer, s.last_layer, s.members) for s in layout]
        pred = predicted_compute(COSTS, devices, plain, plan.micro_batches)
        assert inputs.rebalance(view, layout, plan.micro_batches, pred) is None
        # Even twice off everywhere: the split is still the one to keep (every device alike).
        assert inputs.rebalance(view, layout, plan.micro_batches, {m: 2 * v for m, v in pred.items()}) is None
        assert inputs.devices == devices


def _group_plan(speeds: tuple[float, ...] = (2.0, 1.6, 0.5, 0.5)) -> tuple[PlanInputs, View, Any, list[Stage], dict[str, float], float]:
    """A planned group of devices a-d at ``speeds`` whose compute ran as priced:
    (inputs, view, plan, layout, measured, its price)."""
    devices = [_dev(name, v, 0.006 / v) for name, v in zip("abcd", speeds)]
    inputs, view = _inputs(devices), View(3, ("a", "b", "c", "d"))
    plan = inputs.plan(view)
    layout = layout_from_plan(plan)
    assert len(_members(layout)) > 1  # the group pays here, as priced
    measured = predicted_compute(COSTS, devices, _plain(layout), plan.micro_batches)
    return inputs, view, plan, layout, measured, _priced(devices, layout, plan.micro_batches)


def _plain(layout: list[Stage]) -> list[Any]:
    return [(s.first_layer, s.last_layer, s.members) for s in layout]


def _members(layout: list[Stage]) -> set[str]:
    return {m for s in layout for m, _ in s.members}


def _priced(devices: list[Device], layout: list[Stage], micro: int, measured: dict[str, float] | None = None) -> float:
    """The layout's step priced on ``devices``, corrected by ``measured`` compute when given."""
    if measured is not None:
        devices = measured_devices(COSTS, devices, _plain(layout), micro, measured)
    return layout_step_s(COSTS, devices, _plain(layout), micro=micro, global_batch=32, schedule="1f1b", model=MODEL)


def test_a_group_whose_step_ran_slower_than_its_fastest_member_alone_moves_to_it() -> None:
    # Its compute ran as priced, so the corrections change nothing; its step (the gradient
    # sums, the transfers) took twice its price, more than the fast device alone would.
    inputs, view, plan, layout, measured, price = _group_plan()
    alone = inputs.best_alone(view)
    assert alone is not None and alone.members == ("a",) and price < alone.step_s < 2 * price * 0.9
    assert inputs.rebalance(view, layout, plan.micro_batches, measured) is None  # compute alone: keep
    new = inputs.rebalance(view, layout, plan.micro_batches, measured, 2 * price)
    assert new is not None and new.members == ("a",) and new.step_s == pytest.approx(alone.step_s)


def test_a_group_that_ran_near_its_price_or_faster_than_alone_stays() -> None:
    inputs, view, plan, layout, measured, price = _group_plan()
    alone = inputs.best_alone(view)
    assert alone is not None
    for ran_s in (0.5 * price, price, 1.05 * price, alone.step_s / 0.9 * 0.99):
        assert inputs.rebalance(view, layout, plan.micro_batches, measured, ran_s) is None, ran_s


def test_a_group_that_computed_slower_beside_each_other_moves_to_its_fastest_member_priced_alone() -> None:
    # Measured on hetero4 with the 15 M-parameter tinygpt: the 1.0- and 0.5-core devices as a
    # pair computed at 1.6 times their price (beside each other, in their places in the
    # pipeline) and the job ran at 0.76-0.84 of the 1.0-core device alone. Its step was what
    # that compute priced, so the check weighed nothing against one device; and priced with
    # the pair's ratio, that device alone looked slower still. The job kept the pair.
    inputs, view, plan, layout, measured, price = _group_plan((2.0, 0.6, 0.25, 0.25))
    assert _members(layout) == {"a", "b"}
    alone = inputs.best_alone(view)
    assert alone is not None and alone.members == ("a",)
    slow = {m: 1.6 * v for m, v in measured.items()}
    ran_s = _priced(inputs.devices, layout, plan.micro_batches, slow)  # nothing missed in the transfers
    assert alone.step_s <= 0.9 * ran_s < 1.6 * alone.step_s  # on its own figures it pays; with the pair's ratio it would not
    new = inputs.rebalance(view, layout, plan.micro_batches, slow, ran_s)
    assert new is not None and new.members == ("a",) and new.step_s == pytest.approx(alone.step_s)
    assert inputs.rebalance(view, layout, plan.micro_batches, measured, price) is None  # as priced: it stays


def test_a_mis_probed_member_is_never_the_device_a_group_moves_to_alone() -> None:
    # The 0.5-core device (b) probed a little faster than the 1.0-core one (a), and measured at
    # 2.2 times its price beside it. Priced alone on the probe, b would look the best device to
    # move to; its ratio is its own (a's is 1), so alone it is priced as it measured.
    inputs, view, plan, layout, measured, _ = _group_plan((2.0, 2.2, 0.5, 0.5))
    assert {"a", "b"} <= _members(layout)
    slow = {m: v * (2.2 if m == "b" else 1.0) for m, v in measured.items()}
    now = _priced(inputs.devices, layout, plan.micro_batches, slow)
    probed_alone = inputs.best_alone(view)
    assert probed_alone is not None and probed_alone.members == ("b",)  # what the probe alone would pick
    for ran_s in (now, 1.5 * now, 3.0 * now):
        new = inputs.rebalance(view, layout, plan.micro_batches, slow, ran_s)
        assert new is None or new.members != ("b",), ran_s
    new = inputs.rebalance(view, layout, plan.micro_batches, slow, 3.0 * now)
    assert new is not None and new.members == ("a",)  # three times its price: the true fastest, alone


def test_a_slow_group_moves_to_another_group_only_when_it_beats_alone_with_the_same_excess() -> None:
    # b measured at half its probed speed: the corrected model's best is another group.
    # The layout also ran slower than its corrected price; that group would pay the same
    # excess, the fast device alone would not.
    inputs, view, plan, layout, measured, _ = _group_plan()
    slow = {m: v * (2.0 if m == "b" else 1.0) for m, v in measured.items()}
    plain = [(s.first_layer, s.last_layer, s.members) for s in layout]
    corrected = PlanInputs(inputs.costs, measured_devices(COSTS, inputs.devices, plain, plan.micro_batches, slow), MODEL,
                           inputs.spec, "planned")
    now = layout_step_s(COSTS, corrected.devices, plain, micro=plan.micro_batches, global_batch=32, schedule="1f1b",
                        model=MODEL)
    best, alone = corrected.plan(view), corrected.best_alone(view)
    assert alone is not None and len(best.members) == 4
    assert best.step_s * 1.5 < alone.step_s < best.step_s * 2.0  # the excess decides
    new = inputs.rebalance(view, layout, plan.micro_batches, slow, 1.5 * now)
    assert new is not None and new.members == best.members
    new = inputs.rebalance(view, layout, plan.micro_batches, slow, 2.0 * now)
    assert new is not None and new.members == ("a",)


def test_the_ring_step_is_the_median_of_the_slowest_members_step() -> None:
    m = MeasuredSteps()
    assert not m.due(10, 40)
    for step, row in ((11, [0.2, 0.5, 0.0]), (12, [0.3, 0.4, 0.1]), (13, [9.0, 9.0, 9.0])):
        m.record(step, [0.1, 0.1, 0.0], row)
    assert m.ring_step_s() == pytest.approx((0.5 + 0.4) / 2)
    m.bind()
    assert not m.due(20, 40) and m.ring_step_s() == 0.0  # a new layout: nothing measured yet


def test_the_check_runs_once_at_one_step_on_the_layouts_measured_steps() -> None:
    m = MeasuredSteps()
    assert not m.due(0, 20)
    for step in range(0, 3):
        m.record(step, [float(step), 10.0 * step])
    assert [s for s in range(1, 8) if m.due(s, 20)] == [MEASURED_STEPS + 2]
    assert m.figures(["x", "y"]) == {"x": 1.5, "y": 15.0}  # steps 1 and 2: step 0 pays first calls
    assert m.figures(["x"]) == {}  # another view's members
    m.done = True
    assert not m.due(MEASURED_STEPS + 2, 20)
    m.bind(check=False)  # the layout the check moved to
    assert not any(m.due(s, 20) for s in range(4, 12))
    m.bind(check=True)  # a recovery's layout, on every member alike
    m.due(10, 15)  # it starts at step 10
    assert not m.due(14, 15)  # one step left: not worth moving the state for
    m.bind()
    m.due(10, 20)
    assert m.due(14, 20)


async def test_a_job_that_moves_to_a_new_layout_mid_job_stays_transparent() -> None:
    """Three loopback members move from an even 3-stage pipeline to a hybrid layout at the check."""
    seen: list[tuple[list[str], dict[str, float]]] = []
    n_layers = len(resolve(SPEC).layers())

    def rebalance(view: View, layout: list[Stage], micro: int, measured: dict[str, float], ran_s: float) -> tuple[list[Stage], int]:
        seen.append((list(view.members), dict(measured)))
        m = view.members
        return [Stage(0, 3, ((m[1], 6),)), Stage(4, n_layers - 1, ((m[2], 4), (m[0], 2)))], 4

    trainers = await _train(3, lambda members: even_split(n_layers, 3), rebalance=rebalance, replica_every=5)
    members = list(trainers[0].view.members)
    assert [t.moved_at for t in trainers] == [[MEASURED_STEPS + 2]] * 3
    assert len(seen) == 3 and all(s == seen[0] for s in seen)  # every member decided on the same figures
    assert set(seen[0][1]) == set(members) and all(v > 0 for v in seen[0][1].values())
    stage_of = {members[1]: 0, members[2]: 1, members[0]: 1}
    assert [t.stage_index for t in trainers] == [stage_of[t.node.node_id] for t in trainers]
    # The timeline holds the new layout's ops only: 4 forwards, 4 backwards and an update a step
    # (a bench's "measured" stage time once took the median over both layouts' ops).
    assert [len(t.timeline) for t in trainers] == [9 * (20 - MEASURED_STEPS - 2)] * 3
    _assert_transparent(trainers)


@pytest.mark.parametrize("victim", [0, 2])
async def test_a_member_lost_while_the_members_move_is_recovered_like_any_loss(victim: int) -> None:
    """The check's move and a kill at once: some members have moved, some not, one is gone.

    The survivors recover on the job's first figures, on every member alike, and end
    where a fault-free run ends (the recovery tests' check)."""
    from test_pipeline_recovery import N_LAYERS, _assert_like_fault_free, _even
    from test_pipeline_recovery import SPEC as RSPEC

    from _ring import fake_ring

    async with fake_ring(4) as (net, nodes):
        ids = list(nodes[0].view.members)
        nodes = sorted(nodes, key=lambda x: ids.index(x.node_id))
        tasks: list[asyncio.Future[Any]] = []
        calls: list[int] = []  # the view's size at each member's check

        def rebalance(view: View, layout: list[Stage], micro: int,
                      measured: dict[str, float], ran_s: float) -> tuple[list[Stage], int] | None:
            calls.append(len(view))
            if len(view) < 4:  # the recovered layout is checked again: keep it
                return None
            if len(calls) == 1:  # the first member at the check: the victim dies as the move starts
                net.kill(ids[victim])
                tasks[victim].cancel()
            m = view.members
            return [Stage(0, 3, ((m[1], 6),)), Stage(4, N_LAYERS - 1, ((m[2], 3), (m[0], 2), (m[3], 1)))], 4

        trainers = [PipelineTrainer(x, resolve(RSPEC), stages=even_split(N_LAYERS, 4), global_batch=24, micro_batches=4,
                                    steps=RSPEC.steps, seed=4, lr=1e-2, recover=True, replan=_even, replica_every=3,
                                    rebalance=rebalance) for x in nodes]
        tasks += [asyncio.ensure_future(t.run()) for t in trainers]
        survivors = [t for k, t in enumerate(trainers) if k != victim]
        results = await asyncio.wait_for(asyncio.gather(*(tasks[k] for k in range(4) if k != victim)), 60)
        await asyncio.gather(tasks[victim], return_exceptions=True)
    for t, r in zip(survivors, results):
        t.result = r  # type: ignore[attr-defined]
    assert calls[0] == 4 and calls.count(3) == 3  # every survivor checked its recovered layout too
    _assert_like_fault_free(survivors)
    assert len({len(t.layout) for t in survivors}) == 1


async def _moving_job(rebalance: Any, *, victim: int | None = None, replica_every: int = 3) -> list[PipelineTrainer]:
    """Four fake-ring members of the recovery tests' job, an even pipeline to start with; ``victim``
    leaves in order at the check's step (its handover is the only copy: no replicas)."""
    from test_pipeline_recovery import N_LAYERS, _even
    from test_pipeline_recovery import SPEC as RSPEC

    from _ring import fake_ring

    async with fake_ring(4) as (_, nodes):
        ids = list(nodes[0].view.members)
        nodes = sorted(nodes, key=lambda x: ids.index(x.node_id))
        trainers = [PipelineTrainer(x, resolve(RSPEC), stages=even_split(N_LAYERS, 4), global_batch=24, micro_batches=4,
                                    steps=RSPEC.steps, seed=4, lr=1e-2, recover=True, replan=_even,
                                    replica_every=replica_every, rebalance=rebalance) for x in nodes]
        if victim is not None:
            leaver = trainers[victim]
            leaver.on_applied = lambda step, _: leaver.leave() if step == MEASURED_STEPS + 1 else None
        tasks = [asyncio.ensure_future(t.run()) for t in trainers]
        if victim is not None:
            await asyncio.wait_for(asyncio.shield(tasks[victim]), 60)
            await nodes[victim].close()
        kept = [k for k in range(4) if k != victim]
        results = await asyncio.wait_for(asyncio.gather(*(tasks[k] for k in kept)), 60)
    for k, r in zip(kept, results):
        trainers[k].result = r  # type: ignore[attr-defined]
    return [trainers[k] for k in kept]


def _hybrid_on(view: View) -> tuple[list[Stage], int]:
    from test_pipeline_recovery import N_LAYERS

    m = view.members
    return [Stage(0, 3, ((m[1], 6),)), Stage(4, N_LAYERS - 1, ((m[2], 3), (m[0], 2), (m[3], 1)))], 4


async def test_a_move_keeps_the_pre_move_layers_until_its_first_step_is_reported() -> None:
    """A move can end on some members and fail on others: until every member is past it,
    each keeps the layers it held before it (and the copies it keeps for others)."""
    from test_pipeline_recovery import _assert_like_fault_free

    held: list[set[int]] = []
    trainers: list[PipelineTrainer] = []

    def rebalance(view: View, layout: list[Stage], micro: int, measured: dict[str, float], ran_s: float) -> tuple[list[Stage], int] | None:
        return _hybrid_on(view) if len(view) == 4 else None

    def moved(t: PipelineTrainer) -> Any:
        return lambda step: held.append(t.store.holdings().get(step, set()))

    import test_measured_replan as me
    orig = PipelineTrainer.__init__

    def init(self: PipelineTrainer, *a: Any, **kw: Any) -> None:
        orig(self, *a, **kw)
        self.on_moved = moved(self)
        trainers.append(self)

    PipelineTrainer.__init__ = init  # type: ignore[method-assign]
    try:
        survivors = await me._moving_job(rebalance)
    finally:
        PipelineTrainer.__init__ = orig  # type: ignore[method-assign]
    # At the move every member holds the layers it trained before it, beside the new ones.
    assert len(held) == 4 and set().union(*held) == set(range(len(survivors[0].layers)))
    for t in survivors:
        assert t.moved_at == [MEASURED_STEPS + 2] and t.live_until is None
        assert f"{t.node.node_id}#live" not in t.store._copies  # dropped once the first step was reported
        t.recoveries.append(None)  # type: ignore[arg-type]  # no fault: the reference check wants one
    _assert_like_fault_free(survivors)


async def test_a_member_leaving_in_order_at_the_check_hands_its_layers_over() -> None:
    """A member leaves in order at the check's step while the others start their move: the job
    goes on from its handover, nothing replayed (no replicas: the handover is the only copy).

    Here the handover lands before the others close their old keepers; the order where it
    lands after (the move keeps the old keeper open until it is done) is not forced."""
    from test_pipeline_recovery import _assert_like_fault_free

    def rebalance(view: View, layout: list[Stage], micro: int, measured: dict[str, float], ran_s: float) -> tuple[list[Stage], int] | None:
        return _hybrid_on(view) if len(view) == 4 else None

    survivors = await _moving_job(rebalance, victim=2, replica_every=0)
    _assert_like_fault_free(survivors)
    assert {t.recoveries[0].resume_step for t in survivors} == {MEASURED_STEPS + 2}


@pytest.mark.parametrize("split", ["planned", "even"])
def test_cached_figures_whose_error_moved_twice_are_dropped_after_the_first_jobs_errors_are_noted(tmp_path, split: str) -> None:
    devices = [_dev("a", 2.0, 0.003), _dev("b", 1.0, 0.006), _dev("c", 0.5, 0.012), _dev("d", 0.02, 0.3)]
    view = View(3, ("a", "b", "c", "d"))
    plan = _inputs(list(devices), split).plan(view)
    layout = layout_from_plan(plan)
    plain = [(s.first_layer, s.last_layer, s.members) for s in layout]
    pred = predicted_compute(COSTS, devices, plain, plan.micro_batches)
    # Only a member whose stage carries half the model's work or more is judged (its ratio is
    # its device's more than its layers'): the plan's data-parallel group, none of the even split's.
    carriers = set(own_ratios(COSTS, devices, plain, plan.micro_batches, pred)[0])
    assert carriers == ({"a", "b", "c"} if split == "planned" else set()), plain
    runs = iter(range(1000))
    Left = tuple[tuple[float, ...], str, float] | None

    def job(factor: float, checks: tuple[float, ...] = (), on: dict[str, str] | None = None, off: float = 0.0, *,
            ratio: dict[str, float] | None = None) -> dict[str, Left]:
        """One job whose trainers computed ``factor`` times the prediction (``ratio``: by member), on
        entries whose earlier jobs computed ``checks`` times on terms ``on``, the last ``off`` times
        when it was far off: each member's entry's (checks, checked_on, off) after it (None: dropped)."""
        after: dict[str, Left] = {}
        for d in devices:
            cache = ProfileCache(tmp_path / f"{next(runs)}")
            terms = (on or {}).get(d.node_id, "")
            cache.put("k", LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9, checks=checks, checked_on=terms, off=off))
            inputs = _inputs(list(devices), split)
            inputs.entry = CacheEntry(cache, "k", d.node_id, cache.stamp("k"), checks, terms, off)
            measured = {m: (pred[m] * (ratio or {}).get(m, factor) if m in pred else 0.0) for m in view.members}
            inputs.rebalance(view, layout, plan.micro_batches, measured)
            inputs.rebalance(view, layout, plan.micro_batches, {m: 10 * v for m, v in measured.items()})  # once a job
            e = cache.get("k")
            after[d.node_id] = None if e is None else (e.checks, e.checked_on, e.off)
        return after

    if not carriers:  # nothing says much about any device: every entry stays as it was
        for factor, checks in ((2.5, ()), (2.5 * 1.4, (2.5,) * CHECK_JOBS)):
            assert job(factor, checks) == dict.fromkeys(view.members, (checks, "", 0.0))
        return
    # The first jobs on fresh figures note each member's ratio with its terms, even a large
    # ratio (the model's own error for this model on this device): a carrier's own, the
    # carriers' median for the others (d, left out, too: a host's speed moves every member's figures).
    first = job(2.5)
    assert {m: v[0] for m, v in first.items() if v} == dict.fromkeys(view.members, (pytest.approx(2.5),))
    on = {m: v[1] for m, v in first.items() if v}
    assert on["a"] == "0-5" and on["d"] == "median 0-5"  # the layers priced, not how many ran them
    # Until CHECK_JOBS are in, every ratio joins them, however far off: the first one alone
    # (here 1.32 where the others say 1.03, as measured on a busy host) is no baseline.
    assert job(1.03, (1.32,), on) == {m: ((1.32, 1.03), on[m], 0.0) for m in view.members}
    assert job(1.03, (1.32, 1.03), on) == {m: ((1.32, 1.03, 1.03), on[m], 0.0) for m in view.members}
    base = (1.32, 1.03, 1.03)  # median 1.03
    # Later jobs on the same terms: within STALE_RATIO of the median the figures stand, unchanged.
    for factor in (1.03, 1.03 * 1.2, 1.03 / 1.2):
        assert job(factor, base, on) == {m: (base, on[m], 0.0) for m in view.members}, factor
    # Beyond it, either way, a first job is noted as off; a second on the same side drops
    # every entry (the host slowed or got faster); one on the other side or back in line does not.
    for factor in (1.03 * 1.4, 1.03 / 1.4):
        assert job(factor, base, on) == {m: (base, on[m], pytest.approx(factor)) for m in view.members}, factor
        assert job(factor, base, on, off=factor * 1.1) == dict.fromkeys(view.members, None), factor
    assert job(1.03 * 1.4, base, on, off=1.03 / 1.4) == {m: (base, on[m], pytest.approx(1.03 * 1.4)) for m in view.members}
    assert job(1.03, base, on, off=1.03 * 1.4) == {m: (base, on[m], 0.0) for m in view.members}
    # A ratio on other layers is not compared, nor does it join the checks.
    other = {m: "0-2" for m in view.members}
    assert job(1.03 * 1.4, base, other, off=1.03 * 1.4) == {m: (base, "0-2", pytest.approx(1.03 * 1.4)) for m in view.members}
    assert job(1.03, (1.32,), other) == {m: ((1.32,), "0-2", 0.0) for m in view.members}
    # One carrier off on its own, twice: its entry goes; the median keeps the others'.
    assert job(1.03, base, on, off=1.03 * 1.6, ratio={"a": 1.03 * 1.6}) == {
        m: None if m == "a" else (base, on[m], 0.0) for m in view.members}
    # A stall or a broken clock is neither noted nor compared.
    assert job(50.0) == dict.fromkeys(view.members, ((), "", 0.0))
    assert job(50.0, base, on, off=1.03 * 1.4) == {m: (base, on[m], pytest.approx(1.03 * 1.4)) for m in view.members}


def test_a_job_that_planned_on_corrected_figures_notes_its_ratio_on_the_stored_ones(tmp_path) -> None:
    # The job planned on a's figures times 0.5 (its first job computed at half their price);
    # it computed as it planned, so on the stored figures it computed at 0.5 again.
    inputs, view, plan, layout, measured, _ = _group_plan()
    notes = {}
    for member, stage_member in (("a", True), ("d", False)):
        cache = ProfileCache(tmp_path / member)
        cache.put("k", LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9, checks=(0.5,), checked_on="0-5"))
        inputs.entry = CacheEntry(cache, "k", member, cache.stamp("k"), (0.5,), "0-5", 0.0, 0.5)
        assert (member in {m for st in layout for m, _ in st.members}) == stage_member
        inputs.rebalance(view, layout, plan.micro_batches, measured)  # no loop runs: noted at once
        e = cache.get("k")
        assert e is not None
        notes[member] = e.checks
    # d ran nothing: the others' ratios, taken on their own corrections, say nothing of its figures.
    assert notes == {"a": (0.5, pytest.approx(0.5)), "d": (0.5,)}


def test_a_layout_with_a_newcomer_or_refreshed_figures_leaves_the_entry_alone(tmp_path) -> None:
    devices = [_dev("a", 2.0, 0.003), _dev("b", 1.0, 0.006)]
    view = View(3, ("a", "b"))
    inputs = _inputs(list(devices))
    layout = layout_from_plan(inputs.plan(view))
    micro = inputs.plan(view).micro_batches
    plain = [(s.first_layer, s.last_layer, s.members) for s in layout]
    pred = predicted_compute(COSTS, devices, plain, micro)
    cache = ProfileCache(tmp_path)
    cache.put("k", LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9))
    # A newcomer joined: its device is the leader's estimate, so no ratio of this layout is evidence.
    inputs.devices.append(_dev("n", 1.0))
    joined = View(4, ("a", "b", "n"))
    layout2 = layout_from_plan(inputs.plan(joined))
    inputs.entry = CacheEntry(cache, "k", "a", cache.stamp("k"))
    members = {m for st in layout2 for m, _ in st.members}
    assert "n" in members
    measured = {m: 1e3 for m in members}
    inputs.rebalance(joined, layout2, inputs.plan(joined).micro_batches, measured)
    assert cache.get("k").checked == 0.0 and inputs.entry is not None
    # The same key measured again meanwhile (another member of this device): the old job's
    # ratio is not noted on the new figures, nor are the new figures dropped.
    inputs = _inputs(list(devices))
    inputs.entry = CacheEntry(cache, "k", "a", cache.stamp("k") - 1.0)
    inputs.rebalance(view, layout, micro, {m: 2 * v for m, v in pred.items()})
    assert cache.get("k").checked == 0.0
    inputs.entry = CacheEntry(cache, "k", "a", cache.stamp("k") - 1.0, (1.0,) * CHECK_JOBS, "0-5", 5.0)
    inputs.rebalance(view, layout, micro, {m: 5 * v for m, v in pred.items()})
    assert cache.keys() == ["k"]


def test_two_members_sharing_an_entry_add_to_its_checks_rather_than_overwrite_them(tmp_path) -> None:
    # Two quarter-core members of one device share a cache key; both read the entry at the
    # job's start and both check it at its end. Decided on what each read, the second
    # note overwrote the first's ratio; decided on the entry as stored, both count.
    cache = ProfileCache(tmp_path)
    cache.put("k", LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9))
    stamp = cache.stamp("k")
    first, second = (CacheEntry(cache, "k", m, stamp) for m in ("c", "d"))
    assert first.check(1.0, "0-5") is not None and second.check(1.2, "0-5") is not None
    assert cache.get("k").checks == (1.0, 1.2)
    # Later, the same for a strike: one member's ratio far off, then the other's on the same side drops it.
    cache.put("k", replace(cache.get("k"), checks=(1.0, 1.2, 1.1)), refresh=False)
    assert first.check(2.0, "0-5")[0] == "note" and cache.get("k").off == 2.0
    assert second.check(2.1, "0-5")[0] == "forget" and cache.keys() == []
    assert first.check(1.0, "0-5") is None  # gone: nothing to note


def test_the_checked_ratios_round_trip_and_older_or_bad_entries_read_so(tmp_path) -> None:
    cache = ProfileCache(tmp_path)
    cache.put("k", LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9))
    assert cache.get("k").checked == 0.0 and cache.get("k").checked_on == "" and cache.get("k").checks == ()
    stamp = cache.stamp("k")
    assert cache.check("k", 1.3, "0-5", stamp=stamp)[0] == "note"
    assert (cache.get("k").checked, cache.get("k").checked_on) == (1.3, "0-5")
    for r in (1.0, 1.1, 1.6):
        cache.check("k", r, "0-5", stamp=stamp)
    assert (cache.get("k").checks, cache.get("k").checked, cache.get("k").off) == ((1.3, 1.0, 1.1), 1.1, 1.6)
    assert cache.stamp("k") == stamp  # its age is kept
    assert cache.check("gone", 1.3, "0-5", stamp=stamp) is None  # no entry: nothing
    assert cache.check("k", 1.7, "0-5", stamp=stamp + 1) is None  # other figures than the job's: kept
    assert cache.keys() == ["k"] and cache.check("k", 1.7, "0-5", stamp=stamp)[0] == "forget" and cache.keys() == []
    assert ProfileCache(tmp_path / "never").check("k", 1.0, "0-5", stamp=stamp) is None
    assert not (tmp_path / "never").exists()
    # An entry from before the check reads as unchecked; one from before the baseline of
    # several jobs has its one ratio as its one check; a bad ratio makes the entry unreadable.
    raw = LocalProfile(tuple(COSTS), 1e-3, 1e-4, 1e-9).to_json()
    del raw["checked"], raw["checked_on"], raw["checks"], raw["off"]
    assert LocalProfile.from_json(raw).checked == 0.0
    older = LocalProfile.from_json({**raw, "checked": 1.2, "checked_on": "0-5"})
    assert (older.checks, older.checked, older.off) == ((1.2,), 1.2, 0.0)
    for bad in (True, 1e308, -1.0, 0.01, "x", float("nan")):
        with pytest.raises((ValueError, TypeError)):
            LocalProfile.from_json({**raw, "checked": bad})
        with pytest.raises((ValueError, TypeError)):
            LocalProfile.from_json({**raw, "checks": [1.0, bad]})
        with pytest.raises((ValueError, TypeError)):
            LocalProfile.from_json({**raw, "checks": [1.0], "off": bad})
    for bad_checks in ([1.0] * (CHECK_JOBS + 1), [0.0], "1.0", {"a": 1.0}):
        with pytest.raises(ValueError):
            LocalProfile.from_json({**raw, "checks": bad_checks})
    with pytest.raises(ValueError):
        LocalProfile.from_json({**raw, "checked": 1.2, "checked_on": ["x"]})
