"""Helpers shared by the discovery tests (a module of its own: conftest is not importable by name).

For a bounded wait on a condition use the suite's one helper, ``from _wait import until``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from p2ptrain.discovery import PeerEvent, PeerEventStream, PeerRecord, Resources

LOOPBACK = ["127.0.0.1"]
RES = Resources(cores=2, memory_bytes=4 << 30, accelerator="cpu", gflops=10.0)


def make_record(
    cluster: str, node_id: str, *, port: int = 7000, incarnation: int = 1, **kw: Any
) -> PeerRecord:
    return PeerRecord(
        node_id=node_id,
        cluster=cluster,
        port=port,
        incarnation=incarnation,
        key_fingerprint=kw.pop("key_fingerprint", f"fp-{node_id}"),
        resources=kw.pop("resources", RES),
        **kw,
    )


async def next_event(
    stream: PeerEventStream, *, timeout: float = 3.0, where: Callable[[PeerEvent], bool] | None = None
) -> PeerEvent:
    """The next event (matching ``where``) within ``timeout`` seconds, else fail."""

    async def find() -> PeerEvent:
        async for event in stream:
            if where is None or where(event):
                return event
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(find(), timeout)
