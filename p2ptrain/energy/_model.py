"""The energy model: what a device spent, from its power profile and what it did.

    joules = idle_w x wall_s                      (the device is on)
           + busy_w_per_core x busy_cpu_s         (each core-second of work adds)
           + link_j_per_frame x frames            (each frame crossing the stack)
           + link_j_per_byte x bytes              (each byte on the air)

``busy_cpu_s`` is CPU time summed over cores (two cores busy for 1 s is 2 s), read from
this process (``os.times()``: user + system) or from its cgroup (``cpu.stat``
``usage_usec`` on cgroup v2, ``cpuacct.usage`` ns on v1), which counts every process of
an emulated testbed device. The radio figures are per link-layer frame; when the caller
knows only bytes, frames are counted as ``ceil(bytes / 1448)`` (one TCP segment of a
1500-byte MTU per frame, ACKs ignored).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ._profiles import PowerProfile
from ._sensors import SensorError, read_number

__all__ = ["BYTES_PER_FRAME", "cpu_clock", "model_parts"]

BYTES_PER_FRAME = 1448  # TCP payload of one 1500-byte Ethernet/Wi-Fi MTU frame


def model_parts(profile: PowerProfile, *, wall_s: float, busy_cpu_s: float, frames: int | None = None, bytes_: int = 0) -> dict[str, float]:
    """Joules by cause: ``idle``, ``cpu`` and ``link``.

    Args:
        profile: The device's power profile.
        wall_s: Seconds the window lasted.
        busy_cpu_s: CPU seconds spent in it, summed over cores.
        frames: Link-layer frames sent and received; ``None`` counts them from ``bytes_``.
        bytes_: Payload bytes sent and received.
    """
    if frames is None:
        frames = math.ceil(max(bytes_, 0) / BYTES_PER_FRAME)
    return {
        "idle": profile.idle_w * max(wall_s, 0.0),
        "cpu": profile.busy_w_per_core * max(busy_cpu_s, 0.0),
        "link": profile.link_j_per_frame * max(frames, 0) + profile.link_j_per_byte * max(bytes_, 0),
    }


def cpu_clock(kind: Literal["process", "cgroup", "system"] = "process", *,
              root: str | Path = "/") -> tuple[Callable[[], float], str]:
    """A function returning CPU seconds used so far, and its source label.

    Args:
        kind: ``"process"`` (this process, ``os.times()``), ``"cgroup"`` (this process's
            cgroup: every process in it) or ``"system"`` (every CPU of the machine,
            ``/proc/stat``: what ``p2ptrain energy`` estimates the device by).
        root: Where the filesystem is rooted (tests pass a fake tree).

    Raises:
        SensorError: ``"cgroup"`` or ``"system"`` was asked for and its counter is not readable.
    """
    if kind == "system":
        stat = Path(root) / "proc/stat"

        def system_s() -> float:
            try:
                with open(stat, "rb") as f:
                    fields = f.readline().split()
                # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
                ticks = [int(x) for x in fields[1:9]]
            except (OSError, ValueError, IndexError) as exc:
                raise SensorError(f"cannot read the machine's CPU time from {stat}: {exc}") from exc
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

        system_s()
        return system_s, "/proc/stat"
    if kind == "process":

        def process_s() -> float:
            t = os.times()
            return t.user + t.system

        return process_s, "os.times"
    base = Path(root)
    for reader, label in _cgroup_readers(base):
        try:
            reader()
        except SensorError:
            continue
        return reader, label
    raise SensorError(f"no readable cgroup CPU counter for this process under {base}")


def _cgroup_readers(base: Path) -> list[tuple[Callable[[], float], str]]:
    """CPU-seconds readers for this process's cgroup: v2 ``cpu.stat`` first, then v1 cpuacct."""
    try:
        with open(base / "proc/self/cgroup", "rb") as f:
            text = f.read(4096).decode("ascii", "replace")
    except OSError:
        return []
    out: list[tuple[Callable[[], float], str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            stat = base / "sys/fs/cgroup" / rel / "cpu.stat"
            out.append((functools.partial(_usage_usec, stat), f"cgroup:{stat}"))
        elif "cpuacct" in controllers.split(","):
            for mount in (controllers, "cpuacct", "cpu,cpuacct"):
                usage = base / "sys/fs/cgroup" / mount / rel / "cpuacct.usage"
                out.append((functools.partial(_cpuacct_s, usage), f"cgroup:{usage}"))
    return out


def _cpuacct_s(usage: Path) -> float:
    """CPU seconds in a cgroup v1 ``cpuacct.usage`` file (ns)."""
    return read_number(usage) * 1e-9


def _usage_usec(stat: Path) -> float:
    """CPU seconds in the ``usage_usec`` line of a cgroup v2 ``cpu.stat`` file."""
    try:
        with open(stat, "rb") as f:
            text = f.read(4096).decode("ascii", "replace")
    except OSError as exc:
        raise SensorError(f"cannot read {stat}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return float(value.strip()) * 1e-6
    raise SensorError(f"{stat} has no usage_usec line")
