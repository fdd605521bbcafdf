"""Sequence parallelism: every member holds the model and a slice of every sequence.

Each step every member takes the step's whole global batch (the same samples as data
parallelism and :func:`~p2ptrain.train.train_single`) and cuts every sequence into
contiguous slices, one per member in ring order, sized by the job's ``shares``
(:func:`token_slices`; even without them). A member embeds, transforms and scores its own
slice only, at the slice's global positions; attention exchanges keys and values with
the other members (:mod:`p2ptrain.train._seqattn`), so every query sees the whole causal
prefix. Activations per member shrink with the slice, which is what lets a device train
on sequences whose activations would not fit it whole (the reason the edge-training
study, arXiv 2404.17766, compares it).

The loss is the mean over ALL tokens of the batch: a member's mean over its slice,
weighted by its share of the tokens, summed over the members. The gradients are summed
the same way, bucket by bucket during backward, exactly as data parallelism sums them
(:class:`~p2ptrain.train.DataParallelTrainer`, which this trainer extends: replica
digests, checkpoints, recovery, energy and step metrics come from it). So every member
applies the same update and the replicas stay bit-identical, and the run computes what
one process computes on the whole batch.

When the members change mid-job (a loss, an orderly leave, a newcomer), the survivors
re-slice over the new view. ``shares`` hold for the members the job was accepted with;
after a change the slices are even (a newcomer could not know the old member-to-share
mapping, and every member must cut alike).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch

from p2ptrain._errors import ConfigError, JobError
from p2ptrain.ring import Collectives, Node, View
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._dataparallel import BucketSums, DataParallelTrainer
from p2ptrain.train._energy import step_joules, step_sums
from p2ptrain.train._job import JobSpec
from p2ptrain.train._seqattn import SeqGroup, SequenceLayers, layers_problem
from p2ptrain.zoo import Workload

__all__ = ["SequenceParallelTrainer", "members_fit", "refusal", "sequence_length", "token_slices"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5  # as data parallelism: a failure during recovery starts it again, a few times at most


def token_slices(length: int, members: int, shares: Sequence[float] = ()) -> list[tuple[int, int]]:
    """Every member's ``(offset, count)`` of a ``length``-token sequence, ring order.

    Counts are proportional to ``shares`` by the largest-remainder method, in exact
    rational arithmetic (so every member computes the same cut): each member gets the
    floor of its exact share, and the tokens left go to the largest remainders, the
    lower rank first on a tie. A member whose share rounds to no token takes one from
    the member holding most (every member must hold a token: its queries see its keys).

    Args:
        length: tokens per sequence.
        members: how many members share it.
        shares: relative shares, ring order; empty: even.

    Raises:
        ConfigError: fewer tokens than members, shares of the wrong length, or a share
            that is not a finite positive number.
    """
    if members < 1:
        raise ConfigError(f"sequence parallelism needs at least one member, got {members}")
    if length < members:
        raise ConfigError(
            f"a sequence of {length} tokens cannot be cut over {members} members: each needs at least one token; "
            f"use sequences of at least {members} tokens (tinygpt block_size, a Hugging Face model's seq_len) "
            "or fewer members")
    if shares and len(shares) != members:
        raise ConfigError(f"{len(shares)} shares for {members} members; give one share per member in ring order "
                          "(or none for even slices)")
    if any(not (math.isfinite(s) and s > 0) for s in shares):
        raise ConfigError(f"shares {list(shares)} must be finite positive numbers")
    weights = [Fraction(s) for s in shares] if shares else [Fraction(1)] * members
    total = sum(weights)
    ideal = [length * w / total for w in weights]
    counts = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(members), key=lambda i: (counts[i] - ideal[i], i))
    for i in by_remainder[: length - sum(counts)]:
        counts[i] += 1
    for i in range(members):
        if counts[i] == 0:
            richest = max(range(members), key=lambda j: (counts[j], -j))
            counts[richest] -= 1
            counts[i] = 1
    offsets = [sum(counts[:i]) for i in range(members)]
    return list(zip(offsets, counts))


def sequence_length(workload: Workload) -> int:
    """Tokens per input sequence of ``workload`` (read from its first sample).

    Raises:
        JobError: its inputs and targets are not ``(batch, tokens)`` tensors of one shape.
    """
    inputs, targets = workload.split(workload.batch([0]))
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor) and inputs.dim() == 2
            and inputs.shape == targets.shape):
        raise JobError("sequence parallelism needs inputs and targets as (batch, tokens) tensors of one shape, "
                       f"got {getattr(inputs, 'shape', type(inputs).__name__)} and "
                       f"{getattr(targets, 'shape', type(targets).__name__)}")
    return int(inputs.shape[1])


def refusal(spec: JobSpec, workload: Workload, members: int) -> str | None:
    """Why this member refuses sequence job ``spec`` over ``members`` members, or None when it can run it."""
    problem = layers_problem(workload.model)
    if problem is not None:
        return f"sequence parallelism cannot split this model: {problem}"
    if workload.criterion is None:
        return "sequence parallelism needs a workload with a criterion(outputs, targets) (a mean over tokens)"
    try:
        token_slices(sequence_length(workload), members, spec.shares)
    except (ConfigError, JobError) as exc:
        return str(exc)
    return None


def members_fit(workload: Workload) -> Callable[[int], bool]:
    """Whether a sequence job on ``workload`` can run on that many members: one token each at least."""
    length = sequence_length(workload)
    return lambda n: n <= length


class SequenceParallelTrainer(DataParallelTrainer):
    """Train ``workload`` with every member holding the model and a slice of every sequence.

    Takes :class:`~p2ptrain.train.DataParallelTrainer`'s arguments, and:

    Args:
        shares: each member's relative share of the tokens, in ring order of the job's
            view (empty: even). Dropped (even slices) after the members change.

    The global batch need not divide among the members: every member takes all of it.

    Raises:
        ConfigError: the sequence is shorter than the member count, or the shares do
            not fit the view.
        JobError: the model is not one sequence parallelism can split.
    """

    def __init__(self, node: Node, workload: Workload, *, global_batch: int, seed: int = 0,
                 shares: Sequence[float] = (), **common: Any) -> None:
        view = common.get("view") or node.view
        # DataParallelTrainer refuses a batch smaller than the members, a rule of data
        # parallelism only: give it one sample per member, then set ours.
        super().__init__(node, workload, global_batch=len(view), seed=seed, **common)
        self.global_batch = global_batch
        self.sampler = GlobalSampler(len(workload.dataset), global_batch, seed)
        if workload.criterion is None:
            raise JobError("sequence parallelism needs a workload with a criterion(outputs, targets)")
        self.criterion = workload.criterion
        self.layers = SequenceLayers(self.model)
        self.seq_len = sequence_length(workload)
        self.shares = () if self.joining else tuple(shares)
        self.slices = token_slices(self.seq_len, self.world, self.shares)
        self.kv = Collectives(node, view=self.view, name=f"{self.job}/seq")

    def rebind(self, view: View) -> None:
        """Train on ``view`` from now on, with even slices over its members."""
        super().rebind(view)
        self.shares = ()
        self.slices = token_slices(self.seq_len, self.world)
        self.kv = Collectives(self.node, view=view, name=f"{self.job}/seq")

    def _collectives(self) -> list[Collectives]:
        return [self.coll, self.kv]

    def cannot_train_on(self, view: View) -> str | None:
        """Any member count up to the sequence length can go on (re-sliced evenly)."""
        if len(view) > self.seq_len:
            return f"sequences of {self.seq_len} tokens cannot be cut over the {len(view)} members now in the job"
        return None

    async def _reduce(self, b: int) -> None:
        t0 = time.perf_counter()
        # A sum: each member's loss is already weighted by its share of the tokens.
        await self.coll.all_reduce(self.grads.flat[b], op="sum", codec=self.codec, key=("grad", b))
        self._comm_time += time.perf_counter() - t0

    async def step(self, step: int) -> float:
        """Run one step on this member's slice of every sequence; returns the loss over all tokens."""
        loop = asyncio.get_running_loop()
        inputs, targets = self.w.split(self.w.batch(self.sampler.indices(step)))
        offset, count = self.slices[self.rank]
        ids, want = inputs[:, offset : offset + count], targets[:, offset : offset + count]
        group = SeqGroup(self.kv, loop, self.slices, self.rank)
        weight = count / self.seq_len
        reduces = BucketSums(loop, self._reduce)

        def compute() -> float:
            self.place.push()
            self.grads.attach(1, reduces.launch)
            try:
                self.opt.zero_grad(set_to_none=False)
                loss = self.criterion(self.layers(self.place.to_device(ids), group), self.place.to_device(want)) * weight
                loss.backward()
            except BaseException:
                self.grads.detach()
                raise
            self.grads.finish()
            return float(loss.detach())

        t0 = time.perf_counter()
        try:
            loss = await loop.run_in_executor(self._pool, compute)
        except BaseException:
            group.cancel()  # a compute thread waiting on the others' K/V must not wait forever
            reduces.cancel()
            raise
        compute_s = time.perf_counter() - t0
        await reduces.wait()
        wait_s = time.perf_counter() - t0 - compute_s
        await self._apply_step(step)
        # One sum: the loss over all tokens (weighted parts) and every member's joules.
        sums = step_sums(loss, self.energy, self.rank, self.world)
        await self.coll.all_reduce(sums, op="sum")
        self._last = (compute_s, wait_s)
        self._joules = step_joules(sums, self.energy, self.world)
        return float(sums[0])

