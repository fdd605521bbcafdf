"""The zoo's indexable datasets and the default collate.

- :class:`CharWindows`: next-token windows over an encoded corpus.
- :class:`TensorPairs`: ``(x[i], y[i])`` samples from two tensors.
- :func:`stack_collate`: the default ``collate`` (stack tensors, or tuples of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from p2ptrain._errors import JobError

__all__ = ["CharWindows", "TensorPairs", "stack_collate"]


def stack_collate(samples: Sequence[Any]) -> Any:
    """Stack a list of tensors into one, or a list of tuples of tensors into a tuple.

    Raises:
        TypeError: samples are neither tensors nor tuples of tensors.
    """
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(samples))
    if isinstance(first, tuple):
        return tuple(torch.stack(list(parts)) for parts in zip(*samples))
    raise TypeError(f"stack_collate takes tensors or tuples of tensors, got {type(first).__name__}")


def _check_index(i: int, n: int) -> int:
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index {i} out of range for {n} samples")
    return i


class CharWindows(Sequence[torch.Tensor]):
    """Windows of ``block_size + 1`` token ids at offsets ``0, block_size, 2*block_size, ...``.

    Consecutive windows overlap by one id, so every id except the first is a
    next-token target exactly once per epoch. A sample is a read-only view of the
    corpus (int64, length ``block_size + 1``); collate copies it.

    Args:
        ids: the encoded corpus (1-D int64).
        block_size: tokens of context per sample.

    Raises:
        JobError: the corpus is shorter than one window.
    """

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if ids.dim() != 1 or ids.shape[0] < block_size + 1:
            raise JobError(
                f"a corpus of {ids.shape[0]} ids is shorter than one window of "
                f"block_size+1={block_size + 1}; use a smaller block_size"
            )
        self.ids = ids
        self.block_size = block_size
        self._n = (ids.shape[0] - 1) // block_size

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        start = _check_index(i, self._n) * self.block_size
        return self.ids[start : start + self.block_size + 1]


class TensorPairs(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Samples ``(x[i], y[i])`` from two tensors with the same first dimension."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        i = _check_index(i, self.x.shape[0])
        return self.x[i], self.y[i]
