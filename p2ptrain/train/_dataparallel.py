"""Data-parallel training over the ring: full replica per member, all-reduced gradients.

Every member derives the same sample order from ``(seed, step)`` and takes its
contiguous shard of each global batch (no data is sent). Gradients are packed into
buckets in backward order; a bucket is all-reduced as soon as its last gradient is
accumulated — from a post-accumulate-grad hook on the compute thread — so the
communication of early buckets overlaps the rest of the backward pass. Torch runs on
a dedicated thread, never on the event loop, so heartbeats and transfers keep flowing
during a forward pass.

Replicas must stay identical; a cheap digest of the parameters is compared across
the ring every ``digest_every`` steps, and a mismatch stops the job naming the members
that differ.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from p2ptrain._device import Placement, pick_device
from p2ptrain._errors import ConfigError, JobError, JobStopped, PeerFailedError
from p2ptrain.ring import Collectives, Node, View
from p2ptrain.train._buckets import GradBuckets
from p2ptrain.train._compute import compute_pool
from p2ptrain.train._data import GlobalSampler, shard, shard_weight
from p2ptrain.train._energy import StepEnergy, step_joules, step_sums
from p2ptrain.train._job import DEFAULT_BUCKET_BYTES
from p2ptrain.train._recovery import Recovery, align, recover_replicas
from p2ptrain.train._restore import resume_from_disk
from p2ptrain.train._state import apply, capture
from p2ptrain.train._store import Checkpoints
from p2ptrain.zoo import Workload

__all__ = ["BucketSums", "DataParallelTrainer", "StepMetrics", "TrainResult", "param_digest", "realign", "tensor_digest"]

logger = logging.getLogger(__name__)


def check_finite(loss: float, step: int) -> None:
    """Stop a job whose loss is no longer a number: its parameters are not either.

    Every member holds the same loss of the step (all-reduced, or summed along the
    ring), so every member stops at the same step. The step's update has been applied
    with that loss's gradients: nothing is gained by training on, and a model written
    then is all NaN (a walkthrough: 30 steps of "loss nan", an all-NaN model, exit 0).

    Raises:
        JobError: ``loss`` is NaN or infinite.
    """
    if not math.isfinite(loss):
        raise JobError(f"training diverged at step {step}: its loss is {loss}, so the parameters are no longer finite and "
                       "the job stopped on every member; lower the learning rate (--lr), check the data and the model's "
                       "loss, or resume from a checkpoint taken before it")


def realign(losses: list[float], first_step: int, next_step: int) -> None:
    """Keep ``losses[i]`` the loss of step ``first_step + i`` once a recovery resumes at ``next_step``.

    Steps to be done again are dropped (they count once); a step the survivors applied
    while its loss was lost here (this member's step failed, theirs completed) is NaN.
    """
    del losses[next_step - first_step:]
    losses.extend([math.nan] * (next_step - first_step - len(losses)))


@dataclass
class StepMetrics:
    """What one step did, for progress bars and the JSONL log."""

    step: int
    loss: float
    samples_per_s: float
    step_s: float
    compute_s: float
    comm_wait_s: float
    members: int  # the members that trained the step: a data job's replicas, a pipeline's stages
    epoch: int
    busy: list[float] = field(default_factory=list)  # pipeline: each member's busy fraction, ring order
    # Each member's joules of the step, ring order, and which of them a sensor measured
    # (the others are estimated by a power model; see p2ptrain.energy). Empty: no meter.
    joules: list[float] = field(default_factory=list)
    measured: list[bool] = field(default_factory=list)


@dataclass
class TrainResult:
    """The outcome of a run on this member."""

    losses: list[float] = field(default_factory=list)  # of steps first_step, first_step + 1, ...
    # param_digest of what this member holds: on the submitter the whole trained model (once
    # gathered); elsewhere its replica, or its own stage of a pipeline.
    digest: str = ""
    steps: int = 0
    first_step: int = 0  # the step this run started from (> 0 when it resumed from a checkpoint)
    # The whole trained model (names of ``workload.model.state_dict()``), on the member that
    # submitted the job only (JobService gathers a pipeline's stages there,
    # p2ptrain/train/_gather.py); None elsewhere. Shares storage with that member's model.
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order: equal iff the replicas are bit-identical."""
    return tensor_digest(model.parameters())


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """:func:`param_digest` of any tensors, in order (call it off the event loop)."""
    h = hashlib.sha256()
    for p in tensors:
        # The array itself, not a bytes copy: hashlib reads the buffer and releases the
        # GIL while it hashes, so a digest on a worker thread leaves the loop free.
        h.update(p.detach().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


class BucketSums:
    """One step's gradient-bucket all-reduces, launched from the compute thread onto the loop.

    A step cancelled (or failed) while its backward runs calls :meth:`cancel`: the compute
    thread carries on to the end of its backward, and a sum it launched, or would launch
    after, must not wait for the other members' pieces until the process ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, reduce: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        self.loop, self._reduce = loop, reduce
        self.tasks: list[concurrent.futures.Future[None]] = []
        self._lock, self._ended = threading.Lock(), False

    def launch(self, b: int) -> None:
        """Start bucket ``b``'s sum (compute thread); nothing once the step has ended."""
        with self._lock:
            if not self._ended:
                self.tasks.append(asyncio.run_coroutine_threadsafe(self._reduce(b), self.loop))

    def cancel(self) -> None:
        """End every sum launched and refuse further launches."""
        with self._lock:
            self._ended = True
        for t in self.tasks:
            t.cancel()

    async def wait(self) -> None:
        """Wait for every sum.

        Raises:
            PeerFailedError: a reduce failed (or whatever else the first failing one
                raised); the others are cancelled and have ended by then.
        """
        futs = [asyncio.wrap_future(t) for t in self.tasks]
        try:
            await asyncio.gather(*futs)
        except BaseException:
            self.cancel()  # the sibling sums would fail on their own, unheard
            await asyncio.gather(*futs, return_exceptions=True)
            raise


def diverged(what: str, members: Sequence[str], digests: Sequence[str], at_start: bool) -> str:
    """Why a replica check failed: who differs, and at step 0 of a fresh job the likely cause."""
    common, n = Counter(digests).most_common(1)[0]
    if n == 1:
        why = f"{what} differ on every member ({', '.join(f'{m}={d[:16]}' for m, d in zip(members, digests))})"
    else:
        why = f"{what} diverged: {', '.join(m for m, d in zip(members, digests) if d != common)} differ from the majority digest {common}"
    if at_start:  # a walkthrough's model drew its weights from torch's global RNG
        why += ("; before the first step, so the members built different initial weights: draw every weight from a "
                "torch.Generator seeded from the entry point's seed, not from torch's global RNG (docs/your-model.md)")
    return why


class DataParallelTrainer:
    """Train ``workload`` on every member of ``node``'s current view.

    Args:
        node: a started node whose view holds the members to train with.
        workload: built identically on every member (same seed).
        global_batch: samples per step over the whole ring (at least one per member; it
            need not divide among them).
        steps: optimizer steps.
        seed: seeds the sample order.
        lr: learning rate for ``workload.make_optimizer``.
        codec: gradient codec spec (``"none"``, ``"int8"``, ``"topk:0.01"``, ...).
        bucket_bytes: gradient bucket size.
        digest_every: compare parameter digests every this many steps (0: never).
        on_step: called on the event loop with each step's metrics.
        job: a name for the run, put in every message tag (JobService passes the job id).
        recover: when a member fails or leaves mid-job, go on with the survivors instead
            of raising :class:`PeerFailedError` (see :meth:`_recover`).
        recover_timeout: seconds to wait for the survivors' new view.
        checkpoints: this member's checkpoint directory for the job, or None.
        checkpoint_every: write the whole state there every this many steps (0: never).
        resume: start from the latest checkpoint any member holds.
        manifest: extra fields for checkpoint manifests (the job's spec).
        view: the members to train with (default: the node's current view).
        admit: after a view change, ``(old, new) -> (members, plan)``: who trains on
            (JobService asks members that joined the ring into the job).
        joining: this member joins a running job (from ``admit``): it takes the
            state of the member that got furthest before its first step.
        device: where this member's forward and backward run (``"cpu"``, ``"cuda:0"``,
            ``"mps"``, ``"auto"``); the master weights and the optimizer stay on the
            host (:mod:`p2ptrain._device`).
        offload: keep a separate device copy even on the CPU (a GPU member's code path,
            for tests on CPU-only machines).
    """

    def __init__(
        self,
        node: Node,
        workload: Workload,
        *,
        global_batch: int,
        steps: int,
        seed: int = 0,
        lr: float = 1e-3,
        codec: str = "none",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        digest_every: int = 10,
        on_step: Callable[[StepMetrics], Any] | None = None,
        job: str = "",
        recover: bool = False,
        recover_timeout: float = 30.0,
        checkpoints: Checkpoints | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        manifest: dict[str, Any] | None = None,
        view: View | None = None,
        admit: Callable[[View, View], Awaitable[Any]] | None = None,
        joining: bool = False,
        device: str | torch.device = "cpu",
        offload: bool = False,
    ) -> None:
        self.node = node
        self.admit, self.joining = admit, joining
        self.checkpoints, self.checkpoint_every, self.resume = checkpoints, checkpoint_every, resume
        self.manifest = manifest or {}
        self._writing: asyncio.Future[Any] | None = None
        self.energy = StepEnergy()  # this member's joules per step (JobService gives it a meter)
        self._joules: tuple[list[float], list[bool]] = ([], [])
        self.leaving = False  # set by leave()
        self.stop_reason: str | None = None  # set by JobService.stop: raise JobStopped at the next boundary
        # Called with (step, view epoch) once a step's update is applied here (on_step
        # comes after the step's loss sum; this is the moment the state moved on).
        self.on_applied: Callable[[int, int], Any] | None = None
        self.left_at: int | None = None
        self.job, self.recover, self.recover_timeout = job, recover, recover_timeout
        self.next_step = 0  # the first step not yet applied here
        self.first_step = 0  # the step this run started from (a resume's checkpoint step)
        self.recoveries: list[Recovery] = []
        self.w = workload
        self.view = view or node.view
        self.world = len(self.view)
        self.rank = self.view.rank(node.node_id)
        if global_batch < self.world:
            raise ConfigError(f"global batch {global_batch} is smaller than the {self.world} members: "
                              "each needs a sample at least")
        self.global_batch, self.steps, self.seed, self.lr = global_batch, steps, seed, lr
        # Keeps the epoch's order: a step is then a slice, not a fresh sort.
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        self.codec, self.digest_every, self.on_step = codec, digest_every, on_step
        self.coll = Collectives(node, view=self.view, name=job)
        self.named = [(n, p) for n, p in workload.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]  # the host copy: the optimizer's, every state format's
        self.place = Placement(pick_device(device), offload=offload)
        self.model = self.place.module(workload.model)  # the copy forward and backward run on
        self.grads = GradBuckets(self.place.twins(self.params), bucket_bytes, targets=self.params)
        self.opt: Any = None  # built on the compute thread in run(): the first optimizer imports torch._dynamo (~2 s)
        self._pool = compute_pool("p2ptrain-compute")  # a nicer thread: the host's own threads come first
        self._pool.submit(int)  # its thread starts here (JobService builds trainers off the loop), not on the loop
        self._comm_time = 0.0

    def rebind(self, view: View) -> None:
        """Train on ``view`` from now on (recovery: the survivors of the job's view)."""
        self.view, self.world, self.rank = view, len(view), view.rank(self.node.node_id)
        self.coll = Collectives(self.node, view=view, name=self.job)

    def cannot_train_on(self, view: View) -> str | None:
        """Why the job cannot go on over ``view``'s members (a recovery asks), or None."""
        if self.global_batch < len(view):
            return (f"global batch {self.global_batch} is smaller than the {len(view)} members "
                    f"({', '.join(view.members)}): each needs a sample at least")
        return None

    async def _recover(self, exc: PeerFailedError) -> None:
        self.recoveries.append(await recover_replicas(self, exc))

    def _collectives(self) -> list[Collectives]:
        """This job's collectives over its view (sequence parallelism adds its K/V exchange)."""
        return [self.coll]

    async def _watched_step(self, step: int) -> float:
        """:meth:`step`, its waits ended once the ring changes."""
        watch = asyncio.ensure_future(self._abandon_when_the_ring_moves(step))
        try:
            return await self.step(step)
        finally:
            watch.cancel()

    async def _abandon_when_the_ring_moves(self, step: int) -> None:
        """End ``step``'s waits once the ring is no longer this view (a member left, failed or joined).

        The collectives are pinned to the view: a member that calls one after the change is
        refused at once and recovers, so a member already waiting on it (or on a member that
        left at its step boundary) would sit out the old view's drain (the failure timeout: a
        Ctrl-C on a sequence job's `join` stalled the ring 2.1-2.4 s in 2 of 5 tries, a join 1 s
        in-process). Every member ends the step instead, and the recovery puts them together.
        """
        view = self.view
        while self.node.view.epoch == view.epoch:
            if self.node.closed:  # its close failed every wait already
                return
            await self.node.changed()
        gone = sorted(set(view.members) - set(self.node.view.members))
        why = (f"{', '.join(gone)} left the ring" if gone else "the ring changed") + \
            f" (view {view.epoch} -> {self.node.view.epoch}) during step {step}"
        for coll in self._collectives():
            coll.abandon(why)

    # --- one step ------------------------------------------------------------------------

    async def _reduce(self, b: int) -> None:
        t0 = time.perf_counter()
        await self.coll.all_reduce(self.grads.flat[b], op="mean", codec=self.codec, key=("grad", b))
        self._comm_time += time.perf_counter() - t0

    async def step(self, step: int) -> float:
        """Run one synchronous data-parallel step; returns the ring's mean loss."""
        loop = asyncio.get_running_loop()
        idx = shard(self.sampler.indices(step), self.rank, self.world)
        # The ring averages gradients: a member with one sample more counts for more (1.0 when equal).
        weight = shard_weight(len(idx), self.global_batch, self.world)
        reduces = BucketSums(loop, self._reduce)

        def compute() -> float:
            self.place.push()  # the host weights (updated, restored or recovered) to the device copy
            self.grads.attach(1, reduces.launch)
            try:
                self.opt.zero_grad(set_to_none=False)
                batch = self.w.batch(idx)  # here, not on the loop: gathering samples is tensor work
                loss = self.w.loss(self.place.to_device(batch), model=self.model)
                (loss * weight if weight != 1.0 else loss).backward()
            except BaseException:
                self.grads.detach()  # a failed backward must not send partial gradients
                raise
            self.grads.finish()  # also launches buckets that got no gradient
            return float(loss.detach())

        t0 = time.perf_counter()
        try:
            loss = await loop.run_in_executor(self._pool, compute)
        except BaseException:  # cancelled or failed: the compute thread may still be launching sums
            reduces.cancel()
            raise
        compute_s = time.perf_counter() - t0
        await reduces.wait()
        wait_s = time.perf_counter() - t0 - compute_s
        await self._apply_step(step)
        # One sum gives every member the mean loss and every member's joules of the step.
        sums = step_sums(loss * weight / self.world, self.energy, self.rank, self.world)
        await self.coll.all_reduce(sums, op="sum")
        self._last = (compute_s, wait_s)
        self._joules = step_joules(sums, self.energy, self.world)
        return float(sums[0])

    async def _apply_step(self, step: int) -> None:
        """Apply ``step``'s reduced gradients on the compute thread; ``next_step`` then passes it, ``on_applied`` hears."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._apply)
        self.next_step = step + 1
        if self.on_applied is not None:
            self.on_applied(step, self.view.epoch)

    def _apply(self) -> None:
        """The update (compute thread): the reduced gradients into the host parameters, then the optimizer."""
        self.grads.unpack()
        self.opt.step()

    def leave(self) -> None:
        """Stop at the next step boundary (an orderly leave: every survivor holds the state)."""
        self.leaving = True

    async def _resume(self) -> None:
        """Take the latest checkpoint any member holds (unit 0: the whole model); all members call it."""
        got = await resume_from_disk(self.node, self.view, job=self.job, want=[0], n_units=1, checkpoints=self.checkpoints)
        if got is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: apply(got.units[0], self.named, self.opt, f"checkpoint of step {got.step}"))
            self.next_step = got.step

    async def _checkpoint(self) -> None:
        """Write the state at ``next_step`` on a thread (the copy is taken on the compute thread first)."""
        ckpt = self.checkpoints
        if ckpt is None or not self.checkpoint_every or self.next_step % self.checkpoint_every:
            return
        loop = asyncio.get_running_loop()
        units = {0: await loop.run_in_executor(self._pool, capture, self.named, self.opt)}
        if self._writing is not None:
            await self._writing  # one write in flight: a slow disk holds training back, never piles up copies
        step, extra = self.next_step, {**self.manifest, "view": list(self.view.members)}
        self._writing = loop.run_in_executor(None, lambda: ckpt.write(step, units, extra))

    def _stopping(self) -> bool:
        """Whether to raise :class:`JobStopped` at this step boundary (a stop was asked: at once)."""
        return self.stop_reason is not None

    async def check_replicas(self) -> str:
        """Compare parameter digests across the ring.

        Raises:
            JobError: some member's parameters differ (names the members).
        """
        # Off the loop: hashing every parameter costs 2-4 ms per MB of weights here.
        mine = await asyncio.get_running_loop().run_in_executor(None, param_digest, self.w.model)
        gathered = await self.coll.all_gather(torch.tensor(list(bytes.fromhex(mine)), dtype=torch.uint8))
        digests = [bytes(t.tolist()).hex() for t in gathered]
        if len(set(digests)) > 1:
            raise JobError(diverged("replicas", self.view.members, digests, self.next_step == 0))
        return mine

    async def _steps(self, res: TrainResult) -> None:
        """Train until the last step, a stop, or this member's leave; each applied step reported in ``res``."""
        while self.next_step < self.steps:
            if self._stopping():
                raise JobStopped(self.stop_reason or "stopped", self.next_step)
            if self.leaving:
                self.left_at = self.next_step
                return
            step = self.next_step
            t0 = time.perf_counter()
            loss = await self._watched_step(step)
            # Applied: reported before the checkpoint and the digest check, which a ring
            # change may break after it (its loss was then lost: a gap in the metrics).
            dt = time.perf_counter() - t0
            check_finite(loss, step)
            res.losses.append(loss)
            res.steps = step + 1
            if self.on_step is not None:
                c, w = self._last
                self.on_step(StepMetrics(step, loss, self.global_batch / dt, dt, c, w, self.world,
                                         self.view.epoch, joules=self._joules[0], measured=self._joules[1]))
            await self._checkpoint()
            if self.digest_every and (step + 1) % self.digest_every == 0:
                await self.check_replicas()

    async def run(self) -> TrainResult:
        """Train for ``steps`` steps; returns losses and the final digest."""
        res = TrainResult()
        if self.opt is None:
            self.opt = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.w.make_optimizer, self.params, self.lr)
        try:
            if self.joining:
                await align(self)  # the running job's state, from the member furthest on
            elif self.resume:
                await self._resume()
            res.first_step = res.steps = self.first_step = self.next_step
            self.energy.start()
            checked = self.joining  # a newcomer took its state from the others
            while True:
                try:
                    if not checked:
                        await self.check_replicas()  # identical start, or stop before wasting a run
                        checked = True
                    await self._steps(res)
                    res.digest = (await asyncio.get_running_loop().run_in_executor(None, param_digest, self.w.model)
                                  if self.left_at is not None else await self.check_replicas())
                    break
                except PeerFailedError as exc:
                    # A member lost in a step, or in the check before the first step or after the
                    # last, is recovered from alike (a kill in the final check failed a job that had
                    # trained every step).
                    if not self.recover or self.left_at is not None:
                        raise
                    await self._recover(exc)
                    realign(res.losses, res.first_step, self.next_step)
            if self._writing is not None:
                await self._writing
        finally:
            # Off the loop: waiting for a running backward must not stall heartbeats.
            await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
        return res
