"""The planner: which devices run which layers, with how many micro-batches.

Given each layer's profiled cost (:class:`~p2ptrain.plan._profile.LayerCost`) and the
devices (relative speed, memory, link rate), the planner cuts the model into
contiguous stages so that a training step is as fast as possible and every stage fits
its devices' memory. This is the "plan" step of collaborative edge training.

- :func:`plan_pipeline`: a pure pipeline, one device per stage; the dynamic
  programming over contiguous partitions that PipeDream uses (our own code).
- :func:`plan_hybrid`: Asteroid's (MobiCom'24) hybrid: a pipeline whose every stage
  is run by a *group* of devices in data parallel, each taking an integer share of
  every micro-batch in proportion to its speed. One device per group is a pure
  pipeline, one group of every device is pure data parallelism. The search is in
  :mod:`p2ptrain.plan._hybrid`.

Every node runs the planner on the same agreed inputs and must get the same plan, so
the search is deterministic: floats are combined in a fixed order and ties are broken
by a fixed rule (below), never by dict or set order.

Cost model (per micro-batch of ``b`` samples; stage ``s`` holds layers ``i..j`` and
runs on group ``G``, where member ``d`` takes ``n_d`` of the ``b`` samples; a pure
pipeline has ``G = {d}``, ``n_d = b``):

- shares ``n_d``: proportional to ``d.speed`` by the largest-remainder method
  (remainder ties go to the faster device, then the earlier one in the given order);
  every member needs ``n_d >= 1``, so a group larger than ``b``, or one where a slow
  member would get no sample, is not a candidate for that micro-batch size.
- compute ``c_s = max_d (n_d * work(i..j) / d.speed + d.fixed_s * (j - i + 1) / L
  + op_overhead_s)`` where ``work`` is the per-sample forward + backward seconds of
  the layers, ``d.fixed_s`` the part of a whole-model pass on ``d`` that does not
  grow with the batch (spread evenly over the ``L`` layers), and the overhead the
  fixed cost of one forward and one backward op in the executor (message handling,
  thread hand-off): the two fixed terms are what make tiny micro-batches lose.
- transfer ``x_s = max_d n_d * wire / d.link_bytes_per_s`` with ``wire`` the
  per-sample ``in_bytes`` (unless first stage) plus ``out_bytes`` (unless last): a
  LAN is a star (switch or access point), so each device's own link carries, in each
  direction, its outgoing activation plus the gradient it returns for its input. The
  first stage reads its inputs locally; the targets it sends to the last stage
  (token ids: a few hundred bytes a sample, next to kilobytes of activations) and
  the codec's compression of activations are not counted.
- stage time ``t_s = max(c_s, x_s)``: the executor sends and receives on a separate
  thread while computing, so in the steady state a stage is limited by the slower of
  the two, not their sum.
- after the flush ``y_s``: a group of ``g > 1`` all-reduces its stage's gradients
  (``P`` = the layers' parameter bytes) with a ring,
  ``2 (g - 1) / g * P / min_d d.link_bytes_per_s + 2 (g - 1) * op_overhead_s``
  (bandwidth-optimal ring: ``2 (g - 1)`` rounds of ``P / g``); then every member
  updates the parameters, ``update_s_per_byte * P / min_d d.speed``.
  ``StagePlan.sync_s`` is this whole tail. (The executor's per-step loss sum runs in
  the background and is not charged.)
- step time ``step = sum_s (c_s + x_s) + (M - 1) * max_s t_s + max_s y_s``: the
  first micro-batch crosses every stage forward and back without overlap (the
  pipeline fill and drain, the "bubble"), then one micro-batch leaves every
  ``max_s t_s``; the stages' tails then run concurrently. With equal stages and free
  links this is GPipe's ``(M + S - 1) * t``; it holds for GPipe and 1F1B alike (tests
  simulate both).
- memory ``m_d = ADAM_STATE_FACTOR * params(i..j) + k_s * n_d * (in_bytes + saved +
  out_bytes)`` for every member, where ``k_s`` is the schedule's peak of
  micro-batches in flight at that stage (``M`` for GPipe, ``min(S - s, M)`` for
  1F1B) and ``saved`` is what autograd keeps per sample for the stage's layers; every
  member must fit its device's memory (what is free for training).

Pipeline search: for each micro-batch count ``M`` and stage count ``S`` the DP first
finds the smallest possible bottleneck ``T = max_s t_s`` (the steady-state rate,
which dominates when ``M >> S``), then, among partitions whose every stage stays
within ``T``, the one with the smallest fill latency ``sum_s (c_s + x_s)``; the
(M, S) with the smallest predicted step wins. Ties go, in order, to: fewer
micro-batches, fewer stages, earlier devices (in the given order), fewer layers on
earlier stages (which hold more activations under 1F1B). The hybrid search
(:mod:`p2ptrain.plan._hybrid`) minimises the same step exactly, with the same tie rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain.plan._hybrid import MAX_EXHAUSTIVE_DEVICES, search_hybrid
from p2ptrain.plan._profile import ADAM_STATE_FACTOR, LayerCost
from p2ptrain.plan._schedule import SCHEDULES, max_in_flight

__all__ = [
    "Device",
    "Plan",
    "StagePlan",
    "bound_samples_per_s",
    "format_bytes",
    "plan_hybrid",
    "plan_pipeline",
    "single_device_samples_per_s",
    "uniform_plan",
]

# Fixed executor cost per micro-batch per stage (one forward op + one backward op):
# two queue hand-offs between the torch thread and the messaging thread plus two
# framed sends, each some 50-150 us on a CPU of this class. An estimate; the executor
# can pass what it measures.
DEFAULT_OP_OVERHEAD_S = 5e-4

# Searching every device order visits 2**D subsets; beyond this many devices that
# stops being instant, and the ring order is a fine answer anyway.
_MAX_FREE_ORDER_DEVICES = 8


@dataclass(frozen=True)
class Device:
    """One device as the planner sees it.

    Attributes:
        node_id: the node's id (ring members are ordered by it).
        speed: relative compute speed: time on this device = profiled time / speed
            (1.0 for the device that ran the profile).
        memory_bytes: memory free for training (parameters, gradients, optimizer
            state, activations), after the runtime's own use.
        link_bytes_per_s: rate of this device's network link, in each direction
            (``math.inf`` for loopback).
        fixed_s: seconds of one whole-model forward+backward on this device that do
            not grow with the batch (interpreter and per-op dispatch); a stage of
            ``k`` of the ``L`` layers pays ``k / L`` of it per micro-batch.
    """

    node_id: str
    speed: float
    memory_bytes: int
    link_bytes_per_s: float
    fixed_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ConfigError(f"device {self.node_id!r} has speed {self.speed}; use a finite number > 0")
        if self.memory_bytes <= 0:
            raise ConfigError(f"device {self.node_id!r} has memory_bytes {self.memory_bytes}; use > 0")
        if not self.link_bytes_per_s > 0:
            raise ConfigError(
                f"device {self.node_id!r} has link_bytes_per_s {self.link_bytes_per_s}; use > 0 (math.inf for loopback)"
            )
        if not (math.isfinite(self.fixed_s) and self.fixed_s >= 0):
            raise ConfigError(f"device {self.node_id!r} has fixed_s {self.fixed_s}; use a finite number >= 0")


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a group of devices and the contiguous layers they run.

    Every member runs all of the stage's layers on its share of each micro-batch
    (data parallelism inside the stage); a pure pipeline stage has one member.

    Attributes:
        node_ids: the devices running the stage (at least one), in the order of the
            planner's ``devices`` argument.
        shares: samples of each micro-batch each member runs, aligned with
            ``node_ids``; all >= 1, summing to the plan's ``micro_batch_size``.
        first_layer: index of its first layer.
        last_layer: index of its last layer (inclusive).
        compute_s: forward + backward seconds per micro-batch of the slowest member,
            executor overhead included.
        transfer_s: seconds per micro-batch the busiest member's link spends on the
            boundary activations and gradients (each direction).
        sync_s: seconds of the stage's tail, once per step after the flush: the
            group's gradient all-reduce (none for one device) and the optimizer
            update.
        memory_bytes: predicted peak memory of the member that needs the most.
    """

    node_ids: tuple[str, ...]
    shares: tuple[int, ...]
    first_layer: int
    last_layer: int
    compute_s: float
    transfer_s: float
    sync_s: float
    memory_bytes: int

    @property
    def layers(self) -> range:
        """The stage's layer indices."""
        return range(self.first_layer, self.last_layer + 1)

    @property
    def stage_s(self) -> float:
        """Steady-state seconds per micro-batch: compute and transfer overlap."""
        return max(self.compute_s, self.transfer_s)


