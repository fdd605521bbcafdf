"""``p2ptrain energy``: this device's joules and watts over a few seconds, labelled measured or estimated."""

from __future__ import annotations

import argparse
import json
import time

from p2ptrain._errors import ConfigError

__all__ = ["add_arguments", "main"]

SAMPLE_EVERY_S = 0.5  # a gauge sensor is integrated from samples this far apart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", metavar="NAME", help="power profile for the model (default: guessed from the device)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to meter (default 5)")
    parser.add_argument("--cgroup", action="store_true", help="charge this process's cgroup CPU time (an emulated device)")
    parser.add_argument("--no-sensors", action="store_true", help="always use the model, even where a sensor exists")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from p2ptrain.energy import EnergyMeter

    if not 0 < args.seconds <= 3600:
        raise ConfigError(f"--seconds must be in (0, 3600], got {args.seconds}")
    meter = EnergyMeter.open(args.profile, use_sensors=not args.no_sensors, cpu="cgroup" if args.cgroup else "system")
    meter.start()
    end = time.monotonic() + args.seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(SAMPLE_EVERY_S, left))
        meter.sample()
    reading = meter.read()
    choice = meter.profile
    if args.json:
        print(json.dumps({**reading.to_dict(), "profile": choice.profile.name, "profile_guessed": choice.guessed,
                          "profile_reason": choice.reason}))
    else:
        print(f"{reading.joules:.1f} J over {reading.seconds:.1f} s ({reading.watts_avg:.2f} W), {reading.kind}: "
              f"{reading.source}{f' ({reading.note})' if reading.note else ''}")
    return 0
