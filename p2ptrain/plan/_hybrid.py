"""The hybrid-plan search: device groupings exhaustively, layer cuts by branch and bound.

:func:`search_hybrid` finds the plan of :func:`p2ptrain.plan._planner.plan_hybrid` under
the cost model in :mod:`p2ptrain.plan._cost`'s docstring: over every micro-batch count,
every ordered grouping (an ordered partition of a subset of the devices into stage
groups, one group per stage) and every contiguous cut of the layers, the smallest
predicted step. Exact, with three prunings that never drop the answer:

- Devices the cost model cannot tell apart (same speed, memory and link) are
  interchangeable: of the groupings that differ only by swapping such devices, only
  the one first in the tie order is searched.
- Each (micro-batch count, grouping) has a lower bound on its step from its total
  work alone; they are searched by ascending bound, and the search ends once the
  bound exceeds the best step found.
- A grouping's layer cuts are enumerated depth first, stage by stage, and a branch
  is dropped once its partial step plus a lower bound for the layers left exceeds
  the best step.

The bound: group ``g`` computes ``w`` seconds of per-sample work in at least
``a_g * w + h`` seconds (``h`` the smallest per-op overhead of any device), ``a_g = max_d n_d / speed_d``, so work ``W``
left to groups ``R`` needs a fill of at least ``W * min_R a_g + |R| * h``
and a bottleneck of at least ``W / sum_R (1 / a_g) + h`` (the stages
cannot all be faster than the work spread in proportion to their rates).

Ties: the smallest ``(step, micro-batches, stages, groups, last layers)``, where
``groups`` is the tuple of each stage's device indices (ascending) compared
lexicographically and ``last layers`` puts fewer layers on earlier stages. The
prunings drop only what is strictly worse than the incumbent (with a relative slack
of ``_SLACK`` for float rounding), so the answer does not depend on visiting order.
:func:`tie_key` is this rule as a sort key over finished plans.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from p2ptrain.plan._cost import Group, Parts, StageCost, StepModel
from p2ptrain.plan._types import Plan

__all__ = ["MAX_EXHAUSTIVE_DEVICES", "TieKey", "search_hybrid", "tie_key"]

# Ordered groupings of subsets of 6 devices number 9,366 (sum over k of C(6, k) times
# the Fubini number of k); at 7 they are 7 times as many and the search stops being
# interactive in pure Python.
MAX_EXHAUSTIVE_DEVICES = 6

# Bounds are compared to the best step with this relative slack, so a branch whose
# bound exceeds it only by float rounding (it might tie) is still searched.
_SLACK = 1e-9

_Grouping = tuple[Group, ...]  # one group of device indices per stage, in pipeline order
TieKey = tuple[float, int, int, _Grouping, tuple[int, ...]]  # (step, micro, stages, grouping, last layers)


def _set_partitions(items: Sequence[int]) -> Iterator[list[Group]]:
    """Every partition of ``items`` into blocks (each block ascending when ``items`` is)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [(first,), *part]
        for k in range(len(part)):
            yield [*part[:k], (first, *part[k]), *part[k + 1 :]]


def _groupings(kinds: Sequence[object], use_all: bool, max_stages: int) -> list[_Grouping]:
    """Ordered groupings of the devices, one per arrangement of device kinds.

    Args:
        kinds: per device, what the cost model sees of it; equal kinds are interchangeable.
        use_all: only groupings that use every device.
        max_stages: at most this many groups.

    Returns:
        For each distinct sequence of kind multisets, the lexicographically smallest
        grouping, in that order.
    """
    n = len(kinds)
    kind_id = [kinds.index(k) for k in kinds]  # a sortable stand-in for the kind
    best: dict[tuple[tuple[int, ...], ...], _Grouping] = {}
    for mask in range((1 << n) - 1 if use_all else 1, 1 << n):
        members = [d for d in range(n) if mask >> d & 1]
        for blocks in _set_partitions(members):
            if len(blocks) > max_stages:
                continue
            for order in itertools.permutations(blocks):
                sig = tuple(tuple(sorted(kind_id[d] for d in g)) for g in order)
                if sig not in best or order < best[sig]:
                    best[sig] = order
    return sorted(best.values())