@dataclass(frozen=True)
class Plan:
    """A pipeline plan: stages in pipeline order and the micro-batching of a step.

    Attributes:
        stages: the stages, first (reads the inputs) to last (computes the loss).
        micro_batches: micro-batches per training step, ``M``.
        micro_batch_size: samples per micro-batch; ``M * micro_batch_size`` is the
            global batch.
        step_s: predicted seconds per training step (see the module's cost model).
        samples_per_s: predicted training throughput, ``global_batch / step_s``.
        schedule: the schedule the memory estimate assumes (a key of ``SCHEDULES``).
    """

    stages: tuple[StagePlan, ...]
    micro_batches: int
    micro_batch_size: int
    step_s: float
    samples_per_s: float
    schedule: str = "1f1b"

    @property
    def global_batch(self) -> int:
        """Samples per training step."""
        return self.micro_batches * self.micro_batch_size

    @property
    def members(self) -> tuple[str, ...]:
        """Every device the plan uses: stage by stage, then in each stage's order."""
        return tuple(n for st in self.stages for n in st.node_ids)

    def stage_of(self, node_id: str) -> int | None:
        """Index of the stage ``node_id`` runs, or None if the plan leaves it out."""
        return next((i for i, st in enumerate(self.stages) if node_id in st.node_ids), None)

    def summary(self) -> list[list[Any]]:
        """``[[node_ids, shares, first_layer, last_layer], ...]`` per stage: plain lists for JSON."""
        return [[list(st.node_ids), list(st.shares), st.first_layer, st.last_layer] for st in self.stages]

    def table(self) -> str:
        """The plan as a text table, one row per stage, with the prediction below.

        A group's devices are listed as ``id(share)``; a lone device as its id (it
        runs the whole micro-batch).
        """
        header = ("stage", "devices", "layers", "compute ms", "transfer ms", "tail ms", "memory")
        rows = [
            (
                str(i),
                ", ".join(f"{n}({k})" for n, k in zip(st.node_ids, st.shares)) if st.shares[1:] else st.node_ids[0],
                f"{st.first_layer}-{st.last_layer}" if st.last_layer > st.first_layer else str(st.first_layer),
                f"{st.compute_s * 1e3:.2f}",
                f"{st.transfer_s * 1e3:.2f}",
                f"{st.sync_s * 1e3:.2f}",
                format_bytes(st.memory_bytes),
            )
            for i, st in enumerate(self.stages)
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        # Text columns left-aligned, numbers right-aligned.
        align = ["<", "<", "<", ">", ">", ">", ">"]
        lines = ["  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip() for r in [header, *rows]]
        lines.append(
            f"{self.micro_batches} micro-batch{'es' if self.micro_batches != 1 else ''} of {self.micro_batch_size} ({self.schedule}): "
            f"predicted {self.step_s * 1e3:.1f} ms/step, {self.samples_per_s:.1f} samples/s"
        )
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, 3 significant digits (``"3.1 GiB"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------
# The cost model


@dataclass(frozen=True)
class _Model:
    """Prefix sums of the layer costs and the step's shape: the cost of any stage in O(1)."""

    costs: Sequence[LayerCost]
    devices: Sequence[Device]
    micro: int
    mb: int
    schedule: str
    op_overhead_s: float
    update_s_per_byte: float = 0.0
    time: list[float] = field(init=False)  # prefix sums of fwd_s + bwd_s
    params: list[int] = field(init=False)
    saved: list[int] = field(init=False)
    acts: list[int] = field(init=False)
    in_flight: list[int] = field(init=False)  # by the number of stages after this one

    def __post_init__(self) -> None:
        time, params, saved = [0.0], [0], [0]
        for c in self.costs:
            time.append(time[-1] + (c.fwd_s + c.bwd_s))
            params.append(params[-1] + c.param_bytes)
            # saved_bytes 0 means "not measured": the layer's output is a fair stand-in.
            saved.append(saved[-1] + (c.saved_bytes or c.act_bytes))
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "saved", saved)
        object.__setattr__(self, "acts", [c.act_bytes for c in self.costs])
        # Both schedules' peak depends only on how many stages follow (1F1B: that many
        # plus one, capped by M; GPipe: M), so the DP can index stages from the end
        # and one table serves every stage count.
        flight = [max_in_flight(SCHEDULES[self.schedule](0, r + 1, self.micro)) for r in range(len(self.devices))]
        object.__setattr__(self, "in_flight", flight)

    def shares(self, group: Sequence[int]) -> tuple[int, ...] | None:
        """Each member's samples of a micro-batch (see :func:`_split_shares`)."""
        if len(group) == 1:
            return (self.mb,)
        return _split_shares(self.mb, [self.devices[d].speed for d in group])

    def stage(self, i: int, j: int, group: Sequence[int], shares: Sequence[int], after: int) -> _StageCost:
        """The cost of layers ``i..j`` on ``group`` (device indices) with ``shares``, ``after`` stages following.

        The pipeline search inlines this arithmetic (one member, share ``mb``) in its
        hot loop; keep the two in step.
        """
        in_bytes = self.acts[i - 1] if i > 0 else 0
        out_bytes = self.acts[j]
        wire = in_bytes + (out_bytes if j < len(self.costs) - 1 else 0)
        work = self.time[j + 1] - self.time[i]
        params = self.params[j + 1] - self.params[i]
        acts = in_bytes + (self.saved[j + 1] - self.saved[i]) + out_bytes
        compute = transfer = 0.0
        memory, fits, link = 0, True, math.inf
        for d, n in zip(group, shares):
            dev = self.devices[d]
            compute = max(compute, n * work / dev.speed + dev.fixed_s * (j - i + 1) / len(self.costs) + self.op_overhead_s)
            transfer = max(transfer, n * wire / dev.link_bytes_per_s if wire else 0.0)
            need = ADAM_STATE_FACTOR * params + self.in_flight[after] * n * acts
            memory = max(memory, need)
            fits = fits and need <= dev.memory_bytes
            link = min(link, dev.link_bytes_per_s)
        g = len(group)
        sync = 2 * (g - 1) / g * params / link + 2 * (g - 1) * self.op_overhead_s if g > 1 else 0.0
        # After the flush every member also updates the stage's parameters (the slowest
        # member decides).
        slowest = min(self.devices[d].speed for d in group)
        sync += self.update_s_per_byte * params / slowest
        return _StageCost(compute, transfer, sync, memory, fits)


class _StageCost(NamedTuple):
    compute: float
    transfer: float
    sync: float
    memory: int  # the largest member's peak
    fits: bool  # every member within its device's memory


def _split_shares(total: int, speeds: Sequence[float]) -> tuple[int, ...] | None:
    """``total`` samples split in proportion to ``speeds`` by the largest-remainder method.

    Remainder ties go to the faster device (it finishes the extra sample sooner),
    then to the earlier one. None when some device would get no sample.
    """
    whole = math.fsum(speeds)  # exactly rounded: the same for any member order
    quotas = [total * s / whole for s in speeds]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(len(speeds)), key=lambda k: (shares[k] - quotas[k], -speeds[k], k))
    for k in order[: total - sum(shares)]:
        shares[k] += 1
    return tuple(shares) if min(shares) >= 1 else None


_Group = tuple[int, ...]  # device indices, ascending
_Parts = tuple[tuple[_Group, int, int], ...]  # (device indices, first layer, last layer) per stage


def _make_plan(model: _Model, parts: _Parts) -> Plan:
    """The Plan of ``parts`` in pipeline order; every group must get shares."""
    stages = []
    for pos, (group, i, j) in enumerate(parts):
        shares = model.shares(group)
        assert shares is not None, group
        c = model.stage(i, j, group, shares, len(parts) - pos - 1)
        ids = tuple(model.devices[d].node_id for d in group)
        stages.append(StagePlan(ids, shares, i, j, c.compute, c.transfer, c.sync, c.memory))
    step = _step_s(model.micro, [(st.compute_s, st.transfer_s, st.sync_s) for st in stages])
    return Plan(tuple(stages), model.micro, model.mb, step, model.micro * model.mb / step, model.schedule)


def _step_s(micro: int, stages: Sequence[tuple[float, float, float]]) -> float:
    """The step time of stages given as (compute, transfer, sync), summed in stage order."""
    fill, bottleneck, sync = 0.0, 0.0, 0.0
    for c, x, y in stages:
        fill += c + x
        bottleneck = max(bottleneck, c, x)
        sync = max(sync, y)
    return fill + (micro - 1) * bottleneck + sync


# ---------------------------------------------------------------------------------
# The search

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

    def __init__(self, model: _Model, order_fixed: bool) -> None:
        self.m = model
        self.order_fixed = order_fixed
        self.n_layers = len(model.costs)
        self.n_dev = len(model.devices)
        # Devices that look the same to the model are interchangeable: in free order
        # only the first unused one of each kind is tried (prunes permutations of equals).
        self.kind = [(d.speed, d.memory_bytes, d.link_bytes_per_s, d.fixed_s) for d in model.devices]
        self.memo: dict[float | None, dict[tuple[int, int, int], _Best]] = {}

    def run(self, stages: int, limit: float | None) -> _Best:
        return self._best(0, stages - 1, 0, limit, self.memo.setdefault(limit, {}))

    def _choices(self, r: int, avail: int) -> list[int]:
        if self.order_fixed:  # the next device, or skip it (when enough devices remain)
            return [avail] if self.n_dev - avail - 1 < r else [avail, -1]
        if self.n_dev - bin(avail).count("1") - 1 < r:
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
                compute = m.mb * (m.time[j2 + 1] - m.time[j]) / dev.speed + dev.fixed_s * (j2 - j + 1) / n + m.op_overhead_s
                # compute grows with j2 and bounds the value from below (both
                # objectives): once it reaches the incumbent, longer stages cannot win.
                if (result is not None and compute >= result[0]) or (limit is not None and compute > limit):
                    break
                out_bytes = m.acts[j2]
                wire = in_bytes + (out_bytes if j2 < n - 1 else 0)
                transfer = m.mb * wire / dev.link_bytes_per_s if wire else 0.0
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


def _plan_for(model: _Model, order_fixed: bool, use_all: bool, max_stages: int | None = None) -> Plan | None:
    """The best pipeline plan for one micro-batch count, or None if nothing fits."""
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
        s: (model.micro - 1) * t + max(t, work + s * model.op_overhead_s) for s, t in bottleneck.items()
    }
    chosen: Plan | None = None
    for s in sorted(bound, key=lambda s: (bound[s], s)):
        if chosen is not None and (bound[s], s) > (chosen.step_s, len(chosen.stages)):
            break
        second = search.run(s, bottleneck[s])
        assert second is not None  # the bottleneck-optimal partition itself qualifies
        plan = _make_plan(model, tuple(((d,), i, j) for d, i, j in second[1]))
        if chosen is None or (plan.step_s, s) < (chosen.step_s, len(chosen.stages)):
            chosen = plan
    return chosen


