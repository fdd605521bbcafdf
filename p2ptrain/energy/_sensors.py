"""Power and energy sensors the OS exposes in sysfs, read without any vendor tool.

Each sensor is either a counter (``mode == "energy"``: :meth:`Sensor.read` returns joules
that only grow) or a gauge (``mode == "power"``: it returns watts now, and the meter
integrates its samples). Every path hangs off a ``root`` so tests run on fake trees.

Backends, in the order :func:`find_sensor` tries them (the first covers the most of
the device):

- **Jetson INA3221, board input rail** (whole module + carrier input):
  mainline hwmon driver (JetPack 5/6): ``/sys/class/hwmon/hwmon*/`` whose ``name`` is
  ``ina3221``, channel ``N`` labelled in ``inN_label``, bus voltage ``inN_input`` (mV),
  current ``currN_input`` (mA), per the kernel's Documentation/hwmon/ina3221.rst.
  Legacy ``ina3221x`` IIO driver (JetPack 4, Jetson Nano):
  ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/`` with ``rail_name_N`` and
  ``in_power{N}_input`` (mW). That layout is what JetPack 4 ships and tools such as
  jtop read; it was not checked against a public kernel document here (an assumption).
  The board-input rail is the one labelled ``VDD_IN`` or ``POM_5V_IN``; partial rails
  are never summed into a board figure.
- **Battery** (whole system, only while discharging): ``/sys/class/power_supply/*/``
  with ``type`` ``Battery`` and ``status`` ``Discharging``: ``power_now`` (uW), else
  ``current_now`` x ``voltage_now`` (uA x uV), else the fall of ``energy_now`` (uWh).
- **Intel RAPL powercap** (CPU package and DRAM, or the whole platform where a ``psys``
  domain exists; never the radio): ``/sys/class/powercap/intel-rapl:N/energy_uj``
  (uJ counter) wrapping at ``max_energy_range_uj``. Often root-only to read
  (CVE-2020-8694), then it is skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from p2ptrain._errors import P2PTrainError

__all__ = ["BatterySensor", "Ina3221Sensor", "RaplSensor", "Sensor", "SensorError", "find_sensor"]

# Anything above this is garbage for one edge device (a typo'd unit, a broken ADC).
MAX_PLAUSIBLE_W = 2000.0
_BOARD_RAILS = ("VDD_IN", "POM_5V_IN")
_RAPL_TOP = re.compile(r"intel-rapl:[0-9]+")
# A bound on what one sysfs glob may return, so a strange mount cannot cost us.
_MAX_ENTRIES = 64


class SensorError(P2PTrainError, OSError):
    """A sensor or CPU counter vanished or read garbage; the meter falls back to the model."""


class Sensor(Protocol):
    """One backend. ``read`` raises :class:`SensorError`, never anything else."""

    @property
    def source(self) -> str:
        """Which backend and files, e.g. ``"ina3221:/sys/class/hwmon/hwmon1 VDD_IN"``."""
        ...

    @property
    def mode(self) -> Literal["energy", "power"]:
        """``"energy"``: :meth:`read` is a growing joule counter; ``"power"``: watts now."""
        ...

    def read(self) -> float:
        """Joules so far (counter) or watts now (gauge)."""
        ...


def read_number(path: Path, limit: int = 64) -> float:
    """The number in a small sysfs file.

    Raises:
        SensorError: The file is missing, unreadable, or holds no finite number >= 0.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(limit).decode("ascii", "replace").strip()
    except OSError as exc:
        raise SensorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        value = float(int(text)) if re.fullmatch(r"-?[0-9]{1,20}", text) else float(text)
    except ValueError:
        raise SensorError(f"{path} holds {text[:32]!r}, not a number") from None
    if not math.isfinite(value) or value < 0:
        raise SensorError(f"{path} holds {text[:32]!r}, not a finite number >= 0")
    return value


