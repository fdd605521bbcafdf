"""``p2ptrain bench discovery``: seconds until N local nodes agree on the full ring.

N :class:`~p2ptrain.Node` objects in this process, each with its own ZeroMQ sockets and
its own mDNS responder on 127.0.0.1, are started together; the clock stops when every
one of them has installed the same view of all N. Default protocol timers are used.
Beside it: mDNS discovery alone, and plain python-zeroconf (conflict probing on) for the
same N — the baseline a developer gets from the library's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time

from p2ptrain.discovery import measure_convergence, measure_convergence_baseline, probe_resources

__all__ = ["add_arguments", "main", "measure_ring"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=4, help="nodes to start (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


async def measure_ring(n: int, timeout: float = 20.0) -> float:
    """Start ``n`` loopback nodes at once; seconds until all hold the same n-member view."""
    from p2ptrain.ring import Node

    cluster = "bench-" + secrets.token_hex(4)
    res = probe_resources()  # measured once per device in real life, not per join
    nodes = [Node(cluster=cluster, interfaces=["127.0.0.1"], ephemeral=True, resources=res) for _ in range(n)]
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(x.start() for x in nodes))
        while not (len({x.view for x in nodes}) == 1 and len(nodes[0].view) == n):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{n} nodes did not agree within {timeout}s")
            await asyncio.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        await asyncio.gather(*(x.close() for x in nodes))


async def _run(args: argparse.Namespace) -> dict[str, object]:
    ring = [await measure_ring(args.peers) for _ in range(args.repeat)]
    mdns = [await measure_convergence(args.peers) for _ in range(args.repeat)]
    base = await measure_convergence_baseline(args.peers)
    return {
        "peers": args.peers,
        "converge_s": round(statistics.median(ring), 4),
        "converge_runs_s": [round(x, 4) for x in ring],
        "mdns_only_s": round(statistics.median(mdns), 4),
        "zeroconf_default_s": round(base, 4),
        "where": "in-process nodes, mDNS and tcp on 127.0.0.1",
    }


def main(args: argparse.Namespace) -> int:
    if args.peers < 2:
        from p2ptrain._errors import ConfigError

        raise ConfigError(f"--peers must be at least 2, got {args.peers}")
    from p2ptrain.bench._checks import at_least

    at_least("--repeat", args.repeat, 1)
    out = asyncio.run(_run(args))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['peers']} nodes agreed on the full ring in {out['converge_s']} s (median of {args.repeat}); "
              f"mDNS alone {out['mdns_only_s']} s; plain zeroconf defaults {out['zeroconf_default_s']} s")
    return 0