def _check_inputs(costs: Sequence[LayerCost], devices: Sequence[Device], global_batch: int, sched: str) -> None:
    if not costs:
        raise ConfigError("the planner needs the cost of at least one layer; profile the model first")
    if not devices:
        raise ConfigError("the planner needs at least one device")
    ids = [d.node_id for d in devices]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"device node ids must be unique, got {ids}")
    if not _per_sample_s(costs) > 0:
        raise ConfigError("the layers' forward and backward times sum to 0; profile the model on this device first")
    if global_batch < 1:
        raise ConfigError(f"global_batch must be >= 1, got {global_batch}")
    if sched not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {sched!r}; use one of {', '.join(sorted(SCHEDULES))}")


def _micro_counts(global_batch: int, micro_batches: int | None, n_dev: int) -> list[int]:
    if micro_batches is None:
        # Up to 4 micro-batches per device: past that the bubble is under ~20% of a
        # step for S <= M / 4 and per-op overheads start to dominate (GPipe reports
        # the bubble negligible once M >= 4 S).
        return [m for m in range(1, min(global_batch, 4 * n_dev) + 1) if global_batch % m == 0]
    if not 1 <= micro_batches <= global_batch or global_batch % micro_batches:
        raise ConfigError(
            f"micro_batches={micro_batches} does not divide global_batch={global_batch}; "
            "use a divisor so every micro-batch has the same size"
        )
    return [micro_batches]