def _read_label(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _plausible_w(watts: float, source: str) -> float:
    if not 0 <= watts <= MAX_PLAUSIBLE_W:
        raise SensorError(f"{source} reads {watts:.3g} W, outside [0, {MAX_PLAUSIBLE_W:g}] W")
    return watts


class Ina3221Sensor:
    """The Jetson board-input rail of an INA3221 (a gauge, W)."""

    mode: Literal["power"] = "power"

    def __init__(self, files: tuple[Path, ...], scale: float, rail: str) -> None:
        """Args: files: one power file (mW), or a voltage (mV) and a current (mA) file;
        scale: factor from their product to W; rail: the channel label."""
        self._files = files
        self._scale = scale
        self.source = f"ina3221:{files[0].parent} {rail}"

    def read(self) -> float:
        product = 1.0
        for f in self._files:
            product *= read_number(f)
        return _plausible_w(product * self._scale, self.source)

    @classmethod
    def find(cls, root: Path) -> Ina3221Sensor | None:
        """The board-input rail under ``root``, hwmon first, or ``None``."""
        for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*"))[:_MAX_ENTRIES]:
            if _read_label(hwmon / "name") != "ina3221":
                continue
            for ch in (1, 2, 3):
                rail = _read_label(hwmon / f"in{ch}_label")
                if rail.upper() in _BOARD_RAILS:
                    return cls((hwmon / f"in{ch}_input", hwmon / f"curr{ch}_input"), 1e-6, rail)  # mV x mA
        for dev in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*"))[:_MAX_ENTRIES]:
            for ch in (0, 1, 2):
                rail = _read_label(dev / f"rail_name_{ch}")
                if rail.upper() in _BOARD_RAILS:
                    return cls((dev / f"in_power{ch}_input",), 1e-3, rail)  # mW
        return None


class BatterySensor:
    """A discharging battery: the whole system's draw (a gauge, W, or a counter, J)."""

    def __init__(self, supply: Path, kind: Literal["power_now", "current_voltage", "energy_now"]) -> None:
        self._supply = supply
        self._kind = kind
        self.mode: Literal["energy", "power"] = "energy" if kind == "energy_now" else "power"
        self.source = f"battery:{supply} {kind}"

    def read(self) -> float:
        status = _read_label(self._supply / "status")
        if status != "Discharging":
            raise SensorError(f"{self._supply} is {status or 'gone'!r}, not Discharging: its draw is not the system's")
        if self._kind == "energy_now":
            # The counter falls as the battery drains; the meter wants one that grows.
            return -read_number(self._supply / "energy_now") * 3.6e-3  # uWh -> J
        if self._kind == "power_now":
            watts = read_number(self._supply / "power_now") * 1e-6
        else:
            watts = read_number(self._supply / "current_now") * read_number(self._supply / "voltage_now") * 1e-12
        return _plausible_w(watts, self.source)

    @classmethod
    def find(cls, root: Path) -> BatterySensor | None:
        """The first discharging battery under ``root`` with a readable figure, or ``None``."""
        for supply in sorted((root / "sys/class/power_supply").glob("*"))[:_MAX_ENTRIES]:
            if _read_label(supply / "type") != "Battery":
                continue
            kinds: tuple[Literal["power_now", "current_voltage", "energy_now"], ...] = (
                "power_now",
                "current_voltage",
                "energy_now",
            )
            for kind in kinds:
                sensor = cls(supply, kind)
                try:
                    sensor.read()
                except SensorError:
                    continue
                return sensor
        return None


class RaplSensor:
    """Intel RAPL powercap counters (a counter, J), wraparound handled."""

    mode: Literal["energy"] = "energy"

    def __init__(self, domains: list[Path]) -> None:
        self._domains = domains
        self._last: list[float | None] = [None] * len(domains)
        self._total_uj = 0.0
        self.source = "rapl:" + ",".join(f"{d} {_read_label(d / 'name')}" for d in domains)

    def read(self) -> float:
        for i, domain in enumerate(self._domains):
            now = read_number(domain / "energy_uj")
            last = self._last[i]
            if last is not None:
                delta = now - last
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    span = read_number(domain / "max_energy_range_uj")
                    if not last <= span or span <= 0:
                        raise SensorError(f"{domain}: energy_uj went {last:.0f} -> {now:.0f} with max_energy_range_uj {span:.0f}")
                    delta = span - last + now
                self._total_uj += delta
            self._last[i] = now
        return self._total_uj * 1e-6

    @classmethod
    def find(cls, root: Path) -> RaplSensor | None:
        """The platform (``psys``) domain if there is one, else every package, or ``None``."""
        tops = [d for d in sorted((root / "sys/class/powercap").glob("intel-rapl:*"))[:_MAX_ENTRIES] if _RAPL_TOP.fullmatch(d.name)]
        psys = [d for d in tops if _read_label(d / "name") == "psys"]
        domains = psys or [d for d in tops if _read_label(d / "name").startswith("package")]
        if not domains:
            return None
        sensor = cls(domains)
        try:
            sensor.read()
        except SensorError:
            return None
        return sensor


def find_sensor(root: str | Path = "/") -> tuple[Sensor | None, str]:
    """The best sensor this device has, and why none when there is none.

    Args:
        root: Where the filesystem is rooted (tests pass a fake tree).

    Returns:
        ``(sensor, "")``, or ``(None, reason)`` naming what was looked for and what failed.
    """
    base = Path(root)
    failed: list[str] = []
    finders: tuple[Callable[[Path], Sensor | None], ...] = (Ina3221Sensor.find, BatterySensor.find, RaplSensor.find)
    for find in finders:
        sensor = find(base)
        if sensor is None:
            continue
        try:
            sensor.read()
        except SensorError as exc:
            failed.append(str(exc))
            continue
        return sensor, ""
    rapl = sorted((base / "sys/class/powercap").glob("intel-rapl:*/energy_uj"))[:1]
    for path in rapl:
        try:
            read_number(path)
        except SensorError as exc:
            failed.append(str(exc))
    why = "no INA3221 board rail, discharging battery or readable RAPL counter"
    return None, why + (f" ({'; '.join(failed)})" if failed else "")