def tie_key(plan: Plan, index: dict[str, int]) -> TieKey:
    """The hybrid tie rule as a sort key; ``index`` maps node ids to their position in ``devices``."""
    groups = tuple(tuple(index[n] for n in st.node_ids) for st in plan.stages)
    return (plan.step_s, plan.micro_batches, len(plan.stages), groups, tuple(st.last_layer for st in plan.stages))


def search_hybrid(models: Sequence[StepModel], use_all: bool, max_stages: int) -> tuple[int, Parts] | None:
    """The best hybrid plan over ``models`` (one per micro-batch count, same layers and devices).

    Args:
        models: the cost model for each candidate micro-batch count.
        use_all: every device must be in some stage.
        max_stages: at most this many stages (at most the number of layers).

    Returns:
        ``(index into models, parts)`` of the plan with the smallest predicted step
        (ties as in the module docstring), or None if no grouping and cut fits the
        devices' memory.
    """
    kinds = [(d.speed, d.memory_bytes, d.link_bytes_per_s, d.fixed_s, d.hop_s, d.idle_hop_s) for d in models[0].devices]
    return _Search(models, _groupings(kinds, use_all, max_stages)).run()


class _Search:
    """Branch and bound over (micro-batch count, grouping) candidates and their cuts; holds the incumbent."""

    def __init__(self, models: Sequence[StepModel], grouping_list: list[_Grouping]) -> None:
        self.models = models
        self.grouping_list = grouping_list
        self.best_key: TieKey | None = None
        self.best: tuple[int, Parts] | None = None
        self.limit = math.inf  # prune what is bound to take longer than this
        self.groups: list[dict[Group, _GroupInfo | None]] = [{} for _ in models]
        self.stage_memo: list[dict[tuple[Group, int, int, int], StageCost]] = [{} for _ in models]

    def _infos(self, index: int, grouping: _Grouping) -> list[_GroupInfo] | None:
        """The groups' shares and factors under ``models[index]``, or None if one gets no shares."""
        infos = [self._group(index, g) for g in grouping]
        out = [x for x in infos if x is not None]
        return out if len(out) == len(infos) else None

    def _group(self, index: int, group: Group) -> _GroupInfo | None:
        memo = self.groups[index]
        if group not in memo:
            model = self.models[index]
            shares = model.shares(group)
            memo[group] = None if shares is None else _GroupInfo(
                shares,
                max(n / model.devices[d].speed for d, n in zip(group, shares)),
                2 * (len(group) - 1) * max(model.overhead[d] for d in group)
                + model.closing_hops * max(model.devices[d].idle_hop_s or model.overhead[d] for d in group),
            )  # fmt: skip
        return memo[group]

    def run(self) -> tuple[int, Parts] | None:
        heads = []
        for index, model in enumerate(self.models):
            for grouping in self.grouping_list:
                info = self._infos(index, grouping)
                if info is not None:
                    a_min, inv_sum, sync = _factors(info)
                    fill, bottleneck = _bounds(model, a_min, inv_sum, len(grouping), model.time[-1])
                    bound = max(fill, bottleneck) + (model.micro - 1) * bottleneck + sync
                    heads.append((bound, model.micro, len(grouping), grouping, index))
        heads.sort()
        for bound, _, _, grouping, index in heads:
            if bound > self.limit:
                break
            info = self._infos(index, grouping)
            assert info is not None  # it has a head
            cand = _Candidate(index, grouping, [x.shares for x in info], _suffix_factors(info))
            self._cuts(cand, 0, 0, 0.0, 0.0, 0.0, ())
        return self.best

    def _cuts(
        self, cand: _Candidate, p: int, i: int, fill: float, tmax: float, ymax: float, lasts: tuple[int, ...]
    ) -> None:
        """Try every last layer for stage ``p`` (starting at layer ``i``) and recurse.

        ``fill``, ``tmax`` and ``ymax`` are the step's terms over stages ``0..p-1``,
        ``lasts`` their last layers.
        """
        model, memo, grouping = self.models[cand.model], self.stage_memo[cand.model], cand.grouping
        n_layers, micro = len(model.costs), model.micro
        after = len(grouping) - p - 1
        group = grouping[p]
        # The last stage takes every remaining layer; others leave one per later stage.
        for j in range(n_layers - 1 if after == 0 else i, n_layers - after):
            key = (group, i, j, after)
            cost = memo.get(key)
            if cost is None:
                cost = memo[key] = model.stage(i, j, group, cand.shares[p], after)
            c = cost.compute
            # Compute only grows with j: once it alone loses, longer stages lose too.
            if fill + c + (micro - 1) * max(tmax, c) + ymax > self.limit:
                break
            if not cost.fits:
                continue
            fill2 = fill + (cost.compute + cost.transfer)
            tmax2 = max(tmax, cost.compute, cost.transfer)
            ymax2 = max(ymax, cost.sync)
            if after:
                a_min, inv_sum, sync = cand.rest[p + 1]
                fill3, tmax3 = _bounds(model, a_min, inv_sum, after, model.time[-1] - model.time[j + 1])
                if fill2 + fill3 + (micro - 1) * max(tmax2, tmax3) + max(ymax2, sync) > self.limit:
                    continue
                self._cuts(cand, p + 1, j + 1, fill2, tmax2, ymax2, (*lasts, j))
                continue
            # Summed as _cost.step_s sums a plan's stages, so the plan's step equals it.
            full: TieKey = (fill2 + (micro - 1) * tmax2 + ymax2, micro, len(grouping), grouping, (*lasts, j))
            if self.best_key is None or full < self.best_key:
                self.best_key, self.limit = full, full[0] * (1 + _SLACK)
                self.best = (cand.model, tuple(zip(grouping, (0, *(x + 1 for x in lasts)), full[4])))