def _infeasible(
    model: _Model, use_all: bool, order_fixed: bool, micro_fixed: bool, *, hybrid: bool = False, capped: bool = False
) -> PlanError:
    """The clearest reason why no plan fits, with the numbers.

    ``hybrid``: groups may share a stage (a layer then needs only one sample's
    activations on a device); ``capped``: the stage count was limited.
    """
    costs, devices = model.costs, model.devices
    if use_all and not hybrid and len(devices) > len(costs):
        return PlanError(
            f"use_all=True needs one layer per device at least: the model has {len(costs)} layers "
            f"but there are {len(devices)} devices; pass use_all=False to leave devices out"
        )
    total = sum(d.memory_bytes for d in devices)
    state = ADAM_STATE_FACTOR * model.params[-1]
    acts = model.mb * (model.saved[-1] + costs[-1].act_bytes)
    if state + acts > total:
        return PlanError(
            f"the model needs {format_bytes(state + acts)} ({format_bytes(state)} for parameters, gradients "
            f"and Adam state, {format_bytes(acts)} of activations per micro-batch of {model.mb}) but the "
            f"{len(devices)} devices hold {format_bytes(total)} together; add devices"
            + (", use more micro-batches" if micro_fixed else "")
            + " or train a smaller model"
        )
    largest = max(devices, key=lambda d: d.memory_bytes)
    for i in range(len(costs)):
        # As the last stage (the fewest micro-batches in flight), with the smallest share.
        need = model.stage(i, i, (0,), (1 if hybrid else model.mb,), 0).memory
        if need > largest.memory_bytes:
            return PlanError(
                f"layer {i} alone needs {format_bytes(need)} but the largest device "
                f"({largest.node_id}) holds {format_bytes(largest.memory_bytes)}; a stage holds whole layers"
            )
    hints = [
        h
        for h, ok in (
            ("more micro-batches", micro_fixed),
            ("the 1f1b schedule", model.schedule != "1f1b"),
            ("use_all=False", use_all),
            ("order_fixed=False", order_fixed and len(devices) <= _MAX_FREE_ORDER_DEVICES),
            ("max_stages=None", capped),
        )
        if ok
    ]
    return PlanError(
        f"no split of the {len(costs)} layers into contiguous stages fits the devices' memory (the model "
        f"needs at least {format_bytes(state + acts)} of the {format_bytes(total)} they hold, but not in "
        f"pieces that match them)" + (f"; try {', '.join(hints)}" if hints else "")
    )


