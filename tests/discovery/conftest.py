"""Fixtures for discovery tests: loopback-only mDNS, unique clusters, nodes that always close.

Every MdnsDiscovery here binds to 127.0.0.1 only (never the machine's own interfaces), and
each test gets a fresh random cluster name, so suites running side by side on one host
(several agents, CI jobs) never see each other's peers.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from p2ptrain.discovery import MdnsDiscovery, PeerRecord

from _disc_helpers import LOOPBACK


def _loopback_multicast_works() -> bool:
    """Send one multicast datagram on 127.0.0.1 and see it come back (1 packet, <= 1 s).

    lo here lacks the MULTICAST flag, yet Linux loops multicast back when the socket
    names 127.0.0.1 as its multicast interface; a host where that fails skips the mDNS
    tests instead of timing out in them.
    """
    group = f"239.255.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((group, 0))  # the group, not every interface: only its datagrams reach this socket
        port = rx.getsockname()[1]
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = secrets.token_bytes(8)
        tx.sendto(token, (group, port))
        return rx.recv(64) == token
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


@pytest.fixture(scope="session")
def loopback_multicast() -> None:
    if not _loopback_multicast_works():
        pytest.skip("multicast on 127.0.0.1 does not loop back on this host; mDNS tests need it")


@pytest.fixture
def cluster() -> str:
    return f"t-{secrets.token_hex(5)}"


@pytest.fixture
async def nodes(loopback_multicast: None) -> AsyncIterator[Callable[..., MdnsDiscovery]]:
    """Factory of MdnsDiscovery on 127.0.0.1; every one made is closed after the test."""
    made: list[MdnsDiscovery] = []

    def make(record: PeerRecord | None, *, cluster: str | None = None) -> MdnsDiscovery:
        assert record is not None or cluster is not None
        disc = MdnsDiscovery(record, cluster=cluster or record.cluster, interfaces=LOOPBACK)  # type: ignore[union-attr]
        made.append(disc)
        return disc

    yield make
    await asyncio.gather(*(d.close() for d in made))
