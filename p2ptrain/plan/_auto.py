"""``strategy="auto"``: the planner's pipeline/hybrid plan weighed against sequence and tensor parallelism.

A job with ``strategy="auto"`` measures and agrees as a pipeline job does
(:func:`~p2ptrain.plan.agree_on_plan`), which gives every member the same figures and the
same best plan over the pipeline, data and hybrid layouts (data parallelism is the
one-stage plan on several members). :func:`choose_strategy` then prices sequence and
tensor parallelism on every member from those figures (:func:`~p2ptrain.plan.price_strategy`,
each member's share in proportion to its speed) and picks by the job's objective:

- ``"time"``: the smallest predicted step, among options within ``max_j_per_sample``
  when that bound is set;
- ``"energy"``: the fewest predicted joules per sample, among options within
  ``max_slowdown`` times the fastest option's step when that bound is set.

The planner's plan wins ties, and a replica strategy is weighed only where the job can
run it (every member trains, the model splits that way) and it fits every member's
memory. Every member computes the same choice, bit for bit, from the agreed figures.

On a LAN sequence and tensor parallelism exchange activations at every block and lose to
the planner's plans (the finding of the collaborative-edge-training study, arXiv
2404.17766, which ``p2ptrain study`` measures); they win where a step's batch is too
small to split by samples and the link is fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain.plan._energy import OBJECTIVES, SPARE_BATTERY, plan_for_objective
from p2ptrain.plan._profile import LayerCost
from p2ptrain.plan._study import StrategyPrice, price_strategy
from p2ptrain.plan._types import Device, Plan

__all__ = ["AUTO_STRATEGIES", "StrategyChoice", "choose_strategy", "speed_shares"]

# What "auto" weighs beside the planner's plan (data parallelism is one of its plans).
AUTO_STRATEGIES = ("sequence", "tensor")
# (name, predicted step seconds, predicted J/sample, shares)
_Option = tuple[str, float, float, tuple[float, ...]]


@dataclass(frozen=True)
class StrategyChoice:
    """What an ``auto`` job runs, and what it weighed.

    Attributes:
        strategy: ``"pipeline"`` (the planner's plan), ``"sequence"`` or ``"tensor"``.
        shares: the replica strategy's share of each member, in ring order (empty for
            the plan).
        step_s: the chosen option's predicted seconds per step.
        j_per_sample: its predicted joules per sample (NaN without power figures).
        options: every option weighed: ``(name, predicted samples/s, predicted J/sample)``,
            the plan first; an option outside the job's bounds, or a replica strategy
            that cannot run or does not fit, is absent.
        skipped: why each replica strategy left out was left out.
        plan: the plan to run when ``strategy`` is ``"pipeline"`` (the plan given, or
            the one planned again within a moved bound); None otherwise.
    """

    strategy: str
    shares: tuple[float, ...]
    step_s: float
    j_per_sample: float
    options: tuple[tuple[str, float, float], ...]
    skipped: Mapping[str, str]
    plan: Plan | None = None

    def table(self) -> str:
        """A few lines for a terminal: the options with their predictions, the chosen one marked."""
        lines = ["auto: the planner weighed"]
        for name, sps, j in self.options:
            mark = "*" if name == self.strategy else " "
            energy = f", {j * 1e3:.1f} mJ/sample" if math.isfinite(j) else ""
            lines.append(f" {mark} {name:<9} {sps:9.1f} samples/s{energy}")
        lines += [f"   {name:<9} left out: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def speed_shares(devices: Sequence[Device]) -> tuple[float, ...]:
    """Each device's share of a replica strategy's work: its speed, to 3 significant digits."""
    return tuple(float(f"{d.speed:.3g}") for d in devices)


def choose_strategy(
    plan: Plan,
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    model: Mapping[str, Any],
    *,
    objective: str = "time",
    max_slowdown: float = 0.0,
    max_j_per_sample: float = 0.0,
    can_run: Callable[[str, tuple[float, ...]], str | None] = lambda strategy, shares: None,
    plan_kw: Mapping[str, Any] | None = None,
    spare_battery: float = SPARE_BATTERY,
) -> StrategyChoice:
    """Weigh ``plan`` against :data:`AUTO_STRATEGIES` on all of ``devices`` (module docstring).

    Args:
        plan: the plan :func:`~p2ptrain.plan.plan_for_objective` chose for the job's
            objective (without ``max_j_per_sample``) on these figures.
        costs, devices: the agreed figures; replica strategies train on every device.
        model: the cost model's constants (``CostModel._asdict()``).
        objective, max_slowdown, max_j_per_sample: the job's.
        can_run: why the job cannot run a strategy with those shares (the members'
            refusal), or None when it can.
        plan_kw: the keywords that planned ``plan`` (``global_batch``, ``micro_batches``,
            ...). With them the plan is planned again where a bound moves: within
            ``max_j_per_sample``, and, when a replica strategy is the fastest option,
            within ``max_slowdown`` times its step. Without them ``plan`` is weighed as it is.
        spare_battery: with ``"energy"``, a member on battery below this charge, which
            the plan spares, rules out the strategies that train on every member.

    Raises:
        ConfigError: an unknown objective, or a budget without power figures.
        PlanError: no option meets ``max_j_per_sample``.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    gb = plan.global_batch
    shares = speed_shares(devices)
    priced: list[StrategyPrice] = []
    skipped: dict[str, str] = {}
    low = [d.node_id for d in devices if objective == "energy" and d.power is not None
           and d.power.battery is not None and d.power.battery < spare_battery]
    for name in AUTO_STRATEGIES:
        why = f"{', '.join(low)} on battery below {spare_battery:.0%} would train" if low else can_run(name, shares)
        if why is None:
            price = price_strategy(name, costs, devices, global_batch=gb, shares=shares, **model)
            why = None if price.fits else "does not fit every member's memory"
        if why is not None:
            skipped[name] = why
            continue
        priced.append(price)
    replicas = [(p.strategy, p.step_s, p.j_per_sample if p.joules else math.nan, shares) for p in priced]
    weighed: Plan | None = plan

    def replan(**bound: float) -> Plan | None:
        try:
            return plan_for_objective(costs, devices, objective=objective, **{**(plan_kw or {}), **bound})
        except PlanError:
            return None  # no plan within the bound

    if objective == "time":
        if max_j_per_sample:
            if any(d.power is None for d in devices):
                raise ConfigError(f"max_j_per_sample needs power figures; none for "
                                  f"{', '.join(d.node_id for d in devices if d.power is None)}")
            if not plan.j_per_sample <= max_j_per_sample:
                weighed = replan(max_j_per_sample=max_j_per_sample) if plan_kw is not None else None
            replicas = [o for o in replicas if o[2] <= max_j_per_sample]
            if weighed is None and not replicas:
                raise PlanError(f"no plan and no strategy within {max_j_per_sample:.3g} J/sample")
        options = _options(weighed, replicas)
        chosen = min(options, key=lambda o: o[1])
    else:
        fastest_plan = plan.step_s
        if max_slowdown and plan_kw is not None:
            fastest_plan = plan_for_objective(costs, devices, objective="time", **plan_kw).step_s
        fastest = min([fastest_plan] + [o[1] for o in replicas])
        if max_slowdown:
            if plan.step_s > max_slowdown * fastest * (1 + 1e-9):  # a replica strategy moved the bound
                factor = max_slowdown * fastest / fastest_plan
                weighed = replan(max_slowdown=factor) if plan_kw is not None and factor >= 1.0 else None
            replicas = [o for o in replicas if o[1] <= max_slowdown * fastest * (1 + 1e-9)]
        options = _options(weighed, replicas)
        chosen = min(options, key=lambda o: (o[2] if math.isfinite(o[2]) else math.inf, o[1]))
    return StrategyChoice(chosen[0], chosen[3], chosen[1], chosen[2], tuple((n, gb / st, j) for n, st, j, _ in options),
                          skipped, weighed if chosen[0] == "pipeline" else None)


def _options(plan: Plan | None, replicas: list[_Option]) -> list[_Option]:
    """The options weighed: the plan first (it wins ties), then the replica strategies."""
    return ([("pipeline", plan.step_s, plan.j_per_sample, ())] if plan is not None else []) + replicas
