"""The energy meter: a sensor where the device has one, the model where it has not.

::

    meter = EnergyMeter.open()            # picks a sensor, guesses a profile
    meter.start()
    ...                                   # train a step; call meter.sample() now and then
    reading = meter.read(bytes_=sent + received)
    reading.joules, reading.kind, reading.source

Every :class:`EnergyReading` says whether it was ``measured`` or ``estimated`` and where
it came from. A sensor that vanishes or reads garbage mid-run is dropped for good and
the reading falls back to the model, with the reason in :attr:`EnergyReading.note`;
the meter never raises for a sensor.

Gauges (INA3221, battery ``power_now``) are integrated with the trapezoid rule over the
samples taken: :meth:`EnergyMeter.start`, every :meth:`EnergyMeter.sample` and every
:meth:`EnergyMeter.read`. Sample at least once per step: power between two samples is
assumed to move in a straight line. Counters (RAPL, battery ``energy_now``) need no
samples, but a RAPL counter that wraps twice between two reads loses one wrap, so
sample more often than its wrap period (minutes at most).

Plain class, no threads and no sockets: blocking only for a few small sysfs reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from p2ptrain._errors import ConfigError

from ._emulation import Emulation
from ._model import cpu_clock, model_parts
from ._profiles import PowerProfile, ProfileChoice, choose_profile
from ._sensors import Sensor, SensorError, find_sensor

__all__ = ["EnergyMeter", "EnergyReading"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EnergyReading:
    """Energy spent since :meth:`EnergyMeter.start`.

    Attributes:
        joules: Energy, J.
        watts_avg: ``joules / seconds`` (0.0 for an empty window).
        seconds: Wall time of the window, s.
        kind: ``"measured"`` (a sensor) or ``"estimated"`` (the model).
        source: The sensor (``"ina3221:..."``, ``"battery:..."``, ``"rapl:..."``), or the
            model's profile and CPU clock (``"model:profile:laptop (guessed: ...); cpu=os.times"``).
        parts: Joules by cause: ``{"sensor": J}`` when measured; ``idle``, ``cpu`` and
            ``link`` when estimated.
        model_joules: What the model says for the same window, also when measured (for
            checking a prediction against the meter).
        note: Why the reading is estimated (empty when measured).
    """

    joules: float
    watts_avg: float
    seconds: float
    kind: Literal["measured", "estimated"]
    source: str
    parts: Mapping[str, float] = field(default_factory=dict)
    model_joules: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready keys: the attributes, ``parts`` as a plain dict."""
        return {
            "joules": self.joules,
            "watts_avg": self.watts_avg,
            "seconds": self.seconds,
            "kind": self.kind,
            "source": self.source,
            "parts": dict(self.parts),
            "model_joules": self.model_joules,
            "note": self.note,
        }


