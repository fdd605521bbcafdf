"""When a running pipeline job checks its plan: every member's measured compute and step, at one agreed step.

Each step's closing sum carries every member's forward + backward seconds and its step
seconds (:class:`~p2ptrain.train.pipeline._reports.Closing`), so all members hold the same
figures, bit for bit. A layout's first step pays first-call allocations and the start's
snapshot; the ``MEASURED_STEPS`` after it are its figures. Every member knows them at
the same step boundary: a step starts only once the report two steps before it is in
(:class:`~p2ptrain.train.pipeline._reports.StepReports`), so the check runs at the start
of the layout's step ``MEASURED_STEPS + 2`` on every member, on the same figures, and
every member reaches the same decision (:meth:`~p2ptrain.train._replan.PlanInputs.rebalance`).
A layout checks once, and not when fewer than ``MIN_STEPS_LEFT`` steps remain to pay
for moving the state. The layout a check moved to is not checked again; a layout a
recovery made is (:meth:`MeasuredSteps.bind`): a view change may reach some members
before their check and others after it, so the recovery starts every member afresh,
on the job's first figures (:meth:`~p2ptrain.train._replan.PlanInputs.rebalance` keeps
its corrections to itself).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["MEASURED_STEPS", "MIN_STEPS_LEFT", "MeasuredSteps"]

MEASURED_STEPS = 2
MIN_STEPS_LEFT = 4


class MeasuredSteps:
    """The compute and step figures of the current layout's steps, and when to check them."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}
        self.steps_s: dict[int, list[float]] = {}  # every member's step seconds, by step
        self.since: int | None = None  # the layout's first step
        self.done = False  # a layout checks once

    def bind(self, check: bool = True) -> None:
        """A new layout: its figures start again (at the next step run); ``check``: it is checked too."""
        self.by_step.clear()
        self.steps_s.clear()
        self.since = None
        self.done = not check

    def record(self, step: int, compute_s: Sequence[float], step_s: Sequence[float] = ()) -> None:
        """Step ``step``'s closing sum: every member's forward + backward seconds and its step
        seconds (up to its optimizer's end), in view order."""
        if self.since is not None and self.since < step <= self.since + MEASURED_STEPS:  # only what figures() reads
            self.by_step[step] = list(compute_s)
            self.steps_s[step] = list(step_s)

    def due(self, step: int, steps: int) -> bool:
        """True at the one step boundary where the check runs (``step`` is about to start)."""
        if self.since is None:
            self.since = step
        return not self.done and step == self.since + MEASURED_STEPS + 2 and steps - step >= MIN_STEPS_LEFT

    def figures(self, members: Sequence[str]) -> dict[str, float]:
        """Each member's median forward + backward seconds per step over the measured steps
        (empty when a step's figures are missing or from another view's members)."""
        assert self.since is not None
        rows = [self.by_step.get(s) for s in range(self.since + 1, self.since + 1 + MEASURED_STEPS)]
        if any(r is None or len(r) != len(members) for r in rows):
            return {}
        return {m: statistics.median(r[k] for r in rows if r is not None) for k, m in enumerate(members)}

    def ring_step_s(self) -> float:
        """The layout's measured step: over the measured steps, the median of the slowest
        member's step seconds (0.0 when a step's figures are missing)."""
        assert self.since is not None
        rows = [self.steps_s.get(s) for s in range(self.since + 1, self.since + 1 + MEASURED_STEPS)]
        if any(not r for r in rows):
            return 0.0
        return statistics.median(max(r) for r in rows if r)
