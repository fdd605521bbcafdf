"""The testbed plan: names, addresses and the ordered steps that build it, with no side effects.

Topology (nothing is created in, or attached to, the host's own network namespace)::

    netns p2pt-<name>-br                 netns p2pt-<name>-dev0
    ┌─────────────────────────┐          ┌──────────────────────┐
    │ br0 (bridge, snooping 0)│──d0 ═══ eth0  10.213.0.1/24     │  tbf on eth0 egress = up rate
    │   tbf on d0 egress      │          └──────────────────────┘
    │   = dev0's down rate    │──d1 ═══ eth0 in p2pt-<name>-dev1 ...
    └─────────────────────────┘

Each device also gets a cgroup ``<parent>/p2pt-<name>/devI`` per controller (see
``_testbed_cgroup``) with its CPU quota and memory limit. :meth:`TestbedPlan.steps` lists
the commands and file writes in order; the adapter in ``_testbed`` runs them, and the plan
serialises to the state file so ``down`` knows exactly what ``up`` meant to make.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from p2ptrain._errors import ConfigError

from ._cgroup import CgroupLayout
from ._profile import Profile

__all__ = [
    "DEFAULT_NAME",
    "DEVICE_IFACE",
    "DEFAULT_SUBNET",
    "PREFIX",
    "Command",
    "DevicePlan",
    "MakeDir",
    "Step",
    "TestbedPlan",
    "WriteFile",
    "launch_argv",
    "plan_testbed",
]

logger = logging.getLogger(__name__)

# Every kernel object the testbed makes carries this prefix, so `down` can sweep by name.
PREFIX = "p2pt-"
DEFAULT_NAME = "tb"
# A private /24 that home and office LANs rarely use; it only ever exists inside the
# testbed's namespaces, so a clash would be confusing, never harmful.
DEFAULT_SUBNET = "10.213.0.0/24"
BRIDGE_IFACE = "br0"
DEVICE_IFACE = "eth0"
MAX_DEVICES = 64

# CFS period: 10 ms rather than the kernel's 100 ms default, so a 0.25-core device is
# continuously slow (2.5 ms of every 10 ms) instead of running flat out for 25 ms and then
# stalling for 75 ms, which would make heartbeats and pipeline timings jitter.
_CFS_PERIOD_US = 10_000
# The kernel refuses quotas under 1 ms.
_CFS_MIN_QUOTA_US = 1_000
# tbf queue: up to 50 ms of traffic waits before drops (a wifi-like buffer); the bucket
# holds 4 ms of traffic but at least 16 KiB (>= 10 MTU-sized frames), enough for GSO
# bursts on veth without measurable overshoot over a 1 s transfer.
_TBF_LATENCY = "50ms"
_TBF_BURST_S = 0.004
_TBF_MIN_BURST = 16 * 1024

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


@dataclass(frozen=True)
class Command:
    """Run a command (``ip``/``tc``); it must succeed."""

    argv: tuple[str, ...]

    def describe(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class MakeDir:
    """Make a directory (a cgroup); an existing one is fine."""

    path: str

    def describe(self) -> str:
        return f"mkdir -p {shlex.quote(self.path)}"


@dataclass(frozen=True)
class WriteFile:
    """Write a value into a file (a cgroup knob); ``optional`` skips a missing file."""

    path: str
    value: str
    optional: bool = False

    def describe(self) -> str:
        return f"echo {shlex.quote(self.value)} > {shlex.quote(self.path)}" + ("  # if present" if self.optional else "")


Step = Command | MakeDir | WriteFile


@dataclass(frozen=True, kw_only=True)
class DevicePlan:
    """One emulated device: its names, address, limits and cgroup directories."""

    index: int
    name: str
    kind: str
    netns: str
    address: str
    prefixlen: int
    bridge_port: str
    cpus: float | None
    memory_mib: int | None
    up_mbit: float | None
    down_mbit: float | None
    cpu_cgroup: str | None
    memory_cgroup: str | None
    cpu_cgroup_version: int | None
    memory_cgroup_version: int | None
    power: str | None = None  # power profile (p2ptrain.energy) the device is metered as
    battery: float | None = None  # emulated battery charge; None: on mains

    @property
    def env(self) -> dict[str, str]:
        """What the device's processes are told of the device they stand for.

        Its CPU share (``ip netns exec`` mounts a fresh sysfs, so the device's own cgroup
        cannot be read from inside: the profile cache and the announced cores need the
        share), and with a power profile, that and the battery
        (:class:`p2ptrain.energy.Emulation`).
        """
        out: dict[str, str] = {}
        if self.cpus is not None or self.power is not None:
            out["P2PTRAIN_EMULATED_CPUS"] = repr(float(self.cpus if self.cpus is not None else os.cpu_count() or 1))
        if self.power is not None:
            out["P2PTRAIN_POWER_PROFILE"] = self.power
        if self.battery is not None:
            out["P2PTRAIN_BATTERY"] = repr(float(self.battery))
        return out

    @property
    def cgroups(self) -> list[str]:
        """Distinct cgroup directories the device's processes join (one per hierarchy)."""
        return sorted({d for d in (self.cpu_cgroup, self.memory_cgroup) if d})

    @property
    def memory_limited(self) -> bool:
        return self.memory_mib is not None and self.memory_cgroup is not None


