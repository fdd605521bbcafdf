"""The emulated testbed for real: namespaces, bridge, tbf, cgroups (root only).

Every test skips with a reason where root, ``ip netns`` or tbf is missing. All traffic stays
inside the testbed's own namespaces; every sending loop is bounded in count and time.
Testbed names carry the pid, so suites running side by side never share one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2ptrain._errors import P2PTrainError
from p2ptrain.cli import _testbed as _cmd_testbed
from p2ptrain.testbed._net import Executor, list_netns
from p2ptrain.testbed._plan import Step, WriteFile
from p2ptrain.testbed._testbed import NETEM_MISSING, Testbed


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the testbed creates network namespaces and cgroups"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode != 0:
        return "`ip netns` does not work on this host"
    # The kernel must have the tbf qdisc; probe it on lo of a throwaway namespace.
    probe = f"p2pt-probe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode != 0:
        return "cannot create a network namespace on this host"
    try:
        tbf = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "16k", "latency", "50ms"],
            capture_output=True, text=True, timeout=10,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    if tbf.returncode != 0:
        return f"this kernel has no tbf qdisc: {tbf.stderr.strip()}"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

_PY = sys.executable
# dev0: CPU/memory capped; dev1: 100 Mbit/s up only; dev2: 100 Mbit/s down only; dev3: free.
# One direction per device, so each transfer below checks one of the two tbf points.
PROFILE = """\
[[device]]
kind = "capped"
cpus = 0.5
memory_mib = 64
[[device]]
kind = "uplink"
up_mbit = 100
[[device]]
kind = "downlink"
down_mbit = 100
[[device]]
kind = "free"
"""
RATE_MBIT = 100.0


def _name(tag: str) -> str:
    return f"{tag}{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tb") / "test.toml"
    path.write_text(PROFILE)
    return path


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def testbed(profile_path: Path, state_dir: Path) -> Iterator[Testbed]:
    with Testbed.up(str(profile_path), 4, name=_name("t"), state_dir=state_dir) as tb:
        yield tb


def _leftovers(name: str, groups: list[str]) -> list[str]:
    left = [ns for ns in list_netns() if ns.startswith(f"p2pt-{name}-")]
    return left + [g for g in groups if os.path.exists(g)]


def _host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="p2ptrain testbed")
    _cmd_testbed.add_arguments(parser)
    return _cmd_testbed.main(parser.parse_args(list(argv)))


# -- lifecycle -----------------------------------------------------------------------------


def test_up_down_leaves_nothing(profile_path: Path, state_dir: Path) -> None:
    name = _name("u")
    links = _host_links()
    tb = Testbed.up(str(profile_path), 2, name=name, state_dir=state_dir)
    groups = [g for g, _ in tb.plan.cgroup_groups]
    assert set(tb.plan.namespaces) <= set(list_netns())
    assert all(os.path.isdir(cg) for d in tb.plan.devices for cg in d.cgroups)
    assert _host_links() == links  # nothing appeared in the host's namespace
    quota = Path(tb.plan.devices[0].cpu_cgroup or "", "cpu.cfs_quota_us")
    if quota.exists():
        assert quota.read_text().strip() == "5000"
    report = tb.down()
    assert report.clean and len(report.namespaces) == 3
    assert _leftovers(name, groups) == []
    assert not (state_dir / f"testbed-{name}.json").exists()
    assert _host_links() == links
    again = Testbed.teardown(name, state_dir=state_dir)  # idempotent
    assert again.clean and not again.namespaces and not again.cgroups


def test_down_stops_processes_left_inside(profile_path: Path, state_dir: Path) -> None:
    name = _name("k")
    tb = Testbed.up(str(profile_path), 1, name=name, state_dir=state_dir)
    groups = [g for g, _ in tb.plan.cgroup_groups]
    # A peer a bench forgot: it would keep the namespace (and its veth) alive after `ip netns del`.
    straggler = tb.devices[0].popen([_PY, "-c", "import time; print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert straggler.stdout is not None and straggler.stdout.readline() == b"up\n"
        report = tb.down()
        assert straggler.wait(timeout=10) == -15  # SIGTERM was enough
    finally:
        if straggler.poll() is None:
            straggler.kill()
            straggler.wait()
    assert straggler.pid in report.killed and report.clean
    assert _leftovers(name, groups) == []


class _FailAt(Executor):
    """Raises at step ``at``, as a kernel refusing a command would."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, 0

    def apply(self, step: Step) -> None:
        if self.done == self.at:
            raise P2PTrainError(f"injected failure at step {self.at}")
        self.done += 1
        super().apply(step)


