"""A ring member in its own OS process whose event loop the test can block on purpose.

Run by test_liveness.py as ``python _busy_member.py PEER_ADDRESS FAILURE_TIMEOUT INTERVAL STALL_LIMIT``
(the cluster secret, if any, in ``P2PTRAIN_SECRET``; the cluster name in ``P2PTRAIN_CLUSTER``).

Prints one JSON object per line on stdout:

- ``{"event": "ready", "node": ID, "address": ADDR}`` once started;
- ``{"event": "view", "epoch": E, "members": [...]}`` for every agreed view;
- ``{"event": "blocking", "seconds": S}`` right before a block, ``{"event": "woke"}`` after it;
- ``{"event": "report", "epoch": E, "members": [...], "pulse": {...}, "stats": {...}}`` when asked.

Reads commands on stdin: ``block SECONDS`` runs a synchronous, CPU-bound busy loop of that
many seconds *on the event loop* (nothing else of this process's loop runs meanwhile);
``report`` reports the view, the node's counters and the pulse thread's; ``quit`` (or end
of input) leaves the ring in order and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time

from p2ptrain.ring import Node, View


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


def busy(seconds: float) -> int:
    """Spin the CPU for ``seconds`` without yielding (what a long training step does to a loop)."""
    end = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < end:
        spins += 1
    return spins


async def main(peer: str, failure_timeout: float, interval: float, stall_limit: float) -> None:
    node = Node(cluster=os.environ["P2PTRAIN_CLUSTER"], secret=os.environ.get("P2PTRAIN_SECRET") or None,
                interfaces=["127.0.0.1"], ephemeral=True, mdns=False, peers=[peer], failure_timeout=failure_timeout,
                heartbeat_interval=interval, stall_limit=stall_limit)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with node:
        node.on_view_change(lambda v: say(event="view", epoch=v.epoch, members=list(v.members)))
        say(event="ready", node=node.node_id, address=node.address)
        while True:
            line = (await reader.readline()).decode().split()
            if not line or line[0] == "quit":
                return
            if line[0] == "block":
                seconds = float(line[1])
                say(event="blocking", seconds=seconds)
                busy(seconds)
                say(event="woke")
            elif line[0] == "report":
                view: View = node.view
                stats = node.endpoint.pulse_stats
                say(event="report", epoch=view.epoch, members=list(view.members), stats=node.stats,
                    pulse=dataclasses.asdict(stats) if stats is not None else None)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
