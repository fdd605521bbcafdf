"""Testbed profiles: what each emulated device gets (CPU share, memory, link rate).

A profile is a small TOML file; the named ones ship in ``p2ptrain/testbed/profiles/``::

    description = "Jetson-class devices on wifi"

    [[device]]
    kind = "jetson-nano"   # a label, shown by `p2ptrain testbed status`
    cpus = 0.25            # share of ONE host core (cgroup CPU quota)
    memory_mib = 4096      # memory limit, where the cgroup memory controller allows it
    rate_mbit = 100        # link rate in Mbit/s, both directions
    # up_mbit / down_mbit override one direction (device -> bridge / bridge -> device)
    power = "jetson-nano-10w"  # power profile its energy is modelled with (p2ptrain.energy)
    battery = 0.6          # on battery at this charge (omit: on mains)

A testbed of N devices takes the ``[[device]]`` entries in turn: device ``i`` gets entry
``i mod len(entries)``. Every field but ``kind`` is optional; a missing one means "not
limited". Profiles are validated eagerly: each error names the bad field and the fix.

A device with ``power`` is metered as the device it stands for: its processes get
``$P2PTRAIN_POWER_PROFILE``, ``$P2PTRAIN_EMULATED_CPUS`` (its ``cpus``) and, with
``battery``, ``$P2PTRAIN_BATTERY`` (see :class:`p2ptrain.energy.Emulation`).
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.energy import get_profile

__all__ = ["DeviceSpec", "Profile", "load_profile", "parse_profile", "profile_names"]

_DEVICE_KEYS = ("kind", "cpus", "memory_mib", "rate_mbit", "up_mbit", "down_mbit", "power", "battery")
_TOP_KEYS = ("description", "device")

# Bounds that keep the kernel objects sane. Below 0.01 core the CFS quota would have to
# stretch its period past one second; below 0.1 Mbit/s a single 64 KiB GSO burst lasts
# seconds; below 16 MiB a Python interpreter cannot start.
_MIN_CPUS = 0.01
_MIN_MBIT, _MAX_MBIT = 0.1, 100_000.0
_MIN_MEMORY_MIB = 16


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """What one emulated device gets; ``None`` means not limited.

    Attributes:
        kind: label shown by ``status`` (e.g. ``"jetson-nano"``).
        cpus: share of one host core, enforced by a cgroup CPU quota.
        memory_mib: memory limit in MiB.
        up_mbit: rate from the device to the bridge, Mbit/s.
        down_mbit: rate from the bridge to the device, Mbit/s.
        power: power profile the device's energy is modelled with (``None``: guessed).
        battery: emulated battery charge in [0, 1] (``None``: on mains).
    """

    kind: str = "device"
    cpus: float | None = None
    memory_mib: int | None = None
    up_mbit: float | None = None
    down_mbit: float | None = None
    power: str | None = None
    battery: float | None = None


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A named list of device specs, cycled over the devices of a testbed."""

    name: str
    description: str
    devices: tuple[DeviceSpec, ...]

    def for_devices(self, n: int) -> list[DeviceSpec]:
        """The specs of an ``n``-device testbed: the entries in turn, cycled."""
        return [self.devices[i % len(self.devices)] for i in range(n)]


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib  # novm: this branch runs on 3.11+ only
    else:  # Python 3.10 (JetPack 6): tomllib arrived in 3.11; pyproject declares tomli there
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading testbed profiles needs Python 3.11+ (tomllib) or the `tomli` package: pip install tomli"
            ) from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
        return data
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from exc


def _unknown_key(where: str, key: str, known: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where} has unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _number(where: str, key: str, value: Any, lo: float, hi: float, example: str) -> float:
    # bool is an int subclass in Python; `cpus = true` is a typo, not 1 core.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} is {value!r}; give a number, e.g. {key} = {example}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} is {value!r}; it must lie in [{lo:g}, {hi:g}], e.g. {key} = {example}")
    return float(value)


