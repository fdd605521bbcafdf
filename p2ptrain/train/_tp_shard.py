"""Tensor-parallel shard arithmetic: who holds which heads, MLP columns and tokens.

Pure integer arithmetic on the job's shares, no torch and no network, so every member
computes the same answer for every member, and it is tested on its own.

Rounding (:func:`split_counts`): member ``i`` ideally holds ``total * s_i / sum(s)``
units. Each gets the floor of that, at least one; then the units still missing go one
by one to the member furthest below its ideal, and units given out too many (the
floor of one can overshoot) come back one by one from the member furthest above its
ideal that holds more than one. Ties go to the member first in ring order (for giving)
or last (for taking back). Exact rationals (:class:`fractions.Fraction`) keep the
result the same on every machine. Example: 4 heads with shares (1, 3) give (1, 3);
with (1, 1, 2) give (1, 1, 2); 4 heads over three even members give (2, 1, 1).

Grouped-query attention (fewer key/value heads than query heads): the query heads are
split; a member needs the key/value heads of the groups its query heads belong to.
When every member's query heads are whole groups the key/value projections are split
with them (:attr:`TPPlan.kv_split`); otherwise every member keeps the whole key/value
projections, computes only the heads it needs, and their gradients are summed like any
replicated parameter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from p2ptrain._errors import ConfigError

__all__ = ["TPPlan", "make_plan", "ranges", "split_counts"]

Range = tuple[int, int]


def split_counts(total: int, shares: Sequence[float], what: str = "units") -> list[int]:
    """``total`` units over ``len(shares)`` members in proportion to ``shares``: each >= 1, summing to ``total``.

    Args:
        total: units to hand out (heads, columns, tokens).
        shares: each member's relative share, in ring order; empty or all equal: even.
        what: names the units in the error message.

    Raises:
        ConfigError: fewer units than members, or a share that is not positive.
    """
    n = len(shares)
    if n == 0:
        raise ConfigError(f"no members to split {total} {what} over")
    if total < n:
        raise ConfigError(f"{total} {what} cannot be split over {n} members (each needs at least one); "
                          f"use at most {total} members or a model with more {what}")
    if any(not s > 0 for s in shares):
        raise ConfigError(f"shares must be positive, got {list(shares)}")
    weights = [Fraction(s) for s in shares]
    whole = sum(weights)
    ideal = [total * w / whole for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < total:  # give: the member furthest below its ideal, first in ring order on a tie
        i = max(range(n), key=lambda j: (ideal[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > total:  # take back: the member furthest above its ideal, last on a tie
        i = max((j for j in range(n) if counts[j] > 1), key=lambda j: (counts[j] - ideal[j], j))
        counts[i] -= 1
    return counts


def ranges(counts: Sequence[int], scale: int = 1) -> list[Range]:
    """Contiguous ``[start, stop)`` ranges of ``counts`` units each, in order, times ``scale``."""
    out, at = [], 0
    for c in counts:
        out.append((at * scale, (at + c) * scale))
        at += c
    return out


@dataclass(frozen=True)
class TPPlan:
    """One block's split over the members, in ring order.

    Attributes:
        heads: each member's query heads ``[start, stop)``.
        kv_heads: each member's key/value heads (the groups of its query heads).
        kv_split: the key/value heads are split with the query heads (no two members
            need the same one); False: every member keeps all of them (replicated).
        columns: each member's MLP hidden columns ``[start, stop)``.
        group: query heads per key/value head (1 without grouped-query attention).
    """

    heads: tuple[Range, ...]
    kv_heads: tuple[Range, ...]
    kv_split: bool
    columns: tuple[Range, ...]
    group: int


def make_plan(n_head: int, n_kv_head: int, ffn: int, shares: Sequence[float]) -> TPPlan:
    """The split of a block with ``n_head`` query heads, ``n_kv_head`` key/value heads and ``ffn`` MLP columns.

    Raises:
        ConfigError: fewer heads or columns than members, or ``n_head`` not a multiple
            of ``n_kv_head``.
    """
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ConfigError(f"{n_head} query heads do not group over {n_kv_head} key/value heads")
    group = n_head // n_kv_head
    heads = ranges(split_counts(n_head, shares, "attention heads"))
    kv = tuple((a // group, (b - 1) // group + 1) for a, b in heads)
    kv_split = all(a % group == 0 and b % group == 0 for a, b in heads)
    columns = ranges(split_counts(ffn, shares, "MLP columns"))
    return TPPlan(tuple(heads), kv, kv_split, tuple(columns), group)
