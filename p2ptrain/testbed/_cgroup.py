"""Where the testbed's cgroups go, and how they are emptied and removed.

The host may run cgroup v1 (one hierarchy per controller, ``cpu.cfs_quota_us``), v2 (one
unified hierarchy, ``cpu.max``) or a hybrid. :func:`detect_layout` reads
``/proc/self/mountinfo`` and ``/proc/self/cgroup`` and answers, per controller, which
version it runs and under which directory the testbed's group ``p2pt-<name>`` is made.

Placement, and why:

- v1: under the caller's own cgroup of that controller, so testbed processes stay inside
  whatever limits the host already puts on the caller (a CI job's memory cap, a session
  scope) instead of escaping to the root.
- v2: under the root of the unified hierarchy, because a v2 cgroup holding processes cannot
  also hand controllers to children ("no internal processes"), and the caller's cgroup holds
  the caller.

The parsers are pure functions of the file texts; only :func:`detect_layout`,
:func:`group_pids` and :func:`remove_groups` touch the file system.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["ControllerMount", "CgroupLayout", "detect_layout", "group_pids", "parse_layout", "remove_groups"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerMount:
    """One controller as the testbed uses it.

    Attributes:
        version: 1 or 2.
        parent: directory under which the testbed's ``p2pt-<name>`` group is made.
        mount: mount point of the hierarchy (swept too when no state file survives).
    """

    version: int
    parent: str
    mount: str


@dataclass(frozen=True)
class CgroupLayout:
    """The controllers the testbed can use; ``None`` where the host lacks one."""

    cpu: ControllerMount | None
    memory: ControllerMount | None

    def describe(self) -> str:
        """One line for ``status``: which version each controller runs."""
        parts = []
        for name, mount in (("cpu", self.cpu), ("memory", self.memory)):
            parts.append(f"{name}: v{mount.version}" if mount else f"{name}: unavailable")
        return ", ".join(parts)


def _parse_mountinfo(text: str) -> tuple[dict[str, str], str | None]:
    """v1 controller -> mount point, and the cgroup2 mount point (or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, super_opts = fields[4], tail[0], tail[2]
        if fstype == "cgroup":
            for opt in super_opts.split(","):
                v1.setdefault(opt, mount_point)
        elif fstype == "cgroup2" and v2 is None:
            v2 = mount_point
    return v1, v2


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str]:
    """v1 controller -> the caller's path in it, and the caller's v2 path."""
    v1: dict[str, str] = {}
    v2 = "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for c in controllers.split(","):
            v1[c] = path
    return v1, v2


def parse_layout(
    mountinfo: str,
    proc_cgroup: str,
    *,
    v2_controllers: Callable[[str], str],
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> CgroupLayout:
    """Decide the layout from the texts of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``.

    Args:
        mountinfo: text of ``/proc/self/mountinfo``.
        proc_cgroup: text of ``/proc/self/cgroup``.
        v2_controllers: reads ``cgroup.controllers`` of a cgroup2 mount point ("" if unreadable).
        is_dir: whether a directory exists (the caller's v1 cgroup may be invisible in a container).

    Returns:
        The layout; a controller mounted in neither hierarchy is ``None``.
    """
    v1_mounts, v2_mount = _parse_mountinfo(mountinfo)
    v1_paths, _ = _parse_proc_cgroup(proc_cgroup)
    v2_available = set(v2_controllers(v2_mount).split()) if v2_mount else set()

    def resolve(controller: str) -> ControllerMount | None:
        if controller in v1_mounts:
            mount = v1_mounts[controller]
            own = os.path.join(mount, v1_paths.get(controller, "/").lstrip("/"))
            return ControllerMount(1, own.rstrip("/") if is_dir(own) else mount, mount)
        if v2_mount and controller in v2_available:
            return ControllerMount(2, v2_mount, v2_mount)
        return None

    return CgroupLayout(cpu=resolve("cpu"), memory=resolve("memory"))


def detect_layout() -> CgroupLayout:
    """The layout of this host, read from ``/proc``."""

    def read(path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""

    return parse_layout(
        read("/proc/self/mountinfo"),
        read("/proc/self/cgroup"),
        v2_controllers=lambda mount: read(os.path.join(mount, "cgroup.controllers")),
    )


def _walk_bottom_up(group: str) -> list[str]:
    """``group`` and every cgroup below it, children before parents."""
    out: list[str] = []
    for root, _dirs, _files in os.walk(group, topdown=False):
        out.append(root)
    return out


def group_pids(groups: Iterable[str]) -> set[int]:
    """Pids of every process in the given cgroups and their children."""
    pids: set[int] = set()
    for group in groups:
        for cg in _walk_bottom_up(group):
            try:
                with open(os.path.join(cg, "cgroup.procs"), encoding="ascii") as f:
                    pids.update(int(x) for x in f.read().split())
            except OSError:
                continue
    return pids


def remove_groups(groups: Iterable[str], *, timeout: float = 3.0) -> tuple[list[str], list[str]]:
    """Remove cgroups and everything below them; missing ones are fine.

    A cgroup stays busy for a moment after its last process was killed, so ``EBUSY`` is
    retried until ``timeout``.

    Returns:
        (removed directories, directories that could not be removed).
    """
    removed: list[str] = []
    left: list[str] = []
    deadline = time.monotonic() + timeout
    for group in groups:
        if not os.path.isdir(group):
            continue
        for cg in _walk_bottom_up(group):
            while True:
                try:
                    os.rmdir(cg)
                    removed.append(cg)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    logger.warning("could not remove cgroup %s: %s", cg, exc.strerror)
                    left.append(cg)
                    break
    return removed, left
