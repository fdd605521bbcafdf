"""The energy model's arithmetic, the shipped profiles, profile guessing and the CPU clocks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.energy import (
    PROFILES,
    EnergyMeter,
    PowerProfile,
    SensorError,
    choose_profile,
    cpu_clock,
    get_profile,
    model_parts,
    profile_names,
)

TOY = PowerProfile(name="toy", idle_w=2.0, busy_w_per_core=1.5, cores=2, link_j_per_byte=1e-6, link_j_per_frame=1e-4, citation="a test")


def put(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_model_arithmetic() -> None:
    parts = model_parts(TOY, wall_s=10.0, busy_cpu_s=4.0, frames=100, bytes_=1_000_000)
    assert parts == pytest.approx({"idle": 20.0, "cpu": 6.0, "link": 100 * 1e-4 + 1.0})
    # frames unknown: one per 1448-byte TCP segment
    derived = model_parts(TOY, wall_s=0.0, busy_cpu_s=0.0, bytes_=1_000_000)
    assert derived["link"] == pytest.approx(math.ceil(1_000_000 / 1448) * 1e-4 + 1.0)
    assert model_parts(TOY, wall_s=-1.0, busy_cpu_s=-1.0, frames=-3, bytes_=-5) == {"idle": 0.0, "cpu": 0.0, "link": 0.0}


def test_meter_on_the_model() -> None:
    t = [0.0]
    cpu = [1.0]
    m = EnergyMeter(
        choice=choose_profile(TOY), sensor=None, why_no_sensor="a test", cpu=lambda: cpu[0], cpu_source="fake", clock=lambda: t[0]
    )
    with pytest.raises(RuntimeError, match="start"):
        m.read()
    m.start()
    t[0], cpu[0] = 10.0, 5.0  # 4 CPU seconds in 10 s
    r = m.read(frames=0, bytes_=0)
    assert r.kind == "estimated" and r.source == "model:profile:toy; cpu=fake" and r.note == "estimated: a test"
    assert r.joules == pytest.approx(26.0) and r.watts_avg == pytest.approx(2.6) and r.seconds == 10.0
    assert r.parts == pytest.approx({"idle": 20.0, "cpu": 6.0, "link": 0.0}) and r.model_joules == r.joules
    explicit = m.read(busy_cpu_s=2.0, frames=10, bytes_=0)  # the caller's own CPU figure wins
    assert explicit.parts["cpu"] == pytest.approx(3.0) and explicit.parts["link"] == pytest.approx(1e-3)
    d = r.to_dict()
    assert set(d) == {"joules", "watts_avg", "seconds", "kind", "source", "parts", "model_joules", "note"}
    assert isinstance(d["parts"], dict)


def test_meter_can_be_told_to_ignore_sensors(tmp_path: Path) -> None:
    put(tmp_path, "sys/class/powercap/intel-rapl:0/name", "package-0")
    put(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "5")
    assert EnergyMeter.open(TOY, root=tmp_path).sensor_source is not None
    m = EnergyMeter.open(TOY, root=tmp_path, use_sensors=False)
    m.start()
    r = m.read()
    assert m.sensor_source is None and r.kind == "estimated" and "use_sensors=False" in r.note


def test_on_this_machine_the_meter_answers() -> None:
    m = EnergyMeter.open()
    m.start()
    r = m.read(bytes_=10_000)
    assert r.kind in ("measured", "estimated") and r.joules >= 0 and r.source
    if r.kind == "estimated":
        assert r.note.startswith("estimated: ") and "(guessed: " in r.source


def test_shipped_profiles_match_their_citations() -> None:
    assert {"jetson-nano-5w", "jetson-nano-10w", "orin-nano", "raspberry-pi-5", "laptop"} <= set(profile_names())
    loaded = {"jetson-nano-5w": 5.0, "jetson-nano-10w": 10.0, "orin-nano": 11.0, "raspberry-pi-5": 8.0, "laptop": 30.0}
    idle = {"jetson-nano-5w": 1.25, "jetson-nano-10w": 1.25, "orin-nano": 7.0, "raspberry-pi-5": 2.5, "laptop": 6.0}
    for name, p in PROFILES.items():
        assert p.loaded_w == pytest.approx(loaded[name]) and p.idle_w == idle[name]
        assert "Serrano" in p.citation and p.link_j_per_byte == pytest.approx(160e-9) and p.link_j_per_frame > 0
    assert "5 W" in PROFILES["jetson-nano-5w"].citation and "10 W" in PROFILES["jetson-nano-10w"].citation


def test_unknown_or_invalid_profiles_are_refused() -> None:
    with pytest.raises(ConfigError, match="did you mean 'orin-nano'"):
        get_profile("orin-nan")
    with pytest.raises(ConfigError, match="unknown power profile"):
        EnergyMeter.open("toaster")
    with pytest.raises(ConfigError, match="idle_w"):
        PowerProfile(name="x", idle_w=float("nan"), busy_w_per_core=1, cores=1, link_j_per_byte=0, link_j_per_frame=0, citation="")
    with pytest.raises(ConfigError, match="cores"):
        PowerProfile(name="x", idle_w=1, busy_w_per_core=1, cores=0, link_j_per_byte=0, link_j_per_frame=0, citation="")


@pytest.mark.parametrize(
    ("model", "nvpmodel", "expected", "nearest"),
    [
        ("NVIDIA Jetson Nano Developer Kit\x00", None, "jetson-nano-10w", False),
        ("NVIDIA Jetson Nano Developer Kit\x00", "pmode:0001\n", "jetson-nano-5w", False),
        ("NVIDIA Jetson Nano Developer Kit\x00", "pmode:0000\n", "jetson-nano-10w", False),
        ("NVIDIA Jetson Orin Nano Developer Kit\x00", None, "orin-nano", False),
        ("NVIDIA Jetson AGX Xavier\x00", None, "orin-nano", True),
        ("Raspberry Pi 5 Model B Rev 1.0\x00", None, "raspberry-pi-5", False),
        ("Raspberry Pi 4 Model B Rev 1.4\x00", None, "raspberry-pi-5", True),
        ("Some Other Board\x00", None, "laptop", False),
        (None, None, "laptop", False),
    ],
)
def test_profile_guess_is_labelled(tmp_path: Path, model: str | None, nvpmodel: str | None, expected: str, nearest: bool) -> None:
    if model is not None:
        put(tmp_path, "proc/device-tree/model", model)
    if nvpmodel is not None:
        put(tmp_path, "var/lib/nvpmodel/status", nvpmodel)
    choice = choose_profile(root=tmp_path)
    assert choice.profile.name == expected and choice.guessed
    assert choice.label.startswith(f"profile:{expected} (guessed: ")
    assert ("nearest shipped profile" in choice.reason) == nearest
    named = choose_profile(expected, root=tmp_path)
    assert not named.guessed and named.label == f"profile:{expected}"
    assert choose_profile(TOY).label == "profile:toy"


def test_cpu_clocks(tmp_path: Path) -> None:
    process, source = cpu_clock("process")
    assert source == "os.times" and process() >= 0
    with pytest.raises(SensorError, match="cgroup"):
        cpu_clock("cgroup", root=tmp_path)
    v2 = tmp_path / "v2"
    put(v2, "proc/self/cgroup", "0::/testbed/dev0\n")
    put(v2, "sys/fs/cgroup/testbed/dev0/cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    read, source = cpu_clock("cgroup", root=v2)
    assert read() == pytest.approx(2.5) and source.endswith("testbed/dev0/cpu.stat")
    v1 = tmp_path / "v1"
    put(v1, "proc/self/cgroup", "5:memory:/dev1\n4:cpu,cpuacct:/dev1\n")
    put(v1, "sys/fs/cgroup/cpu,cpuacct/dev1/cpuacct.usage", "3000000000\n")
    read, _ = cpu_clock("cgroup", root=v1)
    assert read() == pytest.approx(3.0)
    bad = tmp_path / "bad"
    put(bad, "proc/self/cgroup", "0::/x\n")
    put(bad, "sys/fs/cgroup/x/cpu.stat", "nr_periods 0\n")
    with pytest.raises(SensorError):
        cpu_clock("cgroup", root=bad)
    # The whole machine (what `p2ptrain energy` estimates by: it counted only its own process, and
    # reported the idle floor while the device worked; a walkthrough): busy = all but idle and iowait.
    sysroot = tmp_path / "sys"
    tick = os.sysconf("SC_CLK_TCK")
    put(sysroot, "proc/stat", f"cpu  {3 * tick} 0 {tick} {50 * tick} {7 * tick} 0 0 0 0 0\ncpu0 1 2 3\n")
    read, source = cpu_clock("system", root=sysroot)
    assert read() == pytest.approx(4.0) and source == "/proc/stat"
    with pytest.raises(SensorError, match="cannot read the machine's CPU time"):
        cpu_clock("system", root=bad)
    # the meter charges the process instead, and says so in its source
    m = EnergyMeter.open(TOY, root=bad, cpu="cgroup")
    m.start()
    assert m.read().source.endswith("cpu=os.times")
    with pytest.raises(ConfigError, match="cpu="):
        EnergyMeter.open(TOY, cpu="gpu")  # type: ignore[arg-type]
