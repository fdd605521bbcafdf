"""A discovery node in its own process, for tests: prints one JSON object per line.

Run: python tests/discovery/_node.py --cluster C --node-id ID [--port P] [--incarnation I]
Lines: {"event": "started"}, then {"event": "found"|"updated"|"lost", "node": ..., "port":
..., "incarnation": ...} per peer event. Binds mDNS to 127.0.0.1 only. Closing its stdin
ends it gracefully (goodbye packets); SIGKILL is a crash; and it exits by itself after
--lifetime seconds, so a test that dies never leaves it behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from p2ptrain.discovery import MdnsDiscovery, PeerRecord, Resources


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--incarnation", type=int, default=1)
    ap.add_argument("--lifetime", type=float, default=20.0)
    args = ap.parse_args()
    record = PeerRecord(
        node_id=args.node_id,
        cluster=args.cluster,
        port=args.port,
        incarnation=args.incarnation,
        key_fingerprint="",
        resources=Resources(cores=1, memory_bytes=1 << 30, accelerator="cpu", gflops=1.0),
    )
    async with MdnsDiscovery(record, cluster=args.cluster, interfaces=["127.0.0.1"]) as disc:
        emit({"event": "started"})

        async def follow() -> None:
            async with disc.events() as stream:
                async for kind, peer in stream:
                    emit(
                        {
                            "event": kind,
                            "node": peer.node_id,
                            "port": peer.port,
                            "incarnation": peer.incarnation,
                        }
                    )

        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        tasks = [asyncio.ensure_future(follow()), asyncio.ensure_future(stdin.read())]
        await asyncio.wait(tasks, timeout=args.lifetime, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
