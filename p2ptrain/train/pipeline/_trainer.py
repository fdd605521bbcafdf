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
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from p2ptrain._errors import ConfigError, JobError, PeerFailedError
from p2ptrain.plan import SCHEDULES, Op
from p2ptrain.ring import Collectives, Node, View
from p2ptrain.train._buckets import GradBuckets
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._dataparallel import StepMetrics, TrainResult, param_digest
from p2ptrain.train.pipeline._layout import Seat, Stage, check_layout, even_split, layout_from_plan
from p2ptrain.train.pipeline._step import TIMELINE_KEEP, OpClock, PipelineStep, StageSetup
from p2ptrain.zoo import Workload

# Stage, even_split and layout_from_plan are re-exported: callers import them from here.
__all__ = ["PipelineTrainer", "Stage", "even_split", "layout_from_plan"]

logger = logging.getLogger(__name__)

# Gradient bytes per group all-reduce bucket. Each bucket costs 2 (g - 1) message hops
# on every member, and on a slow CPU a hop costs ~10 ms (measured on 1/8-core devices):
# with 256 KiB buckets tinygpt's 0.9 MB of gradients took 0.47 s to sum over four such
# devices. At 1 MiB small models are one bucket (the planner's cost model charges one);
# larger ones still overlap their backward.
GROUP_BUCKET_BYTES = 1 << 20

_Closing = asyncio.Future[tuple[float, list[float]]]


