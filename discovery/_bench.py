"""Convergence measurement for ``p2ptrain bench discovery``.

Convergence time: from the moment n nodes start together until every node has seen the
other n - 1. :func:`measure_convergence` times :class:`MdnsDiscovery`;
:func:`measure_convergence_baseline` times what a skilled engineer writes with plain
python-zeroconf and its defaults (probing registration, default browser, service lookup
per added name), the baseline the bench prints beside it.

Both run every node in this process, on 127.0.0.1 by default, under a fresh random
cluster / service instance prefix so concurrent runs on one host never mix.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2ptrain._errors import ConfigError

from ._interfaces import plan_interfaces
from ._mdns import MdnsDiscovery
from ._records import SERVICE_TYPE, PeerRecord
from ._resources import Resources

__all__ = ["measure_convergence", "measure_convergence_baseline"]

# The probe-free resources every benchmark node announces: the bench times discovery,
# not the matmul probe.
_BENCH_RESOURCES = Resources(cores=1, memory_bytes=1 << 30, accelerator="cpu", gflops=1.0)


async def measure_convergence(n: int, *, interfaces: list[str] | None = None, timeout: float = 10.0) -> float:
    """Seconds from starting ``n`` MdnsDiscovery nodes until each sees the other ``n - 1``.

    Args:
        n: Nodes, at least 2.
        interfaces: Where mDNS runs; ``None`` means ``["127.0.0.1"]`` (never the LAN).
        timeout: Give up after this many seconds.

    Returns:
        The convergence time in seconds (excludes the ~0.25 s goodbye on close).

    Raises:
        ConfigError: ``n`` < 2.
        TimeoutError: The nodes did not converge within ``timeout``.
    """
    _check_n(n)
    cluster = f"bench-{secrets.token_hex(4)}"
    nodes = [
        MdnsDiscovery(
            PeerRecord(
                node_id=f"n{i}",
                cluster=cluster,
                port=20000 + i,
                incarnation=1,
                key_fingerprint="",
                resources=_BENCH_RESOURCES,
            ),
            cluster=cluster,
            interfaces=interfaces or ["127.0.0.1"],
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await asyncio.gather(*(node.wait_for_peers(n - 1, timeout=timeout) for node in nodes))
        return time.perf_counter() - start
    finally:
        await asyncio.gather(*(node.close() for node in nodes))


async def measure_convergence_baseline(
    n: int, *, interfaces: list[str] | None = None, timeout: float = 10.0
) -> float:
    """The same measurement with plain python-zeroconf defaults (see the module docstring).

    Args:
        n: Nodes, at least 2.
        interfaces: Where mDNS runs; ``None`` means ``["127.0.0.1"]``.
        timeout: Give up after this many seconds.

    Returns:
        The convergence time in seconds.

    Raises:
        ConfigError: ``n`` < 2.
        TimeoutError: The nodes did not converge within ``timeout``.
    """
    _check_n(n)
    prefix = f"base-{secrets.token_hex(4)}"
    names = [f"{prefix}-{i}.{SERVICE_TYPE}" for i in range(n)]
    zcs: list[AsyncZeroconf] = []
    browsers: list[AsyncServiceBrowser] = []
    seen: list[set[str]] = [set() for _ in range(n)]
    done = [asyncio.Event() for _ in range(n)]
    lookups: set[asyncio.Task[None]] = set()
    addresses = list(plan_interfaces(interfaces or ["127.0.0.1"]).announce)

    async def lookup(i: int, zc: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(zc, 3000) and name != names[i]:
            seen[i].add(name)
            if len(seen[i]) >= n - 1:
                done[i].set()

    def handler_for(i: int):  # type: ignore[no-untyped-def]
        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Added and name.startswith(prefix):
                task = asyncio.ensure_future(lookup(i, zeroconf, name))
                lookups.add(task)
                task.add_done_callback(lookups.discard)

        return on_change

    async def start_node(i: int) -> None:
        azc = AsyncZeroconf(interfaces=interfaces or ["127.0.0.1"])
        zcs.append(azc)
        browsers.append(AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[handler_for(i)]))
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            names[i],
            port=20000 + i,
            properties={"v": "1"},
            server=f"{prefix}-{i}.local.",
            parsed_addresses=addresses,
        )
        await azc.async_register_service(info)  # default: probes for conflicts first

    start = time.perf_counter()
    try:
        await asyncio.gather(*(start_node(i) for i in range(n)))
        await asyncio.wait_for(asyncio.gather(*(d.wait() for d in done)), timeout)
        return time.perf_counter() - start
    except asyncio.TimeoutError as exc:
        raise TimeoutError(f"plain zeroconf nodes did not converge within {timeout:g} s") from exc
    finally:
        for task in list(lookups):
            task.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
        await asyncio.gather(*(b.async_cancel() for b in browsers), return_exceptions=True)
        await asyncio.gather(*(z.async_close() for z in zcs), return_exceptions=True)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"convergence needs at least 2 nodes, got n={n!r}")
