"""`p2ptrain demo --kill-one-at STEP`: a member is killed mid-job and the run goes on, as a user sees it.

Real processes on loopback: the demo member plus two `p2ptrain join` processes found
over mDNS on 127.0.0.1; one is killed with SIGKILL at the step asked for. The run must
finish every step, say that the ring changed, and mark the event in run.png's data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("strategy", ["pipeline", "data"])
def test_the_demo_survives_a_killed_member(tmp_path: Path, strategy: str) -> None:
    cmd = [sys.executable, "-m", "p2ptrain", "demo", "--peers", "3", "--steps", "30", "--kill-one-at", "10",
           "--strategy", strategy, "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"),
           "--checkpoint-every", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--kill-one-at 10: killed peer process" in out.stdout
    assert "ring changed (view" in out.stdout, out.stdout
    assert "done: 30 steps" in out.stdout
    assert list((tmp_path / "runs").glob("*/run.png"))
    assert list((tmp_path / "ckpt").glob("*/step-00000030/*.safetensors")), "no checkpoint of the last step"


def test_kill_one_at_refuses_a_ring_that_cannot_keep_a_majority(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "demo", "--peers", "2", "--kill-one-at", "5", "--runs-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--kill-one-at needs --peers >= 3" in out.stderr
    # A step past the end is named alone (it blamed --peers too: a walkthrough).
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "demo", "--peers", "3", "--kill-one-at", "50", "--steps", "5",
                          "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--kill-one-at 50 must be a STEP in 1..4 (--steps 5)" in out.stderr, out.stderr
    assert "--peers" not in out.stderr.replace("(--steps 5)", "")


def test_a_resume_on_more_members_goes_on_from_the_checkpoint(tmp_path: Path) -> None:
    # The default global batch is 8 per member: resumed on another member count, the job
    # named another lineage, logged "no checkpoint to resume from" and started at step 0.
    def demo(*args: str) -> str:
        cmd = [sys.executable, "-m", "p2ptrain", "demo", "--strategy", "data", "--runs-dir", str(tmp_path / "runs"),
               "--checkpoint-dir", str(tmp_path / "ckpt"), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    demo("--peers", "2", "--steps", "20", "--checkpoint-every", "10")
    text = demo("--peers", "3", "--steps", "30", "--resume")
    assert "keeping that global batch (the default here would be 24)" in text, text
    assert "done: steps 21..30 (resumed after 20 steps)" in text, text  # counted as the bar counts them
    assert "step 30/30" in text.replace("\r", "\n"), text
    assert "no checkpoint to resume from" not in text, text
    # Another global batch is another job: it trains from step 0, and the last line says
    # so (a walkthrough read "done: 3 steps", exit 0, after asking to resume).
    text = demo("--peers", "2", "--steps", "3", "--global-batch", "40", "--resume")
    assert "done: 3 steps from step 0 (resume asked, but no member held a checkpoint of this job)" in text, text


def test_ctrl_c_on_the_demo_says_what_it_left(tmp_path: Path) -> None:
    # It exited 130 without a word.
    import signal
    import time

    # As from a terminal: a runner started in the background (nohup, `&`) hands its children
    # SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'p2ptrain'; runpy.run_module('p2ptrain', run_name='__main__', alter_sys=True)")
    cmd = [sys.executable, "-c", start, "demo", "--peers", "2", "--steps", "100000", "--strategy", "data",
           "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # until the first step's progress line
            if "step " in line and "/100000" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted: the demo and its members stopped; what it logged: " in out and "metrics.jsonl" in out, out
