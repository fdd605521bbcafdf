"""Helpers for ring tests: unique cluster names, loopback nodes, waiting on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from p2ptrain.ring._node import Node
from p2ptrain.transport import FakeNetwork

from _wait import until  # noqa: F401  (re-exported: ring tests import it from here)

# Shrunk protocol timers (the fixture way, not sleeps): failure detection in 1 s.
FAST = {"heartbeat_interval": 0.1, "failure_timeout": 1.0}


def cluster_name() -> str:
    """A cluster no other test (or concurrent run) uses."""
    return "t-" + secrets.token_hex(4)


def loopback_node(cluster: str, **kw: Any) -> Node:
    opts: dict[str, Any] = {"interfaces": ["127.0.0.1"], "ephemeral": True, **FAST}
    opts.update(kw)
    return Node(cluster=cluster, **opts)


async def started_ring(n: int, cluster: str | None = None, **kw: Any) -> list[Node]:
    """``n`` started loopback nodes of one cluster that agree on a full view."""
    cl = cluster or cluster_name()
    nodes = [loopback_node(cl, **kw) for _ in range(n)]
    for x in nodes:
        await x.start()
    await asyncio.gather(*(x.wait_for_peers(n - 1, timeout=15) for x in nodes))
    return nodes


@contextlib.asynccontextmanager
async def fake_ring(n: int, **kw: Any) -> AsyncIterator[tuple[FakeNetwork, list[Node]]]:
    """``n`` started nodes ``n0``, ``n1``, ... on one in-memory network, agreeing on a full view.

    Yields the network (for faults: ``kill``, ``partition``) and the nodes; every node is
    closed on exit, including one that left or was killed.
    """
    net = FakeNetwork()
    nodes = [Node(cluster="c", node_id=f"n{i}", network=net, **{**FAST, **kw}) for i in range(n)]
    try:
        for x in nodes:
            await x.start()
        for x in nodes[1:]:
            x.connect(nodes[0].address)
        await asyncio.gather(*(x.wait_for_peers(n - 1, timeout=10) for x in nodes))
        yield net, nodes
    finally:
        for x in nodes:
            await x.close()
