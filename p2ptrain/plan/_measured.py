"""Plans checked against the steps they ran: the members' measured compute corrects the devices.

A plan rests on probes taken before the job, and probes on a busy host can be far off:
on the 2-core testbed a 0.5-core device once probed as fast as the 1.0-core one, and
the plan that split the batch between them ran at 0.72 of its prediction, slower than
the fast device alone. A running job measures what the probes only estimated: each
training member's forward and backward seconds per step (its compute thread's clock,
summed with the step's loss so every member holds every figure, bit for bit).

:func:`measured_devices` scales each training member's device by its measured compute
over what the cost model predicted for its share of the layout (``speed / r`` and
``fixed_s * r``, the model's own terms) when its stage carries at least half the
model's work, and every other device by the median of those ratios: what slowed the
trainers (the host's noise, a typical repeat's slowdown) is shared, what only one device
does is known only where it ran, and a stage of a few layers measures the layers' profile
as much as the device. The planner then
plans again on the corrected devices, and :func:`layout_step_s` prices the layout that
runs on them the same way, so the two are compared by one model: a job switches only
when the new plan is predicted to take at most ``REPLAN_GAIN`` of the current one's
step, once (see :class:`~p2ptrain.train.pipeline.PipelineTrainer`).

The same ratios tell a member whether the figures it keeps in its profile cache still
hold, when some stage carries at least ``OWN_SHARE`` of the work (:func:`own_ratios`; a
small stage's ratio is more its layers' error than the device's, and moves with the
layout): the first ``CHECK_JOBS`` such jobs on them note the member's ratios in the
entry, and two later ones in a row whose ratios are beyond ``STALE_RATIO`` of their
median on the same side (the host got faster or slower since they were measured, or a
noisy probe was cached) drop the entry, and its next job measures again
(:meth:`~p2ptrain.train._replan.PlanInputs.rebalance`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from p2ptrain.plan._cost import StepModel, closing_hops, on_shared_host, step_s
from p2ptrain.plan._profile import LayerCost
from p2ptrain.plan._types import Device

__all__ = ["OWN_SHARE", "RATIO_LIMITS", "REPLAN_GAIN", "STALE_RATIO", "corrections", "layout_step_s", "measured_devices",
           "own_ratios", "predicted_compute"]

# A measured over predicted ratio is clamped to these: a stalled step (a swap, a pause)
# must not make a device look ten times slower than it is.
RATIO_LIMITS = (0.25, 4.0)
# A member's own ratio corrects its device only when its stage carries at least this
# share of the model's per-sample work (see measured_devices).
OWN_SHARE = 0.5
# A re-plan is taken when predicted to take at most this share of the current layout's
# step: below the model's usual error, a switch would trade a known plan for a guess.
REPLAN_GAIN = 0.9
# A member whose device's correction is off by more than this factor from the median of the
# first jobs' on the same cached figures, on one side in two jobs in a row, drops them: the
# next job measures again.
# Wider than the model's usual error (0.85-1.15 of a prediction), narrower than a host
# whose speed moved a third between jobs (measured: the fifteenth session).
STALE_RATIO = 1.25

# A layout as plain data: (first layer, last layer, ((node id, samples per micro-batch), ...)).
Stages = Sequence[tuple[int, int, Sequence[tuple[str, int]]]]


def _members(stages: Stages) -> list[str]:
    return [m for _, _, members in stages for m, _ in members]


def _priced(devices: Sequence[Device], stages: Stages, shared_speed: float) -> dict[str, Device]:
    """The layout's devices as the planner prices them computing together (a shared host slows them)."""
    by_id = {d.node_id: d for d in devices}
    missing = [m for m in _members(stages) if m not in by_id]
    if missing:
        raise KeyError(f"no device figures for {', '.join(missing)}")
    return {d.node_id: d for d in on_shared_host([by_id[m] for m in _members(stages)], shared_speed)}


def predicted_compute(costs: Sequence[LayerCost], devices: Sequence[Device], stages: Stages, micro: int,
                      shared_speed: float = 0.0) -> dict[str, float]:
    """Each training member's forward + backward seconds per step as the cost model prices them.

    ``micro`` micro-batches of its share on its stage's layers: ``n * work / speed`` plus
    its layers' part of ``fixed_s``, per micro-batch (the executor's per-op overhead is
    not in a forward's or backward's own time, so it is not counted here).
    """
    priced = _priced(devices, stages, shared_speed)
    out: dict[str, float] = {}
    for first, last, members in stages:
        work = math.fsum(c.fwd_s + c.bwd_s for c in costs[first : last + 1])
        for m, n in members:
            d = priced[m]
            out[m] = micro * (n * work / d.speed + d.fixed_s * (last - first + 1) / len(costs))
    return out


