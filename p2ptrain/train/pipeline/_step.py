"""One pipeline step of one member: receive, compute, send, then sum the group's gradients.

A :class:`PipelineStep` is made for every step on the event loop and used once::

    async with PipelineStep(setup, step) as work:   # receives start here
        loss = await work.compute()                 # the schedule, on the compute thread
        await work.fence()                          # the group's gradient sums

Two threads share it, each with its own methods:

- the event loop receives every inbound piece of the step ahead of time (one task per
  piece, started on entry) and sends what the compute thread hands it, so transfers
  overlap compute and an op whose input is already here costs no thread hand-off;
- the compute thread (:meth:`PipelineStep.walk`) runs the stage's schedule op by op
  and blocks only on the inbound pieces it needs next.

Failure is one path: a receive, send or group sum that fails, or an exception or
cancellation on the loop, abandons the step (:meth:`PipelineStep.abort`). Nothing new
is sent, every piece the thread may still wait on is failed with the error (so the
thread wakes at once instead of waiting for pieces that can no longer come), and the
tasks in flight are cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import nn

from p2ptrain._device import Placement
from p2ptrain._errors import PeerFailedError, ProtocolError
from p2ptrain.plan import Op
from p2ptrain.ring import Collectives, Node, send_or_fail
from p2ptrain.train._buckets import GradBuckets
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train.pipeline._layout import ACT, GRAD, LBL, Piece, Route, Seat
from p2ptrain.zoo import Workload

__all__ = ["PIECE_TIMEOUT_S", "TIMELINE_KEEP", "OpClock", "PipelineStep", "StageSetup"]

T = TypeVar("T")

# The compute thread never waits longer than this for one inbound piece; a live peer
# sends within a step, a dead one is reported by the view change long before.
PIECE_TIMEOUT_S = 600.0
# Ops kept for the timeline picture: the last few steps are what a person checks.
TIMELINE_KEEP = 400
_KIND_CODE = {"fwd": 0, "bwd": 1, "opt": 2}


class OpClock:
    """The compute thread's busy time and its recent ops, for the timeline picture.

    Attributes:
        busy_s: seconds spent in timed ops since the clock was made.
        compute_s: the part of ``busy_s`` spent in forwards and backwards (what the
            planner's compute term prices; the optimizer is priced apart).
        ops: the last :data:`TIMELINE_KEEP` ops as ``(kind code, micro, start, end)``,
            kind code 0 forward, 1 backward, 2 optimizer.
    """

    def __init__(self) -> None:
        self.busy_s = self.compute_s = 0.0
        self.ops: list[tuple[int, int, float, float]] = []

    def timed(self, kind: str, micro: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, recorded as one ``kind`` op of micro-batch ``micro`` (``-1`` for none)."""
        # Wall-clock stamps: the stages' timelines are drawn on one axis (same machine in
        # the demo; across devices they are as aligned as the devices' clocks).
        t0 = time.time()
        out = fn(*args)
        t1 = time.time()
        self.busy_s += t1 - t0
        if kind != "opt":
            self.compute_s += t1 - t0
        self.ops.append((_KIND_CODE[kind], micro, t0, t1))
        del self.ops[:-TIMELINE_KEEP]
        return out


@dataclass(frozen=True)
class StageSetup:
    """What every step of one member's stage needs; the trainer builds it once per run.

    Attributes:
        node: the member's node.
        epoch: the view epoch the job runs in.
        digest: the first element of every tag: ``"{view digest}/{job}"``. The view
            digest keeps two rings that share an epoch number apart; the job name keeps
            two runs in one view apart.
        seat: the member's place in the layout.
        ops: the stage's schedule.
        module: the stage's layers.
        workload: the job's workload (data, ``split``, ``criterion``).
        sampler: the global batch of every step.
        micro_batches: micro-batches per step.
        codec: codec for activations, activation-gradients and group gradient sums.
        group: collectives of the stage's data-parallel group, None for a lone member.
        grads: the group's gradient buckets, None for a lone member.
        pool: the member's one compute thread.
        clock: records the compute thread's ops.
        place: where ``module`` computes; what crosses the network is on the host.
    """

    node: Node
    epoch: int
    digest: str
    seat: Seat
    ops: Sequence[Op]
    module: nn.Module
    workload: Workload
    sampler: GlobalSampler
    micro_batches: int
    codec: str
    group: Collectives | None
    grads: GradBuckets | None
    pool: concurrent.futures.ThreadPoolExecutor
    clock: OpClock
    place: Placement


class PipelineStep:
    """Step ``step`` of one member's stage; make it on the event loop, use it once.

    Afterwards the stage's parameters hold this member's gradient of the step (in a
    group: the group's sum, in the flat buckets of ``setup.grads``), ready for the
    optimizer.

    Args:
        setup: the member's stage.
        step: the step number (it picks the global batch and goes in every tag).

    Raises:
        RuntimeError: made outside a running event loop.
    """

    def __init__(self, setup: StageSetup, step: int) -> None:
        self.setup, self.step = setup, step
        self._loop = asyncio.get_running_loop()
        # Set (loop thread) by one receive each, or failed all at once by _abandon.
        self._inbound: dict[Piece, concurrent.futures.Future[torch.Tensor]] = {}
        self._receives: list[asyncio.Task[None]] = []
        self._sends: list[asyncio.Future[None]] = []
        self._reductions: list[asyncio.Future[torch.Tensor]] = []
        self._walking: concurrent.futures.Future[float] | None = None
        # The error that abandoned the step. Written on the loop thread, read by the
        # compute thread between ops (one reference, so no lock).
        self._failure: Exception | None = None
        # The compute thread's own state: inputs read (first stage), and the inputs and
        # outputs kept from each forward for its backward.
        self._batches: dict[int, tuple[Any, Any]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    # --- loop thread -------------------------------------------------------------------------

    async def __aenter__(self) -> PipelineStep:
        self.start_receives()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort(exc)  # and the exception (a cancellation too) goes on

    def start_receives(self) -> None:
        """Start one receive task per inbound piece of the step (loop thread, once)."""
        for piece in self.setup.seat.inbound(self.setup.micro_batches):
            fut: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
            self._inbound[piece] = fut
            self._receives.append(asyncio.ensure_future(self._receive(piece, fut)))

    async def compute(self) -> float:
        """Walk the schedule on the compute thread; return once every send is delivered.

        Returns:
            This member's share of the step's loss sum (0 off the last stage).

        Raises:
            PeerFailedError: a peer failed, the view changed, or a piece did not come
                within :data:`PIECE_TIMEOUT_S`.
        """
        self._walking = self.setup.pool.submit(self.walk)
        loss = await asyncio.wrap_future(self._walking)
        # The thread queued its last sends and bucket launches before its result, so they
        # have run; one more turn of the loop costs nothing and makes sure.
        await asyncio.sleep(0)
        await asyncio.gather(*self._sends)
        return loss

    async def fence(self) -> None:
        """Wait for the group's gradient sums (all started by the end of :meth:`compute`).

        Raises:
            PeerFailedError: a group member failed.
        """
        await asyncio.gather(*self._reductions)

    def abort(self, exc: BaseException | None = None) -> None:
        """Abandon the step (loop thread): send nothing more, wake the thread, cancel the rest.

        Args:
            exc: why; the compute thread raises it at its next wait or op (a
                :class:`PeerFailedError` instead when it is not an ``Exception``, e.g. a
                cancellation).
        """
        self._abandon(exc if isinstance(exc, Exception) else PeerFailedError("the step was abandoned"))
        if self._walking is not None:
            # Only stops a walk that has not started; a running one stops at its next wait
            # or op, on the failure set above.
            self._walking.cancel()
        for task in self._receives:
            task.cancel()
        for send in self._sends:
            send.cancel()
        for reduction in self._reductions:
            reduction.cancel()

    def fail(self, error: Exception) -> None:
        """Abandon the step from outside while :meth:`compute` runs: it raises ``error``.

        Unlike :meth:`abort`, nothing :meth:`compute` awaits is cancelled (a walk still
        queued for the compute thread, cancelled, raised CancelledError out of the trainer
        and ended the job): the walk raises ``error`` at its next wait or op, and the
        step's exit aborts the rest.
        """
        self._abandon(error)
        for task in self._receives:
            task.cancel()

    def _abandon(self, error: Exception) -> None:
        """Record the step's first failure and fail every piece not yet received with it."""
        if self._failure is None:
            self._failure = error
        for fut in self._inbound.values():
            if not fut.done():
                fut.set_exception(error)

    async def _receive(self, piece: Piece, fut: concurrent.futures.Future[torch.Tensor]) -> None:
        """Take ``piece`` off the mailbox and hand it to the compute thread through ``fut``."""
        try:
            msg = await self.setup.node.take(piece.kind, self._tag(piece.micro, piece.row), epoch=self.setup.epoch,
                                            sender=piece.peer or None)
        except asyncio.CancelledError:
            self._abandon(PeerFailedError("the step was abandoned"))
            raise
        except Exception as exc:
            # The compute thread is the one that needs the piece: it raises exc. The
            # step cannot finish without the piece, so it is abandoned now.
            self._abandon(exc)
            return
        if len(msg.tensors) != 1:  # a peer's malformed piece: the step cannot go on, say so now
            self._abandon(ProtocolError(f"{piece.kind} piece {piece.micro}/{piece.row} of step {self.step} from "
                                        f"{msg.sender} carries {len(msg.tensors)} tensors, not 1"))
            return
        if not fut.done():  # else the step was abandoned meanwhile
            fut.set_result(msg.tensors[0])

    def _start_send(self, route: Route, kind: str, micro: int, rows: torch.Tensor) -> None:
        """Send ``rows`` (loop thread; the compute thread posts here)."""
        if self._failure is not None:
            return
        f = asyncio.ensure_future(send_or_fail(
            self.setup.node, route.peer, kind, epoch=self.setup.epoch, tag=self._tag(micro, route.lo),
            tensors=[rows],
            # Targets go uncompressed: they are labels, which a lossy codec must not round.
            codec=self.setup.codec if kind != LBL else "none"))
        f.add_done_callback(self._on_done)
        self._sends.append(f)

    def _start_reduce(self, bucket: int) -> None:
        """Sum gradient bucket ``bucket`` over the group (loop thread; the compute thread posts here)."""
        group, grads = self.setup.group, self.setup.grads
        assert group is not None and grads is not None  # only a group's backward hooks post buckets
        if self._failure is not None:
            return
        f = asyncio.ensure_future(group.all_reduce(grads.flat[bucket], op="sum", codec=self.setup.codec, key=(GRAD, bucket)))
        f.add_done_callback(self._on_done)
        self._reductions.append(f)

    def _on_done(self, f: asyncio.Future[Any]) -> None:
        # A failed send (or group sum) stops the thread at once rather than leaving it
        # waiting for pieces that can no longer come. Reading the exception here also
        # marks it retrieved for a future the step never awaits.
        if not f.cancelled() and (exc := f.exception()) is not None:
            self._abandon(exc if isinstance(exc, Exception) else PeerFailedError(str(exc)))

    def _tag(self, micro: int, row: int) -> list[Any]:
        return [self.setup.digest, self.step, micro, row]

    # --- compute thread ----------------------------------------------------------------------

    def walk(self) -> float:
        """Run the stage's schedule (compute thread).

        In a group, each gradient bucket goes to the loop as soon as the last
        micro-batch's backward has finished it, overlapping the rest of the backward.

        Returns:
            This member's share of the step's loss sum (0 off the last stage).

        Raises:
            PeerFailedError: a piece failed or did not come within :data:`PIECE_TIMEOUT_S`.
            Exception: whatever abandoned the step, or the stage's layers raised.
        """
        self.setup.place.push()  # the host weights (updated or restored) to the device copy
        grads = self.setup.grads
        if grads is None:
            return self._walk_ops()
        grads.attach(self.setup.micro_batches, self._post_reduce)
        try:
            loss = self._walk_ops()
        except BaseException:
            grads.detach()
            raise
        grads.finish()
        return loss

    def _walk_ops(self) -> float:
        if self.setup.seat.is_first:
            self._read_batches()
        loss = 0.0
        for op in self.setup.ops:
            if self._failure is not None:
                raise self._failure
            if op.kind == "fwd":
                loss += self.forward(op.micro)
            else:
                self.backward(op.micro)
        return loss

    def _read_batches(self) -> None:
        """First stage: collate this member's rows of every micro-batch; send their targets on."""
        w, seat = self.setup.workload, self.setup.seat
        idx = self.setup.sampler.indices(self.step)
        for m in range(self.setup.micro_batches):
            x, y = w.split(w.batch(idx[seat.rows(m)]))
            self._batches[m] = (x, y)
            self._post(LBL, m, y, seat.labels_to)

    def forward(self, micro: int) -> float:
        """Micro-batch ``micro``'s forward (compute thread), its output sent downstream.

        Returns:
            Its scaled loss on the last stage, else 0.
        """
        seat = self.setup.seat
        place = self.setup.place
        if seat.is_first:
            x, y = self._batches.pop(micro)
            x = place.to_device(x)
        else:
            x = place.to_device(self._gather(ACT, micro, seat.upstream)).requires_grad_(True)
            y = self._gather(LBL, micro, seat.labels_from) if seat.is_last else None
        self._inputs[micro] = x
        self._outputs[micro] = out = self.setup.clock.timed("fwd", micro, self._run_forward, x, y)
        if seat.is_last:
            return float(out.detach())
        self._post(ACT, micro, place.to_host(out.detach()), seat.downstream)
        return 0.0

    def backward(self, micro: int) -> None:
        """Micro-batch ``micro``'s backward (compute thread), its input-gradient sent upstream."""
        seat = self.setup.seat
        place = self.setup.place
        grad = None if seat.is_last else place.to_device(self._gather(GRAD, micro, seat.downstream))
        gx = self.setup.clock.timed("bwd", micro, self._run_backward, micro, grad)
        if gx is not None:
            self._post(GRAD, micro, place.to_host(gx), seat.upstream)

    def _run_forward(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        out = self.setup.module(x)
        if not self.setup.seat.is_last:
            return out
        criterion = self.setup.workload.criterion
        assert criterion is not None  # checked by the trainer
        y = self.setup.place.to_device(y)
        return criterion(out, y) * self.setup.seat.loss_scale(self.setup.micro_batches)

    def _run_backward(self, micro: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        out = self._outputs.pop(micro)
        if out.requires_grad:  # a first stage of frozen layers (a LoRA job's embedding) has no graph
            out.backward(grad)
        x = self._inputs.pop(micro)
        return None if self.setup.seat.is_first else x.grad

    def _gather(self, kind: str, micro: int, routes: Sequence[Route]) -> torch.Tensor:
        """The rows of micro-batch ``micro`` that ``routes`` bring, joined in row order (blocks)."""
        parts = [self._wait(self._inbound[Piece(kind, micro, r.lo, r.peer)]) for r in routes]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _wait(self, fut: concurrent.futures.Future[torch.Tensor]) -> torch.Tensor:
        # Wakes when the piece comes or the step is abandoned (which fails fut).
        done, _ = concurrent.futures.wait([fut], timeout=PIECE_TIMEOUT_S)
        if not done:
            raise PeerFailedError(f"no activation or gradient piece within {PIECE_TIMEOUT_S:.0f}s")
        return fut.result()

    def _post(self, kind: str, micro: int, t: torch.Tensor, routes: Sequence[Route]) -> None:
        """Hand each route its rows of ``t`` (which holds rows ``seat.lo..seat.hi``) to send."""
        lo = self.setup.seat.lo
        for r in routes:
            self._loop.call_soon_threadsafe(self._start_send, r, kind, micro, t[r.lo - lo : r.hi - lo])

    def _post_reduce(self, bucket: int) -> None:
        # The bucket is final and packed: its group sum starts on the loop.
        self._loop.call_soon_threadsafe(self._start_reduce, bucket)
