"""A peer in its own OS process: echoes every tensor message back, bit for bit.

Run by test_transport_processes.py as ``python _transport_echo.py PARENT_ADDRESS [SECRET]``;
prints its own address on stdout, exits on a ``bye`` message (or after 60 s idle).
"""

from __future__ import annotations

import asyncio
import sys

from p2ptrain.transport import CurveKeys, Endpoint


async def main(parent: str, secret: str | None) -> None:
    keys = CurveKeys.from_secret(secret) if secret else None
    async with Endpoint("child", "proc", curve=keys) as ep:
        ep.add_peer("parent", parent)
        print(ep.address, flush=True)
        while True:
            msg = await ep.recv(timeout=60)
            if msg.kind == "bye":
                return
            await ep.send("parent", "echo", tag=msg.tag, meta=msg.meta, tensors=msg.tensors, timeout=30)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
