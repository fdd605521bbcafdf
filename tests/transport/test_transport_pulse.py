"""The pulse thread: it speaks for a silent event loop, only then, for a bounded time, and cleans up.

The loop is blocked on purpose here with ``time.sleep``: that is the stall under test (all
endpoints of a test share the loop, and the receiving ROUTER's I/O thread still takes what
arrives meanwhile, to be read once the loop wakes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import zmq.asyncio

from p2ptrain._errors import ConfigError, TransportError
from p2ptrain.transport import CurveKeys, Endpoint, FakeNetwork, Message, encode_message

from conftest import RawPeer

T = 10.0  # generous per-step timeout: never hit unless something is broken


async def _drain(ep: Endpoint, quiet: float = 0.3) -> list[Message]:
    """Everything ``ep`` holds now, and what arrives until ``quiet`` seconds pass with nothing."""
    got = []
    while True:
        try:
            got.append(await ep.recv(timeout=quiet))
        except TimeoutError:
            return got


async def _drain_speaking(a: Endpoint, b: Endpoint, **beat: Any) -> list[Message]:
    """What ``b`` holds from ``a``, read while ``a``'s loop speaks (every 30 ms at most), so its pulse keeps quiet."""
    got = []
    while True:
        a.pulse("hb", **beat)
        try:
            got.append(await b.recv(timeout=0.03))
        except TimeoutError:
            return got


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "curve"])
async def test_the_pulse_speaks_for_a_blocked_loop(secure: bool, leak_guard: None) -> None:
    keys = CurveKeys.from_secret("pulse-test-secret-0123456789") if secure else None
    async with Endpoint("a", "test", curve=keys) as a, Endpoint("b", "test", curve=keys) as b:
        a.add_peer("b", b.address)  # before the pulse starts: it picks up the known peers
        assert a.start_pulse(interval=0.05, max_age=5.0)
        a.pulse("hb", epoch=3, meta={"n": 1})
        # Silence, not a blocked loop, is what the pulse answers: the loop says nothing more, so
        # the first pulse comes 1.5 intervals later (and its connection is admitted meanwhile).
        first = await b.recv(timeout=T)
        assert (first.sender, first.kind, first.epoch, first.meta) == ("a", "hb", 3, {"n": 1})
        await _drain_speaking(a, b, epoch=4, meta={"n": 2})
        rounds = a.pulse_stats.rounds if a.pulse_stats else 0
        time.sleep(1.0)  # the stall
        got = await _drain_speaking(a, b, epoch=4, meta={"n": 2})
        assert len(got) >= 5, f"only {len(got)} pulses arrived during a 1 s stall at 0.05 s intervals"
        assert {(m.sender, m.kind, m.epoch, m.meta["n"]) for m in got} == {("a", "hb", 4, 2)}
        st = a.pulse_stats
        assert st is not None and st.rounds - rounds >= 5 and st.expired == 0


async def test_the_pulse_stays_quiet_while_the_loop_speaks(leak_guard: None) -> None:
    async with Endpoint("a", "test") as a, Endpoint("b", "test") as b:
        a.add_peer("b", b.address)
        a.start_pulse(interval=0.2, max_age=5.0)
        for _ in range(50):  # 1 s of a healthy loop beating every 20 ms (the pulse waits 300 ms)
            a.pulse("hb", meta={})
            await asyncio.sleep(0.02)
        assert await _drain(b, quiet=0.1) == []
        assert a.pulse_stats is not None and a.pulse_stats.rounds == 0


async def test_the_pulse_stops_vouching_after_max_age_and_resumes_when_the_loop_speaks(leak_guard: None) -> None:
    async with Endpoint("a", "test") as a, Endpoint("b", "test") as b:
        a.add_peer("b", b.address)
        a.start_pulse(interval=0.05, max_age=0.4)
        a.pulse("hb", meta={"n": 1})
        time.sleep(1.5)  # stuck for good, as far as the pulse can tell
        st = a.pulse_stats
        assert st is not None and st.expired == 1
        # Pulses from 0.075 s to 0.4 s after the last beat, 0.05 s apart: never the whole 1.5 s.
        assert 1 <= st.rounds <= 0.4 / 0.05 + 2, st
        rounds = st.rounds
        assert 1 <= len(await _drain(b)) <= rounds
        a.pulse("hb", meta={"n": 2})  # the loop speaks again, then falls silent: pulses resume
        assert (await b.recv(timeout=T)).meta == {"n": 2}
        assert st.rounds > rounds


async def test_the_pulse_follows_the_peers_of_its_endpoint(leak_guard: None) -> None:
    async with Endpoint("a", "test") as a, Endpoint("b", "test") as b, Endpoint("c", "test") as c:
        a.add_peer("b", b.address)
        a.start_pulse(interval=0.05, max_age=5.0)
        a.add_peer("c", c.address)
        a.remove_peer("b")
        a.pulse("hb", meta={})
        time.sleep(0.5)
        assert len(await _drain_speaking(a, c, meta={})) >= 2
        assert await _drain(b, quiet=0.1) == []


async def test_a_pulse_connection_speaks_only_for_its_own_node(zctx: zmq.asyncio.Context) -> None:
    async with Endpoint("b", "test") as b:
        pulse = RawPeer(zctx, "x\0pulse", b.address)
        await pulse.send(encode_message(sender="y", cluster="test", kind="hb"))
        await pulse.send(encode_message(sender="x", cluster="test", kind="hb"))
        msg = await b.recv(timeout=T)
        assert (msg.sender, msg.kind) == ("x", "hb")
        assert b.drops("x\0pulse") == {"sender_mismatch": 1}
        pulse.sock.close(linger=0)


async def test_pulse_lifecycle_and_limits(leak_guard: None) -> None:
    ep = Endpoint("a", "test")
    with pytest.raises(TransportError, match="not started"):
        ep.start_pulse(interval=0.1, max_age=1.0)
    async with ep:
        with pytest.raises(ConfigError, match="interval"):
            ep.start_pulse(interval=0.0, max_age=1.0)
        with pytest.raises(ConfigError, match="max_age"):
            ep.start_pulse(interval=1.0, max_age=1.0)
        assert ep.pulse_stats is None
        ep.pulse("hb")  # before the pulse starts: nothing to do
        assert ep.start_pulse(interval=0.1, max_age=1.0) and ep.start_pulse(interval=0.1, max_age=1.0)
        ep.stop_pulse()
        ep.stop_pulse()
        ep.pulse("hb")  # after it stopped: nothing to do
        assert ep.pulse_stats is not None
    fake = FakeNetwork().endpoint("f", "test")
    async with fake:
        assert fake.start_pulse(interval=0.1, max_age=1.0) is False  # the fake's wire is the loop itself
        fake.pulse("hb")
        fake.stop_pulse()


async def test_a_dropped_connection_is_reported_at_once(leak_guard: None) -> None:
    """When a peer's sockets close (its process died), the DEALER's monitor tells us its id."""
    lost: list[str] = []
    async with Endpoint("a", "test") as a:
        b = Endpoint("b", "test")
        await b.start()
        try:
            a.on_peer_lost = lost.append
            a.add_peer("b", b.address)
            await a.send("b", "hello", timeout=T)
            assert (await b.recv(timeout=T)).kind == "hello"
        finally:
            t0 = time.monotonic()
            await b.close()
        while not lost and time.monotonic() - t0 < T:
            await asyncio.sleep(0.01)
        assert lost and lost[0] == "b", "the drop was not reported"
        assert time.monotonic() - t0 < 1.0
        a.remove_peer("b")  # closes the DEALER and its monitor with it (the leak guard checks)
