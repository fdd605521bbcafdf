"""``p2ptrain energy``: one labelled reading of this device, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_energy_prints_a_labelled_reading() -> None:
    p = subprocess.run([sys.executable, "-m", "p2ptrain", "energy", "--seconds", "0.6", "--profile", "raspberry-pi-5",
                        "--no-sensors", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["kind"] == "estimated" and r["profile"] == "raspberry-pi-5" and r["profile_guessed"] is False
    assert 0.5 <= r["seconds"] < 5 and r["joules"] > 0
    assert abs(r["joules"] - sum(r["parts"].values())) < 1e-6


def test_energy_refuses_a_bad_window_and_an_unknown_profile() -> None:
    for flags, message in ((["--seconds", "0"], "--seconds must be in"), (["--profile", "toaster"], "toaster")):
        p = subprocess.run([sys.executable, "-m", "p2ptrain", "energy", *flags], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and message in p.stderr, p.stderr
