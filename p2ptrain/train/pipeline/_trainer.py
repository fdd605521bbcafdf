"""Pipeline-parallel training, with data-parallel groups inside stages (hybrid).

A layout (:mod:`p2ptrain.train.pipeline._layout`) gives each member a run of layers
and a share of every micro-batch. Each global batch is cut into ``micro_batches``
equal micro-batches; a schedule (GPipe or 1F1B, see :mod:`p2ptrain.plan`) orders
each stage's forward and backward ops, and a
:class:`~p2ptrain.train.pipeline._step.PipelineStep` runs them for one step.

Every member's loss for a micro-batch is ``criterion(slice) * share / micro_batch_size
/ micro_batches``, so the gradients summed over a group and accumulated over the
micro-batches equal the gradient of the mean loss over the global batch — the step one
device takes on the whole batch (checked by the transparency tests). Groups sum their
gradients with ring all-reduces of buckets that start as soon as the last micro-batch's
backward has finished them (overlapping the rest of it); every replica then takes the
same optimizer step. The step's loss sum over the whole view runs in the background,
off the next step's critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from torch import nn

from p2ptrain._device import Placement, pick_device
from p2ptrain._errors import ConfigError, JobError, JobStopped, P2PTrainError, PeerFailedError
from p2ptrain.plan import SCHEDULES, Op
from p2ptrain.ring import Collectives, Node, View
from p2ptrain.train._buckets import GradBuckets
from p2ptrain.train._compute import compute_pool
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._dataparallel import StepMetrics, TrainResult, check_finite, param_digest
from p2ptrain.train._energy import StepEnergy
from p2ptrain.train._job import DEFAULT_BUCKET_BYTES
from p2ptrain.train._recovery import Recovery
from p2ptrain.train._state import Units, apply, capture
from p2ptrain.train._store import Checkpoints, StateStore
from p2ptrain.train.pipeline._keeper import StageKeeper
from p2ptrain.train.pipeline._layout import Seat, Stage, check_layout, even_split, layout_from_plan
from p2ptrain.train.pipeline._measured import MeasuredSteps
from p2ptrain.train.pipeline._moves import LayoutMoves, Rebalance, Replan
from p2ptrain.train.pipeline._reports import Closing, StepReports, closing_sums, read_closing
from p2ptrain.train.pipeline._step import TIMELINE_KEEP, OpClock, PipelineStep, StageSetup
from p2ptrain.zoo import Workload

# Stage, even_split and layout_from_plan are re-exported: callers import them from here.
__all__ = ["PipelineTrainer", "Stage", "even_split", "layout_from_plan"]

logger = logging.getLogger(__name__)

# Gradient bytes per group all-reduce bucket. Each bucket costs 2 (g - 1) message hops
# on every member, and on a slow CPU a hop costs ~10 ms (measured on 1/8-core devices):
# with 256 KiB buckets tinygpt's 0.9 MB of gradients took 0.47 s to sum over four such
# devices. Small models are one bucket (the planner's cost model charges one). The same
# size as data parallelism's (see DEFAULT_BUCKET_BYTES).
GROUP_BUCKET_BYTES = DEFAULT_BUCKET_BYTES
_STOP_WHY = "job.stop.why"  # a stop's reason, to the members that read the stop in a closing sum

_Closing = asyncio.Future[Closing]


class PipelineTrainer(LayoutMoves):
    """Train ``workload`` split into stages over (some of) the members of ``node``'s view.

    Args:
        node: a started node.
        workload: built identically on every member; needs ``criterion`` and a model
            that is a sequence of layers.
        stages: the layout — :class:`Stage` objects, or plain ``(first, last)`` layer
            ranges, one per view member in ring order (a plain pipeline).
        global_batch: samples per step.
        micro_batches: micro-batches per step (divides ``global_batch``).
        steps, seed, lr: as for data parallelism.
        schedule: ``"gpipe"`` or ``"1f1b"``.
        codec: codec for activations, activation-gradients and group gradient sums.
        on_step: called with each step's metrics.
        view: the view the job was agreed in (default: the node's current one); if
            the node has moved on, :class:`PeerFailedError` is raised at once.
        job: a name for the run, put in every message tag so that two runs in one
            view never take each other's messages (JobService passes the job id).
        recover: when a member fails or leaves mid-job, the survivors re-plan with
            ``replan`` and go on from the latest step whose state they hold together
            (see :mod:`p2ptrain.train.pipeline._keeper`); False raises
            :class:`PeerFailedError`.
        rebalance: ``(view, layout, micro-batches, each member's measured forward +
            backward seconds per step, the ring's measured step seconds) -> (layout,
            micro-batches)`` or None; called on
            every member at one agreed step of each layout (see ``_measured``), the job
            moves to what it returns. None: the layout is never checked.
        replan: the survivors' view -> (layout, micro-batches); default: the layers
            split evenly over the survivors, one micro-batch per survivor.
        replica_every: steps between copies of each stage's state to another member.
        checkpoints: this member's checkpoint directory for the job, or None.
        checkpoint_every: steps between checkpoints (0: none).
        resume: start from the latest checkpoint the members hold together.
        recover_timeout: seconds to wait for the survivors' new view.
        manifest: extra fields for checkpoint manifests (the job's spec).
        admit: after a view change, ``(old, new) -> (members, plan)``: who trains on
            and, when newcomers were asked in, the leader's plan for them (see
            :mod:`p2ptrain.train._admit`).
        joining: this member joins a running job (from ``admit``): it receives the
            state of its layers before its first step.
        device, offload: where this member's stage computes, as for
            :class:`~p2ptrain.train.DataParallelTrainer`; activations and gradients
            move between host and device at the stage boundary.

    Raises:
        PeerFailedError: the node's view is not ``view``.
        ConfigError: the batch does not split into micro-batches, the layout does not
            fit the view or the model, or the schedule is unknown.
        JobError: the workload has no ``criterion``.

    View members the layout leaves out only take part in the per-step loss sum (so
    every member reports progress) and train nothing.
    """

    def __init__(
        self,
        node: Node,
        workload: Workload,
        *,
        stages: Sequence[Stage] | Sequence[tuple[int, int]],
        global_batch: int,
        micro_batches: int,
        steps: int,
        seed: int = 0,
        lr: float = 1e-3,
        schedule: str = "1f1b",
        codec: str = "none",
        on_step: Callable[[StepMetrics], Any] | None = None,
        view: View | None = None,
        job: str = "",
        recover: bool = False,
        replan: Replan | None = None,
        rebalance: Rebalance | None = None,
        replica_every: int = 0,
        checkpoints: Checkpoints | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        recover_timeout: float = 30.0,
        manifest: dict[str, Any] | None = None,
        admit: Callable[[View, View], Awaitable[Any]] | None = None,
        joining: bool = False,
        device: str | torch.device = "cpu",
        offload: bool = False,
    ) -> None:
        self.node, self.w, self.job = node, workload, job
        self.device, self.offload = pick_device(device), offload
        view = view or node.view
        if node.view.epoch != view.epoch:
            raise PeerFailedError(f"the ring moved from view {view.epoch} to {node.view.epoch} before training started")
        if workload.criterion is None:
            raise JobError("the pipeline strategy needs a Workload with `criterion` (the last stage applies it)")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.layers = workload.layers()
        self.global_batch, self.steps, self.seed, self.lr = global_batch, steps, seed, lr
        self.schedule, self.codec, self.on_step = schedule, codec, on_step
        self.recover, self.replan, self.recover_timeout = recover, replan, recover_timeout
        self.rebalance, self.measured, self._generation = rebalance, MeasuredSteps(), 0
        self.moved_at: list[int] = []  # the steps at which a measured re-plan moved the layout
        self.live_until: int | None = None  # a move's pre-move copy is kept until this step is reported
        self.on_moved: Callable[[int], Any] | None = None  # called with that step once the move is done
        self.replica_every, self.checkpoint_every, self.resume = replica_every, checkpoint_every, resume
        self.checkpoints, self.manifest, self.admit, self.joining = checkpoints, manifest, admit, joining
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        self.next_step = 0  # the first step not yet applied here
        self.first_step = 0  # the step this run started from (a resume's checkpoint step, a newcomer's)
        self.recoveries: list[Recovery] = []
        self.store = StateStore()
        self.leaving = False  # set by leave(): stop at the next step boundary, handing the state over
        # Set by JobService.stop: said in each step's closing sum until every member has read it there; they
        # all end at the same step, the model goes to the submitter, then each raises JobStopped (raise_if_stopped).
        self.stop_reason: str | None = None
        self.stopped_by: list[str] = []  # the members whose stop the closing sum carried
        self.gathered: int | None = None  # on the submitter: the step the whole model was gathered at (_gather)
        self._stop_said, self._stop_epoch = False, 0
        # Called with (step, view epoch) once a step's update is applied (on_step: once its loss sum is in).
        self.on_applied: Callable[[int, int], Any] | None = None
        self.left_at: int | None = None
        self.opt: Any = None
        self._pool = compute_pool("p2ptrain-stage")  # a nicer thread: the host's own threads come first
        self.clock = OpClock()
        self._bind(view, stages, micro_batches)
        self.last_busy: list[float] = []  # every view member's busy fraction in the last step
        self._last_report = 0.0  # when the last step was reported (see _report)
        self.energy = StepEnergy()  # this member's joules per step (JobService gives it a meter)
        # Seconds spent per phase of a step, summed over steps (where the time goes).
        # "closing": waiting, after the step, for the step before's loss sum (StepReports).
        self.phase_s = {"schedule": 0.0, "sync": 0.0, "optimizer": 0.0, "snapshot": 0.0, "closing": 0.0}
        self.phase_log: list[dict[str, float]] = []  # the same, per recent step
        self.timelines: list[list[tuple[int, int, float, float]]] = []  # every view member's, after run()
        self._pool.submit(int)  # its thread starts here (JobService builds trainers off the loop), not on the loop

    def _bind(self, view: View, stages: Sequence[Stage] | Sequence[tuple[int, int]], micro_batches: int) -> None:
        """Take the layout ``stages`` in ``view``: this member's layers, schedule, group and routes."""
        if self.global_batch % micro_batches:
            raise ConfigError(f"global batch {self.global_batch} does not split into {micro_batches} micro-batches")
        self.view, self.micro, self.mb = view, micro_batches, self.global_batch // micro_batches
        self.clock.ops.clear()  # the timeline is this layout's (a move's ops would mix two stages' times)
        self.layout = check_layout(stages, view.members, self.mb, len(self.layers))
        self.n_stages = len(self.layout)
        self.seat = Seat.of(self.layout, self.node.node_id)
        self.stage_index = None if self.seat is None else self.seat.stage_index
        self.rank = view.rank(self.node.node_id)
        # A measured re-plan binds again in the same view: new names keep the new
        # collectives' calls apart from the old ones'.
        job = self.job if not self._generation else f"{self.job}~{self._generation}"
        self.coll = Collectives(self.node, view=view, name=job)
        # The step's closing sum runs along a chain with trainers at its ends (two of
        # them pay one message each way, not 2 (n - 1)); the members left out, idle, in between.
        trains = {m for st in self.layout for m, _ in st.members}
        trainers = [m for m in view.members if m in trains]
        self.closing_path = trainers[:1] + [m for m in view.members if m not in trains] + trainers[1:]
        self.stage: nn.Module = nn.Sequential()
        self.units: list[int] = []
        self.ops: list[Op] = []
        self.group: Collectives | None = None
        self.grads: GradBuckets | None = None
        if self.seat is not None:
            st = self.layout[self.seat.stage_index]
            self.units = list(range(st.first_layer, st.last_layer + 1))
            self.stage = nn.Sequential(*self.layers[st.first_layer : st.last_layer + 1])
            self.ops = SCHEDULES[self.schedule](self.seat.stage_index, self.n_stages, micro_batches)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]  # the host copy (optimizer, state)
        self.place = Placement(self.device, offload=self.offload)
        compute = self.place.module(self.stage)  # the copy forward and backward run on
        if self.seat is not None and len(self.layout[self.seat.stage_index].members) > 1:
            # A data-parallel group: its own ring for the gradient sum, bucketed.
            group = View.of(view.epoch, (m for m, _ in self.layout[self.seat.stage_index].members))
            self.group = Collectives(self.node, view=group, name=f"{job}/pp.stage{self.seat.stage_index}")
            self.grads = GradBuckets(self.place.twins(self.params), GROUP_BUCKET_BYTES, targets=self.params)
        self._setup: StageSetup | None = None
        if self.seat is not None:
            self._setup = StageSetup(
                node=self.node, epoch=view.epoch, digest=f"{view.digest}/{job}", seat=self.seat, ops=self.ops,
                module=compute, workload=self.w, sampler=self.sampler, micro_batches=micro_batches, codec=self.codec,
                group=self.group, grads=self.grads, pool=self._pool, clock=self.clock, place=self.place,
            )
        self.keeper: StageKeeper = StageKeeper(
            self.node, view, self.layout, job=job, store=self.store, capture=self._capture, every=self.replica_every,
            checkpoints=self.checkpoints, checkpoint_every=self.checkpoint_every, steps=self.steps,
            manifest=self.manifest)

    def _named(self, unit: int) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.layers[unit].named_parameters() if p.requires_grad]

    def _capture(self) -> Units:
        """This member's layers: parameters and optimizer state (compute thread)."""
        return {u: capture(self._named(u), self.opt) for u in self.units}

    def _install(self, units: Units) -> None:
        """A fresh optimizer for this member's layers, then ``units`` copied in (compute thread)."""
        self.opt = self.w.make_optimizer(self.params, self.lr) if self.params else None
        for u in self.units:
            apply(units[u], self._named(u), self.opt, f"state of layer {u}")

    @property
    def busy_s(self) -> float:
        """Seconds the compute thread has spent in forwards, backwards and optimizer steps."""
        return self.clock.busy_s

    @property
    def timeline(self) -> list[tuple[int, int, float, float]]:
        """This member's recent ops ``(kind, micro, start, end)`` for the picture (see :class:`OpClock`)."""
        return self.clock.ops

    async def run(self) -> TrainResult:
        """Train from ``next_step`` (0, or the resumed step) to ``steps``; the digest covers this member's stage only.

        Raises:
            PeerFailedError: a member failed or the view changed (and ``recover`` is
                off, or recovery failed).
            QuorumLostError: this member is on the minority side of a partition.
            JobError: a lost layer has no copy left anywhere.
        """
        res = TrainResult()
        loop = asyncio.get_running_loop()
        t_run = time.perf_counter()
        reports = StepReports(lambda *step: self._report(res, *step))
        try:
            if self.joining:
                await self._restore(f"recover.{self.view.epoch}")  # as the members of the running job do
            elif self.resume:
                await self._resume()
            res.first_step = res.steps = self.first_step = self.next_step
            if self.opt is None and self.params:
                self.opt = await loop.run_in_executor(self._pool, self.w.make_optimizer, self.params, self.lr)
            t_keep = time.perf_counter()
            await self._keep_now()
            self._last_report = time.perf_counter()
            logger.debug("trainer set up: optimizer and restore %.3f s, first snapshot %.3f s",
                      t_keep - t_run, self._last_report - t_keep)
            self.energy.start()
            while self.next_step < self.steps:
                if self.stop_reason is not None and self.next_step == res.first_step:  # nothing trained: at once
                    raise JobStopped(self.stop_reason, self.next_step)
                if self.leaving:
                    await self._hand_over()
                    break
                step = self.next_step
                t0, busy0 = time.perf_counter(), self.busy_s
                try:
                    if self.rebalance is not None and self.measured.due(step, self.steps):
                        await self._rebalance(reports)
                    closing = await self.step(step)
                    if step == res.first_step:  # first calls allocate: where a job's start goes (-vv)
                        logger.debug("first step %d: %s s", step, {k: round(v, 3) for k, v in self.phase_log[-1].items()})
                    t_add = time.perf_counter()
                    await reports.add(step, t_add - t0, self.busy_s - busy0, closing)
                    waited = time.perf_counter() - t_add
                    self.phase_log[-1]["closing"] += waited
                    self.phase_s["closing"] += waited
                except PeerFailedError as exc:
                    if not self.recover:
                        raise
                    await reports.settle()
                    await self._recover(exc)
                    del res.losses[self.next_step - res.first_step:]
                    # A step whose loss sum was lost with the member has no loss.
                    res.losses += [math.nan] * (self.next_step - res.first_step - len(res.losses))
                    continue
            await reports.finish()
            await self.keeper.close(wait=True)
            res.digest = await asyncio.get_running_loop().run_in_executor(None, param_digest, self.stage)
            if self.left_at is None:  # a leaver's peers are busy recovering, not gathering
                self.timelines = await self.gather_timelines()
        finally:
            await reports.cancel()
            await self.keeper.close(wait=False)
            await loop.run_in_executor(None, self._pool.shutdown)
        return res

    async def raise_if_stopped(self) -> None:
        """After :meth:`run` and the gather of the weights: raise :class:`JobStopped` if a stop ended the run.

        Raises:
            JobStopped: on the member that asked, with its reason; elsewhere naming that member and its reason.
        """
        if not self.stopped_by:
            return
        if self.stop_reason is not None:
            raise JobStopped(self.stop_reason, self.next_step, agreed=True)
        who, why = self.stopped_by[0], ""
        with contextlib.suppress(asyncio.TimeoutError, P2PTrainError):  # sent at its first flagged step, two before
            msg = await asyncio.wait_for(self.node.take(_STOP_WHY, [self.job], epoch=self._stop_epoch, sender=who), 2.0)
            why = f": {str(msg.meta.get('reason', ''))[:1000]}" if isinstance(msg.meta, dict) else ""
        raise JobStopped(f"job {self.job}, stopped on member {who}{why}", self.next_step, agreed=True)

    def leave(self) -> None:
        """Stop at the next step boundary and hand this member's state to its keeper (an orderly leave).

        :meth:`run` then returns what it trained so far; the others go on without this
        member from the step it stopped at (no rollback), once it has left the ring.
        """
        self.leaving = True

    async def step(self, step: int) -> _Closing:
        """Run one training step's work here, up to and including the optimizer step.

        Returns:
            A future of the step's closing sum: (global-batch mean loss, every view
            member's busy fraction, joules and measured flags). The sum runs in the background, off the next
            step's critical path; :meth:`run` reports the step once it is in (:class:`StepReports`).

        Raises:
            PeerFailedError: a member failed or the view changed.
        """
        t_start, busy0, compute0 = time.perf_counter(), self.busy_s, self.clock.compute_s
        phase = {k: 0.0 for k in self.phase_s}
        self.phase_log.append(phase)
        del self.phase_log[:-TIMELINE_KEEP]
        loss_sum = worked = 0.0
        if self._setup is not None:
            t0 = time.perf_counter()
            async with PipelineStep(self._setup, step) as work:
                watch = asyncio.ensure_future(self._abort_when_one_leaves(work, step))
                try:
                    loss_sum = await work.compute()
                    t1 = time.perf_counter()
                    await work.fence()
                finally:
                    watch.cancel()
            t2 = time.perf_counter()
            await self._optimize()
            t3 = time.perf_counter()
            phase.update(schedule=t1 - t0, sync=t2 - t1, optimizer=t3 - t2)
            worked = t3 - t0
        self.next_step = step + 1
        if self.on_applied is not None:
            self.on_applied(step, self.view.epoch)
        snapshot, checkpoint = self.keeper.due(self.next_step)
        if snapshot or checkpoint:
            t4 = time.perf_counter()
            units = await asyncio.get_running_loop().run_in_executor(self._pool, self._capture)
            await self.keeper.keep(self.next_step, units, snapshot=snapshot, checkpoint=checkpoint)
            phase["snapshot"] = time.perf_counter() - t4
        for k, v in phase.items():
            self.phase_s[k] += v
        # One small sum gives every member the loss and every member's busy fraction and compute.
        if self.stop_reason is not None and not self._stop_said:  # why, for the others' JobStopped (not in a sum)
            self._stop_said = True
            for m in self.view.members:
                if m != self.node.node_id:
                    self.node.endpoint.try_send(m, _STOP_WHY, epoch=self.view.epoch, tag=[self.job],
                                                meta={"reason": self.stop_reason[:1000]})
        sums = closing_sums(len(self.view), self.rank, loss_sum,
                            (self.busy_s - busy0) / max(time.perf_counter() - t_start, 1e-9), self.energy.take(),
                            self.clock.compute_s - compute0, worked, self.stop_reason is not None)
        closing = asyncio.ensure_future(self._close(self.coll, self.closing_path, sums))
        # Its awaiter raises its error; a job cancelled before any awaiter took it (a host's
        # Ctrl-C) must not print "Task exception was never retrieved" (a walkthrough).
        closing.add_done_callback(lambda f: f.cancelled() or f.exception())
        return closing

    async def _one_leaves(self, members: frozenset[str]) -> list[str]:
        """Return the ids of ``members`` no longer in the ring, once there are any."""
        while not (gone := sorted(members - set(self.node.view.members))) and not self.node.closed:
            await self.node.changed()
        return gone

    async def _abort_when_one_leaves(self, work: PipelineStep, step: int) -> None:
        """Abandon ``work`` once a member of this view is no longer in the ring.

        A member that leaves in order does so at a step boundary, after its last step:
        the others' next step cannot finish without it. Their waits on it end at once
        (the router knows what it sent), but a stage that waits on a live member which
        itself waited on the leaver would sit out the old view's drain (the failure
        timeout: 2.2 s a leave in a walkthrough, where a kill cost 0.7 s).
        """
        gone = await self._one_leaves(frozenset(self.view.members))
        why = f"{', '.join(gone)} left the ring" if gone else f"node {self.node.node_id} closed"
        work.fail(PeerFailedError(f"{why} (view {self.view.epoch} -> {self.node.view.epoch}) during step {step}"))

    async def _close(self, coll: Collectives, path: list[str], sums: torch.Tensor) -> Closing:
        """The step's closing sum along ``path``; given up once the ring changes.

        The members the plan leaves out finish a step at once and wait in its sum. At a ring
        change the members still in a step call the sum after it, and their pinned collectives
        refuse it: a sum not in by then would only end with the old view's drain (the failure
        timeout: 2.1-2.6 s a join in 3 walkthrough runs of 3, and as long a leave before). The
        step's loss goes, as at any ring change.
        """
        await self._unless_the_ring_moves(coll.sum_along(sums, path), "the step's loss sum was in")
        return read_closing(sums, self.energy.meter is not None)

    async def _optimize(self) -> None:
        """The optimizer step, on the compute thread and on its timeline."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.clock.timed, "opt", -1, self._apply)

    def _apply(self) -> None:
        """The optimizer step on the summed gradients (compute thread)."""
        if self.opt is None:  # a stage without trainable parameters (e.g. a lone activation)
            return
        if self.grads is not None:
            self.grads.unpack()
        else:
            self.place.pull()  # a GPU member's gradients, to the host copy the optimizer updates
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    async def gather_timelines(self) -> list[list[tuple[int, int, float, float]]]:
        """Every view member's recent ops (kind, micro, start, end), in ring order; a collective."""
        mine = torch.tensor(self.timeline or [(2, -1, 0.0, 0.0)], dtype=torch.float64)
        rows = await self.coll.all_gather(mine)
        return [[(int(k), int(m), a, b) for k, m, a, b in r.tolist() if b > 0] for r in rows]

    async def _report(self, res: TrainResult, step: int, dt: float, busy: float, closing: _Closing) -> None:
        loss, self.last_busy, joules, measured, compute_s, step_s, stop = await closing
        if any(stop) and not self.stopped_by:
            # Every member reads this sum before its step + 2 (StepReports): all end after step + 1, in order,
            # so the submitter gathers the whole model as at the last step (a Ctrl-C on `train` wrote none).
            self.stopped_by = [m for m, asked in zip(self.view.members, stop) if asked]
            self._stop_epoch = self.view.epoch
            self.steps = min(self.steps, step + 2)
        self.measured.record(step, compute_s, step_s)
        if self.live_until is not None and step >= self.live_until:  # every member is past the move
            self.store.drop(self._live)
            self.live_until = None
        # A member the plan leaves out finishes its own steps at once; the ring's step is
        # the gap between reports (each waits for its step's sum over the ring).
        now = time.perf_counter()
        dt, self._last_report = max(dt, now - self._last_report), now
        check_finite(loss, step)
        res.losses.append(loss)
        res.steps = step + 1
        if self.on_step is not None:
            self.on_step(StepMetrics(step, loss, self.global_batch / dt, dt, busy, dt - busy, self.n_stages,
                                     self.view.epoch, self.last_busy, joules=joules, measured=measured))


