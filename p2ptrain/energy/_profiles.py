"""Device power profiles: the numbers the energy model runs on, each with its citation.

A profile says what a device draws doing nothing (``idle_w``), what each busy core adds
(``busy_w_per_core``), and what its radio spends per link-layer frame and per byte.
Where a source gives only a power-mode budget or a "loaded" figure, the per-core figure
is derived from it, and the citation says how: all cores busy draws the budget,

    busy_w_per_core = (loaded_w - idle_w) / cores

The Wi-Fi figures follow the per-frame model of Serrano et al. (a fixed "cross-factor"
per frame crossing the stack, plus a cost per byte); the per-byte figure is derived
from an 802.11n card drawing about 2 W while transmitting at about 100 Mbit/s of goodput
(2 W / 12.5 MB/s = 160 nJ/byte), the per-frame figure is an order of magnitude, not a
measurement of a particular card. Calibrate on the device where it matters.

:func:`choose_profile` takes a name, or guesses one from the device tree model string
(Jetson, Raspberry Pi) and falls back to ``laptop``; a guess is always labelled so.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from p2ptrain._errors import ConfigError

__all__ = ["PROFILES", "PowerProfile", "ProfileChoice", "choose_profile", "get_profile", "profile_names"]

# Wi-Fi link, shared by every shipped profile (they all sit on an 802.11n/ac LAN).
_WIFI_J_PER_BYTE = 2.0 / (100e6 / 8)  # 160 nJ/byte: ~2 W transmitting at ~100 Mbit/s goodput
_WIFI_J_PER_FRAME = 100e-6  # order of magnitude of the per-frame cross-factor (Serrano et al.)
_WIFI_CITATION = (
    "Wi-Fi: per-frame + per-byte model of P. Serrano et al., 'Per-frame energy consumption in 802.11 devices "
    "and its implication on modeling and design', IEEE/ACM ToN 2015; J/byte derived from an 802.11n card at "
    "~2 W transmitting ~100 Mbit/s (160 nJ/B); J/frame is an order-of-magnitude assumption (100 uJ)"
)
# Bounds that catch a typo (W for mW) without ruling out a real device.
_MAX_W = 2000.0


@dataclass(frozen=True, kw_only=True)
class PowerProfile:
    """What one kind of device draws, for the energy model.

    Attributes:
        name: Profile name (``[a-z0-9-]``), e.g. ``"jetson-nano-10w"``.
        idle_w: Whole-device power when idle, W.
        busy_w_per_core: Power one fully busy core adds over idle, W.
        cores: Cores the figures assume (the busy figure was derived over these).
        link_j_per_byte: Radio energy per payload byte sent or received, J.
        link_j_per_frame: Radio energy per link-layer frame, independent of its size, J.
        citation: Where the numbers come from and how they were derived.
    """

    name: str
    idle_w: float
    busy_w_per_core: float
    cores: int
    link_j_per_byte: float
    link_j_per_frame: float
    citation: str

    def __post_init__(self) -> None:
        for field, value, hi in (
            ("idle_w", self.idle_w, _MAX_W),
            ("busy_w_per_core", self.busy_w_per_core, _MAX_W),
            ("link_j_per_byte", self.link_j_per_byte, 1.0),
            ("link_j_per_frame", self.link_j_per_frame, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= hi:
                raise ConfigError(f"power profile {self.name!r}: {field}={value!r} must be a finite number in [0, {hi}]")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError(f"power profile {self.name!r}: cores={self.cores!r} must be an int >= 1")

    @property
    def loaded_w(self) -> float:
        """Power with every core busy (idle + cores x per-core), W."""
        return self.idle_w + self.cores * self.busy_w_per_core


def _profile(name: str, *, idle_w: float, loaded_w: float, cores: int, citation: str) -> PowerProfile:
    return PowerProfile(
        name=name,
        idle_w=idle_w,
        busy_w_per_core=(loaded_w - idle_w) / cores,
        cores=cores,
        link_j_per_byte=_WIFI_J_PER_BYTE,
        link_j_per_frame=_WIFI_J_PER_FRAME,
        citation=f"{citation}; busy W/core = (loaded - idle) / {cores} cores; {_WIFI_CITATION}",
    )


PROFILES: dict[str, PowerProfile] = {
    p.name: p
    for p in (
        _profile(
            "jetson-nano-5w",
            idle_w=1.25,
            loaded_w=5.0,
            cores=2,
            citation="NVIDIA Jetson Nano 5 W power mode (nvpmodel mode 1: 2 CPU cores online); loaded = the 5 W budget; "
            "idle 1.25 W is an assumption (module idle, no peripherals)",
        ),
        _profile(
            "jetson-nano-10w",
            idle_w=1.25,
            loaded_w=10.0,
            cores=4,
            citation="NVIDIA Jetson Nano 10 W power mode (nvpmodel mode 0 / MAXN: 4 CPU cores online); loaded = the 10 W "
            "budget; idle 1.25 W is an assumption (module idle, no peripherals)",
        ),
        _profile(
            "orin-nano",
            idle_w=7.0,
            loaded_w=11.0,
            cores=6,
            citation="Jetson Orin Nano: ~7 W idle, ~11 W typical (figures listed in issue 13); loaded = the typical figure",
        ),
        _profile(
            "raspberry-pi-5",
            idle_w=2.5,
            loaded_w=8.0,
            cores=4,
            citation="Raspberry Pi 5: ~2-3 W idle (2.5 W taken), ~8 W with all 4 cores loaded (figures listed in issue 13)",
        ),
        _profile(
            "laptop",
            idle_w=6.0,
            loaded_w=30.0,
            cores=8,
            citation="generic laptop, an assumption, not a measurement: ~6 W idle, ~30 W with 8 cores busy "
            "(a 15-28 W class mobile CPU plus the rest of the machine)",
        ),
    )
}


def profile_names() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(PROFILES)


def get_profile(name: str) -> PowerProfile:
    """The shipped profile called ``name``.

    Raises:
        ConfigError: No such profile (the message lists them and suggests the nearest).
    """
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        near = difflib.get_close_matches(str(name), PROFILES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown power profile {name!r}{hint} (shipped: {', '.join(profile_names())})")
    return profile


@dataclass(frozen=True)
class ProfileChoice:
    """A profile and how it was chosen.

    Attributes:
        profile: The profile.
        guessed: ``True`` when it was guessed from the device, not named by the user.
        reason: How it was chosen (the device string a guess was made from).
    """

    profile: PowerProfile
    guessed: bool
    reason: str

    @property
    def label(self) -> str:
        """``"profile:NAME"``, with ``" (guessed: REASON)"`` after it when guessed."""
        return f"profile:{self.profile.name}" + (f" (guessed: {self.reason})" if self.guessed else "")


def choose_profile(profile: str | PowerProfile | None = None, *, root: str | Path = "/",
                   named: str | None = None) -> ProfileChoice:
    """The profile to model this device with.

    Args:
        profile: A shipped profile's name, a :class:`PowerProfile`, or ``None`` to take
            ``named``, else to guess from ``/proc/device-tree/model`` (Jetson, Raspberry
            Pi; else ``laptop``).
        root: Where the filesystem is rooted (tests pass a fake tree).
        named: The name the environment gives (``$P2PTRAIN_POWER_PROFILE``, read by
            :class:`~p2ptrain.energy.Emulation`), used when ``profile`` is ``None``.

    Returns:
        The choice; ``guessed`` is ``True`` unless a profile was given.

    Raises:
        ConfigError: ``profile`` names no shipped profile.
    """
    if isinstance(profile, PowerProfile):
        return ProfileChoice(profile, False, "given")
    if profile is not None:
        return ProfileChoice(get_profile(profile), False, "named")
    if named is not None:
        return ProfileChoice(get_profile(named), False, "named by $P2PTRAIN_POWER_PROFILE")
    base = Path(root)
    model = _read_text(base / "proc/device-tree/model").replace("\x00", "").strip()
    low = model.lower()
    if "jetson" in low and "nano" in low and "orin" not in low:
        # nvpmodel records the active mode; on the Nano mode 1 is 5 W, mode 0 (MAXN) 10 W.
        status = _read_text(base / "var/lib/nvpmodel/status").strip().lower()
        five = status.startswith("pmode:") and status[6:].lstrip("0") == "1"
        name = "jetson-nano-5w" if five else "jetson-nano-10w"
        mode = f", nvpmodel {status!r}" if status else ", power mode unknown: 10 W assumed"
        return ProfileChoice(PROFILES[name], True, f"device-tree model {model!r}{mode}")
    if "jetson" in low or "orin" in low:
        near = "" if "orin nano" in low else " (nearest shipped profile)"
        return ProfileChoice(PROFILES["orin-nano"], True, f"device-tree model {model!r}{near}")
    if "raspberry pi" in low:
        near = "" if "raspberry pi 5" in low else " (nearest shipped profile)"
        return ProfileChoice(PROFILES["raspberry-pi-5"], True, f"device-tree model {model!r}{near}")
    why = f"device-tree model {model!r} is not a known board" if model else "no device-tree model"
    return ProfileChoice(PROFILES["laptop"], True, f"{why}: generic laptop")


def _read_text(path: Path, limit: int = 256) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return ""
