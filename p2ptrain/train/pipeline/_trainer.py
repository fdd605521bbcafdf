"""Pipeline-parallel training, with data-parallel groups inside stages (hybrid).

A layout is a list of :class:`Stage`: each holds a contiguous run of layers and the
members that run it, each with a fixed share of every micro-batch's samples (one
member with the whole micro-batch is a plain pipeline stage; several members are a
data-parallel group inside the stage, the hybrid of Asteroid-style edge training).
Each global batch is cut into ``micro_batches`` equal micro-batches; a schedule (GPipe
or 1F1B, see :mod:`p2ptrain.plan._schedule`) orders each stage's forward and backward ops.

Messages follow the samples: a member sends the rows of its output to the members of
the next stage whose share overlaps them, and the rows of its input-gradient back the
same way, through the job's codec, as soon as they exist. The first stage reads the
inputs and sends each micro-batch's targets straight to the members of the last stage,
which alone compute the loss.

One thread per member walks the schedule and runs torch; it blocks only on the
inbound pieces it needs next. The event loop receives them ahead of time and sends
what the thread hands it, so transfers overlap compute and an op whose input is
already here costs no thread hand-off.

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
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from p2ptrain.train._buckets import GradBuckets
from p2ptrain.ring import Collectives, send_or_fail
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._dataparallel import StepMetrics, TrainResult, param_digest
from p2ptrain._errors import ConfigError, JobError, PeerFailedError
from p2ptrain.ring import Node
from p2ptrain.plan import SCHEDULES
from p2ptrain.ring import View
from p2ptrain.zoo import Workload

__all__ = ["PipelineTrainer", "Stage", "even_split", "layout_from_plan"]

logger = logging.getLogger(__name__)

_ACT, _GRAD, _LBL = "pp.act", "pp.grad", "pp.lbl"
_KIND_CODE = {"fwd": 0, "bwd": 1, "opt": 2}
# Ops kept for the timeline picture: the last few steps are what a person checks.
_TIMELINE_KEEP = 400
# The compute thread never waits longer than this for one inbound piece; a live peer
# sends within a step, a dead one is reported by the view change long before.
_PIECE_TIMEOUT_S = 600.0
# Gradient bytes per group all-reduce bucket. Each bucket costs 2 (g - 1) message hops
# on every member, and on a slow CPU a hop costs ~10 ms (measured on 1/8-core devices):
# with 256 KiB buckets tinygpt's 0.9 MB of gradients took 0.47 s to sum over four such
# devices. At 1 MiB small models are one bucket (the planner's cost model charges one);
# larger ones still overlap their backward.
GROUP_BUCKET_BYTES = 1 << 20


@dataclass(frozen=True)
class Stage:
    """One stage of a layout: layers ``first_layer..last_layer`` on ``members``.

    Attributes:
        first_layer: index of the stage's first layer.
        last_layer: index of its last layer (inclusive).
        members: ``(node_id, samples)`` pairs: each member runs that many samples of
            every micro-batch, in this order (the first takes the first rows).
    """

    first_layer: int
    last_layer: int
    members: tuple[tuple[str, int], ...]

    def slices(self) -> list[tuple[str, int, int]]:
        """``(node_id, lo, hi)``: the rows of each micro-batch each member runs."""
        out, lo = [], 0
        for node_id, n in self.members:
            out.append((node_id, lo, lo + n))
            lo += n
        return out


def even_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) layer ranges, as even as possible, earlier stages larger."""
    if stages > n_layers:
        raise ConfigError(f"{stages} stages but the model has only {n_layers} layers")
    base, extra = divmod(n_layers, stages)
    out, a = [], 0
    for k in range(stages):
        b = a + base + (1 if k < extra else 0)
        out.append((a, b - 1))
        a = b
    return out


def layout_from_plan(plan: Any) -> list[Stage]:
    """The layout of a :class:`~p2ptrain.plan._planner.Plan`."""
    return [Stage(st.first_layer, st.last_layer, tuple(zip(st.node_ids, st.shares))) for st in plan.stages]


