"""Joules per step on this member, for the step metrics (see :mod:`p2ptrain.energy`).

Each trainer takes this member's energy since its previous step after every step and
adds it, with whether it was measured by a sensor or estimated by a power model, to the
small per-step sum it already runs over the ring (the loss). So every member's
:class:`~p2ptrain.train.StepMetrics` carries every member's joules of the step. The
replica-style trainers (data, sequence, tensor) lay that sum out with :func:`step_sums`
and read the joules back with :func:`step_joules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from p2ptrain.energy import EnergyMeter
from p2ptrain.plan import DevicePower

__all__ = ["StepEnergy", "busy_per_cpu_s", "device_power", "step_joules", "step_sums", "wire_bytes"]


def device_power(meter: EnergyMeter, node: Any) -> DevicePower:
    """What this member draws, for the planner: its meter's power profile, scaled to the cores it trains on.

    A training member keeps as many cores busy as it may use (torch's intra-op threads,
    capped by affinity and the cgroup quota that ``node``'s announced resources count),
    so its busy draw is the profile's per-core figure times those cores, at most the
    profile's own core count. An emulated device (its meter scales CPU time: see
    :class:`~p2ptrain.energy.Emulation`) runs on a share of the host that stands for all
    of the modelled device's cores, so busy, it draws the profile's loaded power. The
    battery level is the one ``node`` announces.
    """
    profile = meter.profile.profile
    res = _resources(node)
    return DevicePower(profile.idle_w, profile.busy_w_per_core * _busy_cores(meter, res), profile.link_j_per_byte,
                       profile.link_j_per_frame, getattr(res, "battery", None), source=meter.profile.label)


def busy_per_cpu_s(meter: EnergyMeter, node: Any) -> float:
    """Seconds of :func:`device_power`'s busy draw that one CPU second of this process stands for.

    The meter charges a CPU second at the profile's per-core figure (times its
    ``cpu_scale`` on an emulated device); the busy draw counts the cores a training
    member keeps busy, so one CPU second is ``cpu_scale / cores`` seconds of it.
    """
    return getattr(meter, "cpu_scale", 1.0) / _busy_cores(meter, _resources(node))


def _resources(node: Any) -> Any:
    me = next((m for m in node.members() if m.node_id == node.node_id), None)
    return getattr(me, "resources", None)


def _busy_cores(meter: EnergyMeter, res: Any) -> int:
    profile = meter.profile.profile
    if getattr(meter, "cpu_scale", 1.0) != 1.0:  # an emulated device: its share stands for all its cores
        return int(profile.cores)
    return int(min(res.cores if res is not None else profile.cores, profile.cores))


def wire_bytes(node: Any) -> Callable[[], int]:
    """A counter of the tensor bytes ``node`` has sent and received so far (its radio's payload).

    Call the counter on the node's event loop.
    """

    def count() -> int:
        try:
            stats = node.endpoint.stats
        except Exception:  # a node not started (tests) or closed: no more bytes
            return 0
        return sum(s.sent_bytes + s.received_bytes for s in stats.values())

    return count


class StepEnergy:
    """This member's energy step by step; with no meter, every step reads 0 J, estimated.

    Args:
        meter: The energy meter, or ``None``.
        wire: Tensor bytes sent and received so far (see :func:`wire_bytes`): the link
            energy the model charges. ``None`` charges no link energy.
    """

    def __init__(self, meter: EnergyMeter | None = None, wire: Callable[[], int] | None = None) -> None:
        self.meter = meter
        self._wire = wire
        self._wire0 = 0
        self._total = 0.0
        self.source = ""  # the meter's source (sensor file or model profile), once read

    def start(self) -> None:
        """Open the meter's window (at the start of a run)."""
        self._total = 0.0
        self._wire0 = self._wire() if self._wire is not None else 0
        if self.meter is not None:
            self.meter.start()

    def take(self) -> tuple[float, float]:
        """Joules since the previous call, and 1.0 when they were measured (0.0: estimated)."""
        if self.meter is None:
            return 0.0, 0.0
        moved = self._wire() - self._wire0 if self._wire is not None else 0
        reading = self.meter.read(bytes_=max(moved, 0))
        joules, self._total = max(reading.joules - self._total, 0.0), reading.joules
        self.source = reading.source
        return joules, 1.0 if reading.kind == "measured" else 0.0


def step_sums(loss: float, energy: StepEnergy, rank: int, world: int, extra: int = 0) -> torch.Tensor:
    """This member's part of a replica-style step's sum, to all-reduce with ``op="sum"``.

    The float64 layout is ``[loss, joules of each member, measured flag of each member,
    extra...]``, members in ring order: this member fills ``loss``, and its own joules
    since the previous step and flag (``energy.take()``) at ``rank``; the rest, ``extra``
    trailing entries included, are 0 for the caller to fill.
    """
    sums = torch.zeros(1 + 2 * world + extra, dtype=torch.float64)
    sums[0] = loss
    sums[1 + rank], sums[1 + world + rank] = energy.take()
    return sums


def step_joules(sums: torch.Tensor, energy: StepEnergy, world: int) -> tuple[list[float], list[bool]]:
    """Every member's joules of the step and whether a sensor measured them, from the reduced :func:`step_sums`.

    Both lists are empty when this member has no meter.
    """
    if energy.meter is None:
        return [], []
    return ([round(v, 6) for v in sums[1 : 1 + world].tolist()],
            [v > 0.5 for v in sums[1 + world : 1 + 2 * world].tolist()])
