"""The pipeline planner: which device runs which layers, with how many micro-batches.

Given each layer's profiled cost (:class:`~p2ptrain._profile.LayerCost`) and the
devices (relative speed, memory, link rate), :func:`plan_pipeline` cuts the model into
contiguous stages, one per device, so that the slowest stage is as fast as possible
and every stage fits its device's memory. This is the "plan" step of collaborative
edge training; the search is the dynamic programming over contiguous partitions that
PipeDream and Asteroid use for heterogeneous devices (our own code; pure pipeline, no
data-parallel replicas of a stage).

Every node runs the planner on the same agreed inputs and must get the same plan, so
the search is deterministic: floats are combined in a fixed order and ties are broken
by a fixed rule (below), never by dict or set order.

Cost model (per micro-batch of ``b`` samples; stage ``s`` on device ``d``):

- compute ``c_s = b * sum(fwd_s + bwd_s of its layers) / d.speed + op_overhead_s``;
  the overhead is the fixed cost of one forward and one backward op in the executor
  (message handling, thread hand-off), which is what makes tiny micro-batches lose.
- transfer ``x_s = b * (in_bytes + out_bytes) / d.link_bytes_per_s``: a LAN is a star
  (switch or access point), so each device's own link carries, in each direction, its
  outgoing activation plus the gradient it returns for its input (and the reverse
  direction the same amounts). The first stage reads its inputs and the last its
  targets locally (every node builds the dataset), so they cross no link.
- stage time ``t_s = max(c_s, x_s)``: the executor sends and receives on a separate
  thread while computing, so in the steady state a stage is limited by the slower of
  the two, not their sum.
- step time ``step = sum_s (c_s + x_s) + (M - 1) * max_s t_s``: the first micro-batch
  crosses every stage forward and back without overlap (the pipeline fill and drain,
  the "bubble"), then one micro-batch leaves every ``max_s t_s``. With equal stages
  and free links this is GPipe's ``(M + S - 1) * t``; it holds for GPipe and 1F1B
  alike (tests simulate both). The optimizer update after the flush is not counted
  (small next to a step for the models this runs).
- memory ``m_s = ADAM_STATE_FACTOR * params + k_s * b * (in_bytes + saved + out_bytes)``
  where ``k_s`` is the schedule's peak of micro-batches in flight at that stage
  (``M`` for GPipe, ``min(S - s, M)`` for 1F1B) and ``saved`` is what autograd keeps
  per sample for the stage's layers. Device memory is what is free for training.

Search: for each micro-batch count ``M`` and stage count ``S`` the DP first finds the
smallest possible bottleneck ``T = max_s t_s`` (the steady-state rate, which dominates
when ``M >> S``), then, among partitions whose every stage stays within ``T``, the
one with the smallest fill latency ``sum_s (c_s + x_s)``; the (M, S) with the
smallest predicted step wins. Ties go, in order, to: fewer micro-batches, fewer
stages, earlier devices (in the given order), fewer layers on earlier stages (which
hold more activations under 1F1B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain._profile import ADAM_STATE_FACTOR, LayerCost
from p2ptrain._schedule import SCHEDULES, max_in_flight

__all__ = [
    "Device",
    "Plan",
    "StagePlan",
    "bound_samples_per_s",
    "format_bytes",
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
    """

    node_id: str
    speed: float
    memory_bytes: int
    link_bytes_per_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ConfigError(f"device {self.node_id!r} has speed {self.speed}; use a finite number > 0")
        if self.memory_bytes <= 0:
            raise ConfigError(f"device {self.node_id!r} has memory_bytes {self.memory_bytes}; use > 0")
        if not self.link_bytes_per_s > 0:
            raise ConfigError(
                f"device {self.node_id!r} has link_bytes_per_s {self.link_bytes_per_s}; use > 0 (math.inf for loopback)"
            )


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a device and the contiguous layers it runs.

    Attributes:
        node_id: the device running the stage.
        first_layer: index of its first layer.
        last_layer: index of its last layer (inclusive).
        compute_s: forward + backward seconds per micro-batch on that device,
            executor overhead included.
        transfer_s: seconds per micro-batch its link spends on the boundary
            activations and gradients (each direction).
        memory_bytes: predicted peak memory of the stage.
    """

    node_id: str
    first_layer: int
    last_layer: int
    compute_s: float
    transfer_s: float
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

    def stage_of(self, node_id: str) -> int | None:
        """Index of the stage ``node_id`` runs, or None if the plan leaves it out."""
        return next((i for i, st in enumerate(self.stages) if st.node_id == node_id), None)

    def table(self) -> str:
        """The plan as a text table, one row per stage, with the prediction below."""
        header = ("stage", "device", "layers", "compute ms", "transfer ms", "memory")
        rows = [
            (
                str(i),
                st.node_id,
                f"{st.first_layer}-{st.last_layer}" if st.last_layer > st.first_layer else str(st.first_layer),
                f"{st.compute_s * 1e3:.2f}",
                f"{st.transfer_s * 1e3:.2f}",
                format_bytes(st.memory_bytes),
            )
            for i, st in enumerate(self.stages)
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        # Text columns left-aligned, numbers right-aligned.
        align = ["<", "<", "<", ">", ">", ">"]
        lines = ["  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip() for r in [header, *rows]]
        lines.append(
            f"{self.micro_batches} micro-batches of {self.micro_batch_size} ({self.schedule}): "
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

    def stage(self, i: int, j: int, d: int, after: int) -> tuple[float, float, int]:
        """(compute_s, transfer_s, memory_bytes) of layers ``i..j`` on device ``d``, ``after`` stages following.

        The search inlines this arithmetic in its hot loop; keep the two in step.
        """
        dev = self.devices[d]
        in_bytes = self.acts[i - 1] if i > 0 else 0
        out_bytes = self.acts[j]
        wire = in_bytes + (out_bytes if j < len(self.costs) - 1 else 0)
        compute = self.mb * (self.time[j + 1] - self.time[i]) / dev.speed + self.op_overhead_s
        transfer = self.mb * wire / dev.link_bytes_per_s if wire else 0.0
        acts = in_bytes + (self.saved[j + 1] - self.saved[i]) + out_bytes
        memory = ADAM_STATE_FACTOR * (self.params[j + 1] - self.params[i]) + self.in_flight[after] * self.mb * acts
        return compute, transfer, memory


def _make_plan(model: _Model, parts: Sequence[tuple[int, int, int]]) -> Plan:
    """The Plan of ``parts`` = ((device, first, last), ...) in pipeline order."""
    stages = []
    for pos, (d, i, j) in enumerate(parts):
        c, x, m = model.stage(i, j, d, len(parts) - pos - 1)
        stages.append(StagePlan(model.devices[d].node_id, i, j, c, x, m))
    step = sum(st.compute_s + st.transfer_s for st in stages) + (model.micro - 1) * max(st.stage_s for st in stages)
    return Plan(tuple(stages), model.micro, model.mb, step, model.micro * model.mb / step, model.schedule)


# ---------------------------------------------------------------------------------
# The search

_Parts = tuple[tuple[int, int, int], ...]  # (device, first layer, last layer) per stage
_Best = tuple[float, _Parts] | None


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
        self.kind = [(d.speed, d.memory_bytes, d.link_bytes_per_s) for d in model.devices]
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
                compute = m.mb * (m.time[j2 + 1] - m.time[j]) / dev.speed + m.op_overhead_s
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


def _plan_for(model: _Model, order_fixed: bool, use_all: bool) -> Plan | None:
    """The best plan for one micro-batch count, or None if nothing fits."""
    n_layers, n_dev = len(model.costs), len(model.devices)
    search = _Search(model, order_fixed)
    counts = [n_dev] if use_all else list(range(1, min(n_dev, n_layers) + 1))
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
        plan = _make_plan(model, second[1])
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


def _infeasible(model: _Model, use_all: bool, order_fixed: bool, micro_fixed: bool) -> PlanError:
    """The clearest reason why no plan fits, with the numbers."""
    costs, devices = model.costs, model.devices
    if use_all and len(devices) > len(costs):
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
        _, _, need = model.stage(i, i, 0, 0)  # as the last stage: the fewest micro-batches in flight
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
        op_overhead_s: fixed executor cost per micro-batch per stage.

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
        model = _Model(costs, devices, m, global_batch // m, schedule, op_overhead_s)
        plan = _plan_for(model, order_fixed, use_all)
        if plan is not None and (chosen is None or plan.step_s < chosen.step_s):
            chosen = plan
    if chosen is None:
        assert model is not None  # the last (most micro-batches: least memory) tried
        raise _infeasible(model, use_all, order_fixed, micro_batches is not None)
    return chosen


def uniform_plan(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    micro_batches: int,
    schedule: str = "1f1b",
    op_overhead_s: float = DEFAULT_OP_OVERHEAD_S,
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
        parts.append((i, first, first + size - 1))
        first += size
    return _make_plan(_Model(costs, devices, m, global_batch // m, schedule, op_overhead_s), parts)


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

