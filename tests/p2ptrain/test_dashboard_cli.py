"""The `--dashboard` and `--tensorboard` flags as a user meets them, and the TensorBoard event files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.dashboard import TensorBoardLog
from p2ptrain.train import StepMetrics

from _ring import cluster_name

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def read_events(folder: Path) -> list[Any]:
    """Every event in the TFRecord files under ``folder`` (length, its CRC, the bytes, their CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack_from("<Q", data, at)
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
            at += 12 + n + 4
    return events


def test_step_metrics_become_tensorboard_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed: pip install -e '.[test]'")

    class Jobs:  # what TensorBoardLog needs of a JobService
        on_step = on_plan = last_trainer = None
        node = None

    log = TensorBoardLog(tmp_path / "tb", members_of=lambda: ["a", "b"])
    jobs = Jobs()
    log.attach(jobs)
    for i in range(3):
        jobs.on_step(StepMetrics(i, 3.0 - i, 100.0 + i, 0.2, 0.1, 0.1, 2, 1, [0.5, 0.25], [1.0, 2.0], [False, False]))
    log.close()
    log.close()  # twice is fine
    scalars: dict[str, list[tuple[int, float]]] = {}
    for ev in read_events(tmp_path / "tb"):
        for v in ev.summary.value:
            scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
    assert scalars["loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert scalars["samples_per_s"][-1] == (2, 102.0)
    assert scalars["busy/b"] == [(i, 0.25) for i in range(3)] and scalars["joules/a"][0] == (0, 1.0)


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2ptrain", *argv], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_a_page_off_loopback_without_a_secret_is_refused_before_joining() -> None:
    env_secret = ENV.pop("P2PTRAIN_SECRET", None)
    try:
        out = run("join", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--ephemeral", "--dashboard", "0.0.0.0:0")
    finally:
        if env_secret is not None:
            ENV["P2PTRAIN_SECRET"] = env_secret
    assert out.returncode == 2 and "not loopback: that needs the cluster secret" in out.stderr, out.stderr
    out = run("demo", "--dashboard", "somehost:80")
    assert out.returncode == 2 and "is not an IP address" in out.stderr and "[ADDR:]PORT" in out.stderr, out.stderr


@pytest.mark.slow
def test_join_prints_where_its_page_is_and_serves_it(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp", reason="the dashboard extra is not installed: pip install -e '.[test]'")
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--ephemeral",
         "--json", "--duration", "30", "--dashboard", "127.0.0.1:0", "--tensorboard", str(tmp_path / "tb")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout is not None
        events = []
        for line in proc.stdout:  # ends with the process; --duration bounds it
            events.append(json.loads(line))
            if events[-1]["event"] == "dashboard":
                break
        dash = events[-1]
        assert dash["event"] == "dashboard" and dash["token"] is None and dash["url"] == f"http://127.0.0.1:{dash['port']}/"
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy
        with direct.open(dash["url"] + "api/status", timeout=10) as r:
            snap = json.loads(r.read())
        assert snap["me"] == events[0]["node"] and [m["id"] for m in snap["members"]] == [events[0]["node"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def test_a_tensorboard_folder_that_cannot_be_made_is_refused_before_joining(tmp_path: Path) -> None:
    # A walkthrough: `--tensorboard FILE` printed the ring and the plan, then a tensorboardX traceback.
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["train", "mlp", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--out", str(tmp_path / "o")],
                 ["join", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--ephemeral"],
                 ["demo", "--runs-dir", str(tmp_path / "runs")]):
        out = run(*argv, "--tensorboard", str(afile))
        assert out.returncode == 2 and f"--tensorboard {afile}: cannot make that folder: it is a file" in out.stderr, \
            out.stdout + out.stderr
        assert "Traceback" not in out.stderr and "joined" not in out.stdout
