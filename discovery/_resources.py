"""What a device offers the pool: cores, memory, accelerator, measured speed, battery, power class.

:func:`probe_resources` reads them from the local machine; :class:`Resources` carries them
in a peer's mDNS TXT record (:meth:`Resources.to_txt` / :meth:`Resources.from_txt`).

The compute figure comes from a short float32 matmul on the CPU through numpy: discovery
sits below ``p2ptrain.kernels`` and must not import torch (a multi-second import on a
Jetson). A node whose real work runs on an accelerator can overwrite the figure with its
own profile: ``dataclasses.replace(res, gflops=measured)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from p2ptrain._errors import ConfigError, ProtocolError

__all__ = ["Resources", "available_memory", "cpu_quota", "probe_resources", "usable_cpus"]

log = logging.getLogger(__name__)

# Bounds a peer's numbers must respect. Generous for real devices, tight enough that a
# hostile announcement cannot make the planner divide by zero or overflow an int64.
MAX_CORES = 4096
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_GFLOPS = 1e7  # 10 PFLOP/s: far above any single device today
_ACCELERATOR_RE = re.compile(r"[a-z0-9_-]{1,16}")
_POWER_RE = re.compile(r"[a-z0-9-]{1,24}")
# A float as repr() writes it (exact round trip), never "nan"/"inf"; at most 32 characters.
_FLOAT_RE = re.compile(r"[0-9]{1,17}(\.[0-9]{1,24})?([eE][-+]?[0-9]{1,3})?")
_MAX_FLOAT_CHARS = 32
_UINT_RE = re.compile(r"[0-9]{1,19}")

# The probe: a 256x256 float32 matmul costs 33.5 MFLOP, ~0.4 ms on one core of this
# 2-core host (86 GFLOP/s) and ~10 ms on a Jetson Nano CPU; the best of the repetitions
# that fit a 0.1 s budget is a stable figure on an idle device, and the probe stays under
# the 0.3 s the design allows. It measures what the device offers *now*: measured on this
# shared host under load, a multi-threaded BLAS call stalled ~12 ms waiting for a busy
# core (1.5 GFLOP/s instead of 134); a node that knows better overrides the figure.
_PROBE_N = 256
_PROBE_BUDGET_S = 0.1
_PROBE_MAX_REPS = 32

# sysfs and cgroup files are a few bytes; a bound keeps a strange mount from costing us.
_MAX_SYSFS_READ = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resources:
    """What one device offers.

    Attributes:
        cores: CPU cores this process may use (affinity and cgroup quota applied).
        memory_bytes: Memory this process may use (physical memory, or a lower cgroup limit).
        accelerator: Kind of accelerator: ``"cpu"``, ``"cuda"``, ``"jetson"``, ...
            (lowercase ``[a-z0-9_-]``, at most 16 characters).
        gflops: Measured compute speed in GFLOP/s: one core's float32 matmul rate times
            the CPUs usable (a cgroup quota's fraction counts; 0.0 when not measured).
        battery: Charge as a fraction in [0, 1], or ``None`` on mains-only devices.
        power: The device's power class: the name of the power profile its energy is
            modelled with (``"orin-nano"``, ``"laptop"``; ``[a-z0-9-]``, at most 24
            characters), or ``None`` when not known.

    Raises:
        ConfigError: A field is out of range (the message names it).
    """

    cores: int
    memory_bytes: int
    accelerator: str
    gflops: float
    battery: float | None = None
    power: str | None = None

    def __post_init__(self) -> None:
        _check_int("cores", self.cores, 1, MAX_CORES)
        _check_int("memory_bytes", self.memory_bytes, 0, MAX_MEMORY_BYTES)
        if not isinstance(self.accelerator, str) or not _ACCELERATOR_RE.fullmatch(self.accelerator):
            raise ConfigError(
                f"accelerator {self.accelerator!r} must be 1-16 characters of [a-z0-9_-], e.g. 'cpu'"
            )
        _check_float("gflops", self.gflops, 0.0, MAX_GFLOPS)
        if self.battery is not None:
            _check_float("battery", self.battery, 0.0, 1.0)
        if self.power is not None and (not isinstance(self.power, str) or not _POWER_RE.fullmatch(self.power)):
            raise ConfigError(f"power class {self.power!r} must be 1-24 characters of [a-z0-9-], e.g. 'orin-nano'")

    def to_txt(self) -> dict[str, str]:
        """Encode as DNS-SD TXT key/value strings (keys of at most 9 characters, RFC 6763 §6.4)."""
        txt = {
            "cores": str(self.cores),
            "mem": str(self.memory_bytes),
            "acc": self.accelerator,
            # repr() of a float parses back to the identical float.
            "gf": repr(float(self.gflops)),
        }
        if self.battery is not None:
            txt["bat"] = repr(float(self.battery))
        if self.power is not None:
            txt["pwr"] = self.power
        return txt

    @classmethod
    def from_txt(cls, txt: Mapping[str, str]) -> Resources:
        """Decode the keys written by :meth:`to_txt`, strictly.

        Args:
            txt: Decoded TXT keys and values (other keys are ignored).

        Returns:
            The resources the peer announced.

        Raises:
            ProtocolError: A key is missing, malformed or out of range.
        """
        try:
            if not isinstance(txt, Mapping):
                raise ConfigError(f"resources must be a mapping, not {type(txt).__name__}")
            battery_text = None if txt.get("bat") is None else _require(txt, "bat")
            return cls(
                cores=_parse_uint(txt, "cores"),
                memory_bytes=_parse_uint(txt, "mem"),
                accelerator=_require(txt, "acc"),
                gflops=_parse_float(_require(txt, "gf"), "gf"),
                battery=None if battery_text is None else _parse_float(battery_text, "bat"),
                power=None if txt.get("pwr") is None else _require(txt, "pwr"),
            )
        except ConfigError as exc:
            raise ProtocolError(f"bad resources in TXT record: {exc}") from exc


def probe_resources(*, measure: bool = True) -> Resources:
    """Describe this machine.

    Blocking (it may run a matmul for up to ~0.2 s the first time): from async code call it
    through ``asyncio.to_thread``. The measurement is cached for the life of the process,
    so several nodes in one process (tests, the demo) measure once.

    Args:
        measure: Run the matmul probe; ``False`` reports ``gflops=0.0`` (fast, for tests).

    Returns:
        This machine's resources.
    """
    return Resources(
        cores=_usable_cores(),
        memory_bytes=_usable_memory(),
        accelerator=_accelerator_kind(),
        gflops=_measured_gflops() if measure else 0.0,
        battery=read_battery(),
    )


def read_battery(root: Path = Path("/sys/class/power_supply")) -> float | None:
    """Mean charge fraction of the batteries under ``root``, or ``None`` when there are none.

    Args:
        root: The power-supply class directory (a parameter so tests can fake sysfs).
    """
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return None
    charges: list[float] = []
    for supply in supplies[:16]:  # a laptop has 1-2; a bound, not a guess
        if _read_small(supply / "type") != "Battery":
            continue
        capacity = _read_small(supply / "capacity")
        if capacity is not None and capacity.isdigit():
            charges.append(min(int(capacity), 100) / 100.0)
    if not charges:
        return None
    return round(sum(charges) / len(charges), 3)


@functools.lru_cache(maxsize=1)
def _measured_gflops() -> float:
    """One core's best float32 matmul speed over a bounded number of repetitions, times the usable CPUs.

    On one BLAS thread: a multithreaded matmul on a busy host waits for its slowest thread
    at every step, and read 2.3 GFLOP/s on a 2-core machine that does 233 (two other busy
    processes, measured); one thread reads its core's speed in the repetitions the
    scheduler leaves whole (149 there under the same load). Cached: the hardware does not
    change within a process, and a second probe would only measure the contention of
    nodes started beside this one.
    """
    import numpy as np  # deferred: only the probe needs them
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((_PROBE_N, _PROBE_N), dtype=np.float32)
    b = rng.standard_normal((_PROBE_N, _PROBE_N), dtype=np.float32)
    out = np.empty_like(a)
    best = math.inf
    with threadpool_limits(limits=1, user_api="blas"):  # the process's BLAS pool, for these 0.1 s only
        np.matmul(a, b, out=out)  # warm-up: page faults, the kernel's first call
        deadline = time.perf_counter() + _PROBE_BUDGET_S
        for _ in range(_PROBE_MAX_REPS):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
            if time.perf_counter() > deadline:
                break
    flops = 2.0 * _PROBE_N**3 * usable_cpus()
    gflops = round(flops / max(best, 1e-9) / 1e9, 1)
    log.debug("matmul probe: %.1f GFLOP/s", gflops)
    return min(gflops, MAX_GFLOPS)


def affinity_cores() -> int:
    """The cores this process may run on (its affinity; the machine's count where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cpus() -> float:
    """The CPUs this process may keep busy: its affinity, or its cgroup quota where that is less.

    Fractional, unlike :attr:`Resources.cores`: a device capped at an eighth of a core
    computes an eighth of what its core does, and its GFLOP/s must say so (the planner
    scales a newcomer's speed by them).
    """
    cores = min(affinity_cores(), MAX_CORES)
    quota = cpu_quota()
    return cores if quota is None else min(cores, quota)


def _usable_cores() -> int:
    cores = affinity_cores()
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, min(cores, MAX_CORES))


def _usable_memory() -> int:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 0
    limit = _cgroup_memory_limit()
    if limit is not None and (total == 0 or limit < total):
        total = limit
    return max(0, min(total, MAX_MEMORY_BYTES))


def available_memory() -> int | None:
    """Bytes this process could still allocate: the kernel's ``MemAvailable``, less within a
    cgroup memory limit; ``None`` where neither can be read (not Linux).
    """
    avail: int | None = None
    text = _read_small(Path("/proc/meminfo"), 4096) or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                avail = int(fields[1]) * 1024  # kB
            break
    limit = _cgroup_memory_limit()
    if limit is not None:
        for path in _cgroup_paths("memory"):
            for name in ("memory.current", "memory.usage_in_bytes"):
                used = _read_small(path / name)
                if used is not None and used.isdigit():
                    room = max(0, limit - int(used))
                    return room if avail is None else min(avail, room)
    return avail


def _accelerator_kind() -> str:
    # File checks only: importing torch or loading CUDA here would cost seconds.
    if (
        Path("/etc/nv_tegra_release").exists()
        or "jetson" in (_read_small(Path("/proc/device-tree/model")) or "").lower()
    ):
        return "jetson"
    if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists():
        return "cuda"
    return "cpu"


def _cgroup_paths(controller: str) -> list[Path]:
    """Candidate directories of this process's cgroup for ``controller`` (v2 first, then v1)."""
    paths: list[Path] = []
    text = _read_small(Path("/proc/self/cgroup"), limit=4096) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            paths.append(Path("/sys/fs/cgroup") / rel)
        elif controller in controllers.split(","):
            for mount in (controllers, controller):
                paths.append(Path("/sys/fs/cgroup") / mount / rel)
                paths.append(Path("/sys/fs/cgroup") / mount)
    return paths


#: Set by an emulated testbed device (p2ptrain.testbed) to its CPU share: ``ip netns exec``
#: mounts a fresh sysfs, so the device's own cgroup files cannot be read from inside it.
#: The same name as ``p2ptrain.energy.EMULATED_CPUS_ENV`` (a test keeps them equal).
EMULATED_CPUS_ENV = "P2PTRAIN_EMULATED_CPUS"


def cpu_quota() -> float | None:
    """The CPUs this process's cgroup may use (``cpu.max`` / ``cpu.cfs_quota_us``), or None when uncapped.

    Read afresh on each call (a testbed may move the process into a capped cgroup). Where
    no cgroup file says, ``$P2PTRAIN_EMULATED_CPUS`` (a testbed device's share) does.
    """
    quota = _cgroup_cpu_quota()
    if quota is None:
        text = os.environ.get(EMULATED_CPUS_ENV, "").strip()
        try:
            value = float(text) if text else math.nan
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            quota = value
    return quota


def _cgroup_cpu_quota() -> float | None:
    for path in _cgroup_paths("cpu"):
        cpu_max = _read_small(path / "cpu.max")  # v2: "<quota|max> <period>"
        if cpu_max is not None:
            quota, _, period = cpu_max.partition(" ")
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                return int(quota) / int(period)
            continue
        quota_v1 = _read_small(path / "cpu.cfs_quota_us")
        period_v1 = _read_small(path / "cpu.cfs_period_us")
        if quota_v1 and period_v1 and quota_v1.isdigit() and period_v1.isdigit() and int(period_v1):
            return int(quota_v1) / int(period_v1)
    return None


def _cgroup_memory_limit() -> int | None:
    for path in _cgroup_paths("memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = _read_small(path / name)
            if text is not None and text.isdigit():
                return int(text)
    return None


def _read_small(path: Path, limit: int = _MAX_SYSFS_READ) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace").strip()
    except OSError:
        return None


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} must be an int in [{lo}, {hi}]")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ConfigError(f"{name}={value!r} must be a finite number in [{lo}, {hi}]")


def _require(txt: Mapping[str, str], key: str) -> str:
    value = txt.get(key)
    if value is None:
        raise ConfigError(f"key {key!r} is missing")
    if not isinstance(value, str):
        raise ConfigError(f"key {key!r} holds a {type(value).__name__}, not a string")
    return value


def _parse_uint(txt: Mapping[str, str], key: str) -> int:
    text = _require(txt, key)
    if not _UINT_RE.fullmatch(text):
        raise ConfigError(f"{key}={text[:40]!r} is not an unsigned decimal integer")
    return int(text)


def _parse_float(text: str, key: str) -> float:
    if len(text) > _MAX_FLOAT_CHARS or not _FLOAT_RE.fullmatch(text):
        raise ConfigError(f"{key}={text[:40]!r} is not a decimal number")
    return float(text)