def plan_pipeline(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    micro_batches: int | None = None,
    order_fixed: bool = True,
    use_all: bool = False,
    schedule: str = "1f1b",
    op_overhead_s: float = DEFAULT_OP_OVERHEAD_S,
    update_s_per_byte: float = 0.0,
) -> Plan:
    """The pipeline plan with the smallest predicted step time that fits the devices.

    Deterministic: the same arguments give an equal plan on every node.

    Args:
        costs: per-layer costs, times per sample measured on a device of speed 1.0.
        devices: the candidate devices, in ring order.
        global_batch: samples per training step.
        micro_batches: micro-batches per step (must divide ``global_batch``); None
            tries every divisor up to ``4 * len(devices)``.
        order_fixed: stages follow the devices' given order; False also searches
            other orders (at most 8 devices).
        use_all: every device gets a stage; False may leave devices out when that
            predicts a faster step (a slow device can cost more than it adds).
        schedule: the schedule whose in-flight micro-batches the memory estimate
            counts (``"1f1b"`` or ``"gpipe"``).
        op_overhead_s: fixed executor cost per micro-batch per stage (and per message hop
            of a group's gradient sum).
        update_s_per_byte: optimizer-update seconds per parameter byte on a device of
            speed 1.0 (0: not counted).

    Returns:
        The plan; stages in pipeline order.

    Raises:
        ConfigError: invalid arguments (no layers or devices, duplicate ids, a
            micro-batch count that does not divide the batch, ...).
        PlanError: no partition fits the devices' memory; the message gives the
            numbers.
    """
    _check_inputs(costs, devices, global_batch, schedule)
    if op_overhead_s < 0:
        raise ConfigError(f"op_overhead_s must be >= 0, got {op_overhead_s}")
    if not order_fixed and len(devices) > _MAX_FREE_ORDER_DEVICES:
        raise ConfigError(
            f"order_fixed=False searches device orders for up to {_MAX_FREE_ORDER_DEVICES} devices, "
            f"got {len(devices)}; pass order_fixed=True"
        )
    chosen: Plan | None = None
    model: _Model | None = None
    for m in _micro_counts(global_batch, micro_batches, len(devices)):
        model = _Model(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte)
        plan = _plan_for(model, order_fixed, use_all)
        if plan is not None and (chosen is None or plan.step_s < chosen.step_s):
            chosen = plan
    if chosen is None:
        assert model is not None  # the last (most micro-batches: least memory) tried
        raise _infeasible(model, use_all, order_fixed, micro_batches is not None)
    return chosen