def _device(where: str, raw: Any) -> DeviceSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([[device]] with keys {', '.join(_DEVICE_KEYS)})")
    for key in raw:
        if key not in _DEVICE_KEYS:
            raise _unknown_key(where, key, _DEVICE_KEYS)
    kind = raw.get("kind", "device")
    if not isinstance(kind, str) or not kind or len(kind) > 40:
        raise ConfigError(f"{where}.kind is {kind!r}; give a short label, e.g. kind = \"jetson-nano\"")
    cpus = raw.get("cpus")
    if cpus is not None:
        cpus = _number(where, "cpus", cpus, _MIN_CPUS, 1024.0, "0.5")
    memory = raw.get("memory_mib")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int):
            raise ConfigError(f"{where}.memory_mib is {memory!r}; give a whole number of MiB, e.g. memory_mib = 4096")
        _number(where, "memory_mib", memory, _MIN_MEMORY_MIB, 2**30, "4096")
    rate = raw.get("rate_mbit")
    if rate is not None:
        rate = _number(where, "rate_mbit", rate, _MIN_MBIT, _MAX_MBIT, "100")
    up = raw.get("up_mbit")
    up = _number(where, "up_mbit", up, _MIN_MBIT, _MAX_MBIT, "100") if up is not None else rate
    down = raw.get("down_mbit")
    down = _number(where, "down_mbit", down, _MIN_MBIT, _MAX_MBIT, "100") if down is not None else rate
    power = raw.get("power")
    if power is not None:
        if not isinstance(power, str):
            raise ConfigError(f"{where}.power is {power!r}; give a power profile's name, e.g. power = \"orin-nano\"")
        try:
            get_profile(power)
        except ConfigError as exc:
            raise ConfigError(f"{where}.power: {exc}") from None
    battery = raw.get("battery")
    if battery is not None:
        battery = _number(where, "battery", battery, 0.0, 1.0, "0.6")
    return DeviceSpec(kind=kind, cpus=cpus, memory_mib=memory, up_mbit=up, down_mbit=down, power=power, battery=battery)


def parse_profile(text: str, *, name: str = "<profile>") -> Profile:
    """Parse and validate a profile's TOML text.

    Args:
        text: the TOML document.
        name: what error messages call the profile (its name or path).

    Returns:
        The validated profile.

    Raises:
        ConfigError: the text is not TOML, or a field is missing, unknown or out of range;
            the message names the field and the fix.
    """
    data = _toml_loads(text)
    where = f"profile {name!r}"
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown_key(where, key, _TOP_KEYS)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description is {description!r}; give a string")
    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where} has no devices; add at least one [[device]] table, e.g. [[device]] cpus = 0.5")
    devices = tuple(_device(f"{where}: device[{i}]", raw) for i, raw in enumerate(entries))
    return Profile(name=name, description=description, devices=devices)


def _shipped_dir() -> Any:
    return importlib.resources.files("p2ptrain.testbed").joinpath("profiles")


def profile_names() -> list[str]:
    """Names of the profiles shipped with p2ptrain (``hetero``, ``uniform``, ...)."""
    folder = _shipped_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(spec: str) -> Profile:
    """Load a shipped profile by name, or a profile file by path.

    Args:
        spec: a shipped name (``"hetero"``) or a path to a ``.toml`` file.

    Raises:
        ConfigError: no such profile, or it is invalid.
    """
    path = Path(spec)
    if path.suffix == ".toml" or "/" in spec or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read testbed profile {spec!r}: {exc.strerror or exc}") from exc
        return parse_profile(text, name=spec)
    resource = _shipped_dir().joinpath(f"{spec}.toml")
    if not resource.is_file():
        names = profile_names()
        raise ConfigError(
            f"no testbed profile named {spec!r}; shipped profiles: {', '.join(names) or '(none)'}"
            " — or give a path to a .toml file"
        )
    return parse_profile(resource.read_text(encoding="utf-8"), name=spec)
