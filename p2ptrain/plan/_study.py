"""Pricing the replica-style strategies: data, sequence and tensor parallelism on given devices.

The pipeline and hybrid planners price stages (:mod:`p2ptrain.plan._cost`); this prices
the strategies where every member holds all layers (or a share of every layer) and
takes a fraction ``f_d`` of every step's work, from the same measurements: the layer
costs, each device's speed, fixed cost, link and hop, and the cost model's constants.
With ``W`` the per-sample forward + backward seconds of the model at speed 1.0, ``P``
its parameter bytes, ``B`` the global batch, ``A`` a transformer block's per-sample
activation bytes (the median of the inner layers' ``act_bytes``) and ``K`` the number
of blocks (the layers between the first and the last):

- every strategy: ``compute_d = f_d * B * W / speed_d + fixed_d`` and an optimizer
  update of the parameters ``d`` holds (``update_s_per_byte * P_d / speed_d``);
- ``data`` (``f_d = 1 / N``: equal shards, as :class:`~p2ptrain.train.DataParallelTrainer`
  takes them): the bucketed ring all-reduce of ``P`` (as a hybrid plan's one-stage
  group pays it: ``2 (N - 1) / N * P / link + 2 (N - 1) * buckets * hop`` + the sums);
- ``sequence`` (``f_d`` = the member's share of every sequence): per block, the keys
  and values are all-gathered in the forward and their gradients all-reduced in the
  backward, both blocking the compute: ``3 (N - 1) / N * 2 A B`` bytes through each
  member's link and ``3 (N - 1)`` hops, plus data parallelism's all-reduce of ``P``;
- ``tensor`` (``f_d`` = the member's share of heads and MLP columns, and of tokens
  between): per block, eight blocking collectives of the block's activation (an
  all-gather before and a reduce-scatter after attention and the MLP, and their
  mirror images in the backward; each member sends its share to the others directly):
  ``8 (N - 1) / N * A B`` bytes and 8 hops; the first and last layers' parameters
  (embeddings, head) are replicated and all-reduced.

The step is the slowest member's compute plus the communication (blocking
collectives do not overlap the compute they feed), plus the update. Joules per device
follow :func:`~p2ptrain.plan.plan_joules`'s model, the CPU's part in moving the bytes
(``Device.msg_busy_s_per_byte``) included. These are estimates: tensor and
sequence parallelism exchange fp32 activations every block, so on a LAN they are
communication-bound and rank below data and pipeline parallelism, the finding of the
collaborative-edge-training study (arXiv 2404.17766) that ``p2ptrain study`` measures.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from p2ptrain._errors import ConfigError
from p2ptrain.plan._cost import on_shared_host
from p2ptrain.plan._energy import MTU_BYTES
from p2ptrain.plan._profile import ADAM_STATE_FACTOR, LayerCost
from p2ptrain.plan._types import Device

__all__ = ["REPLICA_STRATEGIES", "StrategyPrice", "price_strategy"]

REPLICA_STRATEGIES = ("data", "sequence", "tensor")
# Gradient bytes per all-reduce bucket: p2ptrain.train's DEFAULT_BUCKET_BYTES (a test keeps them equal).
BUCKET_BYTES = 4 << 20


@dataclass(frozen=True)
class StrategyPrice:
    """What a replica-style strategy is predicted to cost per step.

    Attributes:
        strategy: ``"data"``, ``"sequence"`` or ``"tensor"``.
        step_s: predicted seconds per step.
        samples_per_s: ``global_batch / step_s``.
        joules: predicted joules per step by device id (empty without power figures).
        memory_bytes: predicted peak training memory by device id.
        fits: every device within its ``memory_bytes``.
        wire_bytes_per_step: bytes every member's link carries per step, summed.
        global_batch: samples per step.
    """

    strategy: str
    step_s: float
    samples_per_s: float
    joules: dict[str, float]
    memory_bytes: dict[str, int]
    fits: bool
    wire_bytes_per_step: int

    global_batch: int

    @property
    def j_per_sample(self) -> float:
        """Predicted joules per sample over every device (0.0 without power figures)."""
        return math.fsum(self.joules.values()) / self.global_batch


def price_strategy(
    strategy: str,
    costs: Sequence[LayerCost],
    devices: Sequence[Device],
    *,
    global_batch: int,
    shares: Sequence[float] = (),
    op_overhead_s: float = 5e-4,
    update_s_per_byte: float = 0.0,
    reduce_s_per_byte: float = 0.0,
    bucket_bytes: int = BUCKET_BYTES,
    shared_speed: float = 0.0,
    **_: object,
) -> StrategyPrice:
    """Predict ``strategy`` on all of ``devices`` (see the module's model).

    Args:
        strategy: one of :data:`REPLICA_STRATEGIES`.
        costs, devices: as for the pipeline planners.
        global_batch: samples per step.
        shares: each device's share of the work for ``sequence`` and ``tensor``
            (normalised; empty: even). ``data`` always splits evenly.
        op_overhead_s, update_s_per_byte, reduce_s_per_byte: the cost model's constants.
        bucket_bytes: gradient bytes per all-reduce bucket.
        shared_speed: the devices' summed speed while all compute at once, when they
            share a host (``CostModel.shared_speed``; 0: each on its own hardware).

    Raises:
        ConfigError: an unknown strategy, no devices, or shares that do not match.
    """
    if strategy not in REPLICA_STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(REPLICA_STRATEGIES)}")
    n = len(devices)
    if n < 1 or not costs:
        raise ConfigError("pricing needs at least one device and one layer")
    if shares and (len(shares) != n or min(shares) <= 0):
        raise ConfigError(f"shares {tuple(shares)} must give each of the {n} devices a positive share")
    devices = on_shared_host(devices, shared_speed)  # every member computes at once
    frac = [1.0 / n] * n if strategy == "data" or not shares else [s / math.fsum(shares) for s in shares]
    work = math.fsum(c.fwd_s + c.bwd_s for c in costs)
    params = sum(c.param_bytes for c in costs)
    saved = sum(c.saved_bytes or c.act_bytes for c in costs)
    inner = [c.act_bytes for c in costs[1:-1]] or [c.act_bytes for c in costs]
    act = statistics.median(inner)
    blocks = max(len(costs) - 2, 1)
    replicated = costs[0].param_bytes + costs[-1].param_bytes if len(costs) > 2 else params
    link = min(d.link_bytes_per_s for d in devices)
    hop = max(d.hop_s or op_overhead_s for d in devices)
    slowest = min(d.speed for d in devices)
    ring = (n - 1) / n

    def all_reduce(nbytes: float) -> tuple[float, float]:  # (seconds, bytes through each member's link)
        if n == 1 or nbytes <= 0:
            return 0.0, 0.0
        buckets = max(1, math.ceil(nbytes / bucket_bytes))
        moved = 2 * ring * nbytes
        return moved / link + 2 * (n - 1) * buckets * hop + reduce_s_per_byte * ring * nbytes / slowest, moved

    if strategy == "tensor":
        held = [f * (params - replicated) + replicated for f in frac]
        sync_s, sync_b = all_reduce(replicated)
        per_block = 8 * ring * act * global_batch
        comm_s, comm_b = blocks * (per_block / link + 8 * hop * (n > 1)), blocks * per_block
    else:
        held = [float(params)] * n
        sync_s, sync_b = all_reduce(params)
        if strategy == "sequence":
            per_block = 3 * ring * 2 * act * global_batch
            comm_s, comm_b = blocks * (per_block / link + 3 * (n - 1) * hop), blocks * per_block
        else:
            comm_s = comm_b = 0.0
    busy = [f * global_batch * work / d.speed + d.fixed_s + update_s_per_byte * p / d.speed
            for f, d, p in zip(frac, devices, held)]
    step = max(busy) + comm_s + sync_s
    nbytes = comm_b + sync_b
    joules: dict[str, float] = {}
    if all(d.power is not None for d in devices):
        for d, b in zip(devices, busy):
            pw = d.power
            assert pw is not None
            frames = math.ceil(2 * nbytes / MTU_BYTES)
            moving = d.msg_busy_s_per_byte * 2 * nbytes  # its CPU's part in the bytes it sends and receives
            joules[d.node_id] = (pw.idle_w * step + pw.busy_w * (b + moving) + pw.link_j_per_byte * 2 * nbytes
                                 + pw.link_j_per_frame * frames)
    memory = {d.node_id: int(ADAM_STATE_FACTOR * p + f * global_batch * saved) for d, f, p in zip(devices, frac, held)}
    fits = all(memory[d.node_id] <= d.memory_bytes for d in devices)
    return StrategyPrice(strategy, step, global_batch / step, joules, memory, fits, int(n * nbytes), global_batch)