def plan_hybrid(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    micro_batches: int | None = None,
    schedule: str = "1f1b",
    op_overhead_s: float = DEFAULT_OP_OVERHEAD_S,
    use_all: bool = False,
    max_stages: int | None = None,
    update_s_per_byte: float = 0.0,
) -> Plan:
    """The hybrid plan (pipeline of data-parallel groups) with the smallest predicted step.

    Up to ``MAX_EXHAUSTIVE_DEVICES`` (6) devices the search is exact over micro-batch
    counts, ordered groupings of the devices and layer cuts (see
    :mod:`p2ptrain.plan._hybrid`). With more devices it compares two families only: the
    pure pipeline of :func:`plan_pipeline` (free device order up to 8 devices) and
    pure data parallelism (one stage on all devices or, unless ``use_all``, on the
    fastest ``k`` for every ``k``). Deterministic: the same arguments give an equal
    plan on every node; ties go to fewer micro-batches, fewer stages, then the
    groups' device indices and the layer cuts, lexicographically.

    Args:
        costs: per-layer costs, times per sample measured on a device of speed 1.0.
        devices: the candidate devices; their order breaks ties and orders each
            stage's members.
        global_batch: samples per training step.
        micro_batches: micro-batches per step (must divide ``global_batch``); None
            tries every divisor up to ``4 * len(devices)``.
        schedule: the schedule whose in-flight micro-batches the memory estimate
            counts (``"1f1b"`` or ``"gpipe"``).
        op_overhead_s: fixed executor cost per micro-batch per stage (and per message hop
            of a group's gradient sum).
        update_s_per_byte: optimizer-update seconds per parameter byte on a device of
            speed 1.0 (0: not counted).
        use_all: every device runs in some stage; False may leave slow devices out.
        max_stages: at most this many stages; None for no limit but the layer count.

    Returns:
        The plan; stages in pipeline order.

    Raises:
        ConfigError: invalid arguments (as :func:`plan_pipeline`, or ``max_stages < 1``).
        PlanError: no plan fits the devices' memory; the message gives the numbers.
    """
    _check_inputs(costs, devices, global_batch, schedule)
    if op_overhead_s < 0:
        raise ConfigError(f"op_overhead_s must be >= 0, got {op_overhead_s}")
    if max_stages is not None and max_stages < 1:
        raise ConfigError(f"max_stages must be >= 1 (or None for no limit), got {max_stages}")
    cap = min(len(costs), len(devices), max_stages or len(devices))
    capped = max_stages is not None and max_stages < min(len(costs), len(devices))
    models = [
        _Model(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte)
        for m in _micro_counts(global_batch, micro_batches, len(devices))
    ]
    chosen: Plan | None = None
    if len(devices) <= MAX_EXHAUSTIVE_DEVICES:
        found = search_hybrid(models, use_all, cap)
        chosen = None if found is None else _make_plan(models[found[0]], found[1])
    else:
        index = {d.node_id: k for k, d in enumerate(devices)}
        candidates = [p for model in models for p in _pure_plans(model, use_all, cap)]
        chosen = min(candidates, key=lambda p: _tie_key(p, index), default=None)
    if chosen is None:
        raise _infeasible(models[-1], use_all, False, micro_batches is not None, hybrid=True, capped=capped)
    return chosen


