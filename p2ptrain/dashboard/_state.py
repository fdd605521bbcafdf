"""The dashboard's model of the ring: plain data, no sockets, tested without a network.

:class:`RingStatus` takes three inputs and gives one output:

- this member's own training, from the job service's hooks (:meth:`RingStatus.on_step`,
  :meth:`~RingStatus.on_plan`, :meth:`~RingStatus.set_timeline`);
- the other members' reports (:meth:`RingStatus.apply`), which arrive as ``dash.status``
  messages (:mod:`p2ptrain.dashboard._share`) and are checked here: a malformed one is
  dropped and counted;
- view changes (:meth:`RingStatus.on_view`): who joined, who left in order, who failed;
  a member that leaves the view leaves the page with it.

:meth:`RingStatus.snapshot` is what the page draws: plain JSON-able data, bounded in size
(the loss curve keeps :data:`HISTORY` points, the event list :data:`EVENTS`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from p2ptrain._errors import ProtocolError
from p2ptrain.dashboard._report import MAX_LOSSES, MAX_OPS, JobInfo, PlanInfo, Report

__all__ = ["RingStatus"]

logger = logging.getLogger(__name__)

HISTORY = 600  # loss points per job on the page: ~18 KB of JSON, a long run's curve at a glance
EVENTS = 20  # recent view changes and recoveries
STALE_S = 5.0  # a member whose last report is older is shown as stale (it may not run the share)
MIN_REPORT_GAP_S = 0.25  # reports come once a second; faster ones are dropped and counted
LOCAL_OPS = 400  # this member's own recent ops kept for the timeline (the others' come in their reports)


def _num(x: float | None, digits: int = 6) -> float | None:
    return round(x, digits) if x is not None and math.isfinite(x) else None


class RingStatus:
    """What the page shows, gathered from this member and the reports of the others. Loop thread only.

    Args:
        me: this member's node id.
        power: this member's power class (its energy profile, e.g. ``"laptop"``).
        history: loss points kept per job.
        stale_s: seconds after which a member's last report is marked stale.
        clock: monotonic seconds; ``wall``: wall-clock seconds (tests pass fake ones).
    """

    def __init__(self, me: str, *, power: str = "", history: int = HISTORY, stale_s: float = STALE_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.me = me
        self.history, self.stale_s, self.clock, self.wall = history, stale_s, clock, wall
        self.stats: dict[str, int] = {"reports": 0, "malformed": 0, "too_fast": 0}
        self._local = Report(power=power[:40])
        self._reports: dict[str, tuple[float, Report]] = {}  # member -> (received at, report)
        self._series: dict[str, dict[int, tuple[float | None, float]]] = {}  # job id -> step -> (loss, samples/s)
        self._active: dict[str, float] = {}  # job id -> last time a step of it was heard of
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self._view: tuple[str, ...] | None = None
        self._ops: tuple[tuple[int, int, float, float], ...] = ()  # this member's, longer than its report's

    # --- this member -----------------------------------------------------------------------

    @property
    def local(self) -> Report:
        """This member's own report as it stands."""
        return self._local

    def set_power(self, power: str) -> None:
        """This member's power class (its energy profile name)."""
        self._local = dataclasses.replace(self._local, power=power[:40])

    def set_state(self, state: str) -> None:
        """This member's node state (``alone``, ``member`` or ``paused``)."""
        self._local = dataclasses.replace(self._local, state=state)

    def on_plan(self, plan: Any) -> None:
        """A pipeline plan this member agreed on (:class:`p2ptrain.plan.Plan`)."""
        self._local = dataclasses.replace(self._local, plan=PlanInfo.from_plan(plan))

    def set_timeline(self, ops: Sequence[Sequence[float]]) -> None:
        """This member's recent pipeline ops ``(kind, micro, start, end)`` (wall-clock seconds)."""
        self._ops = tuple((int(k), int(mb), float(a), float(b)) for k, mb, a, b in list(ops)[-LOCAL_OPS:])
        self._local = dataclasses.replace(self._local, ops=self._ops[-MAX_OPS:])

    def on_step(self, m: Any, *, job: JobInfo | None, members: Sequence[str]) -> None:
        """One step this member took part in (a :class:`p2ptrain.StepMetrics`).

        Args:
            job: the job the step belongs to.
            members: the job's members in ring order (``m.busy`` and ``m.joules`` follow it).
        """
        prev = self._local
        members = tuple(members)
        same_job = job is not None and prev.job is not None and prev.job.id == job.id
        if same_job and m.epoch != prev.epoch and prev.step >= 0:
            self._event("recovery", step=int(m.step), epoch=int(m.epoch), members=list(members))
        mine = members.index(self.me) if self.me in members else -1
        if len(m.busy) == len(members) and mine >= 0:
            busy: float | None = float(m.busy[mine])
        else:
            busy = m.compute_s / m.step_s if m.step_s > 0 else None
        joules = None
        if m.joules and len(m.joules) == len(members) and mine >= 0:
            joules = float(m.joules[mine])
        elif len(m.joules) == 1:
            joules = float(m.joules[0])
        total = (prev.joules_total if same_job else 0.0) + (joules or 0.0)
        loss = float(m.loss)
        point = (int(m.step), loss if math.isfinite(loss) else None, float(m.samples_per_s))
        points = (prev.losses if same_job else ()) + (point,)
        self._local = dataclasses.replace(
            prev, job=job, members=members, epoch=int(m.epoch), step=int(m.step), loss=point[1],
            samples_per_s=point[2], step_s=float(m.step_s), compute_s=float(m.compute_s),
            busy=None if busy is None else min(1.0, max(0.0, busy)), joules=joules, joules_total=total,
            measured=bool(m.measured) and all(m.measured), losses=points[-MAX_LOSSES:],
            plan=prev.plan if same_job or job is None or job.strategy == "pipeline" else None,
            ops=prev.ops if same_job else ())
        if job is not None:
            self._add_points(job.id, [point])

    def local_report(self) -> Report:
        """The report this member sends: stamped now, cut to :data:`~p2ptrain.dashboard._report.MAX_REPORT_BYTES`."""
        return dataclasses.replace(self._local, sent_at=self.wall()).trimmed()

    # --- the other members -----------------------------------------------------------------

    def apply(self, sender: str, meta: Any) -> bool:
        """Take a report received from ``sender``; False when it was dropped (and counted).

        Reports closer together than a quarter second are dropped (``too_fast``): a member
        sends one a second, and a flood must cost the receiver nothing.
        """
        now = self.clock()
        last = self._reports.get(sender)
        if last is not None and now - last[0] < MIN_REPORT_GAP_S:
            self.stats["too_fast"] += 1
            return False
        try:
            report = Report.from_wire(meta)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            logger.debug("dropped a dashboard report from %s: %s", sender, exc)
            return False
        if self._view is not None and sender not in self._view:
            return False  # it left the view while its report was on the way
        self.stats["reports"] += 1
        self._reports[sender] = (now, report)
        if report.job is not None and report.losses:
            self._add_points(report.job.id, report.losses)
        return True

    def on_view(self, members: Sequence[str], epoch: int, *, left: Collection[str] = ()) -> None:
        """A newly agreed view; ``left``: members known to have left in order (the rest of the missing failed)."""
        members = tuple(members)
        old = self._view
        self._view = members
        for m in [m for m in self._reports if m not in members]:
            del self._reports[m]
        if old is None:
            self._event("view", epoch=epoch, members=list(members), joined=list(members), left=[], failed=[])
            return
        gone = [m for m in old if m not in members]
        self._event("view", epoch=epoch, members=list(members), joined=[m for m in members if m not in old],
                    left=[m for m in gone if m in left], failed=[m for m in gone if m not in left])

    # --- the page --------------------------------------------------------------------------

    def snapshot(self, members: Sequence[Any], *, epoch: int, state: str, cluster: str = "") -> dict[str, Any]:
        """Everything the page shows, as JSON-able data.

        Args:
            members: the current view's members with what the node knows of them
                (:class:`p2ptrain.ring.MemberInfo`: ``node_id``, ``address``, ``resources``,
                ``state``), in ring order.
        """
        now = self.clock()
        reports = {m: (now, self._local) if m == self.me else self._reports.get(m) for m in (x.node_id for x in members)}
        job = self._current_job(reports)
        rows = [self._member_row(info, reports.get(info.node_id), now, job) for info in members]
        return {
            "t": round(self.wall(), 3), "me": self.me, "cluster": cluster, "epoch": epoch, "state": state,
            "members": rows, "job": None if job is None else dataclasses.asdict(job),
            "plan": self._plan(job, reports), "series": self._points(job), "timeline": self._timeline(job, reports),
            "events": list(reversed(self._events)), "stats": dict(self.stats),
        }

    # --- internals -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        self._events.append({"kind": kind, "t": round(self.wall(), 3), **fields})

    def _add_points(self, job_id: str, points: Sequence[tuple[int, float | None, float]]) -> None:
        series = self._series.get(job_id)
        if series is None:
            series = self._series[job_id] = {}
            while len(self._series) > 2:  # the job now and the one before
                del self._series[min(self._active, key=self._active.__getitem__)]
                self._active = {k: v for k, v in self._active.items() if k in self._series}
        self._active[job_id] = self.clock()
        for step, loss, rate in points:
            series[step] = (loss, rate)
        while len(series) > self.history:
            del series[min(series)]

    def _current_job(self, reports: dict[str, tuple[float, Report] | None]) -> JobInfo | None:
        """The job heard of most recently, as a member running it describes it."""
        if not self._active:
            return self._local.job
        newest = max(self._active, key=self._active.__getitem__)
        for entry in reports.values():
            if entry is not None and entry[1].job is not None and entry[1].job.id == newest:
                return entry[1].job
        return self._local.job if self._local.job is not None and self._local.job.id == newest else None

    def _member_row(self, info: Any, entry: tuple[float, Report] | None, now: float, job: JobInfo | None) -> dict[str, Any]:
        r = info.resources
        row: dict[str, Any] = {
            "id": info.node_id, "me": info.node_id == self.me, "address": info.address, "state": info.state,
            "cores": r.cores if r else None, "memory_bytes": r.memory_bytes if r else None,
            "accelerator": r.accelerator if r else None, "gflops": _num(r.gflops, 2) if r else None,
            "battery": _num(r.battery, 3) if r and r.battery is not None else None,
            "power": None, "report_age_s": None, "stale": True, "in_job": False,
        }
        if entry is None:
            return row
        at, rep = entry
        current = job is not None and rep.job is not None and rep.job.id == job.id and rep.step >= 0
        row.update(power=rep.power or None, report_age_s=round(now - at, 2), stale=now - at > self.stale_s,
                   in_job=current and info.node_id in rep.members)
        if current:
            row.update(step=rep.step, loss=_num(rep.loss), samples_per_s=_num(rep.samples_per_s, 2),
                       step_s=_num(rep.step_s), busy=_num(rep.busy, 4), joules=_num(rep.joules, 4),
                       joules_total=_num(rep.joules_total, 3), measured=rep.measured)
        return row

    def _with_job(self, job: JobInfo | None, reports: dict[str, tuple[float, Report] | None]) -> list[Report]:
        """Reports of members running ``job``, this member's first, then the newest epoch first."""
        if job is None:
            return []
        found = [e[1] for e in reports.values() if e is not None and e[1].job is not None and e[1].job.id == job.id]
        return sorted(found, key=lambda r: (r is not self._local, -r.epoch))

    def _plan(self, job: JobInfo | None, reports: dict[str, tuple[float, Report] | None]) -> dict[str, Any] | None:
        running = self._with_job(job, reports)
        if job is None or not running:
            return None
        if job.strategy == "pipeline":
            plan = next((r.plan for r in running if r.plan is not None), None)
            if plan is None:
                return None
            return {"kind": "pipeline", "micro_batches": plan.micro_batches, "schedule": plan.schedule,
                    "predicted_step_s": _num(plan.step_s), "predicted_samples_per_s": _num(plan.samples_per_s, 2),
                    "stages": [{"stage": i, "members": list(m), "shares": list(s), "layers": [a, b]}
                               for i, (m, s, a, b) in enumerate(plan.stages)]}
        members = running[0].members
        n = max(1, len(members))
        return {"kind": job.strategy, "stages": [
            {"stage": 0, "members": [m], "shares": [job.global_batch // n], "layers": None} for m in members]}

    def _points(self, job: JobInfo | None) -> list[list[Any]]:
        series = self._series.get(job.id, {}) if job is not None else {}
        return [[s, _num(loss), _num(rate, 2)] for s, (loss, rate) in sorted(series.items())]

    def _timeline(self, job: JobInfo | None, reports: dict[str, tuple[float, Report] | None]) -> dict[str, Any] | None:
        """The members' pipeline ops over the same recent window, in seconds before it ends.

        Reports come once a second, so the members' latest ops end at different times: the
        window ends where the least recent of them ends, so every lane covers it.
        """
        running = self._with_job(job, reports)
        if job is None or not running:
            return None
        ops = {m: (self._ops if e[1] is self._local else e[1].ops) for m, e in reports.items()
               if e is not None and e[1].job is not None and e[1].job.id == job.id}
        ends = [max(op[3] for op in o) for o in ops.values() if o]
        if not ends:
            return None
        end = min(ends)
        window = min(10.0, max(0.05, 2 * max(r.step_s for r in running)))
        lanes = [{"id": m, "ops": [[k, mb, round(a - end, 4), round(b - end, 4)] for k, mb, a, b in ops.get(m, ())
                                   if b >= end - window and a <= end]} for m in running[0].members]
        return {"window_s": round(window, 4), "lanes": lanes}
