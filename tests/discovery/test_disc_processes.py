"""Discovery between separate processes on 127.0.0.1: finding, crash + restart, goodbye."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.discovery import MdnsDiscovery

from _disc_helpers import make_record, next_event

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)
NODE_SCRIPT = Path(__file__).with_name("_node.py")


class Child:
    """One ``_node.py`` process and its JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError(f"child exited with {await self.proc.wait()} before answering")
        return json.loads(raw)

    async def until(self, where: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.line(max(0.01, deadline - loop.time()))
            if where(msg):
                return msg


@pytest.fixture
async def spawn(loopback_multicast: None) -> AsyncIterator[Callable[..., Any]]:
    """Start ``_node.py`` children; all are reaped (killed if still running) afterwards."""
    children: list[Child] = []

    async def start(cluster: str, node_id: str, **kw: int) -> Child:
        args = [
            sys.executable,
            str(NODE_SCRIPT),
            "--cluster",
            cluster,
            "--node-id",
            node_id,
            "--lifetime",
            "30",
        ]
        for key, value in kw.items():
            args += [f"--{key}", str(value)]
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        child = Child(proc)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.returncode is None:
            child.proc.kill()
        await child.proc.wait()


async def test_separate_processes_find_each_other(spawn: Callable[..., Any], cluster: str) -> None:
    """Three child processes and this one: every node sees the other three."""
    spawned = time.perf_counter()
    children = [await spawn(cluster, f"p{i}", port=7000 + i) for i in range(3)]
    async with MdnsDiscovery(make_record(cluster, "main"), cluster=cluster, interfaces=["127.0.0.1"]) as here:
        for child in children:
            assert (await child.line(timeout=15.0))["event"] == "started"
        started = time.perf_counter()

        async def converged(child: Child, me: str) -> None:
            want = {"main", "p0", "p1", "p2"} - {me}
            seen: set[str] = set()
            while seen != want:
                msg = await child.until(lambda m: m["event"] == "found", timeout=5.0)
                seen.add(msg["node"])

        await asyncio.gather(
            here.wait_for_peers(3, timeout=5.0),
            *(converged(c, f"p{i}") for i, c in enumerate(children)),
        )
        done = time.perf_counter()
        assert {p.port for p in here.peers().values()} == {7000, 7001, 7002}
    log.info(
        "4 nodes in 4 processes: %.3f s after the last one started (%.3f s incl. interpreter start)",
        done - started,
        done - spawned,
    )
    for child in children:
        child.proc.stdin.close()  # type: ignore[union-attr]
        assert await asyncio.wait_for(child.proc.wait(), 10.0) == 0


async def test_crash_then_restart_replaces_then_goodbye(spawn: Callable[..., Any], cluster: str) -> None:
    """SIGKILL (no goodbye) then a restart with a higher incarnation on a new port: the
    old entry is replaced in place, never duplicated; a graceful exit then yields lost."""
    async with MdnsDiscovery(make_record(cluster, "obs"), cluster=cluster, interfaces=["127.0.0.1"]) as obs:
        async with obs.events() as stream:
            first = await spawn(cluster, "x", port=7101, incarnation=1)
            ev = await next_event(stream, timeout=15.0)
            assert (ev.kind, ev.record.port, ev.record.incarnation) == ("found", 7101, 1)
            first.proc.send_signal(signal.SIGKILL)
            await first.proc.wait()

            second = await spawn(cluster, "x", port=7102, incarnation=2)
            ev = await next_event(stream, timeout=15.0)
            assert (ev.kind, ev.record.port, ev.record.incarnation) == ("updated", 7102, 2)
            assert list(obs.peers()) == ["x"]

            second.proc.stdin.close()  # type: ignore[union-attr]
            ev = await next_event(stream, timeout=5.0)
            assert (ev.kind, ev.record.incarnation) == ("lost", 2)
            assert await asyncio.wait_for(second.proc.wait(), 10.0) == 0
        assert obs.peers() == {}
