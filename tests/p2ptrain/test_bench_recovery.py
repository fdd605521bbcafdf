"""``p2ptrain bench recovery`` runs end to end with real processes and keeps its JSON contract.

Small runs (3 members, a dozen steps): not a timing test. The pipeline run splits the
layers evenly, so the killed member holds a stage of its own and the survivors need the
copy its keeper holds (the planner gives loopback's equal members one data-parallel
group).
"""

from __future__ import annotations

import json
import math

import pytest

from p2ptrain.cli._main import main

FLAGS = ["--peers", "3", "--steps", "12", "--kill-at", "6", "--checkpoint-every", "4", "--replica-every", "4", "--json"]


@pytest.mark.slow
@pytest.mark.timeout(240)
# The data-parallel path over real processes is covered by the demo's --kill-one-at test;
# one bench run keeps the suite short on 2 cores.
@pytest.mark.parametrize(("strategy", "extra"), [("pipeline", ["--split", "even"])], ids=["pipeline-even"])
def test_a_killed_member_is_recovered_and_timed_against_a_restart(
    strategy: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "recovery", "--strategy", strategy, *FLAGS, *extra]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["strategy"] == strategy and r["peers"] == 3 and r["where"] == "loopback 127.0.0.1"
    assert r["failure_timeout_s"] == 2.0  # the default: the bench does not shrink it
    for key in ("detect_s", "recover_s", "restart_s", "final_loss", "fault_free_final_loss", "params_rel_diff"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    for key in ("lost_steps", "restart_lost_steps", "steps_total", "resume_step", "restart_resume_step"):
        assert isinstance(r[key], int) and r[key] >= 0, key
    assert 0 < r["detect_s"] <= r["recover_s"] < 60
    assert r["restart_s"] > 0
    assert r["ratio"] == pytest.approx(r["recover_s"] / r["restart_s"], rel=1e-3)
    # The survivors go on from a state a fault-free run had, and finish the same job.
    assert r["resume_step"] <= r["reached_step"] and r["restart_resume_step"] <= r["restart_reached_step"]
    assert r["restart_resume_step"] == 4  # the latest checkpoint before the kill at 6
    assert r["steps_total"] == 12 + r["lost_steps"]
    assert len(r["recoveries"]) >= 1 and len(r["recoveries"][0]["members"]) == 2
    assert r["params_rel_diff"] < 1e-4
    assert r["final_loss"] == pytest.approx(r["fault_free_final_loss"], rel=1e-4)
    if strategy == "pipeline":
        assert len(r["plans"]) == 2 and len(r["plans"][0]) == 3 and len(r["plans"][1]) == 2  # 3 stages, then 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--peers", "2"], "--peers must be at least 3"),
        (["--steps", "10", "--kill-at", "9"], "--kill-at must be in 1..8"),
        (["--peers", "4", "--global-batch", "3"], "--global-batch 3 is smaller than the 4 members"),
        (["--codec", "int9"], "job field 'codec'"),
    ],
)
def test_bad_flags_stop_before_any_process_starts(flags: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "recovery", *flags, "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