class _Candidate(NamedTuple):
    """A (micro-batch count, grouping) whose layer cuts are being searched."""

    model: int  # index into the models
    grouping: _Grouping
    shares: list[tuple[int, ...]]  # per group
    rest: list[tuple[float, float, float]]  # _factors of groups p.. for every p


class _GroupInfo(NamedTuple):
    shares: tuple[int, ...]
    a: float  # max_d n_d / speed_d: seconds of compute per second of per-sample work
    sync: float  # the least all-reduce time: the ring's per-round overheads


def _factors(info: Sequence[_GroupInfo]) -> tuple[float, float, float]:
    """(min a_g, sum 1 / a_g, max least sync) of a run of groups: what the bounds scale."""
    return min(x.a for x in info), sum(1 / x.a for x in info), max(x.sync for x in info)


def _suffix_factors(info: Sequence[_GroupInfo]) -> list[tuple[float, float, float]]:
    """``_factors(info[p:])`` for every ``p``, in one pass from the end."""
    out = [(math.inf, 0.0, 0.0)] * len(info)
    a_min, inv_sum, sync = math.inf, 0.0, 0.0
    for p in range(len(info) - 1, -1, -1):
        x = info[p]
        a_min, inv_sum, sync = min(a_min, x.a), inv_sum + 1 / x.a, max(sync, x.sync)
        out[p] = (a_min, inv_sum, sync)
    return out


def _bounds(model: StepModel, a_min: float, inv_sum: float, groups: int, work: float) -> tuple[float, float]:
    """Lower bounds (fill, bottleneck) for per-sample ``work`` on ``groups`` groups with these factors."""
    oh = model.min_overhead
    return work * a_min + groups * oh, work / inv_sum + oh
