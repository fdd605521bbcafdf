"""The planner: which devices run which layers, with how many micro-batches.

Given each layer's profiled cost (:class:`~p2ptrain.plan._profile.LayerCost`) and the
devices (relative speed, memory, link rate), the planner cuts the model into
contiguous stages so that a training step is as fast as possible and every stage fits
its devices' memory. This is the "plan" step of collaborative edge training.

- :func:`plan_pipeline`: a pure pipeline, one device per stage; the dynamic
  programming over contiguous partitions that PipeDream uses (our own code), in
  :mod:`p2ptrain.plan._pipeline_search`.
- :func:`plan_hybrid`: Asteroid's (MobiCom'24) hybrid: a pipeline whose every stage
  is run by a *group* of devices in data parallel, each taking an integer share of
  every micro-batch in proportion to its speed. One device per group is a pure
  pipeline, one group of every device is pure data parallelism. The search is in
  :mod:`p2ptrain.plan._hybrid`.
- :func:`uniform_plan`, :func:`bound_samples_per_s`,
  :func:`single_device_samples_per_s`: the baselines a plan is compared with.

All of them price plans with the cost model of :mod:`p2ptrain.plan._cost`. This
module validates the inputs, tries the micro-batch counts, and explains with numbers
why nothing fits when nothing does.

Every node runs the planner on the same agreed inputs and must get the same plan, so
the search is deterministic: floats are combined in a fixed order and ties are broken
by a fixed rule (see the searches' docstrings), never by dict or set order.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2ptrain._errors import ConfigError, PlanError
from p2ptrain.plan._cost import DEFAULT_OP_OVERHEAD_S, StepModel, make_plan, on_shared_host
from p2ptrain.plan._hybrid import MAX_EXHAUSTIVE_DEVICES, search_hybrid, tie_key
from p2ptrain.plan._pipeline_search import MAX_FREE_ORDER_DEVICES, search_pipeline
from p2ptrain.plan._profile import ADAM_STATE_FACTOR, LayerCost
from p2ptrain.plan._schedule import SCHEDULES
from p2ptrain.plan._types import Device, Plan, format_bytes

__all__ = [
    "bound_samples_per_s",
    "plan_hybrid",
    "plan_pipeline",
    "single_device_samples_per_s",
    "uniform_plan",
]


def _check_inputs(costs: Sequence[LayerCost], devices: Sequence[Device], global_batch: int, sched: str) -> None:
    """Validate what every planner takes.

    Raises:
        ConfigError: no layers or devices, duplicate node ids, layers that take no
            time, a batch under 1 or an unknown schedule.
    """
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
    """The micro-batch counts to try, ascending: ``[micro_batches]``, or divisors when None.

    Raises:
        ConfigError: ``micro_batches`` does not divide ``global_batch``.
    """
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
    model: StepModel, use_all: bool, order_fixed: bool, micro_fixed: bool, *, hybrid: bool = False, capped: bool = False
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
            ("order_fixed=False", order_fixed and len(devices) <= MAX_FREE_ORDER_DEVICES),
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
    reduce_s_per_byte: float = 0.0,
    shared_speed: float = 0.0,
    closing_hops: float = 0.0,
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
        reduce_s_per_byte: seconds to add one gradient byte at speed 1.0 (a group's
            all-reduce sums; 0: not counted).
        shared_speed: the summed speed of devices that share one host, measured with
            all of them computing (0: no shared host); ``devices`` are priced as if all
            of them compute (:func:`~p2ptrain.plan._cost.on_shared_host`).
        closing_hops: message hops of each step's loss sum on a training member
            (:func:`~p2ptrain.plan._cost.closing_hops`; 0: not counted).

    Returns:
        The plan; stages in pipeline order.

    Raises:
        ConfigError: invalid arguments (no layers or devices, duplicate ids, a
            micro-batch count that does not divide the batch, ...).
        PlanError: no partition fits the devices' memory; the message gives the
            numbers.
    """
    _check_inputs(costs, devices, global_batch, schedule)
    devices = on_shared_host(devices, shared_speed)
    if op_overhead_s < 0:
        raise ConfigError(f"op_overhead_s must be >= 0, got {op_overhead_s}")
    if not order_fixed and len(devices) > MAX_FREE_ORDER_DEVICES:
        raise ConfigError(
            f"order_fixed=False searches device orders for up to {MAX_FREE_ORDER_DEVICES} devices, "
            f"got {len(devices)}; pass order_fixed=True"
        )
    chosen: Plan | None = None
    model: StepModel | None = None
    for m in _micro_counts(global_batch, micro_batches, len(devices)):
        model = StepModel(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte,
                          reduce_s_per_byte, closing_hops=closing_hops)
        plan = search_pipeline(model, order_fixed, use_all)
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
    reduce_s_per_byte: float = 0.0,
    shared_speed: float = 0.0,
    closing_hops: float = 0.0,
    count_devices: int | None = None,
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
        reduce_s_per_byte: seconds to add one gradient byte at speed 1.0 (a group's
            all-reduce sums; 0: not counted).
        shared_speed: the summed speed of devices that share one host, measured with
            all of them computing (0: no shared host); ``devices`` are priced as if all
            of them compute (:func:`~p2ptrain.plan._cost.on_shared_host`).
        closing_hops: message hops of each step's loss sum on a training member
            (:func:`~p2ptrain.plan._cost.closing_hops`; 0: not counted).
        use_all: every device runs in some stage; False may leave slow devices out.
        max_stages: at most this many stages; None for no limit but the layer count.
        count_devices: try the micro-batch counts of this many devices (default
            ``len(devices)``): a search over subsets of a ring keeps the ring's choices.

    Returns:
        The plan; stages in pipeline order.

    Raises:
        ConfigError: invalid arguments (as :func:`plan_pipeline`, or ``max_stages < 1``).
        PlanError: no plan fits the devices' memory; the message gives the numbers.
    """
    _check_inputs(costs, devices, global_batch, schedule)
    devices = on_shared_host(devices, shared_speed)
    if op_overhead_s < 0:
        raise ConfigError(f"op_overhead_s must be >= 0, got {op_overhead_s}")
    if max_stages is not None and max_stages < 1:
        raise ConfigError(f"max_stages must be >= 1 (or None for no limit), got {max_stages}")
    cap = min(len(costs), len(devices), max_stages or len(devices))
    capped = max_stages is not None and max_stages < min(len(costs), len(devices))
    models = [
        StepModel(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte,
                          reduce_s_per_byte, closing_hops=closing_hops)
        for m in _micro_counts(global_batch, micro_batches, count_devices or len(devices))
    ]
    chosen: Plan | None = None
    if len(devices) <= MAX_EXHAUSTIVE_DEVICES:
        found = search_hybrid(models, use_all, cap)
        chosen = None if found is None else make_plan(models[found[0]], found[1])
    else:
        index = {d.node_id: k for k, d in enumerate(devices)}
        candidates = [p for model in models for p in _pure_plans(model, use_all, cap)]
        chosen = min(candidates, key=lambda p: tie_key(p, index), default=None)
    if chosen is None:
        raise _infeasible(models[-1], use_all, False, micro_batches is not None, hybrid=True, capped=capped)
    return chosen


def _pure_plans(model: StepModel, use_all: bool, max_stages: int) -> list[Plan]:
    """The best pure pipeline and the pure data-parallel plans that fit, for one micro-batch count."""
    n_dev = len(model.devices)
    plans: list[Plan] = []
    if not use_all or n_dev <= max_stages:  # else no pure pipeline runs every device
        pipe = search_pipeline(model, n_dev > MAX_FREE_ORDER_DEVICES, use_all, max_stages)
        plans += [pipe] if pipe is not None else []
    # The fastest k devices (ties: earlier first) in one stage, members in the given order.
    fastest = sorted(range(n_dev), key=lambda d: (-model.devices[d].speed, d))
    for k in [n_dev] if use_all else range(1, n_dev + 1):
        group = tuple(sorted(fastest[:k]))
        shares = model.shares(group)
        if shares is not None and model.stage(0, len(model.costs) - 1, group, shares, 0).fits:
            plans.append(make_plan(model, ((group, 0, len(model.costs) - 1),)))
    return plans


def uniform_plan(
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    micro_batches: int,
    schedule: str = "1f1b",
    op_overhead_s: float = DEFAULT_OP_OVERHEAD_S,
    update_s_per_byte: float = 0.0,
    reduce_s_per_byte: float = 0.0,
    shared_speed: float = 0.0,
    closing_hops: float = 0.0,
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
    devices = on_shared_host(devices, shared_speed)
    (m,) = _micro_counts(global_batch, micro_batches, len(devices))
    n, d = len(costs), len(devices)
    if n < d:
        raise PlanError(f"a uniform split needs one layer per device at least: {n} layers, {d} devices")
    sizes = [n // d + (1 if i >= d - n % d else 0) for i in range(d)]
    parts, first = [], 0
    for i, size in enumerate(sizes):
        parts.append(((i,), first, first + size - 1))
        first += size
    return make_plan(StepModel(costs, devices, m, global_batch // m, schedule, op_overhead_s, update_s_per_byte,
                          reduce_s_per_byte, closing_hops=closing_hops), tuple(parts))


def _per_sample_s(costs: Sequence[LayerCost]) -> float:
    """Forward + backward seconds of one sample through every layer, at speed 1.0."""
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