@dataclass(frozen=True, kw_only=True)
class TestbedPlan:
    """Everything a testbed is made of; pure data, serialisable to the state file."""

    __test__ = False  # not a pytest test class despite the name

    name: str
    profile: str
    subnet: str
    bridge_netns: str
    devices: tuple[DevicePlan, ...]
    cgroup_groups: tuple[tuple[str, int], ...]  # (p2pt-<name> directory, cgroup version)
    cgroup_layout: str

    @property
    def netns_prefix(self) -> str:
        return netns_prefix(self.name)

    @property
    def namespaces(self) -> list[str]:
        """Device namespaces first, the bridge's last (the order ``down`` deletes them)."""
        return [d.netns for d in self.devices] + [self.bridge_netns]

    def steps(self) -> list[Step]:
        """The ordered commands and writes that build the testbed."""
        br = self.bridge_netns
        out: list[Step] = [
            Command(("ip", "netns", "add", br)),
            Command(("ip", "-n", br, "link", "set", "lo", "up")),
            # IGMP snooping off: nobody sends IGMP queries on this bridge, and a snooping
            # bridge may then stop flooding 224.0.0.251, which is mDNS.
            Command(("ip", "-n", br, "link", "add", BRIDGE_IFACE, "type", "bridge", "mcast_snooping", "0", "stp_state", "0")),
            Command(("ip", "-n", br, "link", "set", BRIDGE_IFACE, "up")),
        ]
        for d in self.devices:
            ns = d.netns
            out += [
                Command(("ip", "netns", "add", ns)),
                Command(("ip", "-n", ns, "link", "set", "lo", "up")),
                # Both ends are born in their namespaces: no interface ever appears in the host's.
                Command(("ip", "-n", br, "link", "add", d.bridge_port, "type", "veth", "peer", "name", DEVICE_IFACE, "netns", ns)),
                Command(("ip", "-n", br, "link", "set", d.bridge_port, "master", BRIDGE_IFACE)),
                Command(("ip", "-n", br, "link", "set", d.bridge_port, "multicast", "on", "up")),
                Command(("ip", "-n", ns, "addr", "add", f"{d.address}/{d.prefixlen}", "dev", DEVICE_IFACE)),
                Command(("ip", "-n", ns, "link", "set", DEVICE_IFACE, "multicast", "on", "up")),
                # No default route exists in the namespace, so multicast needs its own route.
                Command(("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", DEVICE_IFACE)),
            ]
            if d.up_mbit is not None:
                out.append(_tbf(ns, DEVICE_IFACE, d.up_mbit))
            if d.down_mbit is not None:
                out.append(_tbf(br, d.bridge_port, d.down_mbit))
        out += self._cgroup_steps()
        return out

    def _cgroup_steps(self) -> list[Step]:
        out: list[Step] = []
        v2 = []
        if any(d.cpu_cgroup_version == 2 for d in self.devices):
            v2.append("+cpu")
        if any(d.memory_cgroup_version == 2 for d in self.devices):
            v2.append("+memory")
        for group, version in self.cgroup_groups:
            if version == 2:
                # v2 hands a controller to children only when the parent enables it in
                # cgroup.subtree_control, at each level down to the device.
                parent = os.path.dirname(group)
                out.append(WriteFile(os.path.join(parent, "cgroup.subtree_control"), " ".join(v2)))
                out.append(MakeDir(group))
                out.append(WriteFile(os.path.join(group, "cgroup.subtree_control"), " ".join(v2)))
            else:
                out.append(MakeDir(group))
        for d in self.devices:
            for cg in d.cgroups:
                out.append(MakeDir(cg))
            if d.cpus is not None and d.cpu_cgroup:
                period, quota = cfs_quota(d.cpus)
                if d.cpu_cgroup_version == 2:
                    out.append(WriteFile(os.path.join(d.cpu_cgroup, "cpu.max"), f"{quota} {period}"))
                else:
                    out.append(WriteFile(os.path.join(d.cpu_cgroup, "cpu.cfs_period_us"), str(period)))
                    out.append(WriteFile(os.path.join(d.cpu_cgroup, "cpu.cfs_quota_us"), str(quota)))
            if d.memory_limited and d.memory_cgroup and d.memory_mib is not None:
                limit = str(d.memory_mib * 1024 * 1024)
                if d.memory_cgroup_version == 2:
                    out.append(WriteFile(os.path.join(d.memory_cgroup, "memory.max"), limit))
                    out.append(WriteFile(os.path.join(d.memory_cgroup, "memory.swap.max"), "0", optional=True))
                else:
                    out.append(WriteFile(os.path.join(d.memory_cgroup, "memory.limit_in_bytes"), limit))
                    # memsw (memory + swap) must be >= the memory limit; equal means no swap,
                    # as on a Jetson without a swap file.
                    out.append(WriteFile(os.path.join(d.memory_cgroup, "memory.memsw.limit_in_bytes"), limit, optional=True))
        return out

    def device(self, key: str | int) -> DevicePlan:
        """A device by index (``0``, ``"0"``) or name (``"dev0"``).

        Raises:
            ConfigError: no such device.
        """
        text = str(key)
        for d in self.devices:
            if text in (d.name, str(d.index)):
                return d
        names = ", ".join(d.name for d in self.devices)
        raise ConfigError(f"testbed {self.name!r} has no device {text!r}; its devices: {names} (or their index)")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = [asdict(d) for d in self.devices]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TestbedPlan:
        """Rebuild a plan from :meth:`to_json` output (the state file).

        Raises:
            ConfigError: the data is not a plan this version wrote.
        """
        try:
            devices = tuple(DevicePlan(**d) for d in data["devices"])
            return cls(
                name=data["name"],
                profile=data["profile"],
                subnet=data["subnet"],
                bridge_netns=data["bridge_netns"],
                devices=devices,
                cgroup_groups=tuple((str(g), int(v)) for g, v in data["cgroup_groups"]),
                cgroup_layout=data["cgroup_layout"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"testbed state is not readable by this p2ptrain version ({exc})") from exc


def netns_prefix(name: str) -> str:
    """Prefix of every namespace of testbed ``name`` (``p2pt-<name>-``)."""
    return f"{PREFIX}{name}-"


def cgroup_group_name(name: str) -> str:
    return f"{PREFIX}{name}"


def cfs_quota(cpus: float) -> tuple[int, int]:
    """(period_us, quota_us) for a share of ``cpus`` cores."""
    period = _CFS_PERIOD_US
    if cpus * period < _CFS_MIN_QUOTA_US:
        period = math.ceil(_CFS_MIN_QUOTA_US / cpus)
    return period, max(_CFS_MIN_QUOTA_US, round(cpus * period))


def _tbf(ns: str, dev: str, mbit: float) -> Command:
    rate_bps = mbit * 1e6
    burst = max(_TBF_MIN_BURST, int(rate_bps / 8 * _TBF_BURST_S))
    kbit = max(1, round(mbit * 1000))  # tc's kbit is 1000 bit/s
    return Command(("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{kbit}kbit", "burst", str(burst), "latency", _TBF_LATENCY))


def validate_name(name: str) -> str:
    """Check a testbed name (it becomes part of namespace and cgroup names).

    Raises:
        ConfigError: not 1-12 lowercase letters/digits starting with a letter.
    """
    if not _NAME_RE.match(name):
        raise ConfigError(f"testbed name {name!r} is invalid; use 1-12 lowercase letters or digits starting with a letter, e.g. --name tb")
    return name


def _subnet(subnet: str, n: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError(f"subnet {subnet!r} is not an IPv4 network ({exc}); give one like {DEFAULT_SUBNET}") from exc
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise ConfigError(f"subnet {subnet} is not a private range; use one like {DEFAULT_SUBNET} (10/8, 172.16/12, 192.168/16)")
    if net.num_addresses - 2 < n:
        raise ConfigError(
            f"subnet {subnet} has {max(0, net.num_addresses - 2)} host addresses but --devices is {n}; use a larger subnet, e.g. /24"
        )
    return net


def plan_testbed(
    profile: Profile,
    n: int,
    *,
    layout: CgroupLayout,
    name: str = DEFAULT_NAME,
    subnet: str = DEFAULT_SUBNET,
    host_cpus: int | None = None,
) -> TestbedPlan:
    """Plan an ``n``-device testbed from a profile.

    Args:
        profile: the device specs, cycled over the devices.
        n: number of devices, 1..64.
        layout: the host's cgroup controllers (from ``detect_layout``).
        name: testbed name, part of every namespace and cgroup name.
        subnet: private IPv4 subnet; device ``i`` gets host address ``i + 1``.
        host_cpus: host core count, only for a warning when a cap exceeds it.

    Raises:
        ConfigError: bad count, name or subnet, or the profile caps CPU on a host without a
            cgroup cpu controller.
    """
    validate_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEVICES:
        raise ConfigError(f"--devices is {n!r}; give a whole number from 1 to {MAX_DEVICES}")
    net = _subnet(subnet, n)
    specs = profile.for_devices(n)
    if any(s.cpus is not None for s in specs) and layout.cpu is None:
        raise ConfigError(
            f"profile {profile.name!r} caps CPU but this host has no cgroup cpu controller mounted "
            "(neither v1 cpu nor v2 with cpu in cgroup.controllers); use a profile without `cpus`, e.g. wifi"
        )
    if any(s.memory_mib is not None for s in specs) and layout.memory is None:
        logger.warning("this host has no cgroup memory controller: memory limits of profile %r are not applied", profile.name)
    group = cgroup_group_name(name)
    groups = sorted({(os.path.join(m.parent, group), m.version) for m in (layout.cpu, layout.memory) if m})
    devices = []
    for i, spec in enumerate(specs):
        dev = f"dev{i}"
        if spec.cpus is not None and host_cpus and spec.cpus > host_cpus:
            logger.warning("%s asks for %.2f cores but this host has %d: its cap is not binding", dev, spec.cpus, host_cpus)
        cpu_cg = os.path.join(layout.cpu.parent, group, dev) if layout.cpu else None
        mem_cg = os.path.join(layout.memory.parent, group, dev) if layout.memory else None
        devices.append(
            DevicePlan(
                index=i,
                name=dev,
                kind=spec.kind,
                netns=f"{netns_prefix(name)}{dev}",
                address=str(net.network_address + i + 1),
                prefixlen=net.prefixlen,
                bridge_port=f"d{i}",
                cpus=spec.cpus,
                memory_mib=spec.memory_mib if mem_cg else None,
                up_mbit=spec.up_mbit,
                down_mbit=spec.down_mbit,
                power=spec.power,
                battery=spec.battery,
                cpu_cgroup=cpu_cg,
                memory_cgroup=mem_cg,
                cpu_cgroup_version=layout.cpu.version if layout.cpu else None,
                memory_cgroup_version=layout.memory.version if layout.memory else None,
            )
        )
    return TestbedPlan(
        name=name,
        profile=profile.name,
        subnet=str(net),
        bridge_netns=f"{netns_prefix(name)}br",
        devices=tuple(devices),
        cgroup_groups=tuple(groups),
        cgroup_layout=layout.describe(),
    )


def launch_argv(device: DevicePlan, argv: list[str] | tuple[str, ...]) -> list[str]:
    """The argv that runs ``argv`` inside the device's cgroups and network namespace.

    A shell joins the cgroups (writing its own pid, which ``exec`` keeps) and then execs
    ``ip netns exec``, which execs the command: no extra process stays in between, so
    signals and the exit code pass straight through. A device with a power profile runs
    its command under ``env`` with :attr:`DevicePlan.env` set (``env`` execs too). (Python 3.11 has no ``os.setns``, and
    a ``preexec_fn`` is unsafe in the threaded programs that benches are.)

    Raises:
        ConfigError: ``argv`` is empty.
    """
    if not argv:
        raise ConfigError("no command given; e.g. p2ptrain testbed run dev0 -- python -c 'print(1)'")
    joins = " && ".join(f"echo $$ > {shlex.quote(os.path.join(cg, 'cgroup.procs'))}" for cg in device.cgroups)
    script = (joins + " && " if joins else "") + 'exec "$@"'
    env = [f"{k}={v}" for k, v in sorted(device.env.items())]
    return ["sh", "-c", script, "p2ptrain-testbed", "ip", "netns", "exec", device.netns, *(["env", *env] if env else []), *argv]