def _first_cgroup_write(profile_path: Path, name: str) -> int:
    steps = Testbed.plan_for(str(profile_path), 2, name=name).steps()
    return next(i for i, s in enumerate(steps) if isinstance(s, WriteFile)) + 1


def test_failed_up_removes_what_it_made(profile_path: Path, state_dir: Path) -> None:
    name = _name("f")
    at = _first_cgroup_write(profile_path, name)
    with pytest.raises(P2PTrainError, match="injected failure"):
        Testbed.up(str(profile_path), 2, name=name, state_dir=state_dir, executor=_FailAt(at))
    plan = Testbed.plan_for(str(profile_path), 2, name=name)
    assert _leftovers(name, [g for g, _ in plan.cgroup_groups]) == []


_CRASH = """\
import os, sys
from p2ptrain.testbed._testbed import Testbed
from p2ptrain.testbed._net import Executor
class Crash(Executor):
    done = 0
    def apply(self, step):
        if self.done == int(sys.argv[4]):
            os._exit(3)  # no finally, no rollback: a real crash
        self.done += 1
        super().apply(step)
Testbed.up(sys.argv[1], 2, name=sys.argv[2], state_dir=sys.argv[3], executor=Crash())
"""


@pytest.mark.parametrize("keep_state", [True, False], ids=["state-file", "sweep-by-prefix"])
def test_down_after_crash_half_way_through_up(profile_path: Path, state_dir: Path, keep_state: bool) -> None:
    name = _name("c" if keep_state else "s")
    at = _first_cgroup_write(profile_path, name) + 2  # namespaces, links and some cgroups exist
    proc = subprocess.run([_PY, "-c", _CRASH, str(profile_path), name, str(state_dir), str(at)], timeout=60)
    assert proc.returncode == 3
    plan = Testbed.plan_for(str(profile_path), 2, name=name)
    groups = [g for g, _ in plan.cgroup_groups]
    assert len(_leftovers(name, groups)) >= 3  # the crash really left things behind
    state = state_dir / f"testbed-{name}.json"
    assert json.loads(state.read_text())["complete"] is False
    if not keep_state:
        state.unlink()
    report = Testbed.teardown(name, state_dir=state_dir)
    assert report.clean
    assert _leftovers(name, groups) == []
    assert not state.exists()


def test_second_up_of_the_same_name_is_refused(testbed: Testbed) -> None:
    with pytest.raises(P2PTrainError, match="already up"):
        Testbed.up("wifi", 1, name=testbed.name, state_dir=testbed.state_dir)


# -- what runs inside a device ---------------------------------------------------------------


def test_run_joins_namespace_and_cgroups_and_propagates_exit_code(testbed: Testbed, capfd: pytest.CaptureFixture[str]) -> None:
    dev = testbed.device("dev1")
    code = textwrap.dedent(
        f"""
        import socket, sys
        s = socket.socket(); s.bind(({dev.address!r}, 0)); s.close()   # our address exists here
        lo = socket.socket(); lo.bind(("127.0.0.1", 0)); lo.listen(1)   # loopback is up
        c = socket.create_connection(lo.getsockname(), timeout=2); c.close()
        print(open("/proc/self/cgroup").read())
        sys.exit(7)
        """
    )
    # Options may also follow DEVICE when `--` ends them.
    assert _cli("run", "dev1", "--name", testbed.name, "--state-dir", str(testbed.state_dir), "--", _PY, "-c", code) == 7
    out = capfd.readouterr().out
    assert f"p2pt-{testbed.name}/dev1" in out
    # ...and the host cannot bind the device's address: it exists only in the namespace.
    with pytest.raises(OSError):
        import socket

        socket.socket().bind((dev.address, 0))


