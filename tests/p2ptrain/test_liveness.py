"""No false alarms (issue 11): a busy member keeps its place; a dead or stuck one is still removed.

Three members over real CURVE sockets on 127.0.0.1: two in this process, one in a child
process (``_busy_member.py``) whose event loop the test blocks with a synchronous,
CPU-bound busy loop. Blocking the child's loop blocks nothing here, so the two members in
this process judge it exactly as remote peers would.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.ring import Node, View

from _ring import cluster_name, loopback_node
from _wait import until

pytestmark = pytest.mark.slow

FT = 1.0  # failure timeout (s): the shrunk timers of the ring tests
INTERVAL = 0.1
SCRIPT = Path(__file__).with_name("_busy_member.py")


class Child:
    """The member in the child process: its events, as the script prints them."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.node = ""
        self.view: tuple[int, tuple[str, ...]] = (-1, ())
        self._new = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                ev = json.loads(line)
                ev["t"] = time.monotonic()
                self.events.append(ev)
                if ev["event"] == "ready":
                    self.node = ev["node"]
                elif ev["event"] == "view":
                    self.view = (ev["epoch"], tuple(ev["members"]))
                self._new.set()
        finally:
            self._new.set()  # wake a waiter: no more events will come

    async def next(self, kind: str, timeout: float) -> dict[str, Any]:
        """The first event of ``kind`` not yet returned (waits at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == kind and not ev.get("taken"):
                    ev["taken"] = True
                    return ev
            if self.task.done():
                raise AssertionError(f"the child ended (exit {self.proc.returncode}) before a {kind!r} event")
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), max(0.0, deadline - time.monotonic()))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")


async def spawn(cluster: str, secret: str, peer: str, stall_limit: float) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), peer.removeprefix("tcp://"), str(FT), str(INTERVAL), str(stall_limit),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "P2PTRAIN_CLUSTER": cluster, "P2PTRAIN_SECRET": secret},
    )
    child = Child(proc)
    await child.next("ready", 30)
    return child


class Ring:
    """Two members here (``a``, ``b``), one in a child; every view change here is recorded."""

    def __init__(self, a: Node, b: Node, child: Child) -> None:
        self.a, self.b, self.child = a, b, child
        self.changes: list[tuple[str, View]] = []
        for x in (a, b):
            x.on_view_change(lambda v, x=x: self.changes.append((x.node_id, v)))

    def agreed(self, members: set[str]) -> bool:
        return self.a.view == self.b.view and set(self.a.view.members) == members


async def ring_with_child(stall_limit: float | None = None) -> Ring:
    cl, secret = cluster_name(), secrets.token_hex(16)
    a = loopback_node(cl, secret=secret, mdns=False)
    b = loopback_node(cl, secret=secret, mdns=False)
    await a.start()
    await b.start()
    b.connect(a.address)
    child = await spawn(cl, secret, a.address, 10 * FT if stall_limit is None else stall_limit)
    r = Ring(a, b, child)
    everyone = {a.node_id, b.node_id, child.node}
    await until(lambda: r.agreed(everyone) and child.view == (a.view.epoch, a.view.members), 30, "3-member ring")
    r.changes.clear()
    return r


async def close(r: Ring) -> None:
    if r.child.proc.returncode is None:
        r.child.send("quit")
        try:
            await asyncio.wait_for(r.child.proc.wait(), 10)
        except asyncio.TimeoutError:
            r.child.proc.kill()
            await r.child.proc.wait()
    r.child.task.cancel()
    await asyncio.gather(r.child.task, return_exceptions=True)
    await r.a.close()
    await r.b.close()


async def test_a_member_whose_loop_is_blocked_for_three_failure_timeouts_keeps_the_view() -> None:
    r = await ring_with_child()
    try:
        before = r.a.view
        r.child.send(f"block {3 * FT}")
        await r.child.next("blocking", 10)
        woke = await r.child.next("woke", 3 * FT + 20)
        # Let time pass on purpose: a member that wakes and wrongly blames its peers for its
        # own stall would drop them one failure timeout later (plus an agreement round).
        await asyncio.sleep(2 * FT)
        r.child.send("report")
        report = await r.child.next("report", 10)
        assert r.changes == [], f"views changed while a member was only busy: {r.changes}"
        assert r.a.view == r.b.view == before
        assert (report["epoch"], tuple(report["members"])) == (before.epoch, before.members)
        assert not [e for e in r.child.events if e["event"] == "view" and e["t"] > woke["t"]], "the woken member changed views"
        # It was the pulse thread that kept the member alive, not luck, and the member saw its stall.
        assert report["pulse"]["rounds"] >= 2 * FT / INTERVAL, report["pulse"]
        assert report["pulse"]["expired"] == 0
        assert report["stats"].get("loop_stalls", 0) >= 1, report["stats"]
    finally:
        await close(r)


async def test_without_the_pulse_the_same_block_costs_the_member_its_place() -> None:
    """The control: the test above would catch the false alarm it is about."""
    r = await ring_with_child(stall_limit=0)
    try:
        child = r.child.node
        r.child.send(f"block {3 * FT}")
        await r.child.next("blocking", 10)
        await until(lambda: r.agreed({r.a.node_id, r.b.node_id}), 3 * FT + 10, "the busy member removed")
        assert child not in r.a.view.members
    finally:
        await close(r)


async def test_a_killed_member_is_removed_well_within_the_failure_timeout() -> None:
    r = await ring_with_child()
    try:
        r.child.proc.send_signal(signal.SIGKILL)
        took = await until(lambda: r.agreed({r.a.node_id, r.b.node_id}), 10, "view after kill -9")
        # Its kernel closed its connections: the peers suspect it at once and remove it after
        # the suspicion grace (a quarter of the failure timeout), plus one agreement round.
        assert took <= FT / 4 + 0.75, f"a killed member took {took:.2f}s to be removed (failure timeout {FT}s)"
    finally:
        await close(r)


async def test_a_member_whose_loop_is_stuck_past_its_stall_limit_is_removed() -> None:
    """The pulse vouches for a stuck loop for ``stall_limit`` seconds only (a deadlock is a death)."""
    stall_limit = 2 * FT
    r = await ring_with_child(stall_limit=stall_limit)
    try:
        r.child.send(f"block {stall_limit + FT + 3}")  # past the longest removal time allowed below
        blocking = await r.child.next("blocking", 10)
        await until(lambda: r.agreed({r.a.node_id, r.b.node_id}), stall_limit + FT + 10, "the stuck member removed")
        took = time.monotonic() - blocking["t"]
        # Not before the limit (the pulse vouched until then), and soon after it: the limit
        # plus one failure timeout, plus one agreement round.
        assert stall_limit <= took <= stall_limit + FT + 1.5, f"removed {took:.2f}s into the stall"
    finally:
        r.child.proc.kill()  # still stuck: no need to wait for it to wake and leave
        await close(r)
