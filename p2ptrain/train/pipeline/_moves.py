"""How a running pipeline job changes its layout: an orderly leave, a recovery, a measured re-plan.

:class:`LayoutMoves` is a part of :class:`~p2ptrain.train.pipeline.PipelineTrainer`
(its base class), kept apart because these paths share one pattern: capture this
member's live state, bind the new layout, :func:`~p2ptrain.train._restore.assemble`
each member's new layers from whoever holds them, install them and snapshot.

- a member that leaves hands its state to its keeper (:meth:`LayoutMoves._hand_over`);
- when a member fails or leaves, the survivors re-plan and go on from the latest step
  whose state they hold together (:meth:`LayoutMoves._recover`);
- once a job has measured its layout's compute, every member checks the plan against
  it at the same step and moves to a better one when the planner finds it
  (:meth:`LayoutMoves._rebalance`, :mod:`p2ptrain.train.pipeline._measured`);
- a member joining a running job, or a job resuming from disk, takes its layers'
  state from the members (:meth:`LayoutMoves._restore`, :meth:`LayoutMoves._resume`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from p2ptrain._errors import JobError, MemberLostError, PeerFailedError
from p2ptrain.ring import Node, View
from p2ptrain.train._admit import carried_over
from p2ptrain.train._recovery import Recovery, next_view
from p2ptrain.train._restore import assemble, resume_from_disk
from p2ptrain.train._state import Units
from p2ptrain.train._store import Checkpoints, StateStore
from p2ptrain.train.pipeline._keeper import StageKeeper
from p2ptrain.train.pipeline._layout import Stage, even_split, layout_from_wire
from p2ptrain.train.pipeline._measured import MeasuredSteps
from p2ptrain.train.pipeline._reports import StepReports

__all__ = ["LayoutMoves", "Rebalance", "Replan"]

logger = logging.getLogger("p2ptrain.train.pipeline._trainer")  # one logger for the trainer's messages

T = TypeVar("T")

# Re-plan after a loss: the survivors' view -> (layout, micro-batches per step).
Replan = Callable[[View], tuple[list[Stage], int]]
# Re-plan on measured compute: (view, layout, micro-batches, seconds per member) -> a new
# (layout, micro-batches), or None to keep the layout (see _measured).
Rebalance = Callable[[View, list[Stage], int, dict[str, float], float], "tuple[list[Stage], int] | None"]
_MAX_ATTEMPTS = 5  # a failure during recovery starts it again, a few times at most


class LayoutMoves:
    """The trainer's layout changes; the attributes are the trainer's (set in its ``__init__``)."""

    node: Node
    job: str
    view: View
    layout: list[Stage]
    micro: int
    n_stages: int
    units: list[int]
    layers: list[nn.Module]
    next_step: int
    store: StateStore
    keeper: StageKeeper
    checkpoints: Checkpoints | None
    replica_every: int
    recover_timeout: float
    recoveries: list[Recovery]
    left_at: int | None
    admit: Callable[[View, View], Awaitable[Any]] | None
    replan: Replan | None
    rebalance: Rebalance | None
    measured: MeasuredSteps
    moved_at: list[int]
    live_until: int | None
    on_moved: Callable[[int], Any] | None
    _generation: int
    _pool: Any

    def _bind(self, view: View, stages: Sequence[Stage] | Sequence[tuple[int, int]], micro_batches: int) -> None:
        raise NotImplementedError

    def _capture(self) -> Units:
        raise NotImplementedError

    def _install(self, units: Units) -> None:
        raise NotImplementedError

    async def _ring_moves(self, epoch: int) -> str:
        """Once the ring is no longer view ``epoch`` (a member left, failed or joined): what changed."""
        while self.node.view.epoch == epoch and not self.node.closed:
            await self.node.changed()
        gone = sorted(set(self.view.members) - set(self.node.view.members))
        return f"{', '.join(gone)} left the ring" if gone else f"the ring changed (view {epoch} -> {self.node.view.epoch})"

    async def _unless_the_ring_moves(self, work: Awaitable[T], what: str) -> T:
        """``work``, given up with PeerFailedError once the ring changes: a member that starts its
        part in the old view after the change is refused (pinned collectives), and one already
        waiting on it would sit out the old view's drain (a join during a measured move: 1 s
        in-process, 2 of 4 runs)."""
        doing = asyncio.ensure_future(work)
        moving = asyncio.ensure_future(self._ring_moves(self.view.epoch))
        try:
            await asyncio.wait([doing, moving], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not doing.done():
                doing.cancel()
                await asyncio.gather(doing, return_exceptions=True)
            moving.cancel()
        if doing.cancelled():
            raise PeerFailedError(f"{moving.result()} before {what}")
        return doing.result()

    async def _hand_over(self) -> None:
        units = await asyncio.get_running_loop().run_in_executor(self._pool, self._capture)
        try:
            await self.keeper.hand_over(self.next_step, units, timeout=30.0)
        except (PeerFailedError, asyncio.TimeoutError) as exc:
            logger.warning("job %s: handing the state over failed (%s); the others roll back to a snapshot",
                           self.job or "-", exc)
        self.left_at = self.next_step
        logger.info("job %s: left at step %d, state handed to %s", self.job or "-", self.next_step, self.keeper.target)

    async def _recover(self, cause: PeerFailedError) -> None:
        """Re-plan on the survivors and go on from the latest step whose state they hold together."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        await self.keeper.close(wait=False)
        # This member's live state counts as a copy at the step it reached.
        live = await loop.run_in_executor(self._pool, self._capture)
        self.store.put(self._live, self.next_step, live)
        error = cause
        old = self.view
        old_epoch = old.epoch
        for _ in range(_MAX_ATTEMPTS):
            new = await next_view(self.node, old, max(0.0, t0 + self.recover_timeout - time.monotonic()), self.job, self.next_step)
            waited = time.monotonic() - t0
            if self.node.node_id not in new:
                raise PeerFailedError(f"{self.node.node_id} is no longer in the ring (view {new.epoch})")
            try:
                survivors, plan = (await self.admit(old, new)) if self.admit else (
                    View(new.epoch, tuple(carried_over(self.node, old, new))), None)
                layout: Sequence[Stage] | Sequence[tuple[int, int]]
                if plan is not None:
                    layout, micro = layout_from_wire(plan)
                elif self.replan is not None:
                    layout, micro = self.replan(survivors)
                else:
                    layout, micro = even_split(len(self.layers), len(survivors)), len(survivors)
                self._generation = 0  # a new epoch keeps the collectives apart (and a newcomer starts at 0)
                self._bind(survivors, layout, micro)
                self.measured.bind(check=True)  # on every member alike, whether its check ran or not
                got = await assemble(self.node, survivors, job=self.job, name=f"recover.{new.epoch}", want=self.units,
                                     n_units=len(self.layers), store=self.store, checkpoints=self.checkpoints)
            except PeerFailedError as exc:  # another change during recovery: start over on the next view
                error, old = exc, self.view
                continue
            if got is None:
                raise MemberLostError(f"the state of some layers was lost with the members that failed ({cause}); "
                               "no survivor holds a copy (replica_every=0, or more members failed than hold copies)")
            await self._take(got)
            rec = Recovery(old_epoch, new.epoch, survivors.members, got.step,
                           ",".join(sorted(set(got.sources.values()))), waited, time.monotonic() - t0, str(cause))
            self.recoveries.append(rec)
            # Steps counted as the progress line counts them: "after N steps" is followed by step N + 1 of it.
            # The stages' members, of the job's: one member's stage on a ring of three read "1 stage(s) on 3 members".
            logger.warning("job %s recovered: view %d -> %d, %d stage(s) on %d of its %d members, resuming after %d steps",
                           self.job or "-", rec.old_epoch, new.epoch, self.n_stages,
                           len({m for st in self.layout for m, _ in st.members}), len(survivors), got.step)
            return
        raise error

    async def _rebalance(self, reports: StepReports) -> None:
        """Check the layout against its measured compute; move to a better plan when one is found
        (every member runs this at the same step, on the same figures: see ``_measured``).

        Nobody failed, so the move keeps what a failure during it would need: the old
        keeper stays open (a member leaving in order hands its state over to it) until
        this member has its new layers, and this member's pre-move layers and the copies
        it holds for others stay in its store until the first step of the new layout is
        reported (an assembly can end on some members and fail on others).
        """
        self.measured.done = True
        figures = self.measured.figures(self.view.members)
        ran_s = self.measured.ring_step_s()
        new = self.rebalance(self.view, self.layout, self.micro, figures, ran_s) if figures and self.rebalance else None
        if new is None:
            return
        await reports.settle()  # no sum of the old layout's collectives still in flight
        keeper, old, step = self.keeper, (self.layout, self.micro), self.next_step
        live = await asyncio.get_running_loop().run_in_executor(self._pool, self._capture)
        self.store.put(self._live, step, live)
        self._generation += 1
        try:
            self._bind(self.view, *new)
            self.measured.bind(check=False)
            # Every layer is live at ``step`` on some member: no checkpoint is read.
            got = await self._unless_the_ring_moves(
                assemble(self.node, self.view, job=self.job, name=f"rebalance.{step}", want=self.units,
                         n_units=len(self.layers), store=self.store, checkpoints=None), "the move to the measured plan was done")
        except PeerFailedError:
            # Back to the layout whose state this member holds: the recovery copies that one.
            self._bind(self.view, *old)
            self.keeper = keeper
            raise
        if got is None or got.step != step:
            raise JobError(f"moving to the measured plan at step {step} found no complete state")
        await keeper.close(wait=True)  # its last snapshot or checkpoint written, then the new keeper
        await asyncio.get_running_loop().run_in_executor(self._pool, self._install, got.units)
        await self._keep_now()
        self.live_until = step
        self.moved_at.append(step)
        if self.on_moved is not None:
            self.on_moved(step)
        # As visible as a recovery: the plan table that follows would otherwise come unexplained.
        logger.warning("job %s: the members' measured compute favoured another plan; moved to it at step %d: "
                       "%d stages on %d members, %d micro-batches", self.job or "-", step, self.n_stages,
                       sum(len(st.members) for st in self.layout), self.micro)

    @property
    def _live(self) -> str:
        """The store's origin for this member's own live state (a move's, a recovery's)."""
        return f"{self.node.node_id}#live"

    async def _take(self, got: Any) -> None:
        """Install assembled state (its step is where this member goes on), then snapshot it."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._install, got.units)
        self.next_step = got.step
        self.store.clear()
        self.live_until = None
        await self._keep_now()

    async def _keep_now(self) -> None:
        """A snapshot at ``next_step`` right away: at the start, and after a recovery (the old copies are gone)."""
        if self.replica_every:
            units = await asyncio.get_running_loop().run_in_executor(self._pool, self._capture)
            await self.keeper.keep(self.next_step, units, snapshot=True, checkpoint=False)
        self.keeper.start(self.next_step if self.replica_every else 0)

    async def _restore(self, name: str) -> None:
        """Take this member's layers from the job's members (a member that joins a running job)."""
        got = await assemble(self.node, self.view, job=self.job, name=name, want=self.units, n_units=len(self.layers),
                             store=self.store, checkpoints=self.checkpoints)
        if got is None:
            raise JobError("the job's members hold no complete state to join with")
        await asyncio.get_running_loop().run_in_executor(self._pool, self._install, got.units)
        self.next_step = got.step
        logger.info("job %s joined at step %d", self.job or "-", got.step)

    async def _resume(self) -> None:
        """Go on from the latest checkpoint the members hold together (all members call it)."""
        got = await resume_from_disk(self.node, self.view, job=self.job, want=self.units, n_units=len(self.layers),
                                     checkpoints=self.checkpoints)
        if got is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._install, got.units)
            self.next_step = got.step