def _overlaps(slices: Sequence[tuple[str, int, int]], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """The parts of rows ``lo..hi`` held by each of ``slices``: ``(node_id, a, b)``, in row order."""
    return [(peer, max(lo, a), min(hi, b)) for peer, a, b in slices if max(lo, a) < min(hi, b)]


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
        self.layout = self._layout(stages)
        layers = workload.layers()
        covered = [i for st in self.layout for i in range(st.first_layer, st.last_layer + 1)]
        if covered != list(range(len(layers))):
            ranges = [(st.first_layer, st.last_layer) for st in self.layout]
            raise ConfigError(f"stages {ranges} must cover layers 0..{len(layers) - 1} contiguously, in order")
        if workload.criterion is None:
            raise JobError("the pipeline strategy needs a Workload with `criterion` (the last stage applies it)")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.n_stages = len(self.layout)
        self.stage_index = next((k for k, st in enumerate(self.layout) if any(m == node.node_id for m, _ in st.members)), None)
        self.rank = self.view.rank(node.node_id)
        self.global_batch, self.micro, self.steps, self.seed, self.lr = global_batch, micro_batches, steps, seed, lr
        self.codec, self.on_step = codec, on_step
        self.coll = Collectives(node, view=self.view, name=job)
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        self.stage: nn.Module = nn.Sequential()
        self.group: Collectives | None = None
        if self.stage_index is not None:
            st = self.layout[self.stage_index]
            self.first_layer, self.last_layer = st.first_layer, st.last_layer
            self.stage = nn.Sequential(*layers[st.first_layer : st.last_layer + 1])
            self.lo, self.hi = next((a, b) for m, a, b in st.slices() if m == node.node_id)
            self.is_first, self.is_last = self.stage_index == 0, self.stage_index == self.n_stages - 1
            self.ops = SCHEDULES[schedule](self.stage_index, self.n_stages, micro_batches)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.grads: GradBuckets | None = None
        if self.stage_index is not None and len(self.layout[self.stage_index].members) > 1:
            # A data-parallel group: its own ring for the gradient sum, bucketed.
            group = View.of(self.view.epoch, (m for m, _ in self.layout[self.stage_index].members))
            self.group = Collectives(node, view=group, name=f"{job}/pp.stage{self.stage_index}")
            self.grads = GradBuckets(self.params, GROUP_BUCKET_BYTES)
        self.opt: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"p2ptrain-stage{self.stage_index}")
        self._stop = threading.Event()
        self.busy_s = 0.0
        self.last_busy: list[float] = []  # every view member's busy fraction in the last step
        # Seconds spent per phase of a step, summed over steps (where the time goes).
        self.phase_s = {"schedule": 0.0, "sync": 0.0, "optimizer": 0.0}
        self.phase_log: list[dict[str, float]] = []  # the same, per recent step
        self.timeline: list[tuple[int, int, float, float]] = []  # (kind, micro, start, end) for the picture
        self.timelines: list[list[tuple[int, int, float, float]]] = []  # every view member's, after run()

    def _layout(self, stages: Sequence[Stage] | Sequence[tuple[int, int]]) -> list[Stage]:
        members = self.view.members
        if all(isinstance(s, tuple) for s in stages):
            if len(stages) != len(members):
                raise ConfigError(f"{len(stages)} stage ranges for a ring of {len(members)} members")
            return [Stage(a, b, ((m, self.mb),)) for (a, b), m in zip(stages, members)]  # type: ignore[misc]
        layout = [s for s in stages if isinstance(s, Stage)]
        if len(layout) != len(stages) or not layout:
            raise ConfigError("stages must be all Stage objects or all (first, last) ranges, and not empty")
        seen: list[str] = []
        for st in layout:
            if not st.members or sum(n for _, n in st.members) != self.mb or any(n < 1 for _, n in st.members):
                raise ConfigError(f"stage {st.first_layer}-{st.last_layer}: shares {list(st.members)} must be >= 1 "
                                  f"and sum to the micro-batch size {self.mb}")
            seen += [m for m, _ in st.members]
        if len(set(seen)) != len(seen) or not set(seen) <= set(members):
            raise ConfigError(f"layout members {seen} must be distinct members of the view {list(members)}")
        return layout

    # --- one step ----------------------------------------------------------------------------

    def _inbound(self) -> dict[tuple[str, int, int], tuple[str, int, int]]:
        """Every piece this member receives in a step: (kind, micro, first row) -> (peer, a, b)."""
        if self.stage_index is None:
            return {}
        lo, hi, s = self.lo, self.hi, self.stage_index
        want: dict[tuple[str, int, int], tuple[str, int, int]] = {}
        for m in range(self.micro):
            if not self.is_first:
                for peer, a, b in _overlaps(self.layout[s - 1].slices(), lo, hi):
                    want[(_ACT, m, a)] = (peer, a, b)
                if self.is_last:
                    for peer, a, b in _overlaps(self.layout[0].slices(), lo, hi):
                        want[(_LBL, m, a)] = (peer, a, b)
            if not self.is_last:
                for peer, a, b in _overlaps(self.layout[s + 1].slices(), lo, hi):
                    want[(_GRAD, m, a)] = (peer, a, b)
        return want

    async def _fetch(self, kind: str, tag: list[Any], fut: concurrent.futures.Future[Any]) -> None:
        try:
            msg = await self.node.take(kind, tag, epoch=self.view.epoch)
        except BaseException as exc:  # the thread sees it; nobody awaits this task
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else PeerFailedError("step cancelled"))
            return
        if not fut.done():
            fut.set_result(msg.tensors[0])

    async def step(self, step: int) -> asyncio.Future[tuple[float, list[float]]]:
        """Run one training step's work here.

        Returns a future of the step's closing sum: (global-batch mean loss, every view
        member's busy fraction). The sum runs in the background, off the next step's
        critical path; :meth:`run` awaits it one step later.
        """
        loop = asyncio.get_running_loop()
        t_start, busy0 = time.perf_counter(), self.busy_s
        # The view digest keeps two rings that share an epoch number apart; the job name
        # keeps two runs in one view apart.
        digest = f"{self.view.digest}/{self.job}"
        inbound: dict[tuple[str, int, int], concurrent.futures.Future[Any]] = {}
        fetchers = []
        for key in self._inbound():
            inbound[key] = concurrent.futures.Future()
            kind, m, a = key
            fetchers.append(asyncio.ensure_future(self._fetch(kind, [digest, step, m, a], inbound[key])))
        sends: list[asyncio.Future[None]] = []
        reductions: list[asyncio.Future[torch.Tensor]] = []

        def failed(f: asyncio.Future[Any]) -> None:
            # A send (or a group sum) that fails stops this member's thread at once
            # rather than leaving it waiting for pieces that can no longer come.
            if not f.cancelled() and f.exception() is not None:
                self._stop.set()
                for pending in inbound.values():
                    if not pending.done():
                        pending.set_exception(f.exception())  # type: ignore[arg-type]

        def start_send(peer: str, kind: str, m: int, a: int, t: torch.Tensor) -> None:
            if self._stop.is_set():
                return
            f = asyncio.ensure_future(send_or_fail(
                self.node, peer, kind, epoch=self.view.epoch, tag=[digest, step, m, a], tensors=[t],
                codec=self.codec if kind != _LBL else "none"))
            f.add_done_callback(failed)
            sends.append(f)

        def post(peer: str, kind: str, m: int, a: int, t: torch.Tensor) -> None:  # from the compute thread
            loop.call_soon_threadsafe(start_send, peer, kind, m, a, t)

        def start_reduce(b: int) -> None:
            assert self.group is not None and self.grads is not None
            if self._stop.is_set():
                return
            f = asyncio.ensure_future(
                self.group.all_reduce(self.grads.flat[b], op="sum", codec=self.codec, key=("pp.grad", b)))
            f.add_done_callback(failed)
            reductions.append(f)

        def reduce(b: int) -> None:  # compute thread: a gradient bucket is final, sum it over the group
            loop.call_soon_threadsafe(start_reduce, b)

        loss_sum = 0.0
        phase = {k: 0.0 for k in self.phase_s}
        self.phase_log.append(phase)
        del self.phase_log[: -_TIMELINE_KEEP]
        try:
            t = time.perf_counter()
            if self.stage_index is not None:
                loss_sum = await loop.run_in_executor(self._pool, self._run_ops, step, inbound, post, reduce)
            # The thread's last call_soon_threadsafe sends and bucket launches have run.
            await asyncio.sleep(0)
            await asyncio.gather(*sends)
            t, phase["schedule"] = time.perf_counter(), phase["schedule"] + time.perf_counter() - t
            await asyncio.gather(*reductions)
            t, phase["sync"] = time.perf_counter(), phase["sync"] + time.perf_counter() - t
            if self.stage_index is not None:
                await self._compute(self._apply, "opt", -1)
            phase["optimizer"] += time.perf_counter() - t
        except BaseException:
            self._stop.set()  # a thread blocked on a piece gives up
            for f in [*fetchers, *sends, *reductions]:
                f.cancel()
            raise
        for k, v in phase.items():
            self.phase_s[k] += v
        # One small sum gives every member the loss and every member's busy fraction.
        sums = torch.zeros(1 + len(self.view), dtype=torch.float64)
        sums[0] = loss_sum
        sums[1 + self.rank] = (self.busy_s - busy0) / max(time.perf_counter() - t_start, 1e-9)

        async def close() -> tuple[float, list[float]]:
            await self.coll.all_reduce(sums, op="sum")
            return float(sums[0]), [round(v, 4) for v in sums[1:].tolist()]

        return asyncio.ensure_future(close())

    def _wait(self, fut: concurrent.futures.Future[Any]) -> torch.Tensor:
        deadline = time.monotonic() + _PIECE_TIMEOUT_S
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    raise PeerFailedError("the step was abandoned") from None
                if time.monotonic() > deadline:
                    raise PeerFailedError(f"no activation or gradient piece within {_PIECE_TIMEOUT_S:.0f}s") from None

    def _gather(self, inbound: dict[tuple[str, int, int], concurrent.futures.Future[Any]], kind: str, m: int,
                slices: Sequence[tuple[str, int, int]]) -> torch.Tensor:
        parts = [self._wait(inbound[(kind, m, a)]) for _, a, _ in _overlaps(slices, self.lo, self.hi)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _timed(self, kind: str, m: int, fn: Callable[[], Any]) -> Any:
        # Wall-clock stamps: the stages' timelines are drawn on one axis (same machine in
        # the demo; across devices they are as aligned as the devices' clocks).
        t0 = time.time()
        out = fn()
        t1 = time.time()
        self.busy_s += t1 - t0
        self.timeline.append((_KIND_CODE[kind], m, t0, t1))
        del self.timeline[: -_TIMELINE_KEEP]
        return out

    def _run_ops(self, step: int, inbound: dict[tuple[str, int, int], concurrent.futures.Future[Any]],
                 post: Callable[[str, str, int, int, torch.Tensor], None], reduce: Callable[[int], None]) -> float:
        """Walk this stage's schedule on the compute thread; returns this member's loss share.

        In a group, each gradient bucket goes to ``reduce`` as soon as the last
        micro-batch's backward has finished it, overlapping the rest of the backward.
        """
        if self.grads is None:
            return self._walk(step, inbound, post)
        self.grads.attach(self.micro, reduce)
        try:
            loss = self._walk(step, inbound, post)
        except BaseException:
            self.grads.detach()
            raise
        self.grads.finish()
        return loss

    def _walk(self, step: int, inbound: dict[tuple[str, int, int], concurrent.futures.Future[Any]],
              post: Callable[[str, str, int, int, torch.Tensor], None]) -> float:
        s, lo, hi = self.stage_index, self.lo, self.hi
        assert s is not None
        prev = self.layout[s - 1].slices() if not self.is_first else []
        nxt = self.layout[s + 1].slices() if not self.is_last else []
        first_slices = self.layout[0].slices()
        scale = (hi - lo) / self.mb / self.micro
        idx = self.sampler.indices(step)
        batches: dict[int, tuple[Any, Any]] = {}
        if self.is_first:
            for m in range(self.micro):
                batches[m] = self.w.split(self.w.batch(idx[m * self.mb + lo : m * self.mb + hi]))
                if not self.is_last:
                    y = batches[m][1]
                    for peer, a, b in _overlaps(self.layout[-1].slices(), lo, hi):
                        post(peer, _LBL, m, a, y[a - lo : b - lo])
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        loss_sum = 0.0
        for op in self.ops:
            m = op.micro
            if op.kind == "fwd":
                if self.is_first:
                    x, y = batches.pop(m)
                else:
                    x = self._gather(inbound, _ACT, m, prev).requires_grad_(True)
                    y = self._gather(inbound, _LBL, m, first_slices) if self.is_last else None

                def fwd(x: torch.Tensor = x, y: Any = y) -> torch.Tensor:
                    out = self.stage(x)
                    return self.w.criterion(out, y) * scale if self.is_last else out  # type: ignore[misc]

                inputs[m] = x
                outputs[m] = out = self._timed("fwd", m, fwd)
                if self.is_last:
                    loss_sum += float(out.detach())
                else:
                    for peer, a, b in _overlaps(nxt, lo, hi):
                        post(peer, _ACT, m, a, out[a - lo : b - lo].detach())
            else:
                grad = None if self.is_last else self._gather(inbound, _GRAD, m, nxt)

                def bwd(m: int = m, grad: torch.Tensor | None = grad) -> torch.Tensor | None:
                    outputs.pop(m).backward(grad)
                    x = inputs.pop(m)
                    return None if self.is_first else x.grad

                gx = self._timed("bwd", m, bwd)
                if gx is not None:
                    for peer, a, b in _overlaps(prev, lo, hi):
                        post(peer, _GRAD, m, a, gx[a - lo : b - lo])
        return loss_sum

    async def _compute(self, fn: Callable[[], Any], label: str, micro: int) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, label, micro, fn)

    def _apply(self) -> None:
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

    async def run(self) -> TrainResult:
        """Train for ``steps`` steps; the digest covers this member's stage only."""
        res = TrainResult()
        loop = asyncio.get_running_loop()
        if self.opt is None and self.params:
            self.opt = await loop.run_in_executor(self._pool, self.w.make_optimizer, self.params, self.lr)
        pending: tuple[int, float, float, asyncio.Future[tuple[float, list[float]]]] | None = None
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
            self._stop.set()
            await loop.run_in_executor(None, self._pool.shutdown)
        return res

    async def _report(self, res: TrainResult, step: int, dt: float, busy: float,
                      closing: asyncio.Future[tuple[float, list[float]]]) -> None:
        loss, self.last_busy = await closing
        res.losses.append(loss)
        res.steps = step + 1
        if self.on_step is not None:
            self.on_step(StepMetrics(step, loss, self.global_batch / dt, dt, busy, dt - busy, self.n_stages,
                                     self.view.epoch, self.last_busy))
