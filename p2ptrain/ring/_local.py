"""This device's announced resources: the probe, plus its power class and emulated battery."""

from __future__ import annotations

import dataclasses

from p2ptrain.discovery import Resources, probe_resources
from p2ptrain.energy import Emulation, choose_profile

__all__ = ["local_resources"]


def local_resources() -> Resources:
    """What this device announces when its node was given no resources.

    Blocking (the matmul probe of :func:`~p2ptrain.discovery.probe_resources`): call it
    from a thread. The power class is the name of the power profile the energy meter
    models this device with (named by ``$P2PTRAIN_POWER_PROFILE`` or guessed from the
    device tree); on an emulated testbed device ``$P2PTRAIN_BATTERY`` stands in for the
    battery it does not have.

    Raises:
        ConfigError: an emulation variable is malformed (the message names it).
    """
    emu = Emulation.from_env()
    res = probe_resources()
    power = choose_profile(named=emu.profile).profile.name
    return dataclasses.replace(res, power=power, battery=emu.battery if emu.battery is not None else res.battery)
