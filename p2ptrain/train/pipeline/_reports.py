"""A pipeline trainer's step reports: each step as soon as its loss sum is in, in step order.

A step's closing sum (its loss, every member's busy share, joules, compute seconds and step seconds:
one float64 tensor each member adds its entries to, :func:`closing_sums`, and reads back
as :class:`Closing`) runs along the ring in the background while the next step computes. :class:`StepReports` waits for
each sum beside that next step and reports the step the moment its sum arrives, so a
step's metrics (and a job's first step, the end of its start) are known one sum's
latency after the step, not a whole step later. At most one report is in flight beside
the step that computes: :meth:`StepReports.add` returns once the report before it has
ended, as the trainer's loop then starts the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import torch

from p2ptrain._errors import PeerFailedError

__all__ = ["CLOSING_FIELDS", "Closing", "StepReports", "closing_sums", "read_closing"]

# A closing sum's per-member fields, after the loss: busy fraction, joules, measured
# flag, forward + backward seconds, step seconds, a stop asked (each member writes its own entry of each).
CLOSING_FIELDS = 6


class Closing(NamedTuple):
    """A step's closing sum as every member reads it (lists in view order)."""

    loss: float  # the global batch's mean loss
    busy: list[float]  # every member's busy fraction of its step
    joules: list[float]  # every member's joules (empty without an energy meter)
    measured: list[bool]  # whether each member's joules were measured (empty likewise)
    compute_s: list[float]  # every member's forward + backward seconds (0: it trains nothing)
    step_s: list[float]  # every member's step up to its optimizer's end: schedule, gradient sum, update
    stop: list[bool]  # whether each member asked the job to stop (JobService.stop) by this step


def closing_sums(members: int, rank: int, loss: float, busy: float, joules: tuple[float, float],
                 compute_s: float, step_s: float = 0.0, stop: bool = False) -> torch.Tensor:
    """This member's part of a step's closing sum: ``loss`` and its own entry of every field."""
    sums = torch.zeros(1 + CLOSING_FIELDS * members, dtype=torch.float64)
    sums[0] = loss
    for k, v in enumerate((busy, *joules, compute_s, step_s, 1.0 if stop else 0.0)):
        sums[1 + k * members + rank] = v
    return sums


def read_closing(sums: torch.Tensor, metered: bool) -> Closing:
    """The summed tensor as :class:`Closing` (``metered``: this member has an energy meter)."""
    n = (len(sums) - 1) // CLOSING_FIELDS
    rows = [sums[1 + k * n : 1 + (k + 1) * n].tolist() for k in range(CLOSING_FIELDS)]
    busy, joules, measured, compute, step, stop = rows
    stopped = [v > 0.5 for v in stop]
    if not metered:
        return Closing(float(sums[0]), [round(v, 4) for v in busy], [], [], compute, step, stopped)
    return Closing(float(sums[0]), [round(v, 4) for v in busy], [round(v, 6) for v in joules],
                   [v > 0.5 for v in measured], compute, step, stopped)

Report = Callable[[int, float, float, "asyncio.Future[Any]"], Awaitable[None]]


class StepReports:
    """Reports of a trainer's steps, made with ``report(step, dt, busy, closing)`` once ``closing`` is in.

    ``report`` awaits ``closing`` itself; a report raises what the sum raised.
    """

    def __init__(self, report: Report) -> None:
        self._report = report
        self._pending: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[Any] | None = None  # the newest sum: cancel() cancels it even unstarted

    async def add(self, step: int, dt: float, busy: float, closing: asyncio.Future[Any]) -> None:
        """Start ``step``'s report, then wait for the one before it to end.

        Raises:
            Exception: the report before it failed (e.g. :class:`PeerFailedError`: its sum was lost).
        """
        before, self._closing = self._pending, closing
        self._pending = asyncio.ensure_future(self._after(before, step, dt, busy, closing))
        if before is not None:
            await before

    async def _after(self, before: asyncio.Task[None] | None, step: int, dt: float, busy: float,
                     closing: asyncio.Future[Any]) -> None:
        # Steps are reported in order; the failure of the report before is its own (add raises it).
        # A cancelled report leaves its sum to cancel(), which cancels the newest one.
        if before is not None:
            await asyncio.wait([before])
        await self._report(step, dt, busy, closing)

    async def settle(self) -> None:
        """Let the report in flight end: its step is reported if its sum still comes (a lost sum is dropped)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await pending
        except PeerFailedError:
            pass

    async def finish(self) -> None:
        """Wait for the last report (its error is raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def cancel(self) -> None:
        """Drop the report in flight, and its sum."""
        pending, self._pending = self._pending, None
        closing, self._closing = self._closing, None
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        if closing is not None and not closing.done():  # its report had not started yet
            closing.cancel()
            await asyncio.gather(closing, return_exceptions=True)
