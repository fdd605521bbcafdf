"""An emulated edge testbed on one machine: devices as namespaces + cgroups behind a bridge.

This is the part benches and tests use::

    with Testbed.up("hetero4", 4) as tb:
        procs = [d.popen([sys.executable, "-m", "p2ptrain", "join", ...]) for d in tb.devices]

:meth:`Testbed.up` builds the plan (``_testbed_plan``), records it in a state file *before*
creating anything, applies it (``_testbed_net``) and on failure tears down what it made.
:meth:`Testbed.down` removes everything named in the state file and, in case ``up`` crashed
before it could write or finish, everything carrying the testbed's name prefix; it is
idempotent. All of it needs root.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2ptrain._errors import ConfigError, P2PTrainError

from ._cgroup import detect_layout, group_pids, remove_groups
from ._net import Executor, list_netns, netns_pids, probe_netem, require_root, run_cmd
from ._plan import (
    DEFAULT_NAME,
    DEFAULT_SUBNET,
    DevicePlan,
    TestbedPlan,
    cgroup_group_name,
    launch_argv,
    netns_prefix,
    plan_testbed,
    validate_name,
)
from ._profile import Profile, load_profile

__all__ = ["DEFAULT_STATE_DIR", "NETEM_MISSING", "TeardownReport", "Testbed", "TestbedDevice"]

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/p2ptrain")
_STATE_VERSION = 1
NETEM_MISSING = "this kernel has no netem (sch_netem): added latency and loss are NOT emulated, only link rates"
_NETEM_PRESENT = "netem is available, but p2ptrain testbed does not add latency yet: only link rates are emulated"
# How long `down` lets the testbed's processes exit on SIGTERM before SIGKILL.
_TERM_GRACE_S = 1.0


def _state_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"testbed-{name}.json"


@dataclass(frozen=True)
class TestbedDevice:
    """One emulated device; launch processes inside it with :meth:`popen` or :meth:`run`."""

    __test__ = False

    plan: DevicePlan

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def address(self) -> str:
        """The device's IPv4 address (exists only inside the testbed's namespaces)."""
        return self.plan.address

    @property
    def netns(self) -> str:
        return self.plan.netns

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this device's cgroups and namespace."""
        return launch_argv(self.plan, list(argv))

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the device; ``kwargs`` go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the device to completion; ``kwargs`` go to :func:`subprocess.run`."""
        return subprocess.run(self.command(argv), **kwargs)


@dataclass
class TeardownReport:
    """What :meth:`Testbed.down` removed, and what it could not."""

    namespaces: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.left


class Testbed:
    """A testbed that is up; a context manager that takes it down on exit.

    Make one with :meth:`up`, or :meth:`attach` to one made by another process.
    """

    __test__ = False

    def __init__(self, plan: TestbedPlan, *, state_dir: Path = DEFAULT_STATE_DIR, netem: bool | None = None) -> None:
        self.plan = plan
        self.state_dir = Path(state_dir)
        self.netem = netem
        self.devices = [TestbedDevice(d) for d in plan.devices]

    @property
    def name(self) -> str:
        return self.plan.name

    def device(self, key: str | int) -> TestbedDevice:
        """A device by index or name (``0``, ``"0"``, ``"dev0"``).

        Raises:
            ConfigError: no such device.
        """
        return TestbedDevice(self.plan.device(key))

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def plan_for(
        cls, profile: Profile | str, devices: int, *, name: str = DEFAULT_NAME, subnet: str = DEFAULT_SUBNET
    ) -> TestbedPlan:
        """The plan :meth:`up` would apply (no side effects, no root needed)."""
        prof = load_profile(profile) if isinstance(profile, str) else profile
        return plan_testbed(prof, devices, layout=detect_layout(), name=name, subnet=subnet, host_cpus=os.cpu_count())

    @classmethod
    def up(
        cls,
        profile: Profile | str,
        devices: int,
        *,
        name: str = DEFAULT_NAME,
        subnet: str = DEFAULT_SUBNET,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        executor: Executor | None = None,
    ) -> Testbed:
        """Build a testbed of ``devices`` devices from ``profile``.

        Args:
            profile: a :class:`Profile`, a shipped profile name or a ``.toml`` path.
            devices: how many devices (1..64); the profile's entries are cycled.
            name: testbed name (several testbeds with different names may be up at once).
            subnet: private IPv4 subnet for the device addresses.
            state_dir: where the state file goes.
            executor: applies the steps (tests pass one that injects faults).

        Returns:
            The testbed; use it as a context manager to take it down again.

        Raises:
            P2PTrainError: not root, tools missing, or a step failed (what was made is
                removed again before this is raised).
            ConfigError: bad profile or arguments, or a testbed of this name is already up.
        """
        require_root()
        plan = cls.plan_for(profile, devices, name=name, subnet=subnet)
        state_dir = Path(state_dir)
        state = _state_path(state_dir, name)
        existing = [ns for ns in list_netns() if ns.startswith(netns_prefix(name))]
        if state.exists() or existing:
            raise ConfigError(
                f"a testbed named {name!r} is already up (or left over: {state if state.exists() else ', '.join(existing)}); "
                f"take it down first: p2ptrain testbed down --name {name}"
            )
        # Write the intent first: if we die half-way, `down` knows every name we meant to make.
        _write_state(state, plan, complete=False, netem=None)
        executor = executor or Executor()
        try:
            steps = plan.steps()
            logger.info("testbed %s: %d devices, %d steps", name, len(plan.devices), len(steps))
            for step in steps:
                executor.apply(step)
            netem = probe_netem(plan.bridge_netns)
            _write_state(state, plan, complete=True, netem=netem)
        except BaseException:
            logger.warning("testbed %s: up failed, removing what was made", name)
            cls.teardown(name, state_dir=state_dir)
            raise
        return cls(plan, state_dir=state_dir, netem=netem)

    @classmethod
    def attach(cls, name: str = DEFAULT_NAME, *, state_dir: Path | str = DEFAULT_STATE_DIR) -> Testbed:
        """The testbed ``name`` that some process brought up.

        Raises:
            ConfigError: no such testbed is up.
        """
        validate_name(name)
        data = _read_state(_state_path(Path(state_dir), name))
        if data is None:
            raise ConfigError(f"no testbed named {name!r} is up; start one: p2ptrain testbed up --devices 2 --name {name}")
        if not data.get("complete"):
            raise ConfigError(
                f"testbed {name!r} is half made (its `up` failed or is still running); run: p2ptrain testbed down --name {name}"
            )
        return cls(TestbedPlan.from_json(data["plan"]), state_dir=Path(state_dir), netem=data.get("netem"))

    def down(self) -> TeardownReport:
        """Remove this testbed (see :meth:`teardown`)."""
        return self.teardown(self.name, state_dir=self.state_dir)

    @staticmethod
    def teardown(name: str = DEFAULT_NAME, *, state_dir: Path | str = DEFAULT_STATE_DIR) -> TeardownReport:
        """Remove everything testbed ``name`` made; idempotent, also after a crashed ``up``.

        Processes still running inside its namespaces or cgroups get SIGTERM, then SIGKILL.

        Raises:
            P2PTrainError: not root.
        """
        require_root()
        validate_name(name)
        state = _state_path(Path(state_dir), name)
        report = TeardownReport()
        data = _read_state(state)
        plan: TestbedPlan | None = None
        if data is not None:
            try:
                plan = TestbedPlan.from_json(data["plan"])
            except (ConfigError, KeyError):
                logger.warning("state file %s unreadable; sweeping by name prefix only", state)
        prefix = netns_prefix(name)
        namespaces = list(plan.namespaces) if plan else []
        # Sweep by prefix too: a crash between `ip netns add` and the state write, or a
        # state file removed by hand, must not leave namespaces behind.
        namespaces += sorted(ns for ns in list_netns() if ns.startswith(prefix) and ns not in namespaces)
        groups = [g for g, _ in plan.cgroup_groups] if plan else []
        layout = detect_layout()
        for mount in (layout.cpu, layout.memory):
            if mount:
                for parent in (mount.parent, mount.mount):
                    candidate = os.path.join(parent, cgroup_group_name(name))
                    if candidate not in groups:
                        groups.append(candidate)
        groups = [g for g in groups if os.path.isdir(g)]

        pids = set(group_pids(groups))
        for ns in namespaces:
            pids |= netns_pids(ns)
        pids.discard(os.getpid())
        report.killed = sorted(pids)
        _terminate(pids)

        existing = set(list_netns())
        for ns in namespaces:
            if ns in existing:
                proc = run_cmd(["ip", "netns", "delete", ns], check=False)
                if proc.returncode == 0:
                    report.namespaces.append(ns)
                else:  # gone meanwhile, or busy: the re-list below reports what is left
                    logger.warning("ip netns delete %s: %s", ns, proc.stderr.strip())
        left_ns = [ns for ns in list_netns() if ns.startswith(prefix)]
        removed, left = remove_groups(groups)
        report.cgroups = removed
        report.left = left_ns + left
        if report.clean:
            state.unlink(missing_ok=True)
        else:
            logger.warning("testbed %s: could not remove %s", name, ", ".join(report.left))
        return report

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``p2ptrain testbed status --json`` prints: plan, liveness, what is emulated."""
        alive = set(list_netns())
        if self.plan.bridge_netns in alive:
            self.netem = probe_netem(self.plan.bridge_netns)
        devices = []
        for d in self.plan.devices:
            devices.append(
                {
                    "name": d.name,
                    "kind": d.kind,
                    "netns": d.netns,
                    "address": d.address,
                    "up_mbit": d.up_mbit,
                    "down_mbit": d.down_mbit,
                    "cpus": d.cpus,
                    "memory_mib": d.memory_mib,
                    "memory_limited": d.memory_limited,
                    "power": d.power,
                    "battery": d.battery,
                    "cgroups": d.cgroups,
                    "alive": d.netns in alive,
                }
            )
        return {
            "name": self.name,
            "up": True,
            "profile": self.plan.profile,
            "subnet": self.plan.subnet,
            "bridge_netns": self.plan.bridge_netns,
            "cgroup_layout": self.plan.cgroup_layout,
            "netem": self.netem,
            "latency_emulated": False,
            "note": _NETEM_PRESENT if self.netem else NETEM_MISSING,
            "devices": devices,
        }


def _terminate(pids: set[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL for what is left; bounded in time."""
    if not pids:
        return
    logger.info("stopping %d process(es) still in the testbed", len(pids))
    for sig, wait in ((signal.SIGTERM, _TERM_GRACE_S), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = {p for p in pids if _running(p)}
            if not pids:
                return
            time.sleep(0.02)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has left its namespace and cgroups already)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # The state letter follows the ")" that closes the command name.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _write_state(path: Path, plan: TestbedPlan, *, complete: bool, netem: bool | None) -> None:
    data = {"version": _STATE_VERSION, "complete": complete, "netem": netem, "created": time.time(), "plan": plan.to_json()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash leaves the old state or the new, never half
    except OSError as exc:
        raise P2PTrainError(f"could not write testbed state {path}: {exc.strerror}") from exc


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("testbed state %s unreadable (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