class EnergyMeter:
    """Energy of this device over a window, measured where possible, else modelled.

    Build it with :meth:`open`. Not thread-safe: one owner calls its methods.
    """

    def __init__(
        self,
        *,
        choice: ProfileChoice,
        sensor: Sensor | None,
        why_no_sensor: str,
        cpu: Callable[[], float],
        cpu_source: str,
        clock: Callable[[], float] = time.monotonic,
        cpu_scale: float = 1.0,
    ) -> None:
        """Prefer :meth:`open`; this is for tests that inject every part.

        ``cpu_scale`` turns a CPU-second spent here into modelled core-seconds (an
        emulated device: see :class:`~p2ptrain.energy.Emulation`).
        """
        self._choice = choice
        self.cpu_scale = cpu_scale
        self._sensor = sensor
        self._note = "" if sensor is not None else f"estimated: {why_no_sensor}"
        self._cpu = cpu
        self._cpu_source = cpu_source
        self._clock = clock
        self._t0: float | None = None
        self._cpu0 = 0.0
        self._joules = 0.0  # sensor energy integrated since start
        self._last: tuple[float, float] | None = None  # (time, counter J or gauge W) of the last sample

    @classmethod
    def open(
        cls,
        profile: str | PowerProfile | None = None,
        *,
        root: str | Path = "/",
        use_sensors: bool = True,
        cpu: Literal["process", "cgroup", "system"] = "process",
        clock: Callable[[], float] = time.monotonic,
        emulation: Emulation | None = None,
    ) -> EnergyMeter:
        """A meter for this device.

        Args:
            profile: Power profile for the model (a name or a :class:`PowerProfile`);
                ``None`` takes ``$P2PTRAIN_POWER_PROFILE``, else guesses one from the
                device (labelled as a guess).
            root: Where the filesystem is rooted (tests pass a fake tree).
            use_sensors: ``False`` always uses the model (an emulated device on a host
                whose sensors measure the host, not the device).
            cpu: Whose CPU time the model charges: this ``"process"`` or its ``"cgroup"``
                (an emulated testbed device). A cgroup that cannot be read falls back
                to the process, with a warning.
            clock: Monotonic seconds (tests inject a fake).
            emulation: What the environment says of this device (default: read it with
                :meth:`Emulation.from_env`). An emulated device uses no sensor and
                scales its CPU time to the modelled device's cores.

        Raises:
            ConfigError: ``profile`` names no shipped profile, ``cpu`` is unknown, or an
                emulation variable is malformed.
        """
        if cpu not in ("process", "cgroup", "system"):
            raise ConfigError(f"cpu={cpu!r} must be 'process', 'cgroup' or 'system'")
        emu = Emulation.from_env() if emulation is None else emulation
        choice = choose_profile(profile, root=root, named=emu.profile)
        if emu.emulated:
            use_sensors, why_off = False, f"{emu.describe(choice.profile)}: the host's sensors do not measure this device"
        else:
            why_off = "sensors switched off (use_sensors=False)"
        sensor, why = find_sensor(root) if use_sensors else (None, why_off)
        try:
            reader, cpu_source = cpu_clock(cpu, root=root)
        except SensorError as exc:
            log.warning("%s; charging this process's CPU time instead", exc)
            reader, cpu_source = cpu_clock("process")
        if emu.emulated:
            cpu_source += f"; {emu.describe(choice.profile)}"
        return cls(choice=choice, sensor=sensor, why_no_sensor=why, cpu=reader, cpu_source=cpu_source, clock=clock,
                   cpu_scale=emu.cpu_scale(choice.profile))

    @property
    def profile(self) -> ProfileChoice:
        """The power profile the model uses, and how it was chosen."""
        return self._choice

    @property
    def sensor_source(self) -> str | None:
        """The sensor in use, or ``None`` when the meter runs on the model."""
        return None if self._sensor is None else self._sensor.source

    def start(self) -> None:
        """Open a new window now (the previous one is forgotten)."""
        self._t0 = self._clock()
        self._cpu0 = self._safe_cpu()
        self._joules = 0.0
        self._last = None
        self._sample(self._t0)

    def sample(self) -> None:
        """Take a sensor sample (integrates a gauge; keeps a counter's wraps counted)."""
        self._require_started()
        self._sample(self._clock())

    def read(self, *, busy_cpu_s: float | None = None, frames: int | None = None, bytes_: int = 0) -> EnergyReading:
        """Energy since :meth:`start`.

        Args:
            busy_cpu_s: CPU seconds to charge the model with; ``None`` uses the meter's
                own CPU clock (this process or its cgroup) since :meth:`start`.
            frames: Link-layer frames sent and received in the window; ``None`` counts
                them from ``bytes_``.
            bytes_: Payload bytes sent and received in the window.

        Raises:
            RuntimeError: :meth:`start` was never called.
        """
        t0 = self._require_started()
        now = self._clock()
        self._sample(now)
        seconds = max(now - t0, 0.0)
        cpu_s = busy_cpu_s if busy_cpu_s is not None else max(self._safe_cpu() - self._cpu0, 0.0) * self.cpu_scale
        parts = model_parts(self._choice.profile, wall_s=seconds, busy_cpu_s=cpu_s, frames=frames, bytes_=bytes_)
        model_j = sum(parts.values())
        if self._sensor is not None:
            return EnergyReading(
                joules=self._joules,
                watts_avg=self._joules / seconds if seconds > 0 else 0.0,
                seconds=seconds,
                kind="measured",
                source=self._sensor.source,
                parts={"sensor": self._joules},
                model_joules=model_j,
            )
        return EnergyReading(
            joules=model_j,
            watts_avg=model_j / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            kind="estimated",
            source=f"model:{self._choice.label}; cpu={self._cpu_source}",
            parts=parts,
            model_joules=model_j,
            note=self._note,
        )

    def _require_started(self) -> float:
        if self._t0 is None:
            raise RuntimeError("call EnergyMeter.start() before sample() or read()")
        return self._t0

    def _safe_cpu(self) -> float:
        try:
            return self._cpu()
        except SensorError as exc:  # a cgroup removed under us: charge nothing more
            log.warning("CPU clock failed: %s", exc)
            return self._cpu0

    def _sample(self, now: float) -> None:
        sensor = self._sensor
        if sensor is None:
            return
        try:
            value = sensor.read()
            if sensor.mode == "energy":
                if self._last is not None:
                    delta = value - self._last[1]
                    if delta < 0:
                        raise SensorError(f"counter went backwards by {-delta:.3g} J")
                    self._joules += delta
            elif self._last is not None:
                t_prev, w_prev = self._last
                self._joules += 0.5 * (w_prev + value) * max(now - t_prev, 0.0)
            self._last = (now, value)
        except SensorError as exc:
            self._drop_sensor(f"{sensor.source} failed: {exc}")

    def _drop_sensor(self, why: str) -> None:
        log.warning("energy sensor dropped, falling back to the model: %s", why)
        self._sensor = None
        self._note = f"estimated: {why}"
