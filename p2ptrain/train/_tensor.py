"""Tensor parallelism (``strategy="tensor"``): a group of members splits every transformer block.

Each member holds its share of every block's attention heads and MLP columns
(Megatron-LM's column- then row-parallel split, :mod:`p2ptrain.train._tp_layers`; the
cut and its undoing in :mod:`p2ptrain.train._tp_surgery`), sized by the job's
``shares`` (:mod:`p2ptrain.train._tp_shard`). Every member takes the whole global batch
of each step (the same :class:`~p2ptrain.train.GlobalSampler` order as data
parallelism). With sequence parallelism (the default) the activations between the
split layers are cut by tokens, so the LayerNorms, residuals, the head and the loss of a
token run on one member only; the token shares follow the same ``shares``.

Who holds what, and which gradients are summed:

- the split weights (Q/K/V, attention output, MLP projections): one member each, their
  gradients complete on it (no gradient traffic);
- the embedding, the norms, the row-parallel biases, the final norm and the LM head:
  replicated. With sequence parallelism each member's gradient covers its tokens, and
  the members' gradients are *summed* (bucketed, during the backward pass, like data
  parallelism's); without it they are averaged. Either way the all-reduce gives every
  member bit-identical gradients, so the replicas stay bit-identical (checked by digest).

The loss is the workload's ``criterion`` on this member's tokens, weighted by its
share of the tokens, so the members' losses sum to the batch's mean: the criterion
must average over every target token (the zoo's tinygpt and the Hugging Face causal
LMs do).

At the end of :meth:`TensorParallelTrainer.run` every member all-gathers every split
weight and puts the original layers back, so ``workload.model`` (and the submitter's
``result.state_dict``) is the whole trained model under its own names.

A member lost mid-job takes its share of the weights with it: the job stops on every
survivor with a :class:`~p2ptrain.JobError` naming it (never a hang). A member that
leaves in order (``JobService.leave``) hands its share over at the next step boundary and
the others go on re-split over themselves (:mod:`p2ptrain.train._tp_reshard`). A member
joining the ring breaks the step in flight, which the group redoes in the new view
(without the newcomer). A stop (``JobService.stop``, Ctrl-C on ``p2ptrain train``) reaches
the group in a step's sum; at that step's end every member gathers the whole model and
then raises :class:`~p2ptrain.JobStopped`, so the submitter still has the model to write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from p2ptrain._errors import ConfigError, JobError, MemberLostError, PeerFailedError
from p2ptrain.ring import Node, View
from p2ptrain.train._admit import turn_away
from p2ptrain.train._buckets import GradBuckets
from p2ptrain.train._dataparallel import BucketSums, DataParallelTrainer, TrainResult, diverged, tensor_digest
from p2ptrain.train._energy import step_joules, step_sums
from p2ptrain.train._job import DEFAULT_BUCKET_BYTES, JobSpec
from p2ptrain.train._recovery import next_view
from p2ptrain.train._tp_comm import RingComm
from p2ptrain.train._tp_layers import TPContext
from p2ptrain.train._tp_reshard import gather_whole, part_ways
from p2ptrain.train._tp_surgery import Surgery, block_dims, shard_model
from p2ptrain.zoo import Workload

__all__ = ["TensorParallelTrainer", "misfit", "refusal"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5  # view changes in a row while the group agrees to go on (as data parallelism's recovery)


_NO_CHECKPOINTS = ("the tensor strategy does not write or resume checkpoints; use checkpoint_every=0 and "
                   "resume=False (or the data or pipeline strategy)")


def refusal(spec: JobSpec, workload: Workload, members: int) -> str | None:
    """Why a member refuses tensor-parallel job ``spec`` over ``members`` members, or None (cheap: cuts nothing)."""
    if spec.checkpoint_every or spec.resume:
        return _NO_CHECKPOINTS
    return misfit(workload, spec.shares, members)


def misfit(workload: Workload, shares: Sequence[float], members: int) -> str | None:
    """Why ``workload`` cannot be split over ``members`` with ``shares``, or None (reads the blocks' sizes)."""
    if shares and len(shares) != members:
        return (f"shares has {len(shares)} entries but the ring has {members} members; give one share per member "
                "in ring order, or none for even shares")
    model = workload.model
    if not isinstance(model, torch.nn.Sequential) or len(model) < 3:
        return "the tensor strategy needs an nn.Sequential of an embedding, transformer blocks and a head"
    if workload.criterion is None:
        return "the tensor strategy needs a workload with a criterion (a per-token mean loss)"
    for i in range(1, len(model) - 1):
        dims = block_dims(model[i])
        if dims is None:
            return (f"layer {i} ({type(model[i]).__name__}) is not a transformer block the tensor strategy knows; "
                    "train this model with the data or pipeline strategy")
        if dims[0] < members:
            return (f"layer {i} has {dims[0]} attention heads, fewer than the {members} members; every member needs "
                    f"at least one head: use at most {dims[0]} members (or the data or pipeline strategy)")
    return None


class _Unbound:
    """The comm of a context whose trainer has not started (any call is a bug)."""

    def all_gather(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        raise RuntimeError("tensor-parallel layers ran before TensorParallelTrainer.run() bound them to the ring")

    reduce_scatter = all_gather

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather(x, ())


class TensorParallelTrainer(DataParallelTrainer):
    """Train ``workload`` with its blocks split over the members of the view.

    Takes :class:`DataParallelTrainer`'s keyword arguments (the batch is not split:
    ``global_batch`` needs no divisibility), plus:

    Args:
        shares: each member's relative share of heads, MLP columns and tokens, in ring
            order; empty: even.
        sequence_parallel: cut the activations between the split layers by tokens
            (False: every member holds every token's, Megatron's ``f``/``g``).

    Raises:
        ConfigError: shares of the wrong length, fewer heads than members, or
            checkpointing (not supported by this strategy).
        JobError: a model the tensor strategy cannot split.
    """

    def __init__(self, node: Node, workload: Workload, *, global_batch: int, shares: Sequence[float] = (),
                 sequence_parallel: bool = True, **kwargs: Any) -> None:
        view: View = kwargs.pop("view", None) or node.view
        if kwargs.get("joining"):
            raise JobError("a tensor-parallel job takes no members mid-job (its weights are already split)")
        if kwargs.get("checkpoint_every") or kwargs.get("resume"):
            raise ConfigError(_NO_CHECKPOINTS)
        why = misfit(workload, shares, len(view))
        if why is not None:
            raise ConfigError(why)
        shares = list(shares) or [1.0] * len(view)
        self.shares_of = dict(zip(view.members, shares))  # by member: a re-split takes the survivors'
        self.tp = TPContext(_Unbound(), view.rank(node.node_id), shares, sequence_parallel=sequence_parallel)
        self.surgery: Surgery = shard_model(workload.model, self.tp)
        self.whole = False  # the split weights are back in the model (after a gather)
        # The base class splits the batch over its view; here every member takes all of it,
        # so build it on this member alone and then move it onto the job's view.
        super().__init__(node, workload, global_batch=global_batch, view=View(view.epoch, (node.node_id,)), **kwargs)
        self.rebind(view)
        self._bucket_bytes = kwargs.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
        self.bind_split()
        self.comm: RingComm | None = None
        self._want_leave = False  # leave() asked; the group learns it from the step's sum
        self.stopped_by: list[str] = []  # the members whose orderly leave came at the last boundary

    def bind_split(self) -> None:
        """After a cut: the parameters this member trains, the replicated ones, their gradient buckets."""
        self.named = [(n, p) for n, p in self.w.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        split = {id(s.local) for s in self.surgery.shards}
        self.replicated = [p for p in self.params if id(p) not in split]
        place = getattr(self, "place", None)  # a device copy (p2ptrain._device), if this build has them
        pairs = place.twins(self.replicated) if place is not None else self.replicated
        self.grads = GradBuckets(pairs, self._bucket_bytes, targets=self.replicated)

    def bind_comm(self) -> None:
        """The split layers' collectives over the current view (on the event loop)."""
        self.comm = RingComm(self.node, self.view, asyncio.get_running_loop(), job=self.job)
        self.tp.comm = self.comm

    # --- one step --------------------------------------------------------------------------------

    async def _reduce(self, b: int) -> None:
        t0 = time.perf_counter()
        op = "sum" if self.tp.sequence_parallel else "mean"
        await self.coll.all_reduce(self.grads.flat[b], op=op, codec=self.codec, key=("grad", b))
        self._comm_time += time.perf_counter() - t0

    def _loss(self, batch: Any) -> torch.Tensor:
        """This member's part of the batch's mean loss (compute thread)."""
        net = getattr(self, "model", self.w.model)
        place = getattr(self, "place", None)
        if place is not None:
            batch = place.to_device(batch)
        inputs, targets = self.w.split(batch)
        out = net(inputs)
        flat = targets.reshape(-1)
        assert self.w.criterion is not None  # checked by misfit
        if not self.tp.sequence_parallel:
            loss: torch.Tensor = self.w.criterion(out, flat)
            return loss
        start, stop = self.tp.tokens()
        local: torch.Tensor = self.w.criterion(out, flat[start:stop])
        return local * ((stop - start) / flat.numel())

    async def step(self, step: int) -> float:
        """One step: every member on the whole batch; returns the batch's mean loss."""
        loop = asyncio.get_running_loop()
        batch = self.w.batch(self.sampler.indices(step))
        reduces = BucketSums(loop, self._reduce)
        comm = self.comm
        assert comm is not None
        waited = comm.wait_s

        def compute() -> float:
            place = getattr(self, "place", None)
            if place is not None:
                place.push()
            self.grads.attach(1, reduces.launch)
            try:
                self.opt.zero_grad(set_to_none=False)
                loss = self._loss(batch)
                loss.backward()
            except BaseException:
                self.grads.detach()
                raise
            self.grads.finish()
            if place is not None:
                place.pull()  # the split weights' gradients to the host copy (the replicated ones come reduced)
            return float(loss.detach())

        t0 = time.perf_counter()
        try:
            loss = await loop.run_in_executor(self._pool, compute)
        except BaseException as exc:
            comm.abort(f"{type(exc).__name__}: {exc}")  # a compute thread waiting on a peer wakes up
            reduces.cancel()
            raise
        compute_s = time.perf_counter() - t0
        await reduces.wait()
        wait_s = time.perf_counter() - t0 - compute_s + (comm.wait_s - waited)
        await self._apply_step(step)
        # One sum: the loss; every member's joules of the step and, after those, its wish
        # to leave, then its wish to stop the job; last, whether any member could not
        # re-split (then a leave stops everyone).
        n = self.world
        sums = step_sums(loss if self.tp.sequence_parallel else loss / n, self.energy, self.rank, n, extra=2 * n + 1)
        sums[1 + 2 * n + self.rank] = 1.0 if self._want_leave else 0.0
        sums[1 + 3 * n + self.rank] = 1.0 if self.stop_reason is not None else 0.0
        place = getattr(self, "place", None)
        sums[-1] = 0.0 if self.recover and not getattr(place, "separate", False) else 1.0
        await self.coll.all_reduce(sums, op="sum")
        self._last = (compute_s - (comm.wait_s - waited), wait_s)
        self._joules = step_joules(sums, self.energy, n)
        self.stopped_by = [m for m, v in zip(self.view.members, sums[1 + 2 * n: 1 + 3 * n].tolist()) if v > 0.5]
        stoppers = [m for m, v in zip(self.view.members, sums[1 + 3 * n: 1 + 4 * n].tolist()) if v > 0.5]
        if stoppers:
            # A stop (Ctrl-C on train): the whole group puts the model together at this
            # boundary, so the submitter writes it (the split weights are nowhere else).
            await part_ways(self, list(self.view.members), go_on=False)
            said = await self.coll.all_gather(torch.tensor(list((self.stop_reason or "").encode()[:1000]),
                                                           dtype=torch.uint8))
            if self.stop_reason is None:  # said as a data-parallel member says a stop it was told of
                why = next(bytes(t.tolist()).decode(errors="replace") for t in said if t.numel())
                self.stop_reason = f"job {self.job or '-'}, stopped on member {stoppers[0]}: {why}"
        elif self.stopped_by:
            go_on = float(sums[-1]) < 0.5 and len(self.stopped_by) < n
            await part_ways(self, self.stopped_by, go_on)
        return float(sums[0])

    def _stopping(self) -> bool:
        # A stop asked during a step reaches the others in that step's sum; the group stops
        # at its end, once the model is whole again (see step()).
        return self.stop_reason is not None and self.whole

    def leave(self) -> None:
        """Leave at the next step boundary, in order (the others learn it from that step's sum and re-split)."""
        self._want_leave = True

    # --- replicas, failures, the end ---------------------------------------------------------------

    async def check_replicas(self) -> str:
        """Compare the digests of the replicated parameters across the members (the split ones differ by design).

        Raises:
            JobError: some member's replicated parameters differ (names the members).
        """
        mine = await asyncio.get_running_loop().run_in_executor(None, tensor_digest, self.replicated)
        if self.leaving:
            return mine  # this member stopped at the last boundary: its group no longer meets
        gathered = await self.coll.all_gather(torch.tensor(list(bytes.fromhex(mine)), dtype=torch.uint8))
        digests = [bytes(t.tolist()).hex() for t in gathered]
        if len(set(digests)) > 1:
            raise JobError(diverged("replicated parameters", self.view.members, digests, self.next_step == 0))
        return mine

    async def _recover(self, exc: PeerFailedError) -> None:
        """Go on after a view change that lost no member of the group (members joined); else stop, naming them.

        The step that was running is redone from its start (nothing of it was applied).

        Raises:
            JobError: a member of the group failed or left (its share of the weights is
                gone), or the members stopped at different steps.
            QuorumLostError: this member is on the minority side.
        """
        if self.whole:  # a re-split after a leave did not come about: the model is whole here, not split
            raise JobError(f"tensor-parallel job {self.job or '-'} stopped at step {self.next_step}: the group could "
                           f"not re-split after {', '.join(self.stopped_by)} left ({exc})") from exc
        error: PeerFailedError = exc
        for _ in range(_MAX_ATTEMPTS):  # another change while agreeing: start over on the next view
            new = await next_view(self.node, self.view, self.recover_timeout, self.job, self.next_step)
            gone = [m for m in self.view.members if m not in new]
            if gone:
                raise MemberLostError(f"tensor-parallel job {self.job or '-'} stopped at step {self.next_step}: "
                               f"member{'s' if len(gone) > 1 else ''} {', '.join(gone)} left or failed ({error}); "
                               "the split weights of a lost member cannot be rebuilt, submit the job again") from exc
            turn_away(self.node, self.view, new, job=self.job or "-",
                      why=f"a tensor-parallel job takes no members mid-job (its weights are split over "
                          f"{len(self.view)} members)")
            self.rebind(View(new.epoch, self.view.members))
            self.bind_comm()
            try:
                got = await self.coll.all_gather(torch.tensor([self.next_step], dtype=torch.int64))
            except PeerFailedError as again:
                error = again
                continue
            steps = sorted({int(t[0]) for t in got})
            if len(steps) > 1:
                raise JobError(f"tensor-parallel job {self.job or '-'}: after the ring changed its members stood at "
                               f"steps {steps}; a split model cannot be put back together, submit the job again")
            logger.warning("job %s: the ring changed (view %d); the tensor-parallel group goes on from step %d",
                           self.job or "-", new.epoch, self.next_step)
            return
        raise JobError(f"tensor-parallel job {self.job or '-'} stopped: the ring kept changing ({error})") from exc

    async def run(self) -> TrainResult:
        """Train, then put the whole trained model back into ``workload.model`` on every member."""
        self.bind_comm()
        result = await super().run()
        if not self.whole:
            await gather_whole(self, with_state=False)
        if self.left_at is not None and self.left_at < self.steps:
            logger.warning("tensor-parallel job %s: this member stopped at step %d of %d (%s left)", self.job or "-",
                           self.left_at, self.steps, ", ".join(self.stopped_by))
        return result
