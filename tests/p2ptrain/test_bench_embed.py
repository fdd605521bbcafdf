"""``p2ptrain bench embed`` runs as a real command and keeps its JSON contract (a short run; not a timing test)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from p2ptrain.cli._main import main


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_json_contract_of_a_short_run() -> None:
    cmd = [sys.executable, "-m", "p2ptrain", "bench", "embed", "--peers", "2", "--steps", "4", "--global-batch", "8",
           "--idle-s", "0.5", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["host_period_ms"] == 10.0 and r["strategy"] == "data" and r["steps"] == 4 and r["peers"] == 2
    assert r["loop"].startswith("asyncio default") and r["warm_up"] is True
    for prefix in ("", "idle_", "steady_"):
        p50, p99, top = (r[f"{prefix}late_{k}_ms"] for k in ("p50", "p99", "max"))
        assert all(isinstance(v, float) and math.isfinite(v) for v in (p50, p99, top)), prefix
        assert -1.0 < p50 <= p99 <= top, prefix  # a wake is never much before its deadline
    for key in ("thread_late_p99_ms", "baseline_late_p99_ms"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > -1.0, key
    # The training window covers the job: about one tick per period, and every step ran.
    assert r["samples"] >= 0.5 * r["train_s"] * 1000 / r["host_period_ms"]
    assert r["idle_samples"] >= 20
    assert 0 < r["setup_s"] < r["train_s"] and r["step_s"] > 0 and math.isfinite(r["final_loss"])


def test_bad_flags_stop_before_any_process_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "embed", "--peers", "1", "--json"]) == 2
    assert "--peers must be at least 2" in capsys.readouterr().err
    assert main(["bench", "embed", "--peers", "3", "--global-batch", "2", "--json"]) == 2
    assert "--global-batch 2 is smaller than the 3 members" in capsys.readouterr().err
