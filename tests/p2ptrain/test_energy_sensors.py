"""Energy sensors on fake sysfs trees: INA3221, RAPL (with wraparound), batteries, and garbage.

Every tree is built under ``tmp_path`` and handed to the meter as its filesystem root; a
fake clock makes the integrals exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2ptrain.energy import EnergyMeter, EnergyReading, Ina3221Sensor, RaplSensor, find_sensor


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def put(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def meter(root: Path, clock: FakeClock) -> EnergyMeter:
    m = EnergyMeter.open("laptop", root=root, clock=clock)
    m.start()
    return m


def read_after(m: EnergyMeter, clock: FakeClock, seconds: float) -> EnergyReading:
    clock.t += seconds
    return m.read(busy_cpu_s=0.0, bytes_=0)


# --- Jetson INA3221 -------------------------------------------------------------------


def hwmon_ina3221(root: Path, *, rail: str = "VDD_IN", mv: str = "5000", ma: str = "1200") -> Path:
    put(root, "sys/class/hwmon/hwmon0/name", "cpu_thermal")  # another hwmon device, ignored
    hw = root / "sys/class/hwmon/hwmon1"
    put(root, "sys/class/hwmon/hwmon1/name", "ina3221")
    put(root, "sys/class/hwmon/hwmon1/in1_label", rail)
    put(root, "sys/class/hwmon/hwmon1/in1_input", mv)
    put(root, "sys/class/hwmon/hwmon1/curr1_input", ma)
    put(root, "sys/class/hwmon/hwmon1/in2_label", "VDD_CPU_GPU_CV")
    put(root, "sys/class/hwmon/hwmon1/in2_input", "5000")
    put(root, "sys/class/hwmon/hwmon1/curr2_input", "9999")
    return hw


def test_ina3221_hwmon_board_rail_is_integrated(tmp_path: Path) -> None:
    hw = hwmon_ina3221(tmp_path)  # 5 V x 1.2 A = 6 W
    clock = FakeClock()
    m = meter(tmp_path, clock)
    assert m.sensor_source is not None and "VDD_IN" in m.sensor_source
    (hw / "curr1_input").write_text("1600\n")  # 8 W
    r = read_after(m, clock, 10.0)
    assert r.kind == "measured" and r.source.startswith("ina3221:") and r.note == ""
    assert r.joules == pytest.approx(70.0)  # trapezoid: (6 + 8) / 2 x 10 s
    assert r.watts_avg == pytest.approx(7.0) and r.seconds == pytest.approx(10.0)
    assert r.parts == {"sensor": pytest.approx(70.0)}
    assert r.model_joules == pytest.approx(60.0)  # laptop idle 6 W x 10 s, beside the measurement
    m.sample()  # more samples refine the integral
    clock.t += 5.0
    r = m.read(busy_cpu_s=0.0)
    assert r.joules == pytest.approx(110.0)


def test_ina3221_legacy_iio_driver(tmp_path: Path) -> None:
    dev = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    put(tmp_path, f"{dev}/rail_name_0", "POM_5V_IN")
    put(tmp_path, f"{dev}/in_power0_input", "3000")  # mW
    put(tmp_path, f"{dev}/rail_name_1", "POM_5V_GPU")
    put(tmp_path, f"{dev}/in_power1_input", "800")
    sensor, why = find_sensor(tmp_path)
    assert isinstance(sensor, Ina3221Sensor) and why == ""
    assert sensor.read() == pytest.approx(3.0) and "POM_5V_IN" in sensor.source
    clock = FakeClock()
    assert read_after(meter(tmp_path, clock), clock, 4.0).joules == pytest.approx(12.0)


def test_ina3221_without_a_board_rail_is_not_used(tmp_path: Path) -> None:
    hwmon_ina3221(tmp_path, rail="VDD_SOC")  # partial rails must not pass for the board
    assert Ina3221Sensor.find(tmp_path) is None
    clock = FakeClock()
    assert read_after(meter(tmp_path, clock), clock, 1.0).kind == "estimated"


# --- Intel RAPL -------------------------------------------------------------------------


def rapl(root: Path, name: str, domain: str, uj: int, span: int = 10_000_000) -> Path:
    put(root, f"sys/class/powercap/{name}/name", domain)
    put(root, f"sys/class/powercap/{name}/max_energy_range_uj", str(span))
    return put(root, f"sys/class/powercap/{name}/energy_uj", str(uj))


def test_rapl_packages_are_summed_and_subdomains_ignored(tmp_path: Path) -> None:
    p0 = rapl(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    p1 = rapl(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = rapl(tmp_path, "intel-rapl:0:0", "core", 0)
    clock = FakeClock()
    m = meter(tmp_path, clock)
    p0.write_text("3000000\n")  # +2 J
    p1.write_text("5500000\n")  # +0.5 J
    core.write_text("9000000\n")  # inside package-0: counting it would count twice
    r = read_after(m, clock, 1.0)
    assert r.kind == "measured" and r.source.startswith("rapl:")
    assert r.joules == pytest.approx(2.5)


def test_rapl_wraparound(tmp_path: Path) -> None:
    counter = rapl(tmp_path, "intel-rapl:0", "package-0", 9_500_000, span=10_000_000)
    clock = FakeClock()
    m = meter(tmp_path, clock)
    counter.write_text("500000\n")  # wrapped: 0.5 J to the top, then 0.5 J more
    clock.t += 1.0
    m.sample()
    counter.write_text("2500000\n")  # +2 J after the wrap
    r = read_after(m, clock, 1.0)
    assert r.kind == "measured" and r.joules == pytest.approx(3.0)


def test_rapl_prefers_the_platform_domain(tmp_path: Path) -> None:
    rapl(tmp_path, "intel-rapl:0", "package-0", 0)
    rapl(tmp_path, "intel-rapl:1", "psys", 0)
    sensor = RaplSensor.find(tmp_path)
    assert sensor is not None and "psys" in sensor.source and "package-0" not in sensor.source


def test_rapl_counter_beyond_its_range_falls_back(tmp_path: Path) -> None:
    counter = rapl(tmp_path, "intel-rapl:0", "package-0", 20_000_000, span=10_000_000)
    clock = FakeClock()
    m = meter(tmp_path, clock)
    counter.write_text("100\n")  # "wrapped" from above its own range: garbage
    r = read_after(m, clock, 2.0)
    assert r.kind == "estimated" and "max_energy_range_uj" in r.note
    assert r.joules == pytest.approx(12.0)  # the whole window from the model: laptop idle 6 W x 2 s


def test_unreadable_rapl_says_why(tmp_path: Path) -> None:
    energy = rapl(tmp_path, "intel-rapl:0", "package-0", 0)
    energy.write_text("not a number\n")  # stands in for a root-only file (tests may run as root)
    sensor, why = find_sensor(tmp_path)
    assert sensor is None and "energy_uj" in why and "not a number" in why


# --- batteries --------------------------------------------------------------------------


def battery(root: Path, status: str = "Discharging", **files: str) -> Path:
    put(root, "sys/class/power_supply/AC/type", "Mains")
    put(root, "sys/class/power_supply/BAT0/type", "Battery")
    put(root, "sys/class/power_supply/BAT0/status", status)
    for name, text in files.items():
        put(root, f"sys/class/power_supply/BAT0/{name}", text)
    return root / "sys/class/power_supply/BAT0"


def test_battery_power_now(tmp_path: Path) -> None:
    battery(tmp_path, power_now="12000000", energy_now="50000000")  # 12 W; power_now is preferred
    clock = FakeClock()
    r = read_after(meter(tmp_path, clock), clock, 5.0)
    assert r.kind == "measured" and "power_now" in r.source and r.joules == pytest.approx(60.0)


def test_battery_current_times_voltage(tmp_path: Path) -> None:
    battery(tmp_path, current_now="1000000", voltage_now="11000000")  # 1 A x 11 V
    clock = FakeClock()
    r = read_after(meter(tmp_path, clock), clock, 2.0)
    assert "current_voltage" in r.source and r.joules == pytest.approx(22.0)


def test_battery_energy_now_counts_what_the_battery_lost(tmp_path: Path) -> None:
    bat = battery(tmp_path, energy_now="50000000")  # uWh
    clock = FakeClock()
    m = meter(tmp_path, clock)
    (bat / "energy_now").write_text("49990000\n")  # 10 000 uWh = 36 J drained
    r = read_after(m, clock, 60.0)
    assert r.kind == "measured" and "energy_now" in r.source and r.joules == pytest.approx(36.0)


def test_a_charging_battery_is_not_a_meter(tmp_path: Path) -> None:
    bat = battery(tmp_path, status="Charging", power_now="20000000")
    assert find_sensor(tmp_path)[0] is None
    (bat / "status").write_text("Discharging\n")
    clock = FakeClock()
    m = meter(tmp_path, clock)
    (bat / "status").write_text("Charging\n")  # plugged in mid-run: its figure is no longer the system's
    r = read_after(m, clock, 1.0)
    assert r.kind == "estimated" and "Charging" in r.note


# --- sensors that break -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "said"),
    [
        ("garbage", "not a number"),
        ("huge", "outside"),
        ("negative", "not a finite number"),
        ("gone", "cannot read"),
    ],
)
def test_a_broken_sensor_falls_back_to_the_model(tmp_path: Path, breakage: str, said: str) -> None:
    hw = hwmon_ina3221(tmp_path)
    clock = FakeClock()
    m = meter(tmp_path, clock)
    f = hw / "curr1_input"
    if breakage == "gone":
        f.unlink()
    else:
        f.write_text({"garbage": "abc", "huge": "999999999", "negative": "-5"}[breakage] + "\n")
    r = read_after(m, clock, 3.0)
    assert r.kind == "estimated" and r.source.startswith("model:") and said in r.note and "ina3221" in r.note
    assert r.joules == pytest.approx(18.0)  # laptop idle 6 W x 3 s; nothing raised
    f.write_text("1200\n")  # the sensor comes back: a dropped sensor stays dropped within the meter
    assert read_after(m, clock, 1.0).kind == "estimated"
    assert m.sensor_source is None


def test_an_empty_tree_is_estimated_and_says_why(tmp_path: Path) -> None:
    clock = FakeClock()
    r = read_after(meter(tmp_path, clock), clock, 1.0)
    assert r.kind == "estimated" and "no INA3221 board rail" in r.note
