"""The testbed's plain logic: cgroup layout detection, the plan, the launcher, the CLI without root.

Nothing here needs root or touches the network; the root suite is ``test_testbed_root.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from p2ptrain._errors import ConfigError, P2PTrainError
from p2ptrain.cli import _testbed as _cmd_testbed
from p2ptrain.testbed._cgroup import CgroupLayout, ControllerMount, parse_layout
from p2ptrain.testbed._net import ROOT_MESSAGE
from p2ptrain.testbed._plan import Command, MakeDir, TestbedPlan, WriteFile, cfs_quota, launch_argv, plan_testbed
from p2ptrain.testbed._profile import load_profile, parse_profile
from p2ptrain.testbed._testbed import Testbed

# /proc/self/mountinfo of a cgroup v1 host (this project's CI VM), trimmed.
MOUNTINFO_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP_V1 = "4:memory:/jobs/abc\n1:cpu:/\n0::/\n"
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
PROC_CGROUP_V2 = "0::/user.slice/session-1.scope\n"

V1 = CgroupLayout(
    cpu=ControllerMount(1, "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu"),
    memory=ControllerMount(1, "/sys/fs/cgroup/memory/jobs/abc", "/sys/fs/cgroup/memory"),
)
V2 = CgroupLayout(
    cpu=ControllerMount(2, "/sys/fs/cgroup", "/sys/fs/cgroup"),
    memory=ControllerMount(2, "/sys/fs/cgroup", "/sys/fs/cgroup"),
)
NONE = CgroupLayout(cpu=None, memory=None)


# -- cgroup layout ---------------------------------------------------------------------


def test_layout_v1_nests_under_the_callers_cgroup() -> None:
    layout = parse_layout(MOUNTINFO_V1, PROC_CGROUP_V1, v2_controllers=lambda m: "", is_dir=lambda p: True)
    assert layout == V1
    assert layout.describe() == "cpu: v1, memory: v1"


def test_layout_v1_combined_cpu_cpuacct_mount() -> None:
    mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    layout = parse_layout(mountinfo, "3:cpu,cpuacct:/user.slice\n0::/\n", v2_controllers=lambda m: "", is_dir=lambda p: True)
    assert layout.cpu == ControllerMount(1, "/sys/fs/cgroup/cpu,cpuacct/user.slice", "/sys/fs/cgroup/cpu,cpuacct")
    assert layout.memory is None


def test_layout_v1_falls_back_to_the_mount_when_own_cgroup_is_invisible() -> None:
    layout = parse_layout(MOUNTINFO_V1, PROC_CGROUP_V1, v2_controllers=lambda m: "", is_dir=lambda p: False)
    assert layout.memory is not None and layout.memory.parent == "/sys/fs/cgroup/memory"


def test_layout_v2_uses_the_root() -> None:
    layout = parse_layout(MOUNTINFO_V2, PROC_CGROUP_V2, v2_controllers=lambda m: "cpuset cpu io memory pids")
    assert layout == V2


def test_layout_without_controllers() -> None:
    layout = parse_layout(MOUNTINFO_V2, PROC_CGROUP_V2, v2_controllers=lambda m: "pids")
    assert layout == NONE and layout.describe() == "cpu: unavailable, memory: unavailable"


# -- the plan ----------------------------------------------------------------------------


def _plan(n: int = 3, layout: CgroupLayout = V1, profile: str = "hetero", **kw: object) -> TestbedPlan:
    return plan_testbed(load_profile(profile), n, layout=layout, name="x1", **kw)  # type: ignore[arg-type]


def test_names_and_addresses() -> None:
    plan = _plan()
    assert plan.bridge_netns == "p2pt-x1-br"
    assert [d.netns for d in plan.devices] == ["p2pt-x1-dev0", "p2pt-x1-dev1", "p2pt-x1-dev2"]
    assert [d.address for d in plan.devices] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    assert plan.devices[1].cpu_cgroup == "/sys/fs/cgroup/cpu/p2pt-x1/dev1"
    assert plan.devices[1].memory_cgroup == "/sys/fs/cgroup/memory/jobs/abc/p2pt-x1/dev1"
    assert plan.namespaces[-1] == plan.bridge_netns


def test_every_command_stays_inside_the_testbed_namespaces() -> None:
    """The network rule: no ip/tc command runs in (or creates anything in) the host namespace."""
    plan = _plan(4)
    commands = [s.argv for s in plan.steps() if isinstance(s, Command)]
    assert commands
    for argv in commands:
        if argv[:3] == ("ip", "netns", "add"):
            assert argv[3].startswith("p2pt-x1-")
        else:
            assert argv[1] == "-n" and argv[2].startswith("p2pt-x1-"), argv
    veths = [a for a in commands if "veth" in a]
    assert all(a[a.index("peer") + 4].startswith("p2pt-x1-dev") for a in veths)  # peer born in its netns


def test_links_are_limited_both_ways_and_multicast_is_open() -> None:
    plan = _plan(3)
    text = "\n".join(s.describe() for s in plan.steps())
    assert "tc -n p2pt-x1-dev0 qdisc replace dev eth0 root tbf rate 100000kbit" in text
    assert "tc -n p2pt-x1-br qdisc replace dev d0 root tbf rate 100000kbit" in text
    assert "tc -n p2pt-x1-br qdisc replace dev d2 root tbf rate 1000000kbit" in text
    assert "type bridge mcast_snooping 0" in text
    assert text.count("route add 224.0.0.0/4 dev eth0") == 3
    assert text.count("link set lo up") == 4  # bridge + 3 devices


def test_unlimited_direction_gets_no_qdisc() -> None:
    profile = parse_profile("[[device]]\nup_mbit = 10\n")
    plan = plan_testbed(profile, 1, layout=NONE, name="x1")
    tbfs = [s.argv for s in plan.steps() if isinstance(s, Command) and s.argv[0] == "tc"]
    assert len(tbfs) == 1 and tbfs[0][2] == "p2pt-x1-dev0"


def test_cgroup_v1_steps() -> None:
    steps = _plan(1).steps()
    writes = {s.path: s for s in steps if isinstance(s, WriteFile)}
    assert writes["/sys/fs/cgroup/cpu/p2pt-x1/dev0/cpu.cfs_period_us"].value == "10000"
    assert writes["/sys/fs/cgroup/cpu/p2pt-x1/dev0/cpu.cfs_quota_us"].value == "2500"  # 0.25 core
    mem = "/sys/fs/cgroup/memory/jobs/abc/p2pt-x1/dev0/"
    assert writes[mem + "memory.limit_in_bytes"].value == str(4096 << 20)
    assert writes[mem + "memory.memsw.limit_in_bytes"].optional
    dirs = [s.path for s in steps if isinstance(s, MakeDir)]
    assert dirs.index("/sys/fs/cgroup/cpu/p2pt-x1") < dirs.index("/sys/fs/cgroup/cpu/p2pt-x1/dev0")


def test_cgroup_v2_steps() -> None:
    plan = _plan(2, layout=V2)
    assert plan.devices[0].cgroups == ["/sys/fs/cgroup/p2pt-x1/dev0"]  # one dir for both controllers
    writes = [(s.path, s.value) for s in plan.steps() if isinstance(s, WriteFile)]
    assert writes[0] == ("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +memory")
    assert ("/sys/fs/cgroup/p2pt-x1/cgroup.subtree_control", "+cpu +memory") in writes
    assert ("/sys/fs/cgroup/p2pt-x1/dev1/cpu.max", "5000 10000") in writes
    assert ("/sys/fs/cgroup/p2pt-x1/dev1/memory.max", str(8192 << 20)) in writes


def test_cfs_quota_stretches_the_period_for_tiny_shares() -> None:
    assert cfs_quota(0.5) == (10_000, 5_000)
    assert cfs_quota(2.0) == (10_000, 20_000)
    assert cfs_quota(0.01) == (100_000, 1_000)  # the kernel's 1 ms minimum quota


def test_cpu_cap_without_cpu_controller_is_refused() -> None:
    with pytest.raises(ConfigError, match="no cgroup cpu controller.*wifi"):
        _plan(1, layout=NONE)
    plan = _plan(1, layout=NONE, profile="wifi")  # rates only: fine
    assert plan.devices[0].cgroups == []


def test_memory_without_memory_controller_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    layout = CgroupLayout(cpu=V1.cpu, memory=None)
    plan = _plan(1, layout=layout)
    assert not plan.devices[0].memory_limited
    assert "no cgroup memory controller" in caplog.text


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"n": 0}, "--devices is 0"),
        ({"n": 65}, "from 1 to 64"),
        ({"subnet": "8.8.8.0/24"}, "not a private range"),
        ({"subnet": "10.213.0.1/24"}, "not an IPv4 network"),
        ({"subnet": "10.213.0.0/30", "n": 3}, "has 2 host addresses"),
        ({"subnet": "fd00::/64"}, "not an IPv4 network"),
    ],
)
def test_bad_arguments(kw: dict, needle: str) -> None:
    n = kw.pop("n", 2)
    with pytest.raises(ConfigError, match=needle):
        _plan(n, **kw)


@pytest.mark.parametrize("name", ["", "Tb", "1tb", "tb-1", "averyveryverylongname"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="testbed name"):
        plan_testbed(load_profile("wifi"), 1, layout=NONE, name=name)


def test_device_lookup_and_state_round_trip() -> None:
    plan = _plan(3)
    assert plan.device("dev2").index == 2 and plan.device(1).name == "dev1" and plan.device("0").name == "dev0"
    with pytest.raises(ConfigError, match="no device 'dev9'.*dev0, dev1, dev2"):
        plan.device("dev9")
    again = TestbedPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    with pytest.raises(ConfigError, match="not readable"):
        TestbedPlan.from_json({"name": "x"})


# -- the launcher ------------------------------------------------------------------------


def test_launcher_joins_every_cgroup_then_execs(tmp_path) -> None:
    """Run the launcher's shell part for real, with plain files standing in for cgroup.procs."""
    cpu, mem = tmp_path / "cpu" / "dev0", tmp_path / "mem" / "dev0"
    for d in (cpu, mem):
        d.mkdir(parents=True)
    profile = parse_profile("[[device]]\ncpus = 0.5\n")
    layout = CgroupLayout(
        cpu=ControllerMount(1, str(tmp_path / "cpu"), str(tmp_path / "cpu")),
        memory=ControllerMount(1, str(tmp_path / "mem"), str(tmp_path / "mem")),
    )
    device = plan_testbed(profile, 1, layout=layout, name="x1").devices[0]
    for d in device.cgroups:
        os.makedirs(d)
    argv = launch_argv(device, ["python", "-c", "pass"])
    assert argv[4:8] == ["ip", "netns", "exec", "p2pt-x1-dev0"]
    # the share goes in the environment: inside the namespace the cgroup files are out of sight
    assert argv[8:] == ["env", "P2PTRAIN_EMULATED_CPUS=0.5", "python", "-c", "pass"]
    # Swap `ip netns exec NS` for a command that prints its own pid: exec must keep it.
    proc = subprocess.run([*argv[:4], "sh", "-c", "echo $$; exit 5"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 5
    pid = proc.stdout.strip()
    for d in device.cgroups:
        assert (tmp_path / d / "cgroup.procs").read_text().strip() == pid


def test_launcher_needs_a_command() -> None:
    with pytest.raises(ConfigError, match="no command given"):
        launch_argv(_plan(1).devices[0], [])


# -- the CLI without root ------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="p2ptrain testbed")
    _cmd_testbed.add_arguments(parser)
    return _cmd_testbed.main(parser.parse_args(list(argv)))


def test_cli_dry_run_and_profiles_need_no_root(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _cli("up", "--devices", "2", "--profile", "wifi", "--name", "x1", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "ip netns add p2pt-x1-dev1" in out and "tbf rate 100000kbit" in out
    assert _cli("profiles") == 0
    assert "hetero4" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["up", "--devices", "2"], ["run", "dev0", "--", "true"], ["status"], ["down"]])
def test_cli_without_root_fails_fast(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _cli(*argv) == 1
    assert ROOT_MESSAGE in capsys.readouterr().err


def test_library_without_root_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(P2PTrainError, match="needs root"):
        Testbed.up("wifi", 2, name="x1")
    with pytest.raises(P2PTrainError, match="needs root"):
        Testbed.teardown("x1")


def test_cli_bad_profile_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("up", "--devices", "2", "--profile", "nosuch", "--dry-run") == 1
    assert "no testbed profile named 'nosuch'" in capsys.readouterr().err
