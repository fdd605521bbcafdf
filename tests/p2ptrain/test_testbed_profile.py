"""Testbed profiles: the shipped ones load, and every bad field is named with its fix. No root."""

from __future__ import annotations

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.testbed._profile import DeviceSpec, load_profile, parse_profile, profile_names


def test_shipped_profiles_load() -> None:
    names = profile_names()
    assert {"hetero", "hetero4", "hetero4-half", "uniform", "wifi"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.devices and profile.description


def test_hetero_cycles_nano_nx_laptop() -> None:
    specs = load_profile("hetero").for_devices(4)
    assert [s.kind for s in specs] == ["jetson-nano", "jetson-nx", "laptop", "jetson-nano"]
    assert [s.cpus for s in specs] == [0.25, 0.5, 1.0, 0.25]
    assert specs[0].up_mbit == specs[0].down_mbit == 100.0
    assert specs[2].up_mbit == 1000.0


def test_hetero4_and_wifi_as_specified() -> None:
    assert [s.cpus for s in load_profile("hetero4").for_devices(4)] == [1.0, 0.5, 0.25, 0.25]
    assert [s.cpus for s in load_profile("hetero4-half").for_devices(4)] == [0.5, 0.25, 0.125, 0.125]
    wifi = load_profile("wifi").for_devices(3)
    assert all(s.up_mbit == s.down_mbit == 100.0 and s.cpus is None for s in wifi)
    uniform = load_profile("uniform").for_devices(3)
    assert len(set(uniform)) == 1


def test_rate_applies_both_ways_and_overrides_win() -> None:
    p = parse_profile("[[device]]\nrate_mbit = 100\ndown_mbit = 20\n[[device]]\n")
    assert p.devices[0] == DeviceSpec(up_mbit=100.0, down_mbit=20.0)
    assert p.devices[1] == DeviceSpec()  # nothing limited


def test_profile_from_path(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\n[[device]]\nkind = "pi"\ncpus = 0.3\nmemory_mib = 512\n')
    p = load_profile(str(path))
    assert p.name == str(path) and p.devices[0].memory_mib == 512 and p.devices[0].cpus == 0.3


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[[device]]\ncpu = 0.5\n", ["device[0]", "'cpu'", "did you mean 'cpus'"]),
        ("[[device]]\ncpus = -0.5\n", ["device[0].cpus", "-0.5", "cpus = 0.5"]),
        ("[[device]]\ncpus = true\n", ["device[0].cpus", "True", "give a number"]),
        ("[[device]]\ncpus = \"half\"\n", ["device[0].cpus", "'half'"]),
        ("[[device]]\n[[device]]\nmemory_mib = 1.5\n", ["device[1].memory_mib", "whole number"]),
        ("[[device]]\nmemory_mib = 4\n", ["device[0].memory_mib", "[16,"]),
        ("[[device]]\nrate_mbit = 0\n", ["device[0].rate_mbit", "[0.1,"]),
        ("[[device]]\nup_mbit = 1e9\n", ["device[0].up_mbit"]),
        ("[[device]]\nkind = 3\n", ["device[0].kind", "label"]),
        ("description = \"no devices\"\n", ["no devices", "[[device]]"]),
        ("devices = []\n", ["unknown key 'devices'", "did you mean 'device'"]),
        ("[[device]\n", ["not valid TOML"]),
        ("device = 3\n", ["no devices"]),
        ("description = 5\n[[device]]\n", ["description"]),
    ],
)
def test_bad_profiles_name_the_field(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_profile(text, name="bad")
    for needle in needles:
        assert needle in str(info.value)


def test_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="shipped profiles: .*hetero"):
        load_profile("nosuchprofile")


def test_missing_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(str(tmp_path / "absent.toml"))