_CLEAN_EXIT = """\
import signal, sys, time
def stop(*_):
    time.sleep(1.0)  # a trainer finishing its step and writing its model
    print("cleaned up", flush=True)
    sys.exit(3)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(30)
"""


def test_ctrl_c_reaches_the_command_and_run_waits_for_it(testbed: Testbed) -> None:
    # A terminal's Ctrl-C goes to the whole foreground process group: run and its command.
    # subprocess.run used to kill the command 0.25 s after run's own KeyboardInterrupt.
    cmd = [_PY, "-m", "p2ptrain", "testbed", "run", "--name", testbed.name, "--state-dir", str(testbed.state_dir),
           "dev1", "--", _PY, "-c", _CLEAN_EXIT]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "cleaned up" in out
    assert proc.returncode == 3


_TERM_EXIT = """\
import pathlib, signal, sys, time
def stop(*_):
    pathlib.Path(sys.argv[1]).write_text("got SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_run_takes_its_command_with_it(testbed: Testbed, tmp_path: Path) -> None:
    # `run` killed with SIGKILL left its command running, reparented to init, holding
    # its place in the ring until `testbed down`.
    marker = tmp_path / "marker"
    cmd = [_PY, "-m", "p2ptrain", "testbed", "run", "--name", testbed.name, "--state-dir", str(testbed.state_dir),
           "dev1", "--", _PY, "-c", _TERM_EXIT, str(marker)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "got SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_BUSY = """\
import json, os, sys, time
t0, c0 = time.monotonic(), os.times()
kids = []
for _ in range(2):  # two busy processes: the cap, not one thread's speed, must be the limit
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < end:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
c1, wall = os.times(), time.monotonic() - t0
cpu = (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
print(json.dumps({"cpu_s": cpu, "wall_s": wall}))
"""


def test_cpu_cap_holds_on_a_busy_loop(testbed: Testbed, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    assert _cli("run", "--name", testbed.name, "--state-dir", str(testbed.state_dir), "dev0", "--", _PY, "-c", _BUSY, "1.5") == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    share = result["cpu_s"] / result["wall_s"]
    print(f"cpu share {share:.3f} of a configured 0.5 core ({result})")
    assert abs(share - 0.5) / 0.5 <= 0.20


def test_memory_limit_kills_an_oversized_allocation(testbed: Testbed) -> None:
    dev = testbed.device("dev0")
    if not dev.plan.memory_limited:
        pytest.skip("this host has no cgroup memory controller")
    proc = dev.run([_PY, "-c", "b = bytearray(256 << 20); print('allocated')"], capture_output=True, timeout=30)
    assert proc.returncode in (-9, 137) and b"allocated" not in proc.stdout  # 256 MiB > 64 MiB limit
    ok = dev.run([_PY, "-c", "b = bytearray(8 << 20)"], timeout=30)
    assert ok.returncode == 0


# -- the network ---------------------------------------------------------------------------------

_RECV = """\
import json, socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5201)); srv.listen(1); srv.settimeout(10)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(10)
buf, n, t0, end = bytearray(1 << 20), 0, None, time.monotonic() + 10
while time.monotonic() < end:
    k = conn.recv_into(buf)
    if not k:
        break
    t0 = t0 or time.monotonic()
    n += k
print(json.dumps({"bytes": n, "seconds": time.monotonic() - t0}), flush=True)
"""
_SEND = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5201), timeout=10)
chunk, end = b"x" * 65536, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.sendall(chunk)
s.close()
"""


