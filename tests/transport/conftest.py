"""Shared fixtures of the transport tests: raw ZeroMQ peers, leak guards."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from p2ptrain.transport import Endpoint, encode_message

import _wait


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(scope="session", autouse=True)
def _warm_pyzmq_gc() -> None:
    """Start pyzmq's zero-copy garbage-collector thread once, so leak checks ignore it."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.linger = b.linger = 0
    a.bind("inproc://warm")
    b.connect("inproc://warm")
    a.send(np.zeros(1 << 17, np.uint8), copy=False)
    b.recv()
    a.close()
    b.close()
    ctx.term()


@pytest.fixture
def leak_guard() -> Iterator[None]:
    """Fail if the test leaves file descriptors or threads behind."""
    fds, threads = _fds(), _threads()
    yield
    for t in _threads() - threads:
        t.join(timeout=5.0)
    leaked_threads = [t.name for t in _threads() - threads]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    leaked = _fds() - fds
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> float:
    """Wait, bounded, for a condition that another connection makes true: the shared
    :func:`_wait.until`, with a default bound of 10 s for the transport tests.

    For effects whose order against our own traffic is not defined (a handshake on a
    separate connection); everything ordered is awaited directly instead.
    """
    return await _wait.until(cond, timeout, what)


def failing_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, except that its first call raises ``RuntimeError("planted")``: a bug of ours in one message."""
    calls: list[int] = []

    def wrapper(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("planted")
        return fn(*a, **k)

    return wrapper


class RawPeer:
    """A bare DEALER that can send arbitrary frames to an endpoint's ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context, identity: str, address: str, *, curve: Any = None,
                 server_key: bytes | None = None) -> None:
        self.identity = identity
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        if curve is not None:
            self.sock.curve_serverkey = server_key or curve.public
            self.sock.curve_publickey, self.sock.curve_secretkey = curve.public, curve.secret
        self.sock.connect(address)

    async def send(self, frames: list[Any]) -> None:
        await self.sock.send_multipart(frames, copy=True)

    async def send_good(self, cluster: str, tag: Any, **kw: Any) -> None:
        await self.send(encode_message(sender=self.identity, cluster=cluster, kind="good", tag=tag, **kw))


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    """Two started endpoints on loopback that know each other."""
    async with Endpoint("a", "test") as a, Endpoint("b", "test") as b:
        a.add_peer("b", b.address)
        b.add_peer("a", a.address)
        yield a, b