class PipelineTrainer:
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
    ) -> None:
        self.node, self.w, self.job = node, workload, job
        self.view = view or node.view
        if node.view.epoch != self.view.epoch:
            raise PeerFailedError(f"the ring moved from view {self.view.epoch} to {node.view.epoch} before training started")
        if global_batch % micro_batches:
            raise ConfigError(f"global batch {global_batch} does not split into {micro_batches} micro-batches")
        self.mb = global_batch // micro_batches
        layers = workload.layers()
        self.layout = check_layout(stages, self.view.members, self.mb, len(layers))
        if workload.criterion is None:
            raise JobError("the pipeline strategy needs a Workload with `criterion` (the last stage applies it)")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.n_stages = len(self.layout)
        self.seat = Seat.of(self.layout, node.node_id)
        self.stage_index = None if self.seat is None else self.seat.stage_index
        self.rank = self.view.rank(node.node_id)
        self.global_batch, self.micro, self.steps, self.seed, self.lr = global_batch, micro_batches, steps, seed, lr
        self.codec, self.on_step = codec, on_step
        self.coll = Collectives(node, view=self.view, name=job)
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        self.stage: nn.Module = nn.Sequential()
        self.ops: list[Op] = []
        self.group: Collectives | None = None
        self.grads: GradBuckets | None = None
        if self.seat is not None:
            st = self.layout[self.seat.stage_index]
            self.stage = nn.Sequential(*layers[st.first_layer : st.last_layer + 1])
            self.ops = SCHEDULES[schedule](self.seat.stage_index, self.n_stages, micro_batches)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        if self.seat is not None and len(self.layout[self.seat.stage_index].members) > 1:
            # A data-parallel group: its own ring for the gradient sum, bucketed.
            group = View.of(self.view.epoch, (m for m, _ in self.layout[self.seat.stage_index].members))
            self.group = Collectives(node, view=group, name=f"{job}/pp.stage{self.seat.stage_index}")
            self.grads = GradBuckets(self.params, GROUP_BUCKET_BYTES)
        self.opt: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"p2ptrain-stage{self.stage_index}")
        self.clock = OpClock()
        self._setup: StageSetup | None = None
        if self.seat is not None:
            self._setup = StageSetup(
                node=node, epoch=self.view.epoch, digest=f"{self.view.digest}/{job}", seat=self.seat, ops=self.ops,
                module=self.stage, workload=workload, sampler=self.sampler, micro_batches=micro_batches, codec=codec,
                group=self.group, grads=self.grads, pool=self._pool, clock=self.clock,
            )
        self.last_busy: list[float] = []  # every view member's busy fraction in the last step
        # Seconds spent per phase of a step, summed over steps (where the time goes).
        self.phase_s = {"schedule": 0.0, "sync": 0.0, "optimizer": 0.0}
        self.phase_log: list[dict[str, float]] = []  # the same, per recent step
        self.timelines: list[list[tuple[int, int, float, float]]] = []  # every view member's, after run()

    @property
    def busy_s(self) -> float:
        """Seconds the compute thread has spent in forwards, backwards and optimizer steps."""
        return self.clock.busy_s

    @property
    def timeline(self) -> list[tuple[int, int, float, float]]:
        """This member's recent ops ``(kind, micro, start, end)`` for the picture (see :class:`OpClock`)."""
        return self.clock.ops

    async def run(self) -> TrainResult:
        """Train for ``steps`` steps; the digest covers this member's stage only.

        Raises:
            PeerFailedError: a member failed or the view changed.
        """
        res = TrainResult()
        loop = asyncio.get_running_loop()
        if self.opt is None and self.params:
            self.opt = await loop.run_in_executor(self._pool, self.w.make_optimizer, self.params, self.lr)
        pending: tuple[int, float, float, _Closing] | None = None
        try:
            for step in range(self.steps):
                t0, busy0 = time.perf_counter(), self.busy_s
                closing = await self.step(step)
                previous, pending = pending, (step, time.perf_counter() - t0, self.busy_s - busy0, closing)
                if previous is not None:
                    await self._report(res, *previous)
            if pending is not None:
                await self._report(res, *pending)
                pending = None
            res.digest = param_digest(self.stage)
            self.timelines = await self.gather_timelines()
        finally:
            if pending is not None:
                pending[3].cancel()
            await loop.run_in_executor(None, self._pool.shutdown)
        return res

    async def step(self, step: int) -> _Closing:
        """Run one training step's work here, up to and including the optimizer step.

        Returns:
            A future of the step's closing sum: (global-batch mean loss, every view
            member's busy fraction). The sum runs in the background, off the next
            step's critical path; :meth:`run` awaits it one step later.

        Raises:
            PeerFailedError: a member failed or the view changed.
        """
        t_start, busy0 = time.perf_counter(), self.busy_s
        phase = {k: 0.0 for k in self.phase_s}
        self.phase_log.append(phase)
        del self.phase_log[:-TIMELINE_KEEP]
        loss_sum = 0.0
        if self._setup is not None:
            t0 = time.perf_counter()
            async with PipelineStep(self._setup, step) as work:
                loss_sum = await work.compute()
                t1 = time.perf_counter()
                await work.fence()
            t2 = time.perf_counter()
            await self._optimize()
            phase.update(schedule=t1 - t0, sync=t2 - t1, optimizer=time.perf_counter() - t2)
        for k, v in phase.items():
            self.phase_s[k] += v
        # One small sum gives every member the loss and every member's busy fraction.
        sums = torch.zeros(1 + len(self.view), dtype=torch.float64)
        sums[0] = loss_sum
        sums[1 + self.rank] = (self.busy_s - busy0) / max(time.perf_counter() - t_start, 1e-9)
        return asyncio.ensure_future(self._close(sums))

    async def _close(self, sums: torch.Tensor) -> tuple[float, list[float]]:
        await self.coll.all_reduce(sums, op="sum")
        return float(sums[0]), [round(v, 4) for v in sums[1:].tolist()]

    async def _optimize(self) -> None:
        """The optimizer step, on the compute thread and on its timeline."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.clock.timed, "opt", -1, self._apply)

    def _apply(self) -> None:
        """The optimizer step on the summed gradients (compute thread)."""
        if self.opt is None:  # a stage without trainable parameters (e.g. a lone activation)
            return
        if self.grads is not None:
            self.grads.unpack()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    async def gather_timelines(self) -> list[list[tuple[int, int, float, float]]]:
        """Every view member's recent ops (kind, micro, start, end), in ring order; a collective."""
        mine = torch.tensor(self.timeline or [(2, -1, 0.0, 0.0)], dtype=torch.float64)
        rows = await self.coll.all_gather(mine)
        return [[(int(k), int(m), a, b) for k, m, a, b in r.tolist() if b > 0] for r in rows]

    async def _report(self, res: TrainResult, step: int, dt: float, busy: float, closing: _Closing) -> None:
        loss, self.last_busy = await closing
        res.losses.append(loss)
        res.steps = step + 1
        if self.on_step is not None:
            self.on_step(StepMetrics(step, loss, self.global_batch / dt, dt, busy, dt - busy, self.n_stages,
                                     self.view.epoch, self.last_busy))