def _pure_plans(model: _Model, use_all: bool, max_stages: int) -> list[Plan]:
    """The best pure pipeline and the pure data-parallel plans that fit, for one micro-batch count."""
    n_dev = len(model.devices)
    plans: list[Plan] = []
    if not use_all or n_dev <= max_stages:  # else no pure pipeline runs every device
        pipe = _plan_for(model, n_dev > _MAX_FREE_ORDER_DEVICES, use_all, max_stages)
        plans += [pipe] if pipe is not None else []
    # The fastest k devices (ties: earlier first) in one stage, members in the given order.
    fastest = sorted(range(n_dev), key=lambda d: (-model.devices[d].speed, d))
    for k in [n_dev] if use_all else range(1, n_dev + 1):
        group = tuple(sorted(fastest[:k]))
        shares = model.shares(group)
        if shares is not None and model.stage(0, len(model.costs) - 1, group, shares, 0).fits:
            plans.append(_make_plan(model, ((group, 0, len(model.costs) - 1),)))
    return plans


def _tie_key(plan: Plan, index: dict[str, int]) -> tuple[float, int, int, tuple[_Group, ...], tuple[int, ...]]:
    """The hybrid tie rule as a sort key; ``index`` maps node ids to their position in ``devices``."""
    groups = tuple(tuple(index[n] for n in st.node_ids) for st in plan.stages)
    return (plan.step_s, plan.micro_batches, len(plan.stages), groups, tuple(st.last_layer for st in plan.stages))


