"""Helpers for ring tests: unique cluster names, loopback nodes, waiting on conditions."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Callable

from p2ptrain.ring._node import Node

# Shrunk protocol timers (the fixture way, not sleeps): failure detection in 1 s.
FAST = {"heartbeat_interval": 0.1, "failure_timeout": 1.0}


def cluster_name() -> str:
    """A cluster no other test (or concurrent run) uses."""
    return "t-" + secrets.token_hex(4)


def loopback_node(cluster: str, **kw: Any) -> Node:
    opts: dict[str, Any] = {"interfaces": ["127.0.0.1"], "ephemeral": True, **FAST}
    opts.update(kw)
    return Node(cluster=cluster, **opts)


async def until(cond: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Wait (polling every 10 ms, bounded by ``timeout``) until ``cond()``; returns seconds taken."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def started_ring(n: int, cluster: str | None = None, **kw: Any) -> list[Node]:
    """``n`` started loopback nodes of one cluster that agree on a full view."""
    cl = cluster or cluster_name()
    nodes = [loopback_node(cl, **kw) for _ in range(n)]
    for x in nodes:
        await x.start()
    await asyncio.gather(*(x.wait_for_peers(n - 1, timeout=15) for x in nodes))
    return nodes
