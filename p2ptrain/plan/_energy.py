"""Energy-aware planning: the joules a plan costs each device, and the plan an objective picks.

The energy model (per training step, for each device ``d`` the plan uses) is the one
the energy meter estimates with (:mod:`p2ptrain.energy`), applied to the cost model's
predicted times (:mod:`p2ptrain.plan._cost`):

    J_d = idle_w_d * step + busy_w_d * busy_d + j_per_byte_d * bytes_d + j_per_frame_d * frames_d

- ``busy_d``: the device's own compute in the step: ``M`` micro-batches of its share
  (``n_d * work / speed_d + fixed_d * layers / L + op_overhead_s`` each, as the cost
  model prices a stage member) plus its optimizer update, plus its CPU's part in moving
  ``bytes_d`` (``Device.msg_busy_s_per_byte``, measured with the link probe: ZeroMQ,
  Python and copies; on a slow CPU moving a byte costs more than the radio);
- ``busy_w_d``: what the device draws over idle while it trains (its power profile's
  per-core figure times the cores its compute thread keeps busy);
- ``bytes_d``: what its radio moves: each micro-batch's boundary activations out and
  gradients back (both directions, so twice the stage's per-direction wire bytes), its
  group's ring all-reduce (``2 (g - 1) / g`` of the stage's parameters, sent and
  received), and, on a stage's first member, the recovery snapshot it sends its keeper
  every ``replica_every`` steps (the stage's parameters and their two Adam moments,
  ``SNAPSHOT_FACTOR`` times the parameter bytes; docs/recovery.md): for a small model
  on one device this is most of its radio's bytes (measured: 1.9 of a lone Orin Nano's
  35.6 mJ per sample were the snapshot's, which the model missed);
  ``frames_d = bytes_d / MTU``.

Devices the plan leaves out are charged nothing: their idle draw does not depend on the
job. This is the accounting of the collaborative-edge-training study (arXiv 2404.17766:
average board power times training time, on each participating device).

:func:`choose_plan` searches plans over subsets of the devices (the hybrid planner's
best for each subset, every device of the subset used), prices each, and picks by the
objective:

- ``"time"``: the smallest step, optionally within ``max_j_per_sample`` (power figures are
  needed only for that bound); a job's time plan comes from here too
  (:func:`plan_for_objective`), so "the fastest device alone" and "leave these members
  out" are options it weighs and reports (``Plan.options``); members left out stay in
  the ring and idle;
- ``"energy"``: the fewest joules per sample, optionally within ``max_slowdown`` times the
  fastest plan's step (``--max-slowdown 1.2``).

With the energy objective, a device on battery below ``spare_battery`` is left out whenever a
plan without it exists.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain.plan._cost import DEFAULT_OP_OVERHEAD_S, StepModel, closing_hops
from p2ptrain.plan._hybrid import MAX_EXHAUSTIVE_DEVICES, tie_key
from p2ptrain.plan._planner import plan_hybrid
from p2ptrain.plan._profile import LayerCost
from p2ptrain.plan._types import Device, Plan

__all__ = ["MTU_BYTES", "OBJECTIVES", "SNAPSHOT_FACTOR", "SPARE_BATTERY", "choose_plan", "plan_for_objective", "plan_joules",
           "with_joules"]

# Bytes of a stage's recovery snapshot per parameter byte: the parameter and its two Adam
# moments (the gradient is not kept). Jobs train with Adam(W) (the zoo's optimizers); an
# optimizer with less state sends less.
SNAPSHOT_FACTOR = 3

OBJECTIVES = ("time", "energy")
# A device on battery below this charge is spared by the energy objective: a robot that
# keeps a fifth of its charge can still get home.
SPARE_BATTERY = 0.2
# Payload bytes per link-layer frame: Ethernet's and 802.11's 1500-byte MTU.
MTU_BYTES = 1500


def plan_joules(
    plan: Plan,
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    op_overhead_s: float,
    update_s_per_byte: float = 0.0,
    reduce_s_per_byte: float = 0.0,
    replica_every: int = 0,
    **_: Any,
) -> dict[str, float]:
    """Predicted joules per step of each device ``plan`` uses (see the module's model).

    Args:
        replica_every: the job's snapshot period in steps (0: no snapshots are sent);
            the sender's radio is charged, not the keeper's (a member the plan may
            leave out), and the snapshot is sized for Adam (``SNAPSHOT_FACTOR``).

    Raises:
        ConfigError: a device of the plan has no power figures (``Device.power``).
    """
    by_id = {d.node_id: d for d in devices}
    model = StepModel(costs, [by_id[n] for n in plan.members], plan.micro_batches, plan.micro_batch_size,
                      plan.schedule, op_overhead_s, update_s_per_byte, reduce_s_per_byte)
    n_layers = len(costs)
    out: dict[str, float] = {}
    for st in plan.stages:
        i, j = st.first_layer, st.last_layer
        work = model.time[j + 1] - model.time[i]
        params = model.params[j + 1] - model.params[i]
        wire = (model.acts[i - 1] if i > 0 else 0) + (model.acts[j] if j < n_layers - 1 else 0)
        g = len(st.node_ids)
        for node, n in zip(st.node_ids, st.shares):
            dev = by_id[node]
            pw = dev.power
            if pw is None:
                raise ConfigError(f"no power figures for device {node!r}; every planned device needs them")
            hop = dev.hop_s or op_overhead_s
            busy = plan.micro_batches * (n * work / dev.speed + dev.fixed_s * (j - i + 1) / n_layers + hop)
            busy += update_s_per_byte * params / dev.speed
            nbytes = 2 * plan.micro_batches * n * wire + (2 * 2 * (g - 1) / g * params if g > 1 else 0)
            if replica_every and node == st.node_ids[0]:
                nbytes += SNAPSHOT_FACTOR * params / replica_every
            frames = math.ceil(nbytes / MTU_BYTES)
            busy += dev.msg_busy_s_per_byte * nbytes  # its CPU moves the bytes too
            out[node] = (pw.idle_w * plan.step_s + pw.busy_w * busy + pw.link_j_per_byte * nbytes
                         + pw.link_j_per_frame * frames)
    return out


def with_joules(plan: Plan, costs: Sequence[LayerCost], devices: Sequence[Device], objective: str = "time",
                **cost_kw: Any) -> Plan:
    """``plan`` with its predicted joules filled in, when every device it uses has power figures."""
    by_id = {d.node_id: d for d in devices}
    if any(by_id[n].power is None for n in plan.members):
        return plan
    joules = plan_joules(plan, costs, devices, **cost_kw)
    return replace(plan, joules=tuple(sorted(joules.items())), objective=objective)


def _spared(devices: Sequence[Device], spare_battery: float) -> list[Device]:
    low = {d.node_id for d in devices if d.power is not None and d.power.battery is not None
           and d.power.battery < spare_battery}
    return [d for d in devices if d.node_id not in low] or list(devices)  # spare them when others can train


def _candidates(devices: Sequence[Device], spare_battery: float) -> list[list[Device]]:
    """Device subsets to plan on: all of them up to the exhaustive limit, else the fastest k."""
    pool = _spared(devices, spare_battery)
    if len(pool) <= MAX_EXHAUSTIVE_DEVICES:
        return [list(c) for k in range(1, len(pool) + 1) for c in itertools.combinations(pool, k)]
    fastest = sorted(pool, key=lambda d: -d.speed)
    return [sorted(fastest[:k], key=pool.index) for k in range(1, len(pool) + 1)]


def choose_plan(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    objective: str = "time",
    max_slowdown: float = 0.0,
    max_j_per_sample: float = 0.0,
    spare_battery: float = SPARE_BATTERY,
    replica_every: int = 0,
    **plan_kw: Any,
) -> Plan:
    """The plan ``objective`` picks among the hybrid planner's best plans on subsets of ``devices``.

    Args:
        costs, devices: as for :func:`~p2ptrain.plan.plan_hybrid`; with ``"energy"`` or
            ``max_j_per_sample`` every device needs ``power`` figures.
        objective: ``"time"`` or ``"energy"`` (see the module's docstring).
        max_slowdown: with ``"energy"``, plans slower than this times the fastest plan's
            step are not candidates (0: no bound).
        max_j_per_sample: with ``"time"``, plans above this many joules per sample are
            not candidates (0: no bound).
        spare_battery: devices on battery below this charge are left out when possible.
        replica_every: the job's snapshot period (its radio bytes are priced; 0: none).
        plan_kw: the remaining keywords of :func:`~p2ptrain.plan.plan_hybrid`
            (``global_batch``, ``micro_batches``, ``schedule``, ``op_overhead_s``,
            ``update_s_per_byte``, ``reduce_s_per_byte``, ``max_stages``).

    Returns:
        The plan, with ``options`` (the best alone, the best on every device, the
        chosen one) and, where every device has power figures, ``joules`` (per device
        per step) and ``objective`` filled in. Among plans meeting the bounds, a
        ``"time"`` plan is the fastest predicted, ties as the hybrid planner breaks them.

    Raises:
        ConfigError: an unknown objective, a bad bound, or power figures missing where
            they are needed.
        PlanError: no plan fits (the hybrid planner's message), or none meets the bound.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not (max_slowdown == 0 or max_slowdown >= 1.0) or not math.isfinite(max_slowdown):
        raise ConfigError(f"max_slowdown={max_slowdown} must be 0 (no bound) or at least 1.0")
    if not (math.isfinite(max_j_per_sample) and max_j_per_sample >= 0):
        raise ConfigError(f"max_j_per_sample={max_j_per_sample} must be a finite number >= 0 (0: no bound)")
    missing = [d.node_id for d in devices if d.power is None]
    if missing and (objective == "energy" or max_j_per_sample):
        raise ConfigError(f"no power figures for {', '.join(missing)}")
    cost_kw = {k: plan_kw.get(k, 0.0) for k in ("update_s_per_byte", "reduce_s_per_byte")}
    cost_kw["replica_every"] = replica_every
    cost_kw["op_overhead_s"] = plan_kw.get("op_overhead_s", DEFAULT_OP_OVERHEAD_S)
    plan_kw.setdefault("count_devices", len(devices))  # every subset tries the ring's micro-batch counts
    priced: list[tuple[Plan, float]] = []
    last_error: PlanError | None = None
    for subset in _candidates(devices, spare_battery):
        kw = plan_kw
        if len(subset) <= 2 and plan_kw.get("closing_hops"):  # its trainers sit at the closing chain's ends
            kw = {**plan_kw, "closing_hops": min(plan_kw["closing_hops"], closing_hops(2, len(subset)))}
        try:
            plan = plan_hybrid(costs, subset, use_all=True, **kw)
        except PlanError as exc:
            last_error = exc
            continue
        plan = with_joules(plan, costs, devices, objective, **cost_kw)
        priced.append((plan, plan.j_per_sample))
    if not priced:
        assert last_error is not None
        raise last_error
    index = {d.node_id: k for k, d in enumerate(devices)}
    fastest = min(p.step_s for p, _ in priced)
    if objective == "time":
        pool = [(p, j) for p, j in priced if not max_j_per_sample or j <= max_j_per_sample]
        if not pool:
            best = min(j for _, j in priced)
            raise PlanError(f"no plan within {max_j_per_sample:.3g} J/sample: the most frugal costs {best:.3g}")
        # The hybrid planner's own tie rule over every subset: the same plan as one search
        # over all of them, and never one predicted slower than a plan it passed over.
        chosen = min(pool, key=lambda pj: (tie_key(pj[0], index), pj[1]))[0]
    else:
        pool = [(p, j) for p, j in priced if not max_slowdown or p.step_s <= max_slowdown * fastest * (1 + 1e-9)]
        chosen = min(pool, key=lambda pj: (pj[1], pj[0].step_s))[0]
    return replace(chosen, options=_options([p for p, _ in priced], chosen, len(devices)))


def _options(plans: Sequence[Plan], chosen: Plan, n_devices: int) -> tuple[tuple[str, float], ...]:
    """``Plan.options``: the best alone, the best on every device, the chosen plan (predicted samples/s)."""
    alone = [p.samples_per_s for p in plans if len(p.members) == 1]
    every = [p.samples_per_s for p in plans if len(p.members) == n_devices]
    out = [("alone", max(alone))] if alone else []
    out += [("all", max(every))] if every else []
    return (*out, ("chosen", chosen.samples_per_s))


def plan_for_objective(costs: Sequence[LayerCost], devices: Sequence[Device], *, objective: str = "time",
                       max_slowdown: float = 0.0, **plan_kw: Any) -> Plan:
    """The plan a job asks for: :func:`choose_plan`'s over subsets of ``devices``.

    A ``"time"`` job gets the fastest predicted plan (as :func:`~p2ptrain.plan.plan_hybrid`
    with ``use_all=False`` would choose it), with the options it weighed in
    ``Plan.options`` and joules where every device has power figures; no device is
    spared for its battery unless the job asks for energy.
    """
    if objective == "time" and not max_slowdown:
        return choose_plan(costs, devices, objective="time", spare_battery=0.0, **plan_kw)
    return choose_plan(costs, devices, objective=objective, max_slowdown=max_slowdown, **plan_kw)