def own_ratios(costs: Sequence[LayerCost], devices: Sequence[Device], stages: Stages, micro: int,
               measured: Mapping[str, float], shared_speed: float = 0.0,
               limits: tuple[float, float] = RATIO_LIMITS) -> tuple[dict[str, float], dict[str, float]]:
    """What each training member's compute took over what the cost model priced (clamped to
    ``limits``): (the members whose stage carries at least ``OWN_SHARE`` of the model's
    per-sample work, every member that measured a positive figure)."""
    predicted = predicted_compute(costs, devices, stages, micro, shared_speed)
    ratios = {m: min(max(measured[m] / p, limits[0]), limits[1])
              for m, p in predicted.items() if p > 0 and measured.get(m, 0.0) > 0}
    whole = math.fsum(c.fwd_s + c.bwd_s for c in costs)
    carried = {m for first, last, members in stages for m, _ in members
               if math.fsum(c.fwd_s + c.bwd_s for c in costs[first : last + 1]) >= OWN_SHARE * whole}
    return {m: r for m, r in ratios.items() if m in carried}, ratios


def corrections(costs: Sequence[LayerCost], devices: Sequence[Device], stages: Stages, micro: int,
                measured: Mapping[str, float], shared_speed: float = 0.0) -> dict[str, float]:
    """Each device's ``r`` by node id (see :func:`measured_devices`); empty when no member measured anything."""
    own, ratios = own_ratios(costs, devices, stages, micro, measured, shared_speed)
    if not ratios:
        return {}
    rest = statistics.median((own or ratios).values())
    return {d.node_id: own.get(d.node_id, rest) for d in devices}


def measured_devices(costs: Sequence[LayerCost], devices: Sequence[Device], stages: Stages, micro: int,
                     measured: Mapping[str, float], shared_speed: float = 0.0) -> list[Device]:
    """``devices`` corrected by the compute the layout's members measured (seconds per step).

    Each member with a positive figure has ``r = measured / predicted`` (clamped to
    ``RATIO_LIMITS``). A member whose stage carries at least ``OWN_SHARE`` of the model's
    per-sample work is scaled by its own ``r``; every other device by the median ``r``
    of those, or of all measured members when none carries that much. Unchanged when no
    member measured anything.

    A stage's ratio mixes the device's error with its layers' (the layer costs are one
    member's profile): on a few layers the second can dominate. Measured on hetero4 with
    the 15 M model, a member that ran only the embedding got its own ratio, the move gave
    it the last three layers, and the job ran at 0.57 of the new plan's prediction.
    """
    r = corrections(costs, devices, stages, micro, measured, shared_speed)
    if not r:
        return list(devices)
    return [replace(d, speed=d.speed / r[d.node_id], fixed_s=d.fixed_s * r[d.node_id]) for d in devices]


def layout_step_s(costs: Sequence[LayerCost], devices: Sequence[Device], stages: Stages, *, micro: int,
                  global_batch: int, schedule: str, model: Any) -> float:
    """The cost model's step seconds for ``stages`` as laid out (each member's share as it is).

    Priced as the planner prices a plan on the layout's members (``model``: a
    :class:`~p2ptrain.plan.CostModel`): their shared host, the closing sum of a plan on
    one or two members, every stage's compute, transfer and tail.
    """
    members = _members(stages)
    priced = _priced(devices, stages, model.shared_speed)
    ordered = [priced[m] for m in members]
    hops = model.closing_hops if len(members) > 2 else min(model.closing_hops, closing_hops(2, len(members)))
    sm = StepModel(costs, ordered, micro, global_batch // micro, schedule, model.op_overhead_s,
                   model.update_s_per_byte, model.reduce_s_per_byte, closing_hops=hops)
    index = {m: k for k, m in enumerate(members)}
    parts = []
    for pos, (first, last, group) in enumerate(stages):
        c = sm.stage(first, last, [index[m] for m, _ in group], [n for _, n in group], len(stages) - pos - 1)
        parts.append((c.compute, c.transfer, c.sync))
    return step_s(micro, parts)
