"""The plan's vocabulary: the devices the planner sees and the plan it returns.

:class:`Device` is an input of every planner; :class:`StagePlan` and :class:`Plan`
are its output, the same on every node for the same inputs. Plain frozen dataclasses
with no behaviour beyond derived views (:meth:`Plan.table`, :meth:`Plan.summary`),
so the cost model, the searches and the executor share them without importing each
other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from p2ptrain._errors import ConfigError

__all__ = ["Device", "DevicePower", "Plan", "StagePlan", "format_bytes"]


@dataclass(frozen=True)
class DevicePower:
    """What one device draws, as the planner prices it.

    Attributes:
        idle_w: whole-device power when idle, W.
        busy_w: power over idle while the device trains (all the cores its training
            keeps busy), W.
        link_j_per_byte: radio energy per payload byte sent or received, J.
        link_j_per_frame: radio energy per link-layer frame, J.
        battery: charge in [0, 1], or None on mains.
        source: where the figures come from (a power profile's name), for the docs.
    """

    idle_w: float
    busy_w: float
    link_j_per_byte: float = 0.0
    link_j_per_frame: float = 0.0
    battery: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("idle_w", "busy_w", "link_j_per_byte", "link_j_per_frame"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"power figure {name}={v} must be a finite number >= 0")
        if self.battery is not None and not 0.0 <= self.battery <= 1.0:
            raise ConfigError(f"battery={self.battery} must be a fraction in [0, 1] (or None on mains)")


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
        power: what the device draws (for energy-aware plans), or None: unknown.
        hop_s: seconds one message hop costs this device (half its measured round
            trip): its executor overhead per micro-batch op and per round of its
            group's gradient sum; 0: unknown, the planner's ``op_overhead_s`` is used.
        speed_cv: coefficient of variation of the repeated speed probes behind
            ``speed`` (how stable the figure is; 0: one probe or unknown).
        idle_hop_s: one message hop while the device is idle: the CPU a message costs
            it, without the wait for a busy CPU (the step's loss sum); 0: ``hop_s``.
        msg_busy_s_per_byte: seconds at the device's busy power per payload byte it
            sends or receives (its CPU's share of moving a byte: ZeroMQ, Python, copies),
            which the energy model charges beside the radio's joules; 0: unknown.
    """

    node_id: str
    speed: float
    memory_bytes: int
    link_bytes_per_s: float
    fixed_s: float = 0.0
    power: DevicePower | None = None
    hop_s: float = 0.0
    speed_cv: float = 0.0
    idle_hop_s: float = 0.0
    msg_busy_s_per_byte: float = 0.0

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
        for name in ("hop_s", "speed_cv", "idle_hop_s", "msg_busy_s_per_byte"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"device {self.node_id!r} has {name} {v}; use a finite number >= 0")


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
        joules: predicted joules per step of each device the plan uses,
            ``((node_id, J), ...)`` sorted by id; empty when no power figures were given
            (see :mod:`p2ptrain.plan._energy`).
        objective: what chose the plan: ``"time"`` or ``"energy"``.
        options: the options the planner weighed, ``((label, predicted samples/s),
            ...)``: ``"alone"`` (the best plan on one device), ``"all"`` (the best
            using every device), ``"chosen"``; empty when only one search ran. The
            chosen plan is never predicted slower than an option it rejected.
    """

    stages: tuple[StagePlan, ...]
    micro_batches: int
    micro_batch_size: int
    step_s: float
    samples_per_s: float
    schedule: str = "1f1b"
    joules: tuple[tuple[str, float], ...] = ()
    objective: str = "time"
    options: tuple[tuple[str, float], ...] = ()

    @property
    def j_per_sample(self) -> float:
        """Predicted joules per sample over every device the plan uses (NaN: no power figures)."""
        return sum(j for _, j in self.joules) / self.global_batch if self.joules else math.nan

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
            f"{self.micro_batches} micro-batch{'es' if self.micro_batches != 1 else ''} "
            f"of {self.micro_batch_size} ({self.schedule}): "
            f"predicted {self.step_s * 1e3:.1f} ms/step, {self.samples_per_s:.1f} samples/s"
        )
        if self.joules:
            per = ", ".join(f"{n} {j / self.global_batch * 1e3:.2f}" for n, j in self.joules)
            lines.append(f"predicted energy ({self.objective} objective): {self.j_per_sample * 1e3:.2f} mJ/sample "
                         f"(by device, mJ/sample: {per})")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, 3 significant digits (``"3.1 GiB"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
