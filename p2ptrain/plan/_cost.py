"""The planner's cost model: what a stage and a training step cost on given devices.

Cost model (per micro-batch of ``b`` samples; stage ``s`` holds layers ``i..j`` and
runs on group ``G``, where member ``d`` takes ``n_d`` of the ``b`` samples; a pure
pipeline has ``G = {d}``, ``n_d = b``):

- shares ``n_d``: proportional to ``d.speed`` by the largest-remainder method
  (remainder ties go to the faster device, then the earlier one in the given order);
  every member needs ``n_d >= 1``, so a group larger than ``b``, or one where a slow
  member would get no sample, is not a candidate for that micro-batch size.
- compute ``c_s = max_d (n_d * work(i..j) / d.speed + d.fixed_s * (j - i + 1) / L
  + h_d)`` where ``work`` is the per-sample forward + backward seconds of
  the layers, ``d.fixed_s`` the part of a whole-model pass on ``d`` that does not
  grow with the batch (spread evenly over the ``L`` layers), and ``h_d`` the fixed
  cost of one forward and one backward op in the executor on ``d`` (message handling,
  thread hand-off): ``d.hop_s``, its measured message hop, or ``op_overhead_s`` where
  that is unknown. The two fixed terms are what make tiny micro-batches lose.
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
  (``P`` = the layers' parameter bytes) in ``B = ceil(P / bucket_bytes)`` buckets,
  each with a ring,
  ``2 (g - 1) / g * P / min_d d.link_bytes_per_s + 2 (g - 1) * B * max_d h_d
  + reduce_s_per_byte * (g - 1) / g * P / min_d d.speed``
  (bandwidth-optimal ring: ``2 (g - 1)`` rounds of ``P / g`` per bucket, every round
  a message hop on the slowest member, and the reduce-scatter's sums on it: for a
  15 M-parameter model these are tens of buckets and 60 MB of adds, not one hop);
  then every member updates the parameters, ``update_s_per_byte * P / min_d d.speed``;
  and every step each training member takes part in the step's loss sum,
  ``closing_hops * max_d e_d`` with ``e_d`` the device's idle hop (``d.idle_hop_s``,
  else ``h_d``): the sum runs beside the next step's compute, on the same CPU, and
  costs it the messages' CPU, not their wait (measured: 4-5 of the 52 ms of a 1-core
  device training alone in a 4-member ring when the sum was a ring all-reduce, 6 hops
  of an idle hop of 0.7 ms; it is now a chain with trainers at its ends,
  :func:`closing_hops`).
  ``StagePlan.sync_s`` is this whole tail.
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

:class:`StepModel` prices any stage of one micro-batching in O(1) from prefix sums;
:func:`make_plan` turns a partition into a :class:`~p2ptrain.plan._types.Plan` at
these prices. The searches (:mod:`~p2ptrain.plan._pipeline_search`,
:mod:`~p2ptrain.plan._hybrid`) rank candidates by the step summed exactly as
:func:`step_s` sums it, so the step they minimise is the step the plan reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from p2ptrain.plan._profile import ADAM_STATE_FACTOR, LayerCost
from p2ptrain.plan._schedule import SCHEDULES, max_in_flight
from p2ptrain.plan._types import Device, Plan, StagePlan

__all__ = [
    "DEFAULT_OP_OVERHEAD_S",
    "GROUP_BUCKET_BYTES",
    "Group",
    "Parts",
    "StageCost",
    "StepModel",
    "closing_hops",
    "make_plan",
    "on_shared_host",
    "split_shares",
    "step_s",
]

# Fixed executor cost per micro-batch per stage (one forward op + one backward op):
# two queue hand-offs between the torch thread and the messaging thread plus two
# framed sends, each some 50-150 us on a CPU of this class. An estimate; the executor
# can pass what it measures.
DEFAULT_OP_OVERHEAD_S = 5e-4

# Gradient bytes per all-reduce bucket of a stage group: the executor's
# (p2ptrain.train.pipeline._trainer.GROUP_BUCKET_BYTES; a test keeps them equal).
GROUP_BUCKET_BYTES = 4 << 20


def closing_hops(members: int, trainers: int | None = None) -> float:
    """Messages of a step's closing loss sum on its busiest trainer, in a ring of ``members``.

    The pipeline trainer sums the step's loss (and every member's busy share and
    joules) along a chain (:meth:`~p2ptrain.ring.Collectives.sum_along`) with two
    trainers at its ends, one message each way, and members the plan left out in
    between: a plan on one or two of the members pays 2 hops a step, a larger one 4 on
    its middle trainers (``trainers``: how many train; None: all of them).
    """
    if members <= 1:
        return 0.0
    return 2.0 if (members if trainers is None else trainers) <= 2 else 4.0


Group = tuple[int, ...]  # device indices, ascending
Parts = tuple[tuple[Group, int, int], ...]  # (device indices, first layer, last layer) per stage


@dataclass(frozen=True)
class StepModel:
    """Prefix sums of the layer costs and the step's shape: the cost of any stage in O(1).

    Attributes:
        costs: per-layer costs, times per sample on a device of speed 1.0.
        devices: the candidate devices; stages name them by index into this.
        micro: micro-batches per step, ``M``.
        mb: samples per micro-batch, ``b``.
        schedule: a key of ``SCHEDULES``; sets how many micro-batches a stage holds.
        op_overhead_s: fixed executor cost per micro-batch per stage.
        update_s_per_byte: optimizer-update seconds per parameter byte at speed 1.0.
        reduce_s_per_byte: seconds to add one gradient byte into another at speed 1.0
            (the sums of a group's all-reduce).
        bucket_bytes: gradient bytes per all-reduce bucket.
        closing_hops: message hops of the step's loss sum on a training member (0: not
            counted; :func:`closing_hops`).
        overhead: ``h_d`` of each device: its ``hop_s``, else ``op_overhead_s``.
        time: ``time[k]`` is the per-sample seconds of layers ``0..k-1``.
        params: ``params[k]`` is the parameter bytes of layers ``0..k-1``.
        saved: ``saved[k]`` is the per-sample bytes autograd keeps for layers ``0..k-1``.
        acts: per-sample output bytes of each layer.
        in_flight: peak micro-batches a stage holds, by the number of stages after it.
    """

    costs: Sequence[LayerCost]
    devices: Sequence[Device]
    micro: int
    mb: int
    schedule: str
    op_overhead_s: float
    update_s_per_byte: float = 0.0
    reduce_s_per_byte: float = 0.0
    bucket_bytes: int = GROUP_BUCKET_BYTES
    closing_hops: float = 0.0
    overhead: list[float] = field(init=False)
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
        object.__setattr__(self, "overhead", [d.hop_s or self.op_overhead_s for d in self.devices])
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "saved", saved)
        object.__setattr__(self, "acts", [c.act_bytes for c in self.costs])
        # Both schedules' peak depends only on how many stages follow (1F1B: that many
        # plus one, capped by M; GPipe: M), so the DP can index stages from the end
        # and one table serves every stage count.
        flight = [max_in_flight(SCHEDULES[self.schedule](0, r + 1, self.micro)) for r in range(len(self.devices))]
        object.__setattr__(self, "in_flight", flight)

    @property
    def min_overhead(self) -> float:
        """The smallest ``h_d``: what the searches' lower bounds may assume of any stage."""
        return min(self.overhead)

    def shares(self, group: Sequence[int]) -> tuple[int, ...] | None:
        """Each member's samples of a micro-batch (see :func:`split_shares`)."""
        if len(group) == 1:
            return (self.mb,)
        return split_shares(self.mb, [self.devices[d].speed for d in group])

    def stage(self, i: int, j: int, group: Sequence[int], shares: Sequence[int], after: int) -> StageCost:
        """The cost of layers ``i..j`` on ``group`` (device indices) with ``shares``, ``after`` stages following.

        The pipeline search (:mod:`~p2ptrain.plan._pipeline_search`) inlines this
        arithmetic (one member, share ``mb``) in its hot loop; keep the two in step.
        """
        in_bytes = self.acts[i - 1] if i > 0 else 0
        out_bytes = self.acts[j]
        wire = in_bytes + (out_bytes if j < len(self.costs) - 1 else 0)
        work = self.time[j + 1] - self.time[i]
        params = self.params[j + 1] - self.params[i]
        acts = in_bytes + (self.saved[j + 1] - self.saved[i]) + out_bytes
        compute = transfer = hop = idle = 0.0
        memory, fits, link = 0, True, math.inf
        for d, n in zip(group, shares):
            dev = self.devices[d]
            compute = max(compute, n * work / dev.speed + dev.fixed_s * (j - i + 1) / len(self.costs) + self.overhead[d])
            hop = max(hop, self.overhead[d])
            idle = max(idle, dev.idle_hop_s or self.overhead[d])
            transfer = max(transfer, n * wire / dev.link_bytes_per_s if wire else 0.0)
            need = ADAM_STATE_FACTOR * params + self.in_flight[after] * n * acts
            memory = max(memory, need)
            fits = fits and need <= dev.memory_bytes
            link = min(link, dev.link_bytes_per_s)
        g = len(group)
        slowest = min(self.devices[d].speed for d in group)
        sync = 0.0
        if g > 1:
            buckets = max(1, -(-params // self.bucket_bytes))
            sync = (2 * (g - 1) / g * params / link + 2 * (g - 1) * buckets * hop
                    + self.reduce_s_per_byte * (g - 1) / g * params / slowest)
        # After the flush every member also updates the stage's parameters (the slowest
        # member decides), and sums the step's loss with the ring.
        sync += self.update_s_per_byte * params / slowest + self.closing_hops * idle
        return StageCost(compute, transfer, sync, memory, fits)


class StageCost(NamedTuple):
    """One stage's terms in the step time (see the module's cost model), in seconds and bytes."""

    compute: float  # c_s: the slowest member's forward + backward, overhead included
    transfer: float  # x_s: the busiest member's link, each direction
    sync: float  # y_s: the tail after the flush (all-reduce and update)
    memory: int  # the largest member's peak
    fits: bool  # every member within its device's memory


def on_shared_host(devices: Sequence[Device], shared_speed: float) -> list[Device]:
    """``devices`` as they compute together on a host that gives them ``shared_speed`` in all.

    Devices that share one host (the testbed's namespaces, containers on one machine)
    cannot together go faster than the host: when their summed speed exceeds
    ``shared_speed`` (the summed speed measured with every member computing at once),
    each is slowed by the same factor, its per-pass fixed time with it. ``shared_speed``
    0 (devices on their own hardware) or at least the sum leaves them as they are.
    """
    total = math.fsum(d.speed for d in devices)
    if not shared_speed or shared_speed >= total:
        return list(devices)
    f = shared_speed / total
    return [replace(d, speed=d.speed * f, fixed_s=d.fixed_s / f) for d in devices]


def split_shares(total: int, speeds: Sequence[float]) -> tuple[int, ...] | None:
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


def make_plan(model: StepModel, parts: Parts) -> Plan:
    """The Plan of ``parts`` in pipeline order; every group must get shares."""
    stages = []
    for pos, (group, i, j) in enumerate(parts):
        shares = model.shares(group)
        assert shares is not None, group
        c = model.stage(i, j, group, shares, len(parts) - pos - 1)
        ids = tuple(model.devices[d].node_id for d in group)
        stages.append(StagePlan(ids, shares, i, j, c.compute, c.transfer, c.sync, c.memory))
    step = step_s(model.micro, [(st.compute_s, st.transfer_s, st.sync_s) for st in stages])
    return Plan(tuple(stages), model.micro, model.mb, step, model.micro * model.mb / step, model.schedule)


def step_s(micro: int, stages: Sequence[tuple[float, float, float]]) -> float:
    """The step time of stages given as (compute, transfer, sync), summed in stage order."""
    fill, bottleneck, sync = 0.0, 0.0, 0.0
    for c, x, y in stages:
        fill += c + x
        bottleneck = max(bottleneck, c, x)
        sync = max(sync, y)
    return fill + (micro - 1) * bottleneck + sync

