"""``p2ptrain status``: browse mDNS and print a cluster's announced members, without joining."""

from __future__ import annotations

import argparse
import asyncio
import json

from p2ptrain._errors import ConfigError
from p2ptrain.discovery import MdnsDiscovery, PeerRecord

__all__ = ["add_arguments", "heard_elsewhere", "main", "power_label"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", default="default", help="cluster name (default: default)")
    parser.add_argument("--interface", metavar="ADDR", action="append", help="browse on this address only (repeatable; default: all)")
    parser.add_argument("--wait", type=float, default=1.5, help="seconds to listen for announcements (default 1.5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def power_label(power: str | None, battery: float | None) -> str:
    """A power class with its battery level: ``"laptop, battery 60%"``, ``"orin-nano"``, ``"?"``."""
    return (power or "?") + (f", battery {battery:.0%}" if battery is not None else "")


def _row(r: PeerRecord) -> dict[str, object]:
    res = r.resources
    return {
        "node": r.node_id,
        "addresses": list(r.addresses),
        "port": r.port,
        "cores": res.cores,
        "memory_bytes": res.memory_bytes,
        "accelerator": res.accelerator,
        "gflops": res.gflops,
        "battery": res.battery,
        "power": res.power,
        "key_fingerprint": r.key_fingerprint,
        "incarnation": r.incarnation,
    }


async def _browse(args: argparse.Namespace) -> tuple[list[PeerRecord], dict[str, int]]:
    async with MdnsDiscovery(None, cluster=args.cluster, interfaces=args.interface) as disc:
        await asyncio.sleep(args.wait)  # browsing is passive: collect answers for a fixed window
        return sorted(disc.peers().values(), key=lambda r: r.node_id), disc.other_clusters()


def heard_elsewhere(others: dict[str, int]) -> str:
    """``"cluster 'lab' (3 members)"``-style list of the other clusters heard, or ``""``."""
    return ", ".join(f"{name!r} ({n} member{'s' if n != 1 else ''})" for name, n in others.items())


def main(args: argparse.Namespace) -> int:
    if not 0 < args.wait <= 3600:
        raise ConfigError(f"--wait must be a number of seconds in (0, 3600], not {args.wait}")
    records, others = asyncio.run(_browse(args))
    rows = [_row(r) for r in records]
    # Exit 1 when nobody answered, as grep and pgrep do when nothing matched: a health
    # check (`p2ptrain status && ...`) could not tell an empty cluster from a full one.
    if args.json:
        print(json.dumps({"cluster": args.cluster, "members": rows, "other_clusters": others}))
        return 0 if rows else 1
    if not rows:
        print(f"no members of cluster {args.cluster!r} answered within {args.wait}s")
        if others:
            print(f"heard other clusters: {heard_elsewhere(others)}; pick one with --cluster NAME")
        return 1
    head = ("node", "address", "cores", "memory", "GFLOP/s", "accel", "power", "key")
    table = [head] + [
        (
            r.node_id,
            f"{(r.addresses or ('?',))[0]}:{r.port}",
            str(r.resources.cores),
            f"{r.resources.memory_bytes / 2**30:.1f} GiB",
            f"{r.resources.gflops:.1f}",
            str(r.resources.accelerator),
            power_label(r.resources.power, r.resources.battery),
            r.key_fingerprint,
        )
        for r in records
    ]
    w = [max(len(x[i]) for x in table) for i in range(len(head))]
    print(f"cluster {args.cluster!r}: {len(rows)} member(s) announced")
    for i, row in enumerate(table):
        print("  ".join(c.ljust(n) for c, n in zip(row, w)).rstrip())
        if i == 0:
            print("  ".join("-" * n for n in w))
    return 0