def _transfer_mbit(testbed: Testbed, src: str, dst: str, seconds: float = 1.2) -> float:
    receiver = testbed.device(dst)
    recv = receiver.popen([_PY, "-c", _RECV, receiver.address], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        send = testbed.device(src).run([_PY, "-c", _SEND, receiver.address, str(seconds)], timeout=30)
        assert send.returncode == 0
        out, _ = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    result = json.loads(out)
    return result["bytes"] * 8 / result["seconds"] / 1e6


@pytest.mark.parametrize(
    ("src", "dst", "where"),
    [("dev1", "dev3", "device-side egress (upload)"), ("dev3", "dev2", "bridge-side egress (download)")],
)
def test_rate_limit_measures_within_15_percent(testbed: Testbed, src: str, dst: str, where: str) -> None:
    mbit = _transfer_mbit(testbed, src, dst)
    print(f"{where}: {mbit:.1f} Mbit/s of a configured {RATE_MBIT:g}")
    # TCP goodput is ~95% of the link rate (1448 payload bytes per 1514-byte frame).
    assert abs(mbit - RATE_MBIT) / RATE_MBIT <= 0.15


_MC_RECV = """\
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1]))
s.settimeout(5)
print("ready", flush=True)
data, addr = s.recvfrom(2048)
print(json.dumps({"data": data.decode(), "from": addr[0]}), flush=True)
"""
_MC_SEND = """\
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
for i in range(5):  # bounded: five datagrams, 50 ms apart
    s.sendto(b"p2pt-hello", ("224.0.0.251", 5353))
    time.sleep(0.05)
"""


def test_multicast_crosses_the_bridge(testbed: Testbed) -> None:
    a, b = testbed.device("dev1"), testbed.device("dev2")
    recv = b.popen([_PY, "-c", _MC_RECV, b.address], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        assert a.run([_PY, "-c", _MC_SEND], timeout=20).returncode == 0
        out, _ = recv.communicate(timeout=20)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert json.loads(out) == {"data": "p2pt-hello", "from": a.address}


_MDNS = """\
import asyncio, json, sys
from p2ptrain.discovery import MdnsDiscovery, PeerRecord, Resources

async def main(address, node):
    record = PeerRecord(node_id=node, cluster=sys.argv[3], port=7000, incarnation=1, key_fingerprint="",
                        resources=Resources(cores=1, memory_bytes=1 << 30, accelerator="cpu", gflops=0.0))
    async with MdnsDiscovery(record, cluster=sys.argv[3], interfaces=[address]) as disc:
        peers = await disc.wait_for_peers(1, timeout=10)
        print(json.dumps({k: list(v.addresses) for k, v in peers.items()}), flush=True)
        # Stay announced until the test has heard from both nodes (stdin closes), at most 15 s.
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), 15)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_mdns_discovery_across_the_bridge(testbed: Testbed) -> None:
    pytest.importorskip("p2ptrain.discovery", reason="p2ptrain.discovery is not built yet")
    cluster = f"tb{os.getpid()}"
    devs = [testbed.device("dev2"), testbed.device("dev3")]
    procs = [
        d.popen([_PY, "-c", _MDNS, d.address, f"node{d.index}", cluster], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for d in devs
    ]
    try:
        seen = [json.loads(p.stdout.readline() or "{}") for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert seen == [{"node3": [devs[1].address]}, {"node2": [devs[0].address]}]


# -- status --------------------------------------------------------------------------------------------


def test_status_tells_the_truth(testbed: Testbed, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("status", "--name", testbed.name, "--state-dir", str(testbed.state_dir), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["up"] is True and status["latency_emulated"] is False
    netem = subprocess.run(
        ["tc", "-n", testbed.plan.bridge_netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
    )
    if netem.returncode == 0:
        subprocess.run(["tc", "-n", testbed.plan.bridge_netns, "qdisc", "del", "dev", "lo", "root"], check=False)
    assert status["netem"] is (netem.returncode == 0)
    if not status["netem"]:
        assert status["note"] == NETEM_MISSING
    dev0, dev1 = status["devices"][:2]
    assert dev0["cpus"] == 0.5 and dev0["alive"] and dev1["up_mbit"] == 100.0 and dev1["down_mbit"] is None
    assert _cli("status", "--name", testbed.name, "--state-dir", str(testbed.state_dir)) == 0
    text = capsys.readouterr().out
    assert "dev3" in text and "netem" in text
