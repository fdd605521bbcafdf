"""The planner: balanced, memory-aware, deterministic, and optimal by brute force (pipeline and hybrid)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain.plan._cost import split_shares
from p2ptrain.plan._planner import (
    bound_samples_per_s,
    plan_hybrid,
    plan_pipeline,
    single_device_samples_per_s,
    uniform_plan,
)
from p2ptrain.plan._profile import LayerCost
from p2ptrain.plan._types import Device, Plan

GIB = 2**30


def layers(n: int, *, t: float = 1e-3, params: int = 1000, act: int = 100) -> list[LayerCost]:
    return [LayerCost(fwd_s=t, bwd_s=2 * t, param_bytes=params, act_bytes=act, saved_bytes=2 * act) for _ in range(n)]


def devices(*speeds: float, memory: int = GIB, link: float = 1e9) -> list[Device]:
    return [Device(f"n{i}", s, memory, link) for i, s in enumerate(speeds)]


def sizes(plan: Plan) -> list[int]:
    return [len(st.layers) for st in plan.stages]


def test_homogeneous_splits_evenly() -> None:
    for use_all in (True, False):
        plan = plan_pipeline(layers(8), devices(1, 1, 1, 1), global_batch=32, micro_batches=8, use_all=use_all)
        assert sizes(plan) == [2, 2, 2, 2]
        assert [st.node_ids for st in plan.stages] == [("n0",), ("n1",), ("n2",), ("n3",)]
        assert all(st.shares == (4,) and st.sync_s == 0.0 for st in plan.stages)
        assert plan.members == ("n0", "n1", "n2", "n3")
        assert [st.first_layer for st in plan.stages] == [0, 2, 4, 6]
        assert plan.global_batch == 32 and plan.micro_batch_size == 4
        assert plan == uniform_plan(layers(8), devices(1, 1, 1, 1), global_batch=32, micro_batches=8)
    # 7 layers on 3 devices: the spare layer goes late (1F1B's early stages hold more).
    assert sizes(plan_pipeline(layers(7), devices(1, 1, 1), global_batch=8, micro_batches=4, use_all=True)) == [2, 2, 3]


def test_heterogeneous_speeds_favour_the_fast_device_and_beat_uniform() -> None:
    costs, devs = layers(8), devices(1.0, 0.5, 0.25, 0.25)
    plan = plan_pipeline(costs, devs, global_batch=32)
    assert sizes(plan) == [4, 2, 1, 1]  # time = layers / speed, equal on every stage
    assert len({round(st.compute_s, 9) for st in plan.stages}) == 1
    uniform = uniform_plan(costs, devs, global_batch=32, micro_batches=plan.micro_batches)
    assert plan.step_s < 0.6 * uniform.step_s
    assert plan.samples_per_s == pytest.approx(32 / plan.step_s)
    single = single_device_samples_per_s(costs, devs)
    bound = bound_samples_per_s(costs, devs)
    assert single == pytest.approx(1.0 / (8 * 3e-3))
    assert bound == pytest.approx(2.0 / (8 * 3e-3))
    assert single < plan.samples_per_s < bound


def test_step_model_is_the_documented_one() -> None:
    costs, devs = layers(4), devices(1, 1, link=1e6)
    plan = plan_pipeline(costs, devs, global_batch=8, micro_batches=4, use_all=True, op_overhead_s=0.0)
    c = 2 * 2 * 3e-3  # 2 samples x 2 layers x (fwd + bwd) per micro-batch
    x = 2 * 100 / 1e6  # one boundary: the activation out (and the gradient back) on each side
    assert [st.compute_s for st in plan.stages] == pytest.approx([c, c])
    assert [st.transfer_s for st in plan.stages] == pytest.approx([x, x])
    assert plan.step_s == pytest.approx(2 * (c + x) + 3 * max(c, x))
    # 1F1B: stage 0 of 2 holds 2 micro-batches; memory = 4 x params + in-flight x batch x bytes.
    assert plan.stages[0].memory_bytes == 4 * 2000 + 2 * 2 * (0 + 2 * 200 + 100)
    assert plan.stages[1].memory_bytes == 4 * 2000 + 1 * 2 * (100 + 2 * 200 + 100)
    gpipe = plan_pipeline(costs, devs, global_batch=8, micro_batches=4, use_all=True, schedule="gpipe")
    assert gpipe.stages[1].memory_bytes == 4 * 2000 + 4 * 2 * (100 + 2 * 200 + 100)


def test_slow_link_keeps_the_model_on_fewer_devices() -> None:
    costs = layers(4, act=10**6)  # 1 MB activations at 1 MB/s: a second per boundary
    plan = plan_pipeline(costs, devices(1, 1, link=1e6), global_batch=4)
    assert plan.members == ("n0",)
    with_both = plan_pipeline(costs, devices(1, 1, link=1e6), global_batch=4, use_all=True)
    assert len(with_both.stages) == 2 and with_both.step_s > plan.step_s


def test_memory_limits_force_a_different_split() -> None:
    costs = layers(8, params=GIB // 16)  # 4 x 64 MiB = 256 MiB of training state per layer
    free = plan_pipeline(costs, devices(1.0, 0.5, memory=4 * GIB), global_batch=4, micro_batches=2, use_all=True)
    assert sizes(free) == [5, 3]  # 5/1.0 vs 3/0.5: bottleneck 6 beats 4 vs 4/0.5 = 8
    tight = [Device("n0", 1.0, GIB, 1e9), Device("n1", 0.5, 4 * GIB, 1e9)]  # n0 fits 3 layers
    plan = plan_pipeline(costs, tight, global_batch=4, micro_batches=2, use_all=True)
    assert sizes(plan) == [3, 5]
    assert all(st.memory_bytes <= d.memory_bytes for st, d in zip(plan.stages, tight))


def test_nothing_fits_says_why() -> None:
    costs = layers(8, params=GIB // 16)  # 2 GiB of training state
    with pytest.raises(PlanError, match=r"the model needs 2 GiB .* but the 3 devices hold 1.5 GiB together"):
        plan_pipeline(costs, devices(1, 1, 1, memory=GIB // 2), global_batch=4)
    big = layers(2, params=GIB // 2)  # each layer alone needs 2 GiB
    with pytest.raises(PlanError, match=r"layer 0 alone needs 2 GiB but the largest device \(n0\) holds 1 GiB"):
        plan_pipeline(big, devices(1, 1, 1, 1, 1), global_batch=4)
    with pytest.raises(PlanError, match="use_all=True needs one layer per device.*2 layers.*3 devices"):
        plan_pipeline(layers(2), devices(1, 1, 1), global_batch=4, use_all=True)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="does not divide global_batch=32"):
        plan_pipeline(layers(2), devices(1), global_batch=32, micro_batches=5)
    with pytest.raises(ConfigError, match="unique"):
        plan_pipeline(layers(2), [Device("a", 1, GIB, 1e9)] * 2, global_batch=2)
    with pytest.raises(ConfigError, match="speed"):
        Device("a", 0.0, GIB, 1e9)
    with pytest.raises(ConfigError, match="link_bytes_per_s"):
        Device("a", 1.0, GIB, 0.0)
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        plan_pipeline(layers(2), devices(1), global_batch=2, schedule="zb")
    with pytest.raises(ConfigError, match="at least one layer"):
        plan_pipeline([], devices(1), global_batch=2)
    with pytest.raises(ConfigError, match="sum to 0"):
        plan_pipeline([LayerCost(0.0, 0.0, 1, 1)], devices(1), global_batch=2)
    with pytest.raises(ConfigError, match="up to 8 devices, got 9"):
        plan_pipeline(layers(9), devices(*[1] * 9), global_batch=2, order_fixed=False)


def test_deterministic_and_order_independent_value() -> None:
    rng = random.Random(7)
    costs = [LayerCost(rng.uniform(1e-4, 1e-3), rng.uniform(1e-4, 2e-3), 10**6, 4096, 8192) for _ in range(9)]
    devs = [Device(f"n{i}", s, GIB, 1e8) for i, s in enumerate([1.0, 0.3, 0.7, 0.5])]
    first = plan_pipeline(costs, devs, global_batch=24)
    assert plan_pipeline(list(costs), list(devs), global_batch=24) == first
    assert first.table() == plan_pipeline(costs, devs, global_batch=24).table()
    free = plan_pipeline(costs, devs, global_batch=24, order_fixed=False)
    assert free.step_s <= first.step_s + 1e-12
    for perm in itertools.permutations(devs):
        assert plan_pipeline(costs, list(perm), global_batch=24, order_fixed=False).step_s == pytest.approx(free.step_s)
    # use_all=inf links: default micro-batch choice is one of the divisors tried.
    assert 24 % first.micro_batches == 0 and first.micro_batches <= 16


def test_table_shows_devices_layers_time_and_memory() -> None:
    plan = plan_pipeline(layers(8), devices(1.0, 0.5, 0.25, 0.25), global_batch=32)
    text = plan.table()
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "devices", "layers", "compute", "ms", "transfer", "ms", "tail", "ms", "memory"]
    assert lines[1].split()[:3] == ["0", "n0", "0-3"]
    assert lines[4].split()[:3] == ["3", "n3", "7"]
    assert "KiB" in lines[1]
    assert f"{plan.step_s * 1e3:.1f} ms/step" in lines[-1]
    assert plan.stage_of("n2") == 2 and plan.stage_of("nope") is None


# ---------------------------------------------------------------------------------
# Brute force: the documented objective, computed the slow way with its own cost model


def _ref_stage(costs, dev, i, j, pos, n_stages, micro, mb, overhead):
    n = len(costs)
    inb = costs[i - 1].act_bytes if i else 0
    outb = costs[j].act_bytes
    wire = inb + (outb if j < n - 1 else 0)
    c = mb * sum(costs[k].fwd_s + costs[k].bwd_s for k in range(i, j + 1)) / dev.speed + overhead
    x = mb * wire / dev.link_bytes_per_s
    saved = sum(costs[k].saved_bytes or costs[k].act_bytes for k in range(i, j + 1))
    mem = 4 * sum(costs[k].param_bytes for k in range(i, j + 1)) + min(n_stages - pos, micro) * mb * (
        inb + saved + outb
    )
    return c, x, mem


def _brute_step(costs, devs, micro, mb, overhead, use_all, order_fixed):
    n = len(costs)
    best_step = math.inf
    for s in [len(devs)] if use_all else range(1, min(len(devs), n) + 1):
        seqs = itertools.combinations(devs, s) if order_fixed else itertools.permutations(devs, s)
        lex_best = None
        for seq in seqs:
            for cuts in itertools.combinations(range(1, n), s - 1):
                bounds = [0, *cuts, n]
                stages = [
                    _ref_stage(costs, d, bounds[p], bounds[p + 1] - 1, p, s, micro, mb, overhead)
                    for p, d in enumerate(seq)
                ]
                if any(m > d.memory_bytes for (_, _, m), d in zip(stages, seq)):
                    continue
                key = (max(max(c, x) for c, x, _ in stages), sum(c + x for c, x, _ in stages))
                if lex_best is None or key < lex_best:
                    lex_best = key
        if lex_best is not None:
            best_step = min(best_step, lex_best[1] + (micro - 1) * lex_best[0])
    return best_step


def _random_costs(rng: random.Random, n: int) -> list[LayerCost]:
    """``n`` layers of random cost, some with autograd-saved bytes unmeasured (0)."""
    return [
        LayerCost(rng.uniform(0.1, 1.0), rng.uniform(0.1, 2.0), rng.randint(0, 50), rng.randint(1, 40),
                  rng.choice([0, rng.randint(1, 80)]))
        for _ in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
def test_dp_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    costs = _random_costs(rng, n)
    devs = [
        Device(f"d{i}", rng.choice([0.25, 0.5, 1.0, 2.0]), rng.randint(200, 1500), rng.choice([20.0, 100.0, math.inf]))
        for i in range(rng.randint(1, 3))
    ]
    micro = rng.choice([1, 2, 4])
    overhead = rng.choice([0.0, 0.05])
    for use_all, order_fixed in itertools.product((False, True), (True, False)):
        want = _brute_step(costs, devs, micro, 2, overhead, use_all, order_fixed)
        try:
            plan = plan_pipeline(
                costs, devs, global_batch=2 * micro, micro_batches=micro,
                use_all=use_all, order_fixed=order_fixed, op_overhead_s=overhead,
            )  # fmt: skip
        except PlanError:
            assert want == math.inf, (use_all, order_fixed)
            continue
        assert plan.step_s == pytest.approx(want, rel=1e-9), (use_all, order_fixed)
        assert all(st.memory_bytes <= next(d for d in devs if (d.node_id,) == st.node_ids).memory_bytes
                   for st in plan.stages)  # fmt: skip


# ---------------------------------------------------------------------------------
# Hybrid plans: data-parallel groups as pipeline stages


def test_shares_follow_speed_by_largest_remainder() -> None:
    assert split_shares(8, [1.0, 0.5, 0.25, 0.25]) == (4, 2, 1, 1)
    assert split_shares(3, [1.0, 1.0]) == (2, 1)  # a tie between equals: the earlier one
    assert split_shares(4, [3.0, 5.0]) == (1, 3)  # 1.5 vs 2.5: the tie goes to the faster
    assert split_shares(3, [1.0, 1.0, 2.0]) == (1, 1, 1)
    assert split_shares(2, [1.0, 0.25]) is None  # 1.6 / 0.4 rounds the slow one to 0
    assert split_shares(1, [1.0, 1.0]) is None


def test_pipeline_plans_are_one_device_groups() -> None:
    plan = plan_pipeline(layers(8), devices(1.0, 0.5, 0.25, 0.25), global_batch=32)
    mb = plan.micro_batch_size
    assert all(len(st.node_ids) == 1 and st.shares == (mb,) and st.sync_s == 0.0 for st in plan.stages)
    assert plan.members == ("n0", "n1", "n2", "n3")
    assert plan.summary() == [[["n0"], [mb], 0, 3], [["n1"], [mb], 4, 5], [["n2"], [mb], 6, 6], [["n3"], [mb], 7, 7]]


def test_hybrid_beats_the_pipeline_on_heterogeneous_devices() -> None:
    costs, devs = layers(10, params=100), devices(1.0, 0.5, 0.25, 0.25, link=math.inf)
    hybrid = plan_hybrid(costs, devs, global_batch=32)
    pipe = plan_pipeline(costs, devs, global_batch=32)
    assert hybrid.samples_per_s >= 0.85 * bound_samples_per_s(costs, devs)
    assert hybrid.samples_per_s > pipe.samples_per_s
    assert hybrid.samples_per_s == pytest.approx(32 / hybrid.step_s)
    for st in hybrid.stages:  # shares in proportion to speed (4:2:1:1), summing to the micro-batch
        assert sum(st.shares) == hybrid.micro_batch_size and min(st.shares) >= 1
        speeds = [next(d.speed for d in devs if d.node_id == n) for n in st.node_ids]
        assert st.shares == split_shares(hybrid.micro_batch_size, speeds)
    assert sorted(hybrid.members) == ["n0", "n1", "n2", "n3"]


def test_step_model_of_a_group_is_the_documented_one() -> None:
    costs, devs = layers(2, params=1000), devices(1.0, 0.5, link=1e6)
    plan = plan_hybrid(costs, devs, global_batch=6, micro_batches=1, max_stages=1, op_overhead_s=1e-3)
    (st,) = plan.stages
    assert st.node_ids == ("n0", "n1") and st.shares == (4, 2)
    assert st.compute_s == pytest.approx(4 * 2 * 3e-3 + 1e-3)  # both members: 24 ms of work each
    assert st.transfer_s == 0.0  # one stage: no boundary
    assert st.sync_s == pytest.approx(2 * 1 / 2 * 2000 / 1e6 + 2 * 1e-3)  # ring of 2 over 2 layers' params
    assert st.memory_bytes == 4 * 2000 + 1 * 4 * (0 + 2 * 200 + 100)
    assert plan.step_s == pytest.approx(st.compute_s + st.sync_s)


def test_slow_link_keeps_big_stages_unreplicated() -> None:
    costs = layers(6, params=10**7)  # 10 MB of parameters per layer: 10 s to all-reduce at 1 MB/s
    slow = plan_hybrid(costs, devices(1, 1, 1, memory=4 * GIB, link=1e6), global_batch=12)
    assert all(len(st.node_ids) == 1 and st.sync_s == 0.0 for st in slow.stages)
    # 60 MB of gradients are 58 buckets of 2 (g - 1) hops each: free only with free hops too.
    fast = plan_hybrid(costs, devices(1, 1, 1, memory=4 * GIB, link=math.inf), global_batch=12, op_overhead_s=0.0)
    assert any(len(st.node_ids) > 1 for st in fast.stages)  # the same devices replicate when sync is free
    assert fast.step_s < slow.step_s


def test_hybrid_respects_every_members_memory() -> None:
    costs = layers(8, params=GIB // 32)  # 128 MiB of training state per layer, 1 GiB in all
    devs = [Device("n0", 1.0, GIB // 2, 1e9), Device("n1", 1.0, GIB, 1e9),
            Device("n2", 0.5, GIB // 4, 1e9), Device("n3", 0.5, GIB // 2, 1e9)]  # fmt: skip
    plan = plan_hybrid(costs, devs, global_batch=16)
    assert len(plan.stages) >= 2  # nobody but n1 holds the whole model: no pure data parallelism
    for pos, st in enumerate(plan.stages):
        for n, share in zip(st.node_ids, st.shares):
            dev = next(d for d in devs if d.node_id == n)
            _, _, _, peaks = _ref_group(costs, [dev], [share], st.first_layer, st.last_layer, pos,
                                        len(plan.stages), plan.micro_batches, 0.0, "1f1b")  # fmt: skip
            assert peaks[0] <= dev.memory_bytes
            assert peaks[0] <= st.memory_bytes


def test_hybrid_is_deterministic_and_equal_devices_are_interchangeable() -> None:
    rng = random.Random(7)
    costs = [LayerCost(rng.uniform(1e-4, 1e-3), rng.uniform(1e-4, 2e-3), 10**5, 4096, 8192) for _ in range(9)]
    devs = [Device(f"n{i}", s, GIB, 1e8) for i, s in enumerate([1.0, 0.3, 0.7, 0.5, 0.3])]
    first = plan_hybrid(costs, devs, global_batch=24)
    assert plan_hybrid(list(costs), list(devs), global_batch=24) == first
    assert first.table() == plan_hybrid(costs, devs, global_batch=24).table()
    # n1 and n4 look the same to the planner: swapping them swaps their roles, nothing else.
    swapped = [devs[0], devs[4], devs[2], devs[3], devs[1]]
    rename = {"n1": "n4", "n4": "n1"}
    again = plan_hybrid(costs, swapped, global_batch=24)
    assert again.summary() == [[[rename.get(n, n) for n in ids], sh, i, j] for ids, sh, i, j in first.summary()]
    assert again.step_s == first.step_s
    for perm in [devs[::-1], devs[2:] + devs[:2], [devs[k] for k in (3, 0, 4, 2, 1)]]:
        assert plan_hybrid(costs, perm, global_batch=24).step_s == pytest.approx(first.step_s, rel=1e-12)


def test_use_all_and_max_stages() -> None:
    costs, devs = layers(3), devices(1.0, 0.5, 0.25, 0.25, 0.25)  # more devices than layers
    plan = plan_hybrid(costs, devs, global_batch=16, use_all=True)
    assert sorted(plan.members) == ["n0", "n1", "n2", "n3", "n4"]
    assert plan.step_s >= plan_hybrid(costs, devs, global_batch=16).step_s
    capped = plan_hybrid(layers(8, act=10), devices(1, 1, 1, 1, link=math.inf), global_batch=16, max_stages=2)
    assert len(capped.stages) <= 2
    with pytest.raises(ConfigError, match="max_stages must be >= 1"):
        plan_hybrid(costs, devs, global_batch=16, max_stages=0)
    with pytest.raises(ConfigError, match="does not divide global_batch=16"):
        plan_hybrid(costs, devs, global_batch=16, micro_batches=3)


def test_hybrid_table_lists_every_device_with_its_share() -> None:
    devs = devices(1.0, 0.5, 0.25, 0.25, link=math.inf)
    plan = plan_hybrid(layers(10, params=100), devs, global_batch=32)
    text = plan.table()
    assert all(d.node_id in text for d in devs)
    assert ", ".join(f"{n}({k})" for n, k in zip(plan.stages[0].node_ids, plan.stages[0].shares)) in text
    assert "tail ms" in text.splitlines()[0]
    assert f"{plan.step_s * 1e3:.1f} ms/step" in text.splitlines()[-1]
    assert all(plan.stage_of(n) == i for i, st in enumerate(plan.stages) for n in st.node_ids)
    assert plan.stage_of("nope") is None


def test_hybrid_nothing_fits_says_why() -> None:
    costs = layers(8, params=GIB // 16)  # 2 GiB of training state
    with pytest.raises(PlanError, match=r"the model needs 2 GiB .* but the 3 devices hold 1.5 GiB together"):
        plan_hybrid(costs, devices(1, 1, 1, memory=GIB // 2), global_batch=4)
    with pytest.raises(PlanError, match=r"layer 0 alone needs 2 GiB but the largest device \(n0\) holds 1 GiB"):
        plan_hybrid(layers(2, params=GIB // 2), devices(1, 1, 1, 1, 1), global_batch=4)


def test_many_devices_compare_pure_pipeline_and_data_parallel() -> None:
    costs = layers(12, act=1000)
    devs = devices(1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.4, link=1e7)  # 8 > 6: no exhaustive search
    plan = plan_hybrid(costs, devs, global_batch=64)
    pipe = plan_pipeline(costs, devs, global_batch=64, order_fixed=False)
    assert plan.step_s <= pipe.step_s
    assert len(plan.stages) == 1 or all(len(st.node_ids) == 1 for st in plan.stages)
    every = plan_hybrid(costs, devs, global_batch=64, use_all=True)
    assert sorted(every.members) == sorted(d.node_id for d in devs)


def test_six_devices_search_exactly_and_beat_the_pipeline() -> None:
    rng = random.Random(3)
    costs = [LayerCost(rng.uniform(2e-4, 2e-3), rng.uniform(4e-4, 4e-3), rng.randint(10**4, 10**6),
                       rng.randint(10**3, 10**5)) for _ in range(12)]  # fmt: skip
    links = [1e7, 2e7, 5e6, 1e8, 3e7, 4e6]
    devs = [Device(f"n{i}", s, GIB, x) for i, (s, x) in enumerate(zip([1.0, 0.9, 0.7, 0.5, 0.3, 0.2], links))]
    plan = plan_hybrid(costs, devs, global_batch=48)
    assert plan.step_s <= plan_pipeline(costs, devs, global_batch=48, order_fixed=False).step_s


# Brute force for hybrid plans: every micro-batch split, grouping and cut, computed the slow way.


def _ref_shares(mb, speeds):
    quotas = [mb * s / math.fsum(speeds) for s in speeds]
    shares = [math.floor(q) for q in quotas]
    # The largest remainders get one more; ties to the faster, then the earlier device.
    for k in sorted(range(len(speeds)), key=lambda k: (shares[k] - quotas[k], -speeds[k], k))[: mb - sum(shares)]:
        shares[k] += 1
    return shares if min(shares) >= 1 else None


def _ref_group(costs, devs, shares, i, j, pos, n_stages, micro, overhead, schedule):
    """(compute, transfer, sync, per-member peak memory) of layers i..j on the group."""
    n = len(costs)
    inb = costs[i - 1].act_bytes if i else 0
    outb = costs[j].act_bytes
    wire = inb + (outb if j < n - 1 else 0)
    work = sum(costs[k].fwd_s + costs[k].bwd_s for k in range(i, j + 1))
    params = sum(costs[k].param_bytes for k in range(i, j + 1))
    saved = sum(costs[k].saved_bytes or costs[k].act_bytes for k in range(i, j + 1))
    flight = micro if schedule == "gpipe" else min(n_stages - pos, micro)
    c = max(k * work / d.speed + overhead for d, k in zip(devs, shares))
    x = max(k * wire / d.link_bytes_per_s for d, k in zip(devs, shares))
    g = len(devs)
    y = 2 * (g - 1) / g * params / min(d.link_bytes_per_s for d in devs) + 2 * (g - 1) * overhead if g > 1 else 0.0
    peaks = [4 * params + flight * k * (inb + saved + outb) for k in shares]
    return c, x, y, peaks


def _brute_hybrid(costs, devs, micro, mb, overhead, schedule, use_all):
    n, nd = len(costs), len(devs)
    best = math.inf
    for k in range(1, min(nd, n) + 1):
        for labels in itertools.product(range(-1, k), repeat=nd):  # -1: the device sits out
            if set(range(k)) - set(labels) or (use_all and -1 in labels):
                continue
            groups = [[d for d, lab in zip(devs, labels) if lab == s] for s in range(k)]
            shares = [_ref_shares(mb, [d.speed for d in g]) for g in groups]
            if None in shares:
                continue
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                stages = [
                    _ref_group(costs, g, sh, bounds[p], bounds[p + 1] - 1, p, k, micro, overhead, schedule)
                    for p, (g, sh) in enumerate(zip(groups, shares))
                ]
                if any(m > d.memory_bytes for g, st in zip(groups, stages) for d, m in zip(g, st[3])):
                    continue
                step = (sum(c + x for c, x, _, _ in stages) + (micro - 1) * max(max(c, x) for c, x, _, _ in stages)
                        + max(y for _, _, y, _ in stages))  # fmt: skip
                best = min(best, step)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_hybrid_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(4, 5)
    costs = _random_costs(rng, n)
    devs = [
        Device(f"d{i}", rng.choice([0.25, 0.5, 1.0, 2.0]), rng.randint(300, 4000), rng.choice([20.0, 100.0, math.inf]))
        for i in range(3)
    ]
    micro, mb = rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 5])
    overhead = rng.choice([0.0, 0.05])
    schedule = rng.choice(["1f1b", "gpipe"])
    for use_all in (False, True):
        want = _brute_hybrid(costs, devs, micro, mb, overhead, schedule, use_all)
        try:
            plan = plan_hybrid(costs, devs, global_batch=micro * mb, micro_batches=micro, schedule=schedule,
                               op_overhead_s=overhead, use_all=use_all)  # fmt: skip
        except PlanError:
            assert want == math.inf, use_all
            continue
        assert plan.step_s == pytest.approx(want, rel=1e-9), use_all
        assert all(sum(st.shares) == mb and min(st.shares) >= 1 for st in plan.stages)
        assert [st.last_layer + 1 for st in plan.stages[:-1]] == [st.first_layer for st in plan.stages[1:]]
        assert plan.stages[0].first_layer == 0 and plan.stages[-1].last_layer == n - 1
        if not use_all:  # every pure pipeline is a hybrid plan too
            try:
                pipe = plan_pipeline(costs, devs, global_batch=micro * mb, micro_batches=micro, schedule=schedule,
                                     op_overhead_s=overhead, order_fixed=False)  # fmt: skip
            except PlanError:
                continue
            assert plan.step_s <= pipe.step_s * (1 + 1e-9)
