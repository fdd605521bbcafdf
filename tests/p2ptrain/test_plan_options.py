"""The planner's options (alone, leave members out, everyone), per-device hops and bucketed gradient sums."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from p2ptrain.plan import Device, LayerCost, choose_plan, plan_for_objective, plan_hybrid
from p2ptrain.plan._cost import GROUP_BUCKET_BYTES, StepModel, make_plan, step_s

GIB = 1 << 30


def layers(n: int, *, t: float = 1e-3, params: int = 1000, act: int = 100) -> list[LayerCost]:
    return [LayerCost(fwd_s=t, bwd_s=2 * t, param_bytes=params, act_bytes=act, saved_bytes=2 * act) for _ in range(n)]


def test_the_plan_names_its_options_and_is_never_predicted_slower_than_one_it_rejected() -> None:
    costs = layers(6)
    devs = [Device("a", 1.0, GIB, 1e9), Device("b", 0.5, GIB, 1e9), Device("c", 0.25, GIB, 1e9),
            Device("d", 0.25, GIB, 1e9)]
    plan = plan_for_objective(costs, devs, global_batch=32, op_overhead_s=1e-3)
    opts = dict(plan.options)
    assert set(opts) == {"alone", "all", "chosen"} and opts["chosen"] == plan.samples_per_s
    assert plan.samples_per_s >= max(opts.values()) * (1 - 1e-12)
    # The same plan as one exact search over every subset of the devices.
    assert plan.step_s == pytest.approx(plan_hybrid(costs, devs, global_batch=32, op_overhead_s=1e-3).step_s, rel=1e-12)


def test_the_fastest_device_alone_wins_when_the_others_cost_more_than_they_add() -> None:
    # Big gradients on a slow link: any group pays seconds to sum them; a pipeline pays the
    # slow devices' hops. The fast device alone is the plan, and says so.
    costs = layers(4, params=4 << 20, act=1 << 20)
    devs = [Device("fast", 1.0, GIB, 1e6), Device("slow1", 0.2, GIB, 1e6, hop_s=0.05),
            Device("slow2", 0.2, GIB, 1e6, hop_s=0.05)]
    plan = plan_for_objective(costs, devs, global_batch=8, op_overhead_s=1e-3)
    assert plan.members == ("fast",)
    assert dict(plan.options)["alone"] == plan.samples_per_s > dict(plan.options)["all"]


def test_members_left_out_are_chosen_deterministically_from_any_device_order() -> None:
    costs = layers(6)
    devs = [Device(f"n{i}", s, GIB, 1e8, hop_s=h) for i, (s, h) in enumerate([(1.0, 1e-3), (0.5, 2e-3),
                                                                             (0.25, 8e-3), (0.25, 8e-3)])]
    plans = [plan_for_objective(costs, order, global_batch=32, op_overhead_s=1e-3)
             for order in (devs, devs[::-1], devs[1:] + devs[:1])]
    assert len({p.step_s for p in plans}) == 1
    assert len({frozenset(p.members) for p in plans}) == 1


def test_each_device_pays_its_own_hop_and_a_group_its_slowest_per_bucket() -> None:
    params = 3 * GROUP_BUCKET_BYTES + 1  # four buckets
    costs = [LayerCost(1e-3, 2e-3, params, 100, 200)]
    devs = [Device("a", 1.0, GIB, 1e8, hop_s=1e-3), Device("b", 1.0, GIB, 1e8)]
    model = StepModel(costs, devs, 1, 4, "1f1b", 5e-3, 0.0, 2e-10)
    assert model.overhead == [1e-3, 5e-3] and model.min_overhead == 1e-3
    alone = model.stage(0, 0, (0,), (4,), 0)
    assert alone.compute == pytest.approx(4 * 3e-3 + 1e-3) and alone.sync == 0.0
    pair = model.stage(0, 0, (0, 1), (2, 2), 0)
    assert pair.compute == pytest.approx(2 * 3e-3 + 5e-3)
    assert pair.sync == pytest.approx(params / 1e8 + 2 * 4 * 5e-3 + 2e-10 * params / 2)
    # The step's loss sum over a ring of four: 2 (4 - 1) hops on each member, the slowest decides.
    # It costs the messages' CPU: the idle hop where measured.
    ring = StepModel(costs, devs, 1, 4, "1f1b", 5e-3, 0.0, 2e-10, closing_hops=6)
    assert ring.stage(0, 0, (0,), (4,), 0).sync == pytest.approx(6 * 1e-3)
    assert ring.stage(0, 0, (0, 1), (2, 2), 0).sync == pytest.approx(pair.sync + 6 * 5e-3)
    idle = [Device("a", 1.0, GIB, 1e8, hop_s=1e-3, idle_hop_s=4e-4), Device("b", 1.0, GIB, 1e8, idle_hop_s=2e-3)]
    ring = StepModel(costs, idle, 1, 4, "1f1b", 5e-3, 0.0, 2e-10, closing_hops=6)
    assert ring.stage(0, 0, (0,), (4,), 0).sync == pytest.approx(6 * 4e-4)
    assert ring.stage(0, 0, (0, 1), (2, 2), 0).sync == pytest.approx(pair.sync + 6 * 2e-3)


def test_plan_table_and_options_survive_choose_plan_without_power_figures() -> None:
    costs = layers(3)
    devs = [Device("a", 1.0, GIB, 1e9), Device("b", 1.0, GIB, 1e9)]
    plan = choose_plan(costs, devs, objective="time", global_batch=8)
    assert plan.joules == () and dict(plan.options)["chosen"] == plan.samples_per_s


def _brute(model: StepModel, use_all: bool) -> float:
    """The smallest step over every ordered grouping and cut, each stage priced by the model."""
    n, nd = len(model.costs), len(model.devices)
    best = math.inf
    for k in range(1, min(nd, n) + 1):
        for labels in itertools.product(range(-1, k), repeat=nd):
            if set(range(k)) - set(labels) or (use_all and -1 in labels):
                continue
            groups = [tuple(d for d in range(nd) if labels[d] == s) for s in range(k)]
            shares = [model.shares(g) for g in groups]
            if any(sh is None for sh in shares):
                continue
            for cuts in itertools.combinations(range(1, n), k - 1):
                edges = [0, *cuts, n]
                stages = [model.stage(edges[p], edges[p + 1] - 1, g, sh, k - p - 1)
                          for p, (g, sh) in enumerate(zip(groups, shares)) if sh is not None]
                if all(st.fits for st in stages):
                    best = min(best, step_s(model.micro, [(st.compute, st.transfer, st.sync) for st in stages]))
    return best


@pytest.mark.parametrize("seed", range(15))
def test_hybrid_search_stays_exact_with_per_device_hops_and_buckets(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    costs = [LayerCost(rng.uniform(0.1, 1.0), rng.uniform(0.1, 2.0), rng.randint(0, 3000), rng.randint(1, 40))
             for _ in range(n)]
    devs = [Device(f"d{i}", rng.choice([0.25, 0.5, 1.0]), rng.randint(2000, 40000), rng.choice([50.0, 500.0, math.inf]),
                   hop_s=rng.choice([0.0, 0.01, 0.2]), idle_hop_s=rng.choice([0.0, 0.005])) for i in range(3)]
    micro, mb = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
    kw = {"op_overhead_s": rng.choice([0.0, 0.05]), "reduce_s_per_byte": rng.choice([0.0, 1e-4])}
    for use_all in (False, True):
        model = StepModel(costs, devs, micro, mb, "1f1b", kw["op_overhead_s"], 0.0, kw["reduce_s_per_byte"], 1000,
                          closing_hops=rng.choice([0.0, 4.0]))
        want = _brute(model, use_all)
        if want == math.inf:
            continue
        from p2ptrain.plan._hybrid import search_hybrid

        found = search_hybrid([model], use_all, min(n, len(devs)))
        assert found is not None
        assert make_plan(model, found[1]).step_s == pytest.approx(want, rel=1e-9)


def test_the_planners_bucket_is_the_executors() -> None:
    from p2ptrain.train.pipeline._trainer import GROUP_BUCKET_BYTES as EXECUTOR

    assert GROUP_BUCKET_BYTES == EXECUTOR


def test_the_strategy_pricer_buckets_as_the_data_parallel_trainer() -> None:
    from p2ptrain.plan._study import BUCKET_BYTES
    from p2ptrain.train import JobSpec
    from p2ptrain.train._job import DEFAULT_BUCKET_BYTES

    assert JobSpec(model="tinygpt").bucket_bytes == BUCKET_BYTES == DEFAULT_BUCKET_BYTES


def test_devices_sharing_a_host_are_priced_at_what_they_get_together() -> None:
    from p2ptrain.plan._cost import on_shared_host

    devs = [Device("a", 1.0, GIB, 1e9, fixed_s=1e-3), Device("b", 0.5, GIB, 1e9), Device("c", 0.5, GIB, 1e9)]
    assert on_shared_host(devs, 0.0) == devs and on_shared_host(devs, 2.0) == devs
    slowed = on_shared_host(devs, 1.0)
    assert [d.speed for d in slowed] == [0.5, 0.25, 0.25] and slowed[0].fixed_s == pytest.approx(2e-3)
    # All three on a host that gives them one device's worth: the fast one alone is as fast
    # as all of them, and has no hops or gradient sums to pay.
    costs = layers(6)
    plan = plan_for_objective(costs, devs, global_batch=32, op_overhead_s=1e-3, shared_speed=1.0)
    assert plan.members == ("a",)
    assert plan_for_objective(costs, devs, global_batch=32, op_overhead_s=1e-3).members != ("a",)


def test_shared_speed_is_charged_only_past_the_probes_noise() -> None:
    from p2ptrain.plan._agree import SHARED_BELOW, _shared_speed

    assert _shared_speed([1.0, 0.5], [0.97, 0.95]) == 0.0
    assert _shared_speed([1.0, 0.5], [0.5, 0.9]) == pytest.approx(0.95) and 0.95 < SHARED_BELOW * 1.5


def test_the_closing_sum_charges_a_lone_or_paired_trainer_two_hops_and_a_larger_plan_four() -> None:
    from p2ptrain.plan._cost import closing_hops

    assert closing_hops(1) == 0.0 and closing_hops(2) == 2.0 and closing_hops(4) == 4.0
    assert closing_hops(4, 1) == closing_hops(4, 2) == 2.0 and closing_hops(4, 3) == 4.0
    costs = layers(6)
    idle = 2e-3
    devs = [Device(f"n{i}", s, GIB, 1e9, hop_s=h, idle_hop_s=idle)
            for i, (s, h) in enumerate([(1.0, 1e-3), (0.2, 0.05), (0.2, 0.05), (0.2, 0.05)])]
    kw = dict(global_batch=32, micro_batches=1, op_overhead_s=1e-3)
    alone = choose_plan(costs, devs[:1], **kw)  # no loss sum charged
    in_ring = plan_for_objective(costs, devs, closing_hops=closing_hops(4), **kw)
    assert in_ring.members == ("n0",)  # the others add less than they cost
    # The lone trainer sits at an end of the chain: two idle hops a step, not four.
    assert in_ring.step_s == pytest.approx(alone.step_s + 2 * idle, rel=1e-9)
