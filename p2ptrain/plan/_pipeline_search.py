"""The pure pipeline search: one device per stage, dynamic programming over contiguous cuts.

The dynamic programming over contiguous partitions that PipeDream uses (our own
code), on the cost model of :mod:`p2ptrain.plan._cost`. For each micro-batch count
``M`` and stage count ``S`` the DP first finds the smallest possible bottleneck
``T = max_s t_s`` (the steady-state rate, which dominates when ``M >> S``), then,
among partitions whose every stage stays within ``T``, the one with the smallest
fill latency ``sum_s (c_s + x_s)``; the (M, S) with the smallest predicted step wins
(:func:`p2ptrain.plan._planner.plan_pipeline` compares the micro-batch counts).
Ties go, in order, to: fewer micro-batches, fewer stages, earlier devices (in the
given order), fewer layers on earlier stages (which hold more activations under
1F1B). The hybrid search (:mod:`p2ptrain.plan._hybrid`) minimises the same step
exactly, with the same tie rule.
"""

from __future__ import annotations

from p2ptrain.plan._cost import StepModel, make_plan
from p2ptrain.plan._profile import ADAM_STATE_FACTOR
from p2ptrain.plan._types import Plan

__all__ = ["MAX_FREE_ORDER_DEVICES", "search_pipeline"]

# Searching every device order visits 2**D subsets; beyond this many devices that
# stops being instant, and the ring order is a fine answer anyway.
MAX_FREE_ORDER_DEVICES = 8

_Best = tuple[float, tuple[tuple[int, int, int], ...]] | None  # value, (device, first, last) per stage


class _Search:
    """Dynamic programming over contiguous partitions, memoised per objective.

    ``best(j, r, avail)`` is the best way to run layers ``j..L-1`` as exactly ``r + 1``
    stages on devices still available (``avail``: the index of the first usable
    device in fixed order, or the bitmask of used devices in free order). With
    ``limit`` None the value is the bottleneck ``max_s t_s``; otherwise it is the fill
    latency ``sum_s (c_s + x_s)`` over stages that all keep ``t_s <= limit``. Stages
    that do not fit their device's memory are never used.

    Tie rule: candidates are tried device by device in the given order, then by
    growing stage length, and only a strictly better value replaces the incumbent.
    """

    def __init__(self, model: StepModel, order_fixed: bool) -> None:
        self.m = model
        self.order_fixed = order_fixed
        self.n_layers = len(model.costs)
        self.n_dev = len(model.devices)
        # Devices that look the same to the model are interchangeable: in free order
        # only the first unused one of each kind is tried (prunes permutations of equals).
        self.kind = [(d.speed, d.memory_bytes, d.link_bytes_per_s, d.fixed_s, d.hop_s, d.idle_hop_s) for d in model.devices]
        self.memo: dict[float | None, dict[tuple[int, int, int], _Best]] = {}

    def run(self, stages: int, limit: float | None) -> _Best:
        """The best run of every layer as exactly ``stages`` stages under ``limit`` (see above)."""
        return self._best(0, stages - 1, 0, limit, self.memo.setdefault(limit, {}))

    def _choices(self, r: int, avail: int) -> list[int]:
        """Devices to try for the next stage, ``r`` stages after it; -1 means skip one (fixed order)."""
        if self.order_fixed:  # the next device, or skip it (when enough devices remain)
            return [avail] if self.n_dev - avail - 1 < r else [avail, -1]
        if self.n_dev - avail.bit_count() - 1 < r:
            return []
        out, seen = [], set()
        for d in range(self.n_dev):
            if not avail >> d & 1 and self.kind[d] not in seen:
                seen.add(self.kind[d])
                out.append(d)
        return out

    def _best(self, j: int, r: int, avail: int, limit: float | None, memo: dict[tuple[int, int, int], _Best]) -> _Best:
        key = (j, r, avail)
        if key in memo:
            return memo[key]
        m, n = self.m, self.n_layers
        result: _Best = None
        if self.order_fixed and self.n_dev - avail - 1 < r:
            memo[key] = None
            return None
        for d in self._choices(r, avail):
            if d < 0:  # fixed order: leave device ``avail`` out
                sub = self._best(j, r, avail + 1, limit, memo)
                if sub is not None and (result is None or sub[0] < result[0]):
                    result = sub
                continue
            dev = m.devices[d]
            nxt = d + 1 if self.order_fixed else avail | (1 << d)
            in_bytes = m.acts[j - 1] if j > 0 else 0
            flight_mb = m.in_flight[r] * m.mb
            # The last stage must take every remaining layer; others leave r layers.
            for j2 in range(n - 1 if r == 0 else j, n - r):
                compute = m.mb * (m.time[j2 + 1] - m.time[j]) / dev.speed + dev.fixed_s * (j2 - j + 1) / n + m.overhead[d]
                # compute grows with j2 and bounds the value from below (both
                # objectives): once it reaches the incumbent, longer stages cannot win.
                if (result is not None and compute >= result[0]) or (limit is not None and compute > limit):
                    break
                out_bytes = m.acts[j2]
                wire = in_bytes + (out_bytes if j2 < n - 1 else 0)
                transfer = m.mb * wire / dev.link_bytes_per_s if wire else 0.0
                # Conditionals rather than max() here and below: this is the search's
                # innermost loop, where a builtin call costs more than the comparison.
                t = compute if compute >= transfer else transfer
                if limit is not None and t > limit:
                    continue
                acts = in_bytes + (m.saved[j2 + 1] - m.saved[j]) + out_bytes
                memory = ADAM_STATE_FACTOR * (m.params[j2 + 1] - m.params[j]) + flight_mb * acts
                if memory > dev.memory_bytes:
                    continue
                sub = (0.0, ()) if r == 0 else self._best(j2 + 1, r - 1, nxt, limit, memo)
                if sub is None:
                    continue
                value = (t if t >= sub[0] else sub[0]) if limit is None else (compute + transfer) + sub[0]
                if result is None or value < result[0]:
                    result = (value, ((d, j, j2), *sub[1]))
        memo[key] = result
        return result


