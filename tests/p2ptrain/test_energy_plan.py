"""Energy-aware planning: joules per device of a plan, and what each objective picks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from p2ptrain._errors import ConfigError, JobError, PlanError
from p2ptrain.plan import Device, DevicePower, LayerCost, choose_plan, plan_hybrid, plan_joules, uniform_plan, with_joules
from p2ptrain.plan._energy import MTU_BYTES

GIB = 2**30
OVERHEAD = 1e-4


def layers(n: int, *, t: float = 1e-3, params: int = 4000, act: int = 3000) -> list[LayerCost]:
    return [LayerCost(fwd_s=t, bwd_s=2 * t, param_bytes=params, act_bytes=act, saved_bytes=act) for _ in range(n)]


def dev(name: str, speed: float, idle: float, busy: float, *, battery: float | None = None, jpb: float = 0.0,
        jpf: float = 0.0, link: float = 1e9) -> Device:
    return Device(name, speed, GIB, link, power=DevicePower(idle, busy, jpb, jpf, battery))


def test_one_device_pays_idle_for_the_step_and_busy_for_its_compute() -> None:
    costs = layers(4)
    d = dev("a", 2.0, idle=5.0, busy=10.0, jpb=1e-6, jpf=1e-3)
    plan = plan_hybrid(costs, [d], global_batch=8, micro_batches=2, op_overhead_s=OVERHEAD, update_s_per_byte=1e-9)
    joules = plan_joules(plan, costs, [d], op_overhead_s=OVERHEAD, update_s_per_byte=1e-9)
    busy = 2 * (4 * 4 * 3e-3 / 2.0 + OVERHEAD) + 1e-9 * 16000 / 2.0
    assert joules == {"a": pytest.approx(5.0 * plan.step_s + 10.0 * busy)}  # nothing crosses a link
    assert plan.step_s == pytest.approx(busy, rel=1e-9)  # alone, the device is busy the whole step


def test_a_pipeline_charges_each_side_of_the_boundary_for_the_activations_and_gradients() -> None:
    costs = layers(4)
    devs = [dev("a", 1.0, 0.0, 0.0, jpb=1e-6, jpf=1e-3), dev("b", 1.0, 0.0, 0.0, jpb=2e-6, jpf=0.0)]
    plan = uniform_plan(costs, devs, global_batch=8, micro_batches=4, op_overhead_s=OVERHEAD)
    assert [len(st.node_ids) for st in plan.stages] == [1, 1]
    joules = plan_joules(plan, costs, devs, op_overhead_s=OVERHEAD)
    nbytes = 2 * 4 * 2 * 3000  # M micro-batches of 2 samples, 3000 B each way at the boundary
    assert joules["a"] == pytest.approx(1e-6 * nbytes + 1e-3 * math.ceil(nbytes / MTU_BYTES))
    assert joules["b"] == pytest.approx(2e-6 * nbytes)


def test_a_group_pays_for_its_gradient_all_reduce() -> None:
    costs = layers(2)
    devs = [dev("a", 1.0, 0.0, 0.0, jpb=1e-6), dev("b", 1.0, 0.0, 0.0, jpb=1e-6)]
    plan = plan_hybrid(costs, devs, global_batch=8, micro_batches=1, op_overhead_s=OVERHEAD, use_all=True, max_stages=1)
    joules = plan_joules(plan, costs, devs, op_overhead_s=OVERHEAD)
    assert joules == {"a": pytest.approx(1e-6 * 2 * 8000), "b": pytest.approx(1e-6 * 2 * 8000)}  # 2 (g-1)/g P, both ways


# A fast, frugal device and a slow, hungry one (a Jetson-class board beside an old laptop).
FRUGAL = dev("fast", 3.0, idle=3.0, busy=4.0)
HUNGRY = dev("slow", 1.0, idle=15.0, busy=20.0)


def test_the_energy_objective_leaves_a_hungry_slow_device_out_and_time_keeps_it() -> None:
    costs = layers(8)
    kw = {"global_batch": 32, "op_overhead_s": OVERHEAD}
    fast = choose_plan(costs, [FRUGAL, HUNGRY], objective="time", **kw)
    frugal = choose_plan(costs, [FRUGAL, HUNGRY], objective="energy", **kw)
    assert set(fast.members) == {"fast", "slow"}
    assert frugal.members == ("fast",)
    assert frugal.j_per_sample < 0.8 * fast.j_per_sample
    assert fast.step_s < frugal.step_s
    assert frugal.objective == "energy" and fast.objective == "time"
    # The time objective is the hybrid planner's own choice, now priced.
    assert fast.step_s == pytest.approx(plan_hybrid(costs, [FRUGAL, HUNGRY], **kw).step_s)
    # A tight time budget keeps the fast plan; a loose one lets energy win.
    slowdown = frugal.step_s / fast.step_s
    assert choose_plan(costs, [FRUGAL, HUNGRY], objective="energy", max_slowdown=slowdown * 0.99, **kw).step_s == \
        pytest.approx(fast.step_s)
    assert choose_plan(costs, [FRUGAL, HUNGRY], objective="energy", max_slowdown=slowdown * 1.01, **kw).members == \
        ("fast",)
    # Time within an energy budget: the fast plan costs too much, so the frugal one runs.
    budget = (fast.j_per_sample + frugal.j_per_sample) / 2
    assert choose_plan(costs, [FRUGAL, HUNGRY], objective="time", max_j_per_sample=budget, **kw).members == ("fast",)
    with pytest.raises(PlanError, match="no plan within"):
        choose_plan(costs, [FRUGAL, HUNGRY], objective="time", max_j_per_sample=frugal.j_per_sample / 2, **kw)
    assert "predicted energy (energy objective)" in frugal.table()


def test_a_device_on_a_low_battery_is_spared_unless_it_is_all_there_is() -> None:
    costs = layers(8)
    low = dev("robot", 3.0, idle=1.0, busy=1.0, battery=0.1)
    ok = dev("pc", 1.0, idle=10.0, busy=10.0)
    assert choose_plan(costs, [low, ok], objective="time", global_batch=16).members == ("pc",)
    assert choose_plan(costs, [low, ok], objective="time", global_batch=16, spare_battery=0.05).members != ("pc",)
    assert choose_plan(costs, [low], objective="energy", global_batch=16).members == ("robot",)


def test_bad_objectives_and_missing_figures_are_refused() -> None:
    costs = layers(2)
    with pytest.raises(ConfigError, match="objective 'speed' is not one of time, energy"):
        choose_plan(costs, [FRUGAL], objective="speed", global_batch=4)
    with pytest.raises(ConfigError, match="max_slowdown=0.5 must be 0"):
        choose_plan(costs, [FRUGAL], objective="energy", max_slowdown=0.5, global_batch=4)
    with pytest.raises(ConfigError, match="no power figures for n"):
        choose_plan(costs, [Device("n", 1.0, GIB, 1e9)], objective="energy", global_batch=4)
    with pytest.raises(ConfigError, match="busy_w=-1"):
        DevicePower(1.0, -1.0)
    with pytest.raises(ConfigError, match="battery=1.5"):
        DevicePower(1.0, 1.0, battery=1.5)
    # Without figures a plan is simply not priced.
    plain = plan_hybrid(costs, [Device("n", 1.0, GIB, 1e9)], global_batch=4)
    assert with_joules(plain, costs, [Device("n", 1.0, GIB, 1e9)], op_overhead_s=OVERHEAD) is plain
    assert math.isnan(plain.j_per_sample) and "predicted energy" not in plain.table()


async def test_an_energy_job_is_priced_and_planned_alike_on_every_member_and_trains() -> None:
    import asyncio

    from p2ptrain.plan import plan_for_objective
    from p2ptrain.train import JobService, JobSpec
    from p2ptrain.train._replan import PlanInputs

    from _ring import started_ring

    nodes = await started_ring(3)
    plans: list = []
    try:
        services = [JobService(n, on_plan=plans.append) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=4, seed=1, objective="energy",
                       max_slowdown=3.0, model_kwargs={"depth": 3})
        mine = await asyncio.wait_for(services[0].submit(spec), 60)
        await asyncio.wait_for(asyncio.gather(*serving), 30)
    finally:
        for n in nodes:
            await n.close()
    assert len(plans) == 3 and plans[0] == plans[1] == plans[2]
    plan = plans[0]
    assert plan.objective == "energy" and {n for n, _ in plan.joules} == set(plan.members)
    _, costs, devs, model = services[0].last_plan_inputs
    assert all(d.power is not None and d.power.idle_w > 0 for d in devs)  # every member sent its figures
    # Priced as the job is: its snapshots' radio bytes included.
    fastest = plan_for_objective(costs, devs, global_batch=24, replica_every=spec.replica_every, **model._asdict())
    assert plan.j_per_sample <= fastest.j_per_sample and plan.step_s <= 3.0 * fastest.step_s * (1 + 1e-9)
    assert len(mine.losses) == 4 and mine.state_dict is not None
    # A newcomer gets the figures with the rest of the planner inputs.
    inputs = PlanInputs(costs, devs, model, spec)
    back = PlanInputs.from_wire(inputs.to_wire(), spec, "planned")
    # The wire carries every figure a re-plan prices with, hops and spread included.
    assert back.devices == devs and any(d.hop_s > 0 for d in devs)
    # Every member measured what moving a byte costs its CPU (the link probe's CPU time).
    assert all(d.msg_busy_s_per_byte > 0 for d in devs)
    # A leader of an older release sends six or nine fields per device: read as unknown.
    old = {**inputs.to_wire(), "devices": [row[:6] for row in inputs.to_wire()["devices"]]}
    assert PlanInputs.from_wire(old, spec, "planned").devices == [
        replace(d, hop_s=0.0, speed_cv=0.0, idle_hop_s=0.0, msg_busy_s_per_byte=0.0) for d in devs]
    nine = {**inputs.to_wire(), "devices": [row[:9] for row in inputs.to_wire()["devices"]]}
    assert PlanInputs.from_wire(nine, spec, "planned").devices == [replace(d, msg_busy_s_per_byte=0.0) for d in devs]
    bad = {**inputs.to_wire(), "devices": [row[:7] for row in inputs.to_wire()["devices"]]}
    with pytest.raises(JobError, match="malformed devices"):
        PlanInputs.from_wire(bad, spec, "planned")


def test_the_cpu_s_part_in_moving_bytes_is_charged_at_busy_power() -> None:
    from p2ptrain.plan import plan_joules, price_strategy

    costs = [LayerCost(1e-4, 2e-4, 4000, 100, 200) for _ in range(4)]
    pw = DevicePower(2.0, 5.0, link_j_per_byte=1e-7, link_j_per_frame=0.0)
    devs = [Device("a", 1.0, GIB, 1e9, power=pw), Device("b", 1.0, GIB, 1e9, power=pw)]
    busy = [replace(d, msg_busy_s_per_byte=1e-8) for d in devs]
    plan = uniform_plan(costs, devs, global_batch=8, micro_batches=2, op_overhead_s=OVERHEAD)
    plain, moving = (plan_joules(plan, costs, d, op_overhead_s=OVERHEAD) for d in (devs, busy))
    nbytes = 2 * 2 * 4 * 100  # two micro-batches of 4 samples, 100 B each way at the boundary
    assert {n: moving[n] - plain[n] for n in plain} == {n: pytest.approx(5.0 * 1e-8 * nbytes) for n in plain}
    for strategy in ("data", "sequence", "tensor"):
        a, b = (price_strategy(strategy, costs, d, global_batch=8) for d in (devs, busy))
        each = b.wire_bytes_per_step / 2  # per member, one way
        assert b.step_s == a.step_s  # time is unchanged: the bytes' time is the link's
        assert b.joules["a"] - a.joules["a"] == pytest.approx(5.0 * 1e-8 * 2 * each)


def test_a_stage_leaders_snapshots_are_priced_on_its_radio() -> None:
    from p2ptrain.plan import plan_joules
    from p2ptrain.plan._energy import SNAPSHOT_FACTOR

    costs = [LayerCost(1e-4, 2e-4, 4000, 100, 200) for _ in range(2)]
    pw = DevicePower(2.0, 5.0, link_j_per_byte=1e-7, link_j_per_frame=0.0)
    devs = [Device("a", 1.0, GIB, 1e9, power=pw), Device("b", 1.0, GIB, 1e9, power=pw)]
    plan = plan_hybrid(costs, devs, global_batch=8, micro_batches=1, op_overhead_s=OVERHEAD, use_all=True)
    plain = plan_joules(plan, costs, devs, op_overhead_s=OVERHEAD)
    every = plan_joules(plan, costs, devs, op_overhead_s=OVERHEAD, replica_every=10)
    for st in plan.stages:
        params = sum(c.param_bytes for c in costs[st.first_layer : st.last_layer + 1])
        lead = st.node_ids[0]
        assert every[lead] - plain[lead] == pytest.approx(1e-7 * SNAPSHOT_FACTOR * params / 10)
        assert all(every[n] == plain[n] for n in st.node_ids[1:])  # one member of a group sends
