"""What a pipeline job's members re-plan from when the ring changes: the measurements of its start.

A job measures its members once (:func:`~p2ptrain.plan.agree_on_plan`). When a member is
lost the survivors re-plan from those same figures, minus the lost device, so every
survivor computes the same plan with no new probes. A member that joins mid-job was
never measured: the job's leader estimates it from the resources it announced (its
GFLOP/s against the measured members' speed per GFLOP/s) and hands the updated
figures to everyone, newcomer included (:mod:`p2ptrain.train._admit`), so the members
keep planning alike. Once a planned job has run a few steps, its members' measured
compute corrects those figures and may move the job to a better plan
(:meth:`PlanInputs.rebalance`, :mod:`p2ptrain.plan._measured`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from p2ptrain._errors import JobError, P2PTrainError, PlanError
from p2ptrain.discovery import Resources
from p2ptrain.plan import (
    CHECKED_RANGE,
    REPLAN_GAIN,
    CacheEntry,
    CostModel,
    Device,
    DevicePower,
    LayerCost,
    Plan,
    layout_step_s,
    measured_devices,
    own_ratios,
    plan_for_objective,
    plan_pipeline,
    uniform_plan,
    with_joules,
)
from p2ptrain.ring import View
from p2ptrain.train._job import JobSpec
from p2ptrain.train.pipeline._layout import Stage, layout_from_plan

__all__ = ["PlanInputs"]

logger = logging.getLogger(__name__)


@dataclass
class PlanInputs:
    """A pipeline job's planner inputs; ``devices`` grows when members join.

    Attributes:
        costs: per-layer costs (reference device).
        devices: every device the job has measured or estimated.
        model: the cost model's constants.
        spec: the job.
        split: ``"planned"``, ``"pipeline"`` or ``"even"`` (the JobService's choice).
        exclude: members the plan leaves out whatever they measure (a submitter with
            ``submitter_trains=False``).
        entry: the profile cache entry of this member's figures (None: no cache); checked
            by :meth:`rebalance`.
    """

    costs: list[LayerCost]
    devices: list[Device]
    model: CostModel
    spec: JobSpec
    split: str = "planned"
    exclude: frozenset[str] = frozenset()  # members the plan must leave out (a submit-only member)
    entry: CacheEntry | None = None
    agreed: frozenset[str] = field(init=False, default=frozenset())  # the members the agreement measured

    def __post_init__(self) -> None:
        self.agreed = frozenset(d.node_id for d in self.devices)

    def plan(self, view: View) -> Plan:
        """The plan on ``view``'s members (the same on every member holding these inputs)."""
        kept = [d for d in self.devices if d.node_id in view and d.node_id not in self.exclude]
        missing = sorted(set(view.members) - self.exclude - {d.node_id for d in kept})
        if missing:
            raise JobError(f"no measurements of {', '.join(missing)} to plan with")
        spec = self.spec
        if self.split == "even":
            # Baseline for benchmarks: the layers split evenly over the same devices, with
            # the micro-batch count the cost model likes best for that split.
            counts = [spec.micro_batches] if spec.micro_batches else [
                m for m in range(1, min(spec.global_batch, 4 * len(kept)) + 1) if spec.global_batch % m == 0]
            return min((uniform_plan(self.costs, kept, global_batch=spec.global_batch, micro_batches=m,
                                     schedule=spec.schedule, **self.model._asdict()) for m in counts),
                       key=lambda p: p.step_s)
        if self.split == "pipeline":
            # Baseline for the study: a pure pipeline (one device per stage, every device
            # used), cut where the cost model says.
            pure = plan_pipeline(self.costs, kept, global_batch=spec.global_batch, micro_batches=spec.micro_batches or None,
                                 use_all=True, schedule=spec.schedule, **self.model._asdict())
            return with_joules(pure, self.costs, kept, "time", replica_every=self._replicas(view), **self.model._asdict())
        kw = self._plan_kw(view)
        try:
            return plan_for_objective(self.costs, kept, max_j_per_sample=spec.max_j_per_sample, **kw)
        except PlanError:
            if not spec.max_j_per_sample:
                raise
            # The members left cannot meet the energy budget: training on beats stopping.
            logger.warning("no plan on the %d members left meets max_j_per_sample=%g; planning without it",
                           len(kept), spec.max_j_per_sample)
            return plan_for_objective(self.costs, kept, **kw)

    def _replicas(self, view: View) -> int:
        """The snapshot period the plan prices: the job's, when a keeper exists."""
        return self.spec.replica_every if len(view) > 1 else 0

    def rebalance(self, view: View, stages: Sequence[Stage], micro: int, measured: Mapping[str, float],
                  ran_s: float = 0.0) -> Plan | None:
        """A better plan on ``view`` once ``stages`` has run, or None to keep them.

        Every training member's measured forward + backward seconds per step
        (``measured``) correct the devices (:func:`~p2ptrain.plan.measured_devices`);
        the plan on them is returned when it differs from ``stages`` and is predicted to
        take at most ``REPLAN_GAIN`` of their step priced the same way. Only a planned job
        re-plans: the baselines keep their split.

        The corrections fix compute only. A layout of several members also moves to the
        best plan on one device when that is predicted at most ``REPLAN_GAIN`` of the step
        it ran (``ran_s``, the ring's measured step: the slowest member's schedule,
        gradient sum and update; a time job with no energy bound), unless the model's best
        plan on the corrected figures, weighed with what the layout ran over its price on
        them (the excess the model missed in transfers and sums, which one device does not
        pay), is faster still, or is itself one device (then that one): a job does not keep
        a group that ran slower than its fastest member alone is predicted to. That one
        device is priced on the agreed figures (members the agreement measured only) times
        what its own ratio exceeds the other members' median: a slowdown every member
        measured alike came of computing beside each other, which one device alone does not
        pay (a 15 M-parameter pair on hetero4 computed at 1.1-1.6 times its price with the
        1.0-core device as its first stage, 1.03 in the other order, and ran at 0.76-0.84 of
        that device alone); a ratio of its own is the device's (a mis-probed device alone is
        priced as it measured). A move is final for its layout (it is not checked again), so
        a device whose figures are too fast by more than ``REPLAN_GAIN`` and by the same
        share as every member's can still take the job alone and run it slower.

        The figures themselves are left as they were: a view change can reach some
        members before this check and others after it, and every member must re-plan a
        recovery on the same figures (a recovered layout is checked again, see
        :mod:`p2ptrain.train.pipeline._measured`).

        Whatever the split, each member checks its own figures' cache entry (``entry``)
        once, when some stage carries at least ``OWN_SHARE`` of the work and every
        member of the layout was measured by the agreement (not estimated as a
        newcomer): by its own measured over predicted compute ``r`` when it is such a
        stage's member, else by the median of theirs (the re-plan's corrections,
        unclamped). The first ``CHECK_JOBS`` jobs on the figures note their ``r`` in the
        entry with its terms (the layers priced): their median is the cost model's own
        error for this model and device. After them, a job on the same terms whose ``r``
        is beyond ``STALE_RATIO`` of that is noted as off; a second in a row off on the
        same side drops the entry (off the loop), and its next job measures again rather
        than plan on figures two jobs contradicted (one job's ratio strays by a third on
        a busy host). A host whose speed moved moves every member's ratio, so the
        members it did not measure drop their figures with the ones it did.
        """
        plain = [(st.first_layer, st.last_layer, st.members) for st in stages]
        self._check_entry(plain, micro, measured)
        if self.split != "planned":
            return None
        corrected = PlanInputs(self.costs, measured_devices(self.costs, self.devices, plain, micro, measured,
                                                            self.model.shared_speed),
                               self.model, self.spec, self.split, self.exclude)
        spec = self.spec
        now = layout_step_s(self.costs, corrected.devices, plain, micro=micro, global_batch=spec.global_batch,
                            schedule=spec.schedule, model=self.model)
        try:
            best = corrected.plan(view)
        except (PlanError, JobError) as exc:
            logger.info("no re-plan on measured figures: %s", exc)
            return None
        same = (layout_from_plan(best), best.micro_batches) == (list(stages), micro)
        new = None if same or best.step_s > REPLAN_GAIN * now else best
        members = {m for _, _, group in plain for m, _ in group}
        if ran_s <= 0 or len(members) < 2 or spec.objective != "time" or spec.max_j_per_sample:
            return new
        if new is not None and len(new.members) == 1:
            return new  # the corrected figures already favour one device: that one
        # Against one device: the model's best pays what the layout ran over its price (the
        # excess: transfers, sums), one device none of it. One device is priced on the agreed
        # figures times only what its own ratio exceeds the other members' median: what they
        # all measured alike came of running beside each other, a ratio of its own is the
        # device's (a mis-probed device, whose price alone must not be the probe's).
        _, ratios = own_ratios(self.costs, self.devices, plain, micro, measured, self.model.shared_speed)
        alone = self.best_alone(view, _own_excess(ratios))
        excess = max(ran_s / now, 1.0) if now > 0 else 1.0
        if alone is None or alone.step_s > REPLAN_GAIN * ran_s or (new is not None and len(new.members) > 1
                                                                    and new.step_s * excess <= alone.step_s):
            return new
        logger.info("the layout ran at %.4f s a step (its measured compute prices %.4f s); %s alone is predicted at "
                    "%.4f s on its own figures: moving to it", ran_s, now, alone.members[0], alone.step_s)
        return alone

    def best_alone(self, view: View, slower: Mapping[str, float] | None = None) -> Plan | None:
        """The fastest predicted plan on one of ``view``'s members the agreement measured (a
        newcomer's figures are estimates), or None when none fits; ``slower``: price these
        members' compute that many times slower."""
        plans = []
        for d in self.devices:
            if d.node_id not in view or d.node_id in self.exclude or d.node_id not in self.agreed:
                continue
            f = (slower or {}).get(d.node_id, 1.0)
            d = replace(d, speed=d.speed / f, fixed_s=d.fixed_s * f)
            try:
                plans.append(plan_for_objective(self.costs, [d], **self._plan_kw(view)))
            except PlanError:
                continue  # the model does not fit this device's memory
        return min(plans, key=lambda p: p.step_s, default=None)

    def _plan_kw(self, view: View) -> dict[str, Any]:
        spec = self.spec
        return dict(objective=spec.objective, max_slowdown=spec.max_slowdown, replica_every=self._replicas(view),
                    global_batch=spec.global_batch, micro_batches=spec.micro_batches or None, schedule=spec.schedule,
                    **self.model._asdict())

    def _check_entry(self, plain: Any, micro: int, measured: Mapping[str, float]) -> None:
        """Check this member's cached figures against the job's measured compute (once a job, when
        a stage carries half the model's work): note the ratio on figures no job has checked,
        drop figures whose ratio on the same terms has moved."""
        entry = self.entry
        members = {m for _, _, group in plain for m, _ in group}
        if entry is None or not members <= self.agreed:  # a newcomer's figures are estimates, not measurements
            return
        try:
            # Unclamped: the clamp keeps a stalled step from steering a plan; here CHECKED_RANGE guards.
            own, _ = own_ratios(self.costs, self.devices, plain, micro, measured, self.model.shared_speed,
                                limits=(0.0, math.inf))
        except (KeyError, ValueError, ZeroDivisionError) as exc:  # advisory: never the job's end
            logger.debug("no check of the cached figures: %s", exc)
            return
        if not own:  # no stage carried half the work: no ratio says much about a device
            return
        self.entry = None
        # The terms of the ratio: the layers it priced. A stage of the whole model is priced at
        # the member's own per-sample time, whoever's profile is the reference; a part of it by
        # the reference's layer shares, so a ratio on other layers is not compared.
        ranges = {m: f"{first}-{last}" for first, last, group in plain for m, _ in group if m in own}
        if entry.node_id in own:
            # On the figures as stored: the job planned on them times entry.applied.
            r, on = own[entry.node_id] * entry.applied, ranges[entry.node_id]
        elif entry.applied != 1.0:  # others' ratios on their own corrections say nothing of these figures
            return
        else:
            # The layers, not who ran them: one carrier of the whole model or two, the same terms.
            r, on = statistics.median(own.values()), "median " + ",".join(sorted(set(ranges.values())))
        logger.debug("%s computed at %.2f times what its figures price on %s (the jobs before: %s on %s%s)",
                     entry.node_id, r, on, list(entry.checks), entry.checked_on or "-",
                     f", the last far off at {entry.off:.2f}" if entry.off else "")
        if not CHECKED_RANGE[0] <= r <= CHECKED_RANGE[1]:  # a stall or a broken clock
            return
        _off_loop(lambda: _judged(entry, r, on))

    def layout(self, view: View) -> tuple[list[Stage], int]:
        p = self.plan(view)
        return layout_from_plan(p), p.micro_batches

    def estimate(self, view: View, resources: Mapping[str, Resources | None]) -> None:
        """Add an estimated device for each member of ``view`` never measured."""
        known = {d.node_id for d in self.devices}
        per_gflop = [d.speed / r.gflops for d in self.devices if (r := resources.get(d.node_id)) and r.gflops > 0]
        for m in view.members:
            if m in known:
                continue
            r = resources.get(m)
            if per_gflop and r is not None and r.gflops > 0:
                speed = statistics.median(per_gflop) * r.gflops
            else:  # nothing to scale by: assume the slowest measured device
                speed = min(d.speed for d in self.devices)
            powers = [d.power for d in self.devices if d.power is not None]
            self.devices.append(Device(
                node_id=m, speed=speed,
                memory_bytes=r.memory_bytes if r is not None else min(d.memory_bytes for d in self.devices),
                link_bytes_per_s=min(d.link_bytes_per_s for d in self.devices),
                fixed_s=max(d.fixed_s for d in self.devices),
                # Never measured: priced as the hungriest measured device (an energy plan
                # then takes it in only where it pays even at that price).
                power=max(powers, key=lambda p: (p.idle_w + p.busy_w, p.link_j_per_byte)) if powers else None))

    def devices_to_wire(self) -> list[list[Any]]:
        # hop_s, speed_cv, idle_hop_s and msg_busy_s_per_byte follow the power figures: a
        # leader of an older release sends six or nine fields, read as unknown (0).
        return [[d.node_id, d.speed, d.memory_bytes, d.link_bytes_per_s, d.fixed_s, _power_to_wire(d.power),
                 d.hop_s, d.speed_cv, d.idle_hop_s, d.msg_busy_s_per_byte] for d in self.devices]

    def to_wire(self) -> dict[str, Any]:
        """Costs, devices and constants as plain data (for a newcomer)."""
        return {"costs": [[c.fwd_s, c.bwd_s, c.param_bytes, c.act_bytes, c.saved_bytes] for c in self.costs],
                "devices": self.devices_to_wire(), "model": list(self.model)}

    @staticmethod
    def devices_from_wire(d: Any) -> list[Device]:
        try:
            out = []
            for row in d:
                if not isinstance(row, list) or len(row) not in (6, 9, 10):
                    raise ValueError(f"a device row of {len(row) if isinstance(row, list) else type(row).__name__}")
                m, v, mem, link, fx, pw, *more = row
                hop, cv, idle, moving = (*(float(x) for x in more), 0.0, 0.0, 0.0, 0.0)[:4]
                out.append(Device(node_id=str(m), speed=float(v), memory_bytes=int(mem), link_bytes_per_s=float(link),
                                  fixed_s=float(fx), power=_power_from_wire(pw), hop_s=hop, speed_cv=cv, idle_hop_s=idle,
                                  msg_busy_s_per_byte=moving))
            return out
        except (TypeError, ValueError, P2PTrainError) as exc:
            raise JobError(f"malformed devices from the job's leader: {exc}") from None

    @classmethod
    def from_wire(cls, d: Any, spec: JobSpec, split: str, exclude: frozenset[str] = frozenset()) -> PlanInputs:
        """Check and decode :meth:`to_wire`'s data (it came from the network).

        Raises:
            JobError: it is malformed.
        """
        try:
            costs = [LayerCost(float(f), float(b), int(p), int(a), int(s)) for f, b, p, a, s in d["costs"]]
            model = CostModel(*(float(x) for x in d["model"]))
        except (TypeError, ValueError, KeyError, P2PTrainError) as exc:
            raise JobError(f"malformed planner inputs from the job's leader: {exc}") from None
        return cls(costs, cls.devices_from_wire(d.get("devices")), model, spec, split, exclude)


def _off_loop(work: Any) -> None:
    """``work`` (a small file's write) on the running loop's executor, or here when no loop runs."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # a direct call, outside any loop
        work()
        return
    try:
        loop.run_in_executor(None, work)
    except RuntimeError as exc:  # the executor is shut down: the loop is closing; skip it
        logger.debug("cached figures not updated: %s", exc)


def _power_to_wire(p: DevicePower | None) -> list[Any] | None:
    return None if p is None else [p.idle_w, p.busy_w, p.link_j_per_byte, p.link_j_per_frame, p.battery]


def _power_from_wire(p: Any) -> DevicePower | None:
    if p is None:
        return None
    idle, busy, jpb, jpf, battery = p
    return DevicePower(float(idle), float(busy), float(jpb), float(jpf), None if battery is None else float(battery))


def _judged(entry: CacheEntry, r: float, on: str) -> None:
    """Apply a job's ratio to its member's entry (file I/O: off the loop), and say when that drops it."""
    got = entry.check(r, on)
    if got is not None and got[0] == "forget":
        was = got[1]
        logger.info("%s computed at %.2f and then %.2f times what its cached figures price, where the first %d "
                    "jobs on them computed at %.2f times (median): the device or its host changed since they "
                    "were measured; they are dropped, and its next job measures again",
                    entry.node_id, was.off, r, len(was.checks), was.checked)


def _own_excess(ratios: Mapping[str, float]) -> dict[str, float]:
    """Each measured member's ratio over the median of the others' (at least 1; 1 when it is the only one)."""
    out = {}
    for m, r in ratios.items():
        others = [v for k, v in ratios.items() if k != m]
        out[m] = max(1.0, r / statistics.median(others)) if others else 1.0
    return out
