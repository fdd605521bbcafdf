"""`p2ptrain join` as real OS processes on 127.0.0.1: agreement, kill -9, graceful Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import pytest

from _ring import cluster_name
from _wait import until

pytestmark = pytest.mark.slow
FAILURE_TIMEOUT = 1.5


class Joiner:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.node = ""
        self.view: dict[str, Any] = {}
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "joined":
                self.node = ev["node"]
            elif ev["event"] == "view":
                self.view = ev


async def spawn(cluster: str, *extra: str) -> Joiner:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster, "--interface", "127.0.0.1",
        "--ephemeral", "--json", "--failure-timeout", str(FAILURE_TIMEOUT), "--duration", "60", *extra,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return Joiner(proc)


def agreed(js: list[Joiner]) -> bool:
    views = {(j.view.get("epoch"), tuple(j.view.get("members", ()))) for j in js}
    return len(views) == 1 and len(next(iter(views))[1]) == len(js) and {j.node for j in js} == set(next(iter(views))[1])


async def test_four_processes_agree_then_survive_kill_and_leave() -> None:
    cl = cluster_name()
    js = [await spawn(cl) for _ in range(4)]
    try:
        await until(lambda: agreed(js), 30, "4-process ring")
        # kill -9: no goodbye; the rest must agree within the failure-detection time.
        js[0].proc.send_signal(signal.SIGKILL)
        took = await until(lambda: agreed(js[1:]), 10, "view after kill -9")
        assert took <= FAILURE_TIMEOUT + 1.5, f"failure took {took:.2f}s to agree on"
        # Ctrl-C: a graceful leave shrinks the ring at once.
        js[1].proc.send_signal(signal.SIGINT)
        took = await until(lambda: agreed(js[2:]), 10, "view after Ctrl-C")
        assert took < FAILURE_TIMEOUT, f"graceful leave took {took:.2f}s"
        assert await asyncio.wait_for(js[1].proc.wait(), 10) == 0
    finally:
        for j in js:
            if j.proc.returncode is None:
                j.proc.kill()
            await j.proc.wait()
            j.task.cancel()


def test_join_leaves_with_an_error_when_its_job_service_stops(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # The service only ends when cancelled, or on a bug: then the member must not sit in
    # the ring looking healthy while it answers no job.
    from p2ptrain.cli._main import main
    from p2ptrain.train import JobService

    async def broken_serve(self: Any, *, once: bool = False) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(JobService, "serve", broken_serve)
    t0 = time.monotonic()
    rc = main(["join", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--ephemeral", "--no-mdns",
               "--duration", "60", "--json"])
    assert rc == 1 and time.monotonic() - t0 < 30  # at once, not after --duration
    assert "the job service stopped" in caplog.text and "planted" in caplog.text


def test_ctrl_c_on_an_idle_join_says_nothing_of_a_handover(tmp_path: Any) -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster_name(), "--interface",
                             "127.0.0.1", "--ephemeral", "--no-mdns", "--duration", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "joined cluster ...": the signal handlers are in place
        assert "joined cluster" in first, first
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "leaving the ring" in rest and "handing" not in rest, rest


def test_join_does_its_one_time_torch_work_before_it_joins_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    # A walkthrough: a `join` started mid-job held a data job up 1.3-1.4 s and a sequence job
    # 1.5-1.7 s (2 runs of 2 each): the members wait for a newcomer in the admission and the
    # alignment, and its first optimizer's imports ran then. Warm first, join after: 0.3-0.6 s.
    import p2ptrain.train
    from p2ptrain.cli._main import main
    from p2ptrain.ring import Node

    order: list[str] = []
    real_start = Node.start

    async def start(self: Node) -> None:
        order.append("ring")
        await real_start(self)

    monkeypatch.setattr(p2ptrain.train, "warm_process", lambda: order.append("warm"))
    monkeypatch.setattr(Node, "start", start)
    rc = main(["join", "--cluster", cluster_name(), "--interface", "127.0.0.1", "--ephemeral", "--no-mdns",
               "--duration", "0.5", "--json"])
    assert rc == 0 and order[:2] == ["warm", "ring"], order
