"""p2ptrain.energy: joules per device, measured where the OS can, modelled where not.

A leaf like ``p2ptrain.discovery``: it knows neither torch nor the ring, so a planner,
a testbed or robot software can meter energy at the cost of a few sysfs reads.

Files:

- ``_meter.py``     :class:`EnergyMeter` (``open`` / ``start`` / ``sample`` / ``read``) and
  :class:`EnergyReading` (joules, watts, ``kind`` measured/estimated, ``source``, parts)
- ``_sensors.py``   sysfs backends: Jetson INA3221 board rail (hwmon and the legacy IIO
  driver), battery ``power_now`` / ``energy_now``, Intel RAPL with wraparound;
  :func:`find_sensor` picks one
- ``_model.py``     the model (idle x wall + busy W/core x CPU s + link J/frame and J/byte)
  and the CPU clocks it charges (process ``os.times()``, cgroup ``cpu.stat``)
- ``_emulation.py`` :class:`Emulation`: what a testbed tells a process about the device it
  emulates (``$P2PTRAIN_POWER_PROFILE``, ``$P2PTRAIN_EMULATED_CPUS``, ``$P2PTRAIN_BATTERY``)
- ``_profiles.py``  :class:`PowerProfile`, the shipped :data:`PROFILES` with citations,
  :func:`choose_profile` (named, or guessed from the device tree and labelled so)

What is measured where, what is estimated and how: docs/energy.md.
"""

from __future__ import annotations

from ._emulation import BATTERY_ENV, EMULATED_CPUS_ENV, POWER_PROFILE_ENV, Emulation
from ._meter import EnergyMeter, EnergyReading
from ._model import cpu_clock, model_parts
from ._profiles import PROFILES, PowerProfile, ProfileChoice, choose_profile, get_profile, profile_names
from ._sensors import BatterySensor, Ina3221Sensor, RaplSensor, Sensor, SensorError, find_sensor

__all__ = [
    "BATTERY_ENV",
    "EMULATED_CPUS_ENV",
    "POWER_PROFILE_ENV",
    "PROFILES",
    "BatterySensor",
    "EnergyMeter",
    "EnergyReading",
    "Emulation",
    "Ina3221Sensor",
    "PowerProfile",
    "ProfileChoice",
    "RaplSensor",
    "Sensor",
    "SensorError",
    "choose_profile",
    "cpu_clock",
    "find_sensor",
    "get_profile",
    "model_parts",
    "profile_names",
]
