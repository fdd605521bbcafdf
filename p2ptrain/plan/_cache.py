"""The profile cache: a member's own measurements of a model, kept between jobs.

:func:`~p2ptrain.plan.agree_on_plan` measures, on every member, the model's layer costs,
its per-sample and fixed per-pass time, and the optimizer update: about 1.5-2 s of
compute before a job's first step. Those figures depend on the model's structure, the
micro-batch, the device and torch, not on the weights, so a member that has seen the
model keeps them in ``<state dir>/profiles.json`` and reuses them (:class:`ProfileCache`).

An entry also keeps, for each host setting it has met (the members it shared a host
with and their CPU quotas: :func:`~p2ptrain.plan._together.host_setting`), the share of its speed
the member kept while they all computed, so a warm job on the same setting skips that
pass too.

The key (:func:`profile_key`) is a digest of:

- the layers' :func:`~p2ptrain.plan.model_digest` (classes, parameter and buffer shapes
  and dtypes, ``extra_repr``) and the micro-batch input's shape and dtype;
- the optimizer's name (the update probe times it);
- :func:`device_fingerprint`: CPU model, usable cores, the cgroup CPU quota, torch
  threads, the accelerator's name, and ``torch.__version__``.

The file is small JSON (never pickle), written atomically (temporary file, rename) under
an ``flock`` so members on one device that write at once keep each other's entries, read
defensively (an unreadable or foreign file counts as empty and is rewritten on the next
store), and bounded to the ``max_entries`` newest entries.

:data:`PROFILE_CACHE_ENV` names another directory or turns the cache off (``off``);
:data:`REPROFILE_ENV` (``1``) makes every member measure again and refresh its entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from p2ptrain.discovery import affinity_cores, cpu_quota
from p2ptrain.plan._checks import CHECK_JOBS, judge
from p2ptrain.plan._profile import LayerCost, device_tag, model_digest
from p2ptrain.ring import default_state_dir

if sys.platform != "win32":
    import fcntl

__all__ = [
    "CHECKED_RANGE",
    "CHECK_JOBS",
    "CORRECTION_LIMITS",
    "MAX_SETTINGS",
    "PROFILE_CACHE_ENV",
    "REPROFILE_ENV",
    "CacheEntry",
    "LocalProfile",
    "ProfileCache",
    "default_profile_cache",
    "device_fingerprint",
    "profile_key",
    "reprofile_requested",
]

log = logging.getLogger(__name__)

PROFILE_CACHE_ENV = "P2PTRAIN_PROFILE_CACHE"  # a directory, or "off"
REPROFILE_ENV = "P2PTRAIN_REPROFILE"  # "1": measure again and refresh the cache
FILE_NAME = "profiles.json"
# 2: speeds are the fastest repeat (were the median), with the median over it as ``typical``.
# 3: a capped member's speed is in quota seconds, ``typical`` its median wall pass over
#    that, and its busy hop is timed against a member that is not probing.
_VERSION = 3
# Host settings (which members share this member's host, and their CPU quotas) whose
# shared-host share a profile keeps: a device moves between a few rings, not many.
MAX_SETTINGS = 8
# A measured over predicted compute ratio outside this is a stall or a broken clock, not a
# figure to keep (LocalProfile.checked).
CHECKED_RANGE = (0.05, 20.0)
# The most a job's planning corrects cached figures by their checks (LocalProfile.correction),
# either way: the re-plan's own clamp on one job's measured ratio.
CORRECTION_LIMITS = (0.25, 4.0)
# A tinygpt entry is ~1 KiB, a 100-layer model ~15 KiB: 32 entries stay far below this,
# and a file above it is not ours (read nothing rather than parse megabytes).
_MAX_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class LocalProfile:
    """What one member measured of one model on its own device (``agree_on_plan``'s local figures).

    Attributes:
        costs: per-layer costs (:func:`~p2ptrain.plan.profile_layers`).
        per_sample_s: whole-model forward+backward seconds per sample.
        fixed_s: fixed seconds per forward+backward pass.
        update_s: optimizer update seconds per parameter byte.
        speed_cv: coefficient of variation of the speed probe's repeats (0: unknown).
        reduce_s: seconds to add one gradient byte into another (0: unknown).
        busy_hop_s: one message hop while this device computes, to a member that is not
            probing (its ring successor when every member probes at once; 0: unknown).
        typical: the speed probe's median wall-clock repeat over its fastest repeat
            (in quota seconds for a capped member; 1: unknown).
        together: the share of its speed this member kept computing beside the members
            it shared a host with (:func:`~p2ptrain.plan._together.probe_together`), by
            :func:`~p2ptrain.plan._together.host_setting`; the newest :data:`MAX_SETTINGS`.
        checks: what this member's compute took, over what the cost model priced on
            these figures, in each of the first :data:`CHECK_JOBS` jobs that ran on them
            (each within :data:`CHECKED_RANGE`); their median, :attr:`checked`, is the
            model's own error for this model on this device, not staleness. Once they are
            all in, two jobs in a row far from it on the same side find the figures stale
            (:meth:`~p2ptrain.train._replan.PlanInputs.rebalance`).
        checked_on: the terms ``checks`` were taken on (the layers they priced): a ratio on
            other terms is not compared with them.
        off: the last job's ratio when it was far from :attr:`checked` (0: it was not).
    """

    costs: tuple[LayerCost, ...]
    per_sample_s: float
    fixed_s: float
    update_s: float
    speed_cv: float = 0.0
    reduce_s: float = 0.0
    busy_hop_s: float = 0.0
    typical: float = 1.0
    together: tuple[tuple[str, float], ...] = ()
    checks: tuple[float, ...] = ()
    checked_on: str = ""
    off: float = 0.0

    @property
    def checked(self) -> float:
        """The median of :attr:`checks` (0: no job has checked these figures yet)."""
        return statistics.median(self.checks) if self.checks else 0.0

    def correction(self, n_layers: int) -> float:
        """What a job scales these figures' compute (``per_sample_s``, ``fixed_s``) by before it
        plans on them: :attr:`checked` (clamped to :data:`CORRECTION_LIMITS`) when the checks
        are this member's own ratios on the whole model, else 1.

        A probe can be far off and stay cached: on hetero4 at batch 128 the 1.0-core device's
        probe read half its speed, and four warm jobs planned on it, predicting the device
        alone at 273 samples/s where it trained at 450-510. The jobs that ran on the figures
        measured what they priced; their median is the better figure for the next plan.
        """
        if not self.checks or self.checked_on != f"0-{n_layers - 1}":
            return 1.0
        return min(max(self.checked, CORRECTION_LIMITS[0]), CORRECTION_LIMITS[1])

    def to_json(self) -> dict[str, Any]:
        return {"costs": [asdict(c) for c in self.costs], "per_sample_s": self.per_sample_s,
                "fixed_s": self.fixed_s, "update_s": self.update_s, "speed_cv": self.speed_cv,
                "reduce_s": self.reduce_s, "busy_hop_s": self.busy_hop_s, "typical": self.typical,
                "together": dict(self.together), "checked": self.checked, "checks": list(self.checks),
                "checked_on": self.checked_on, "off": self.off}

    def remembering(self, kept: dict[str, float]) -> LocalProfile:
        """This profile with the shares ``kept`` by host setting, the newest :data:`MAX_SETTINGS` (``kept``'s order)."""
        return replace(self, together=tuple(kept.items())[-MAX_SETTINGS:])

    @classmethod
    def from_json(cls, raw: Any) -> LocalProfile:
        """Raises ValueError / TypeError / KeyError on anything but a well-formed entry."""
        if not isinstance(raw, dict) or not isinstance(raw["costs"], list) or not raw["costs"]:
            raise ValueError("not a profile entry")
        # The last five arrived later: an entry without them reads as unknown.
        nums = [raw["per_sample_s"], raw["fixed_s"], raw["update_s"], raw.get("speed_cv", 0.0), raw.get("reduce_s", 0.0),
                raw.get("busy_hop_s", 0.0), raw.get("typical", 1.0), raw.get("checked", 0.0)]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in nums):
            raise ValueError(f"bad figures {nums}")
        costs = []
        for c in raw["costs"]:
            if not isinstance(c, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in c.values()):
                raise ValueError(f"bad layer cost {c!r}")
            costs.append(LayerCost(float(c["fwd_s"]), float(c["bwd_s"]), int(c["param_bytes"]), int(c["act_bytes"]),
                                   int(c.get("saved_bytes", 0))))
        if nums[0] <= 0 or nums[6] < 1:
            raise ValueError("per_sample_s must be > 0 and typical at least 1")
        together = raw.get("together", {})  # arrived later: an entry without it has seen no shared host
        if not isinstance(together, dict) or len(together) > MAX_SETTINGS or not all(
                isinstance(k, str) and len(k) <= 256 and isinstance(v, (int, float)) and 0 < v <= 1
                for k, v in together.items()):
            raise ValueError("bad shared-host shares")
        checked_on = raw.get("checked_on", "")
        # "checks" arrived after "checked" (one job's ratio): an entry with only that has one check.
        checks = raw.get("checks", [nums[7]] if nums[7] else [])
        off = raw.get("off", 0.0)
        if not isinstance(checks, list) or len(checks) > CHECK_JOBS or not all(_ratio_ok(v) and v for v in checks) or (
                not _ratio_ok(nums[7]) or not _ratio_ok(off)) or (
                not isinstance(checked_on, str) or len(checked_on) > 256):
            raise ValueError("bad checked ratio")
        per_sample, fixed, update, cv, reduce, hop, typical = (float(v) for v in nums[:7])
        return cls(tuple(costs), per_sample, fixed, update, cv, reduce, hop, typical,
                   tuple((k, float(v)) for k, v in together.items()), tuple(float(v) for v in checks), checked_on,
                   float(off))


def _ratio_ok(v: Any) -> bool:
    """0 (none) or a ratio within :data:`CHECKED_RANGE`."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (
        v == 0 or CHECKED_RANGE[0] <= v <= CHECKED_RANGE[1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read(64 << 10).decode(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(("model name", "Hardware", "Model")):  # x86, older and newer ARM
            return line.partition(":")[2].strip()
    return ""


def device_fingerprint(device: torch.device | str = "cpu") -> str:
    """This device as the profile cache sees it: times measured under one fingerprint apply to it.

    CPU model, usable cores (affinity), the cgroup CPU quota (a testbed's caps), torch's
    threads, the accelerator's name and ``torch.__version__`` (:func:`device_tag`).
    """
    usable = affinity_cores()
    quota = cpu_quota()
    quota_s = "none" if quota is None else f"{quota:.3f}"
    return f"{device_tag(device)}|{_cpu_model()}|affinity{usable}|quota{quota_s}"


def profile_key(layers: Sequence[nn.Module], sample_input: Tensor, *, optimizer: str = "",
                device: str | None = None) -> str:
    """The cache key of ``layers`` profiled on ``sample_input`` (one micro-batch) on ``device``.

    Args:
        layers: the model's layers; only their structure counts, not their weights.
        sample_input: the micro-batch the layers are profiled on (its shape and dtype count).
        optimizer: what the update probe times (e.g. its qualified name).
        device: a :func:`device_fingerprint`; default: this process's.
    """
    fp = device_fingerprint(sample_input.device) if device is None else device
    spec = "\n".join([model_digest(layers), str(tuple(sample_input.shape)), str(sample_input.dtype), optimizer, fp])
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


MAX_AGE_S = 24 * 3600.0


class ProfileCache:
    """The ``profiles.json`` in ``directory``: up to ``max_entries`` :class:`LocalProfile` by key.

    Args:
        directory: where the file lives (created on the first store).
        max_entries: entries kept; storing more drops the oldest stored.
        max_age_s: an entry older than this is measured again: a device's load, power
            mode or thermal state drifts, and figures taken once under contention must
            not steer plans for ever (default: a day).
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_entries: int = 32,
                 max_age_s: float = MAX_AGE_S) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_age_s = max_age_s
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.max_entries = max_entries

    def _read(self) -> dict[str, Any]:
        """The stored entries by key; {} for a missing, unreadable or foreign file."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_FILE_BYTES + 1)
            if len(data) > _MAX_FILE_BYTES:
                raise ValueError(f"over {_MAX_FILE_BYTES} bytes")
            raw = json.loads(data)
            if isinstance(raw, dict) and isinstance(raw.get("version"), int) and raw["version"] != _VERSION:
                # An upgrade, not damage: say so quietly, and measure again.
                log.info("the profile cache %s is from another p2ptrain release (format %d, this one reads %d); "
                         "each model is measured again once", self.path, raw["version"], _VERSION)
                return {}
            if not isinstance(raw, dict) or raw.get("version") != _VERSION or not isinstance(raw.get("entries"), dict):
                raise ValueError("not a p2ptrain profile cache")
            return {k: v for k, v in raw["entries"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            log.warning("ignoring the unreadable profile cache %s (%s); it is rewritten on the next store",
                        self.path, exc)
            return {}

    def get(self, key: str) -> LocalProfile | None:
        """The entry stored under ``key``, or None (absent, or malformed: it is measured again)."""
        entry = self._read().get(key)
        if entry is None or time.time() - _stamp(entry) > self.max_age_s:
            return None
        try:
            return LocalProfile.from_json(entry.get("profile"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring a malformed profile cache entry in %s: %s", self.path, exc)
            return None

    def put(self, key: str, profile: LocalProfile, *, refresh: bool = True) -> None:
        """Store ``profile`` under ``key``, keeping the ``max_entries`` newest. Never raises for I/O.

        Args:
            refresh: stamp the entry now (its figures were just measured). False keeps a
                stored entry's stamp (only its shared-host shares are new), so its
                figures still age out ``max_age_s`` after they were measured.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = self._read()
                old = entries.get(key)
                stamp = time.time() if refresh or old is None else _stamp(old)
                entries[key] = {"stored": stamp, "profile": profile.to_json()}
                newest = sorted(entries.items(), key=lambda kv: _stamp(kv[1]), reverse=True)[: self.max_entries]
                self._write({"version": _VERSION, "entries": dict(newest)})
        except OSError as exc:  # a read-only state folder costs a re-profile, not the job
            log.warning("could not store a profile in %s: %s", self.path, exc)

    def stamp(self, key: str) -> float:
        """When the entry under ``key`` was measured (its store stamp); 0 for none."""
        entry = self._read().get(key)
        return 0.0 if entry is None else _stamp(entry)

    def check(self, key: str, ratio: float, on: str, *, stamp: float) -> tuple[str, LocalProfile] | None:
        """Apply one job's ``ratio`` (taken ``on`` those terms) to the entry stamped ``stamp``,
        deciding on the entry as it is under the lock (:func:`judge`), so members sharing a
        key (two members of one device) add to each other's checks rather than overwrite
        them. Returns the decision and the entry it was made on (None: no such entry, or
        other figures now). Never raises for I/O."""
        if not self.path.exists():
            return None
        try:
            with self._locked():
                entries = self._read()
                old = entries.get(key)
                if old is None or _stamp(old) != stamp:
                    return None
                profile = LocalProfile.from_json(old.get("profile"))
                action, checks, checked_on, off = judge(profile.checks, profile.checked_on, profile.off, ratio, on)
                if action == "forget":
                    del entries[key]
                elif action == "note":
                    entries[key] = {"stored": stamp, "profile": replace(profile, checks=checks, checked_on=checked_on,
                                                                        off=off).to_json()}
                if action != "keep":
                    self._write({"version": _VERSION, "entries": entries})
                return action, profile
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # a malformed entry: it is measured again anyway
        except OSError as exc:
            log.warning("could not update a profile in %s: %s", self.path, exc)
            return None

    def keys(self) -> list[str]:
        """The stored keys, newest first."""
        return [k for k, _ in sorted(self._read().items(), key=lambda kv: _stamp(kv[1]), reverse=True)]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if sys.platform == "win32":  # no flock: concurrent writers may drop each other's entry
            yield
            return
        fd = os.open(self.directory / (FILE_NAME + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, body: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".profiles-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, separators=(",", ":"))
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class CacheEntry:
    """Where one member's figures for a job live: ``node_id``'s entry ``key`` in ``cache``.

    ``stamp`` identifies the figures the job planned on (their store stamp): a note or a
    drop touches the entry only while it still holds them, so a member re-measuring the
    same key meanwhile (two members of one device sharing a cache) keeps its fresh
    figures. ``checks`` / ``checked_on`` / ``off`` are the entry's
    :attr:`LocalProfile.checks`, their terms and its :attr:`LocalProfile.off` when the job
    read it (what the job's own log lines show). The job's measured compute adds to the
    stored ones or strikes, or, far from them twice in a row, drops the entry
    (:meth:`check`, decided on the entry as stored), so the next job measures
    again (:meth:`~p2ptrain.train._replan.PlanInputs.rebalance`). Both are file I/O: call
    them off a host's event loop. ``applied`` is the correction the job planned with
    (:meth:`LocalProfile.correction`): its ratios are taken on the corrected figures, and
    times it they are ratios on the stored ones, which is what the entry keeps.
    """

    cache: ProfileCache
    key: str
    node_id: str
    stamp: float
    checks: tuple[float, ...] = ()
    checked_on: str = ""
    off: float = 0.0
    applied: float = 1.0  # the correction the job planned with (LocalProfile.correction)

    @property
    def checked(self) -> float:
        """The median of :attr:`checks` (0: none yet)."""
        return statistics.median(self.checks) if self.checks else 0.0

    def check(self, ratio: float, on: str) -> tuple[str, LocalProfile] | None:
        """:meth:`ProfileCache.check` on this entry's figures."""
        return self.cache.check(self.key, ratio, on, stamp=self.stamp)


def _stamp(entry: Any) -> float:
    v = entry.get("stored") if isinstance(entry, dict) else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0


def default_profile_cache(state_dir: str | os.PathLike[str] | None = None) -> ProfileCache | None:
    """The cache a node uses: :data:`PROFILE_CACHE_ENV`'s directory, else ``state_dir``, else the default.

    Returns None when :data:`PROFILE_CACHE_ENV` is ``off`` (also ``0``, ``none``, ``false``).
    """
    env = os.environ.get(PROFILE_CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    return ProfileCache(env or state_dir or default_state_dir())


def reprofile_requested() -> bool:
    """True when :data:`REPROFILE_ENV` asks every job here to measure again."""
    return os.environ.get(REPROFILE_ENV, "").strip().lower() not in ("", "0", "false", "no")
