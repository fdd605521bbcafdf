"""An emulated device: what a testbed tells the processes it starts about the device they stand for.

A testbed device (:mod:`p2ptrain.testbed`) is a share of one host core in a network
namespace. To meter it as the device it emulates, the testbed starts its processes with
three environment variables, each optional:

- ``P2PTRAIN_POWER_PROFILE=NAME``: the power profile to model this device with (a
  shipped profile's name). Also honoured outside a testbed: it names the profile instead
  of guessing one from the device tree.
- ``P2PTRAIN_EMULATED_CPUS=Q``: this device runs on ``Q`` host cores that stand for the
  whole modelled device. Sensors are switched off (they measure the host, not the
  device), and every CPU-second the device spends counts as ``cores / Q`` core-seconds of
  the modelled device: a device kept busy on its quota draws its profile's loaded power,
  an idle one its idle power, whatever share of the host it was given.
- ``P2PTRAIN_BATTERY=F``: the device is on battery at charge ``F`` in [0, 1]; the node
  announces it (mDNS TXT ``bat``) and planners spare a device that runs low.

Values are parsed strictly: a bad one is a :class:`~p2ptrain._errors.ConfigError` naming
the variable, never a silent default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from p2ptrain._errors import ConfigError

from ._profiles import PowerProfile, get_profile

__all__ = ["BATTERY_ENV", "EMULATED_CPUS_ENV", "POWER_PROFILE_ENV", "Emulation"]

POWER_PROFILE_ENV = "P2PTRAIN_POWER_PROFILE"
EMULATED_CPUS_ENV = "P2PTRAIN_EMULATED_CPUS"
BATTERY_ENV = "P2PTRAIN_BATTERY"


@dataclass(frozen=True)
class Emulation:
    """What the environment says about the device this process runs as.

    Attributes:
        profile: The named power profile, or ``None`` (guess from the device).
        cpus: Host cores standing for the whole device, or ``None`` (a real device).
        battery: Emulated battery charge in [0, 1], or ``None`` (read the real one).
    """

    profile: str | None = None
    cpus: float | None = None
    battery: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Emulation:
        """Read the three variables from ``env`` (default: this process's environment).

        Raises:
            ConfigError: a variable is set to something unusable (the message names it).
        """
        env = os.environ if env is None else env
        name = env.get(POWER_PROFILE_ENV, "").strip() or None
        if name is not None:
            get_profile(name)  # an unknown name fails here, with the list of shipped ones
        return cls(profile=name, cpus=_fraction(env, EMULATED_CPUS_ENV, 0.001, 1024.0),
                   battery=_fraction(env, BATTERY_ENV, 0.0, 1.0))

    @property
    def emulated(self) -> bool:
        """``True`` when this process stands for a device on a share of the host."""
        return self.cpus is not None

    def cpu_scale(self, profile: PowerProfile) -> float:
        """Modelled core-seconds per CPU-second spent here (1.0 on a real device)."""
        return profile.cores / self.cpus if self.cpus is not None else 1.0

    def describe(self, profile: PowerProfile) -> str:
        """``"emulated: N cores on Q host cores (CPU s x S)"``, or ``""`` on a real device."""
        if self.cpus is None:
            return ""
        return f"emulated: {profile.cores} cores on {self.cpus:g} host cores (CPU s x{self.cpu_scale(profile):.3g})"


def _fraction(env: Mapping[str, str], key: str, lo: float, hi: float) -> float | None:
    text = env.get(key, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"${key}={text!r} is not a number; expected one in [{lo:g}, {hi:g}]") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"${key}={text!r} must be in [{lo:g}, {hi:g}]")
    return value
