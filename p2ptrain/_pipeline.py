"""Pipeline-parallel training: each member holds a contiguous run of layers.

Member ``k`` of the view's ring order runs stage ``k``. Each global batch is cut into
``micro_batches`` equal micro-batches; a schedule (GPipe or 1F1B, see
:mod:`p2ptrain._schedule`) orders each stage's forward and backward ops. Activations
go to the successor and activation-gradients to the predecessor as soon as they exist
(through a codec); compute runs on the stage's own thread while the event loop moves
bytes, so transfer overlaps compute. The first stage reads the inputs and sends each
micro-batch's targets straight to the last stage, which alone computes the loss.

Every micro-batch loss is scaled by ``1 / micro_batches``, so the accumulated gradient
equals the gradient of the mean loss over the global batch — the same step one device
takes on the whole batch (checked by the transparency test).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from p2ptrain._collectives import Collectives, send_or_fail
from p2ptrain._data import GlobalSampler
from p2ptrain._dataparallel import StepMetrics, TrainResult, param_digest
from p2ptrain._errors import ConfigError, JobError
from p2ptrain._node import Node
from p2ptrain._schedule import SCHEDULES
from p2ptrain._zoo import Workload

__all__ = ["PipelineTrainer", "even_split"]

logger = logging.getLogger(__name__)

_ACT, _GRAD, _LBL = "pp.act", "pp.grad", "pp.lbl"
_KIND_CODE = {"fwd": 0, "bwd": 1, "opt": 2}
# Ops kept for the timeline picture: the last few steps are what a person checks.
_TIMELINE_KEEP = 400


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


class PipelineTrainer:
    """Train ``workload`` split into stages over the members of ``node``'s view.

    Args:
        node: a started node; its view's ring order is the stage order.
        workload: built identically on every member; needs ``criterion`` and an
            ``nn.Sequential`` model.
        stages: (first, last) layer range of each stage, one per member in ring order.
        global_batch: samples per step.
        micro_batches: micro-batches per step (divides ``global_batch``).
        steps, seed, lr: as for data parallelism.
        schedule: ``"gpipe"`` or ``"1f1b"``.
        codec: codec for activations and activation-gradients.
        on_step: called with each step's metrics.
    """

    def __init__(
        self,
        node: Node,
        workload: Workload,
        *,
        stages: Sequence[tuple[int, int]],
        global_batch: int,
        micro_batches: int,
        steps: int,
        seed: int = 0,
        lr: float = 1e-3,
        schedule: str = "1f1b",
        codec: str = "none",
        on_step: Callable[[StepMetrics], Any] | None = None,
    ) -> None:
        self.node, self.w = node, workload
        self.view = node.view
        self.rank = self.view.rank(node.node_id)
        self.n_stages = len(self.view)
        if len(stages) != self.n_stages:
            raise ConfigError(f"{len(stages)} stage ranges for a ring of {self.n_stages} members")
        layers = workload.layers()
        covered = [i for a, b in stages for i in range(a, b + 1)]
        if covered != list(range(len(layers))):
            raise ConfigError(f"stages {list(stages)} must cover layers 0..{len(layers) - 1} contiguously, in order")
        if workload.criterion is None:
            raise JobError("the pipeline strategy needs a Workload with `criterion` (the last stage applies it)")
        if global_batch % micro_batches:
            raise ConfigError(f"global batch {global_batch} does not split into {micro_batches} micro-batches")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        a, b = stages[self.rank]
        self.first_layer, self.last_layer = a, b
        self.stage = nn.Sequential(*layers[a : b + 1])
        self.is_first, self.is_last = self.rank == 0, self.rank == self.n_stages - 1
        self.prev = self.view.members[self.rank - 1] if not self.is_first else None
        self.next = self.view.members[self.rank + 1] if not self.is_last else None
        self.last_member = self.view.members[-1]
        self.global_batch, self.micro, self.steps, self.seed, self.lr = global_batch, micro_batches, steps, seed, lr
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        self.ops = SCHEDULES[schedule](self.rank, self.n_stages, micro_batches)
        self.codec, self.on_step = codec, on_step
        self.coll = Collectives(node, view=self.view)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.opt: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"p2ptrain-stage{self.rank}")
        self.busy_s = 0.0
        self.timeline: list[tuple[int, int, float, float]] = []  # (kind, micro, start, end) for the picture
        self.timelines: list[list[tuple[int, int, float, float]]] = []  # all stages', after run()

    async def _compute(self, fn: Callable[[], Any], label: str, micro: int) -> Any:
        # Wall-clock stamps: the stages' timelines are drawn on one axis (same machine in
        # the demo; across devices they are as aligned as the devices' clocks).
        t0 = time.time()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        t1 = time.time()
        self.busy_s += t1 - t0
        self.timeline.append((_KIND_CODE[label], micro, t0, t1))
        del self.timeline[: -_TIMELINE_KEEP]
        return out

    async def gather_timelines(self) -> list[list[tuple[int, int, float, float]]]:
        """Every stage's recent ops (kind, micro, start, end), in stage order; a collective."""
        mine = torch.tensor(self.timeline or [(2, -1, 0.0, 0.0)], dtype=torch.float64)
        rows = await self.coll.all_gather(mine)
        return [[(int(k), int(m), a, b) for k, m, a, b in r.tolist() if b > 0] for r in rows]

    async def step(self, step: int) -> float:
        """One pipelined training step; returns the global-batch mean loss (on every member)."""
        idx = self.sampler.indices(step)
        mb = self.global_batch // self.micro
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        targets: dict[int, Any] = {}
        losses: list[float] = []
        sends: list[asyncio.Task[None]] = []
        digest = self.view.digest  # keeps two rings that share an epoch number apart

        def tag(m: int) -> list[Any]:
            return [digest, step, m]

        def send(peer: str, kind: str, m: int, t: torch.Tensor) -> None:
            sends.append(asyncio.ensure_future(send_or_fail(
                self.node, peer, kind, epoch=self.view.epoch, tag=tag(m), tensors=[t],
                codec=self.codec if kind != _LBL else "none")))

        if self.is_first:
            batches = [self.w.split(self.w.batch(idx[m * mb : (m + 1) * mb])) for m in range(self.micro)]
            for m, (_, y) in enumerate(batches):
                if self.is_last:
                    targets[m] = y
                else:
                    send(self.last_member, _LBL, m, y)
        for op in self.ops:
            m = op.micro
            if op.kind == "fwd":
                if self.is_first:
                    x = batches[m][0]
                else:
                    msg = await self.node.take(_ACT, tag(m), epoch=self.view.epoch)
                    x = msg.tensors[0].requires_grad_(True)
                if self.is_last and not self.is_first:
                    msg = await self.node.take(_LBL, tag(m), epoch=self.view.epoch)
                    targets[m] = msg.tensors[0]
                inputs[m] = x

                def fwd(x: torch.Tensor = x, m: int = m) -> torch.Tensor:
                    out = self.stage(x)
                    if self.is_last:
                        loss = self.w.criterion(out, targets.pop(m)) / self.micro  # type: ignore[misc]
                        losses.append(float(loss.detach()) * self.micro)
                        return loss
                    return out

                outputs[m] = await self._compute(fwd, "fwd", m)
                if not self.is_last:
                    send(self.next, _ACT, m, outputs[m].detach())  # type: ignore[arg-type]
            else:
                grad = None
                if not self.is_last:
                    msg = await self.node.take(_GRAD, tag(m), epoch=self.view.epoch)
                    grad = msg.tensors[0]

                def bwd(m: int = m, grad: torch.Tensor | None = grad) -> torch.Tensor | None:
                    out = outputs.pop(m)
                    out.backward(grad)
                    x = inputs.pop(m)
                    return None if self.is_first else x.grad

                gx = await self._compute(bwd, "bwd", m)
                if not self.is_first:
                    send(self.prev, _GRAD, m, gx)  # type: ignore[arg-type]
        await asyncio.gather(*sends)
        await self._compute(self._apply, "opt", -1)
        loss_t = torch.tensor([sum(losses) / self.micro if self.is_last else 0.0], dtype=torch.float64)
        await self.coll.broadcast(loss_t, self.last_member)
        return float(loss_t[0])

    def _apply(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    async def run(self) -> TrainResult:
        """Train for ``steps`` steps; the digest covers this member's stage only."""
        res = TrainResult()
        loop = asyncio.get_running_loop()
        if self.opt is None:
            self.opt = await loop.run_in_executor(self._pool, self.w.make_optimizer, self.params, self.lr)
        try:
            for step in range(self.steps):
                t0 = time.perf_counter()
                busy0 = self.busy_s
                loss = await self.step(step)
                dt = time.perf_counter() - t0
                res.losses.append(loss)
                res.steps = step + 1
                if self.on_step is not None:
                    busy = self.busy_s - busy0
                    self.on_step(StepMetrics(step, loss, self.global_batch / dt, dt, busy, dt - busy, self.n_stages, self.view.epoch))
            res.digest = param_digest(self.stage)
            self.timelines = await self.gather_timelines()
        finally:
            await loop.run_in_executor(None, self._pool.shutdown)
        return res