def search_pipeline(model: StepModel, order_fixed: bool, use_all: bool, max_stages: int | None = None) -> Plan | None:
    """The best pure pipeline plan (one device per stage) for one micro-batch count.

    Args:
        model: the cost model of that micro-batch count.
        order_fixed: stages follow the devices' order in ``model.devices``; False also
            searches other orders (callers keep that to ``MAX_FREE_ORDER_DEVICES``).
        use_all: one stage per device; False tries every stage count up to the
            devices, the layers and ``max_stages``.
        max_stages: at most this many stages; None for no limit but the devices and
            layers (ignored when ``use_all``).

    Returns:
        The plan with the smallest predicted step (ties as in the module docstring),
        or None if nothing fits the devices' memory.
    """
    n_layers, n_dev = len(model.costs), len(model.devices)
    search = _Search(model, order_fixed)
    counts = [n_dev] if use_all else list(range(1, min(n_dev, n_layers, max_stages or n_dev) + 1))
    # Bottlenecks for every stage count come from one table (indexed from the end).
    bottleneck = {s: b[0] for s in counts if (b := search.run(s, None)) is not None}
    # A lower bound on each count's step lets the slower second pass skip counts that
    # cannot win: the fill takes at least the bottleneck stage, and at least all the
    # work on the fastest device plus every stage's overhead.
    work = model.mb * model.time[-1] / max(d.speed for d in model.devices)
    bound = {
        s: (model.micro - 1) * t + max(t, work + s * model.min_overhead) for s, t in bottleneck.items()
    }
    chosen: Plan | None = None
    for s in sorted(bound, key=lambda s: (bound[s], s)):
        if chosen is not None and (bound[s], s) > (chosen.step_s, len(chosen.stages)):
            break
        second = search.run(s, bottleneck[s])
        assert second is not None  # the bottleneck-optimal partition itself qualifies
        plan = make_plan(model, tuple(((d,), i, j) for d, i, j in second[1]))
        if chosen is None or (plan.step_s, s) < (chosen.step_s, len(chosen.stages)):
            chosen = plan
    return chosen
