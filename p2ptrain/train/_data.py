"""Data every member agrees on without talking: the sample order and the shards.

Data-parallel training needs each member to pick its part of the same global batch
at every step. Nothing is sent for that: the order is a pure function of
``(n_samples, global_batch, step, seed)``, and a member's part is a contiguous
slice of it.

- :class:`GlobalSampler` / :func:`global_batch_indices`: a fresh permutation per epoch
  (derived from the seed with exact integer hashing, so it does not depend on the
  torch or numpy version, the platform or the thread count), sliced per step. The
  incomplete tail of an epoch is dropped, so every global batch has exactly
  ``global_batch`` samples.
- :func:`shard`: rank ``r`` of ``world`` takes the ``r``-th of ``world`` contiguous
  slices, as equal as they can be (the first ``n % world`` ranks take one sample
  more). A member weighs its mean gradient by its share (``shard_weight``), so the
  sum over the ring is the mean gradient of the global batch: a batch of 32 still
  trains on the 3 members left of 4. With equal shards the weight is exactly 1.
The zoo's indexable datasets live in :mod:`p2ptrain.zoo`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from p2ptrain._errors import JobError

__all__ = ["GlobalSampler", "global_batch_indices", "shard", "shard_weight"]

_U64 = np.uint64
# splitmix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number generators",
# OOPSLA 2014): a bijective 64-bit mixer. numpy's unsigned arithmetic wraps by
# definition, so the result is the same bit for bit on every machine.
_GAMMA = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x + _GAMMA
    x = (x ^ (x >> _U64(30))) * _M1
    x = (x ^ (x >> _U64(27))) * _M2
    return x ^ (x >> _U64(31))


def _epoch_key(seed: int, epoch: int) -> np.uint64:
    # blake2b rather than arithmetic on the seed: any int seed (negative, > 64 bits)
    # maps to a well-spread key, and the "sampler" tag keeps it apart from the
    # model-initialisation stream derived from the same seed.
    digest = hashlib.blake2b(f"p2ptrain/sampler/{seed}/{epoch}".encode(), digest_size=8).digest()
    return _U64(int.from_bytes(digest, "little"))


def _epoch_permutation(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of ``range(n_samples)`` for one epoch (int64)."""
    keys = _mix64(np.arange(n_samples, dtype=_U64) ^ _epoch_key(seed, epoch))
    # _mix64 is a bijection, so keys are distinct and the order is unique; "stable"
    # names the algorithm anyway so no library default can change it.
    return np.argsort(keys, kind="stable").astype(np.int64)


class GlobalSampler:
    """Indices of the global batch at each step, identical on every member.

    Keeps the current epoch's permutation, so consecutive steps cost a slice rather
    than a sort (a sort of a million keys takes ~0.1 s).

    Args:
        n_samples: size of the dataset.
        global_batch: samples per step across the whole ring.
        seed: the job's seed.

    Raises:
        JobError: ``global_batch`` is not in ``[1, n_samples]``.
    """

    def __init__(self, n_samples: int, global_batch: int, seed: int) -> None:
        if n_samples < 1:
            raise JobError(f"the dataset is empty (n_samples={n_samples}); nothing to train on")
        if not 1 <= global_batch <= n_samples:
            raise JobError(
                f"global_batch={global_batch} does not fit a dataset of {n_samples} samples; "
                f"choose 1 <= global_batch <= {n_samples}"
            )
        self.n_samples = n_samples
        self.global_batch = global_batch
        self.seed = seed
        # Drop the epoch's tail: every step then sees exactly global_batch samples,
        # which keeps equal shards possible at every step.
        self.steps_per_epoch = n_samples // global_batch
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the global batch at ``step`` (a new int64 tensor).

        Raises:
            JobError: ``step`` is negative.
        """
        if step < 0:
            raise JobError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = _epoch_permutation(self.n_samples, self.seed, epoch)
            self._epoch = epoch
        start = k * self.global_batch
        return torch.from_numpy(self._perm[start : start + self.global_batch].copy())


def global_batch_indices(n_samples: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch at ``step``, identical on every member.

    A stateless shortcut for ``GlobalSampler(n_samples, global_batch, seed).indices(step)``;
    a training loop should keep one :class:`GlobalSampler` instead (one sort per epoch).

    Raises:
        JobError: arguments out of range.
    """
    return GlobalSampler(n_samples, global_batch, seed).indices(step)


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The contiguous part of ``indices`` that member ``rank`` trains on.

    Shards are as equal as they can be: of ``n`` samples over ``world`` members the
    first ``n % world`` ranks take ``n // world + 1``, the others ``n // world``.

    Args:
        indices: the global batch (1-D).
        rank: this member's position in the ring, ``0 <= rank < world``.
        world: number of members sharing the batch.

    Returns:
        A view of ``indices``; the shards of ranks ``0..world-1`` concatenate to it.

    Raises:
        JobError: fewer samples than members (one would train on nothing), or
            rank/world out of range.
    """
    if world < 1 or not 0 <= rank < world:
        raise JobError(f"rank {rank} is not in a ring of {world} members; need 0 <= rank < world")
    n = indices.shape[0]
    if n < world:
        raise JobError(f"global_batch={n} is smaller than the {world} members: each needs a sample at least")
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return indices[lo : lo + size + (1 if rank < extra else 0)]


def shard_weight(shard_size: int, global_batch: int, world: int) -> float:
    """What a member scales its mean loss by so the ring's mean of gradients is the batch's mean.

    ``shard_size * world / global_batch``: exactly 1.0 for equal shards (their plain mean
    is already the batch's), more for a member that took one sample more.
    """
    return shard_size * world / global_batch