def uniform_plan(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    micro_batches: int,
    schedule: str = "1f1b",
    op_overhead_s: float = DEFAULT_OP_OVERHEAD_S,
    update_s_per_byte: float = 0.0,
) -> Plan:
    """The naive baseline: layers split evenly over all devices in their order.

    With ``L`` layers on ``D`` devices every stage gets ``L // D`` layers and the last
    ``L % D`` stages one more. Same cost model as :func:`plan_pipeline`; memory is
    predicted but not checked.

    Raises:
        ConfigError: invalid arguments.
        PlanError: fewer layers than devices.
    """
    _check_inputs(costs, devices, global_batch, schedule)
    (m,) = _micro_counts(global_batch, micro_batches, len(devices))
    n, d = len(costs), len(devices)
    if n < d:
        raise PlanError(f"a uniform split needs one layer per device at least: {n} layers, {d} devices")
    sizes = [n // d + (1 if i >= d - n % d else 0) for i in range(d)]
    parts, first = [], 0
    for i, size in enumerate(sizes):
        parts.append(((i,), first, first + size - 1))
        first += size
    return _make_plan(_Model(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte), tuple(parts))


def _per_sample_s(costs: Sequence[LayerCost]) -> float:
    return sum(c.fwd_s + c.bwd_s for c in costs)


def bound_samples_per_s(costs: Sequence[LayerCost], devices: Sequence[Device]) -> float:
    """Upper bound on throughput: perfectly divisible work, free links, no bubble, no overhead.

    ``sum(speeds) / per-sample forward+backward time``. Independent of the
    micro-batch size because the costs are per sample.
    """
    _check_inputs(costs, devices, 1, "1f1b")
    return sum(d.speed for d in devices) / _per_sample_s(costs)


def single_device_samples_per_s(costs: Sequence[LayerCost], devices: Sequence[Device]) -> float:
    """Throughput of the fastest device training alone (no pipeline, no links, memory unchecked)."""
    _check_inputs(costs, devices, 1, "1f1b")
    return max(d.speed for d in devices) / _per_sample_s(costs)

