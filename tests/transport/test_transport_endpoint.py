"""The ZeroMQ endpoint in one process: round trips, validation on a live socket,
back-pressure, lifecycle, and the default loop as well as uvloop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from p2ptrain._errors import ConfigError, ProtocolError, TransportError
from p2ptrain.kernels import ErrorFeedback
from p2ptrain.transport import PROTOCOL_VERSION, Endpoint, Limits, encode_message
from p2ptrain.transport._deferred import DEFER_BYTES, DEFER_MAX_FRAMES, deferrable
from p2ptrain.transport._envelope import decode_envelope

from conftest import RawPeer, failing_once, until

T = 10.0  # generous per-step timeout: never hit unless something is broken


async def test_round_trip_of_many_dtypes_and_sizes(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    tensors = [torch.randn(3 << 18), torch.arange(7), torch.tensor(2.0, dtype=torch.bfloat16), torch.zeros(0, 3),
               torch.randn(64, 64).t(), torch.tensor([True, False])]
    await a.send("b", "grad", epoch=3, tag=[5, "w"], meta={"step": 5}, tensors=tensors, timeout=T)
    msg = await b.recv(timeout=T)
    assert (msg.sender, msg.kind, msg.epoch, msg.tag, msg.meta) == ("a", "grad", 3, [5, "w"], {"step": 5})
    for sent, got in zip(tensors, msg.tensors, strict=True):
        assert torch.equal(sent, got)
    st = a.stats["b"]
    assert st.sent == 1 and st.sent_bytes == msg.nbytes
    assert b.stats["a"].received == 1


async def test_messages_from_one_peer_arrive_in_order(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    for i in range(50):
        await a.send("b", "seq", tag=i, tensors=[torch.full((10,), float(i))], timeout=T)
    got = [(await b.recv(timeout=T)).tag for _ in range(50)]
    assert got == list(range(50))


async def test_send_returns_when_the_tensor_may_change(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    t = torch.zeros(1 << 20)  # 4 MiB: zero-copy frames
    await a.send("b", "x", tensors=[t], timeout=T)
    t.fill_(1.0)  # the wire is done with it: this must not show up at b
    msg = await b.recv(timeout=T)
    assert float(msg.tensors[0].abs().sum()) == 0.0


async def test_lossy_codec_with_feedback_over_the_wire(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    g = torch.randn(1 << 19)  # 2 MiB: encoded and decoded off the loop
    fb = ErrorFeedback()
    await a.send("b", "g", tensors=[g], codec="int8", feedback=fb, timeout=T)
    msg = await b.recv(timeout=T)
    assert msg.tensors[0].shape == g.shape
    assert float((msg.tensors[0] - g).abs().max()) < 0.05
    assert fb.residual is not None


async def test_try_send_and_unknown_peers(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    assert a.try_send("b", "hb", meta={"t": 1.5})
    assert (await b.recv(timeout=T)).meta == {"t": 1.5}
    with pytest.raises(TransportError, match="unknown peer 'zed'"):
        await a.send("zed", "x")
    with pytest.raises(TransportError, match="unknown peer"):
        a.try_send("zed", "x")
    with pytest.raises(ProtocolError):
        await a.send("b", "", timeout=T)


async def test_recv_timeout_is_the_builtin_timeout_error(pair: tuple[Endpoint, Endpoint]) -> None:
    a, _ = pair
    with pytest.raises(TimeoutError):
        await a.recv(timeout=0.01)


async def test_add_peer_is_idempotent_and_replaces_addresses() -> None:
    async with Endpoint("a", "t") as a, Endpoint("b", "t") as b, Endpoint("b2", "t") as b2:
        a.add_peer("b", b.address)
        a.add_peer("b", b.address)
        assert a.peers == {"b": b.address}
        await a.send("b", "one", timeout=T)
        assert (await b.recv(timeout=T)).kind == "one"
        # Same peer id, new address (a restarted node elsewhere): the old socket goes.
        b2_as_b = Endpoint("b", "t")
        async with b2_as_b:
            a.add_peer("b", b2_as_b.address)
            await a.send("b", "two", timeout=T)
            assert (await b2_as_b.recv(timeout=T)).kind == "two"
        a.remove_peer("b")
        a.remove_peer("b")
        assert a.peers == {}
        del b2


async def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="node_id"):
        Endpoint("", "c")
    with pytest.raises(ConfigError, match="host"):
        Endpoint("a", "c", host="localhost")
    with pytest.raises(ConfigError, match="port"):
        Endpoint("a", "c", port=70000)
    with pytest.raises(ConfigError, match="NUL"):
        Endpoint("\0a", "c")
    async with Endpoint("a", "c") as a:
        with pytest.raises(ConfigError, match="tcp://"):
            a.add_peer("b", "127.0.0.1:5")


async def test_bind_failure_is_a_transport_error() -> None:
    async with Endpoint("a", "c") as a:
        port = int(a.address.rsplit(":", 1)[1])
        with pytest.raises(TransportError, match="could not bind"):
            await Endpoint("b", "c", port=port).start()


async def test_not_started_and_closed_endpoints_refuse_work() -> None:
    ep = Endpoint("a", "c")
    with pytest.raises(TransportError, match="not started"):
        await ep.recv(timeout=0.01)
    await ep.close()
    await ep.close()
    with pytest.raises(TransportError, match="closed"):
        await ep.send("b", "x")


async def test_close_twice_wakes_waiters_and_leaks_nothing(leak_guard: None) -> None:
    for _ in range(3):
        async with Endpoint("a", "c") as a, Endpoint("b", "c") as b:
            a.add_peer("b", b.address)
            await a.send("b", "x", tensors=[torch.zeros(1 << 18)], codec="fp16", timeout=T)
            await a.send("b", "y", tensors=[torch.zeros(1 << 20)], timeout=T)
            await b.recv(timeout=T)
            waiter = asyncio.ensure_future(a.recv())
            await asyncio.sleep(0)  # let the waiter start waiting (ordering only, not timing)
            await a.close()
            with pytest.raises(TransportError, match="closed while waiting"):
                await waiter
            await a.close()
        await b.close()


# --- validation on a live socket ---------------------------------------------------------

BAD: list[tuple[str, Any]] = [
    ("bad_msgpack", lambda: [b"\xc1"]),
    ("wrong_version", lambda: [msgpack.packb({"v": PROTOCOL_VERSION + 1})]),
    ("wrong_cluster", lambda: encode_message(sender="evil", cluster="other", kind="x")),
    ("sender_mismatch", lambda: encode_message(sender="alice", cluster="test", kind="x")),
    ("bad_kind", lambda: [msgpack.packb({"v": 1, "c": "test", "s": "evil", "e": 0, "k": 5, "t": 0, "m": {}, "f": 1, "x": []})]),
    ("truncated", lambda: encode_message(sender="evil", cluster="test", kind="x", tensors=[torch.zeros(300_000)])[:-1]),
    ("extra_frames", lambda: [*encode_message(sender="evil", cluster="test", kind="x"), b"more"]),
    ("frame_length", lambda: [*encode_message(sender="evil", cluster="test", kind="x", tensors=[torch.zeros(4)])[:1], b"abc"]),
    ("unknown_codec", lambda: [msgpack.packb({"v": 1, "c": "test", "s": "evil", "e": 0, "k": "x", "t": 0, "m": {}, "f": 8,
                                              "x": [{"d": "float32", "s": [2], "c": "lz4", "m": {}, "n": [8]}]}), bytes(8)]),
    ("unknown_dtype", lambda: [msgpack.packb({"v": 1, "c": "test", "s": "evil", "e": 0, "k": "x", "t": 0, "m": {}, "f": 8,
                                              "x": [{"d": "complex64", "s": [1], "c": "none", "m": {}, "n": [8]}]}), bytes(8)]),
    ("length_mismatch", lambda: [msgpack.packb({"v": 1, "c": "test", "s": "evil", "e": 0, "k": "x", "t": 0, "m": {}, "f": 8,
                                                "x": [{"d": "float32", "s": [3], "c": "none", "m": {}, "n": [8]}]}), bytes(8)]),
    ("too_large", lambda: [msgpack.packb({"v": 1, "c": "test", "s": "evil", "e": 0, "k": "x", "t": 0, "m": {}, "f": 8,
                                          "x": [{"d": "float32", "s": [2**40], "c": "none", "m": {}, "n": [2**42]}]})]),
    ("envelope_too_large", lambda: [b"\x00" * (64 * 1024 + 1)]),
]


async def test_each_malformed_message_is_dropped_counted_and_good_traffic_flows(
    zctx: zmq.asyncio.Context, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2ptrain.transport")
    async with Endpoint("me", "test") as ep:
        evil = RawPeer(zctx, "evil", ep.address)
        for i, (why, make) in enumerate(BAD):
            await evil.send(make())
            await evil.send_good("test", tag=i, tensors=[torch.full((3,), float(i))])
            msg = await ep.recv(timeout=T)  # per-connection order: the bad one was handled first
            assert (msg.sender, msg.tag) == ("evil", i)
            assert torch.equal(msg.tensors[0], torch.full((3,), float(i)))
            assert ep.drops("evil").get(why) == 1, (why, ep.drops("evil"))
        assert sum(ep.drops().values()) == len(BAD)
        assert ep.stats["evil"].received == len(BAD)
        assert any("dropped from evil: wrong_cluster" in r.getMessage() for r in caplog.records)


def _big() -> list[Any]:
    """A message past DEFER_BYTES: its frames are checked, copied and decoded in the codec thread."""
    return encode_message(sender="evil", cluster="test", kind="x", tensors=[torch.arange(DEFER_BYTES // 4 + 7, dtype=torch.float32)])


BIG_BAD: list[tuple[str, Any]] = [
    ("truncated", lambda: _big()[:-1]),
    ("extra_frames", lambda: [*_big(), b"more"]),
    ("frame_length", lambda: [*_big()[:-1], b"abc"]),
]


async def test_a_large_message_is_read_off_the_loop_and_checked_as_strictly(zctx: zmq.asyncio.Context, monkeypatch) -> None:
    import p2ptrain.transport._endpoint as endpoint_mod

    deferred: list[int] = []
    take = endpoint_mod.take_frames
    monkeypatch.setattr(endpoint_mod, "take_frames", lambda env, source: deferred.append(env.nbytes) or take(env, source))
    async with Endpoint("me", "test") as ep:
        evil = RawPeer(zctx, "evil", ep.address)
        await evil.send(_big())
        msg = await ep.recv(timeout=T)
        assert torch.equal(msg.tensors[0], torch.arange(DEFER_BYTES // 4 + 7, dtype=torch.float32))
        for i, (why, make) in enumerate(BIG_BAD):
            await evil.send(make())
            await evil.send_good("test", tag=i, tensors=[torch.full((3,), float(i))])
            msg = await ep.recv(timeout=T)  # the bad one was handled first, and nothing else was lost
            assert (msg.sender, msg.tag) == ("evil", i)
            assert ep.drops("evil").get(why) == 1, (why, ep.drops("evil"))
        assert sum(ep.drops().values()) == len(BIG_BAD)
    assert len(deferred) == 1 + len(BIG_BAD) and min(deferred) >= DEFER_BYTES  # only the large ones took that path


def test_only_large_messages_in_few_frames_are_deferred() -> None:
    limits = Limits()

    def env(numel: int, frame_bytes: int) -> Any:
        frames = encode_message(sender="evil", cluster="test", kind="x", tensors=[torch.zeros(numel)], limits=limits)
        raw = msgpack.unpackb(frames[0])
        raw["f"] = frame_bytes
        return decode_envelope(msgpack.packb(raw), limits, "test")

    assert not deferrable(env(DEFER_BYTES // 4, 1 << 20))  # the plan's 4 MiB link probe stays on the loop's path
    assert deferrable(env(DEFER_BYTES // 4 + 1, 1 << 20))
    # A peer declaring 1-byte frames: never collected as millions of frame objects.
    assert not deferrable(env(DEFER_BYTES // 4 + 1, 1)) and DEFER_MAX_FRAMES < DEFER_BYTES


async def test_drop_log_is_rate_limited(zctx: zmq.asyncio.Context, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2ptrain.transport")
    async with Endpoint("me", "test") as ep:
        evil = RawPeer(zctx, "evil", ep.address)
        for _ in range(20):
            await evil.send([b"\xc1"])
        await evil.send_good("test", tag=0)
        await ep.recv(timeout=T)
        assert ep.drops("evil") == {"bad_msgpack": 20}
        assert sum("bad_msgpack" in r.getMessage() for r in caplog.records) == 1


async def test_non_utf8_identity_is_dropped(zctx: zmq.asyncio.Context) -> None:
    async with Endpoint("me", "test") as ep:
        raw = zctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.setsockopt(zmq.ROUTING_ID, b"\xff\xfe")
        raw.connect(ep.address)
        await raw.send_multipart([b"x"])
        good = RawPeer(zctx, "good", ep.address)
        await good.send_good("test", tag=1)
        await ep.recv(timeout=T)
        await until(lambda: bool(ep.drops().get("bad_identity")))  # the two connections race
        assert ep.drops() == {"bad_identity": 1}


async def test_a_libzmq_made_identity_is_dropped_quietly(zctx: zmq.asyncio.Context,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # libzmq names a connection whose routing id a reconnecting peer took over (ROUTER_HANDOVER)
    # 0x00 + 4 bytes; what still arrives on it is that peer's stale traffic (seen when a member
    # woke from SIGSTOP: "dropped from <unknown>: bad_identity" as a warning). Dropped and
    # counted, logged at debug level.
    caplog.set_level(logging.DEBUG, logger="p2ptrain.transport")
    async with Endpoint("me", "test") as ep:
        old = zctx.socket(zmq.DEALER)
        old.linger = 0
        old.setsockopt(zmq.ROUTING_ID, b"\x00k\x8bEk")
        old.connect(ep.address)
        await old.send_multipart(encode_message(sender="peer", cluster="test", kind="good", tag=0))
        good = RawPeer(zctx, "good", ep.address)
        await good.send_good("test", tag=1)
        await ep.recv(timeout=T)
        await until(lambda: bool(ep.drops()))
        assert ep.drops() == {"superseded": 1}
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert "superseded" in caplog.text


# --- back-pressure -----------------------------------------------------------------------


async def test_a_receiver_that_does_not_read_blocks_its_sender() -> None:
    size = 1 << 20  # 1 MiB messages
    async with Endpoint("rx", "t", recv_queue=2, recv_hwm=2) as rx, Endpoint("tx", "t", send_hwm=2) as tx:
        tx.add_peer("rx", rx.address)
        payload = torch.zeros(size // 4)
        sent = 0
        with pytest.raises(TransportError, match="timed out"):
            for i in range(256):  # bounded: 256 MiB at most, far beyond any queue here
                await tx.send("rx", "blob", tag=i, tensors=[payload], timeout=0.5)
                sent += 1
        # Queues (2 + 2 + 2 messages) plus kernel socket buffers: a few dozen MiB at most.
        assert 4 <= sent < 64, sent
        # The timed-out message sits in the 2-slot send queue; a heartbeat fits beside it,
        # then try_send refuses without waiting.
        extra = 0
        while extra < 100 and tx.try_send("rx", "hb", tag=extra):
            extra += 1
        assert 1 <= extra <= 2, extra
        got = [(m.kind, m.tag) for m in [await rx.recv(timeout=T) for _ in range(sent + 1 + extra)]]
        # Nothing lost or reordered while pushed back; the timed-out send is delivered late.
        assert got == [("blob", i) for i in range(sent + 1)] + [("hb", i) for i in range(extra)]


async def test_sends_that_wait_for_room_all_arrive_in_order() -> None:
    # 300 sends of 128 KiB at once to a receiver that reads late: once its inbox, both
    # sockets' queues (2 each) and the kernel's buffers are full, the rest wait in the
    # peer's own queue; each leaves as room comes, none lost, none reordered.
    async with Endpoint("rx", "t", recv_queue=2, recv_hwm=2) as rx, Endpoint("tx", "t", send_hwm=2) as tx:
        tx.add_peer("rx", rx.address)
        dealer = tx._dealers.get("rx") if tx._dealers is not None else None
        assert dealer is not None
        sending = [asyncio.create_task(tx.send("rx", "x", tag=i, tensors=[torch.full((1 << 15,), float(i))], timeout=T))
                   for i in range(300)]
        await until(lambda: len(dealer.queue) > 100, T, "the sends to wait for room")
        assert tx.try_send("rx", "hb") is False  # it may not overtake them
        got = [await rx.recv(timeout=T) for _ in range(300)]
        await asyncio.wait_for(asyncio.gather(*sending), T)
        assert [m.tag for m in got] == list(range(300))
        assert all(torch.equal(m.tensors[0], torch.full((1 << 15,), float(m.tag))) for m in got)
        assert not dealer.queue


async def test_a_send_that_times_out_waiting_for_room_is_withdrawn() -> None:
    # A dead peer: its DEALER's queue (1) fills, later sends wait and time out. Each one
    # that timed out leaves the queue with its tensors: a caller that keeps sending to a
    # peer that never answers holds no memory for it.
    async with Endpoint("gone", "t") as gone:
        dead = gone.address
    async with Endpoint("tx", "t", send_hwm=1) as tx:
        tx.add_peer("b", dead)
        dealer = tx._dealers.get("b") if tx._dealers is not None else None
        assert dealer is not None
        while tx.try_send("b", "fill"):
            pass
        big = torch.zeros(1 << 18)
        for i in range(5):
            with pytest.raises(TransportError, match="queue stayed full"):
                await tx.send("b", "late", tag=i, tensors=[big], timeout=0.05)
        await asyncio.sleep(0)  # the withdrawals' callbacks
        assert not dealer.queue


# --- loops -------------------------------------------------------------------------------


async def _exchange() -> None:
    async with Endpoint("a", "t") as a, Endpoint("b", "t") as b:
        a.add_peer("b", b.address)
        await a.send("b", "x", tensors=[torch.arange(1 << 18)], timeout=T)
        assert torch.equal((await b.recv(timeout=T)).tensors[0], torch.arange(1 << 18))


def test_works_under_uvloop_and_default_loop() -> None:
    uvloop = pytest.importorskip("uvloop")
    for make_loop in (uvloop.new_event_loop, asyncio.SelectorEventLoop):
        loop = make_loop()  # not asyncio.Runner: that is 3.11+, and the suite runs on 3.10
        try:
            loop.run_until_complete(_exchange())
        finally:
            loop.close()


async def test_several_endpoints_per_process_do_not_share_state() -> None:
    eps = [Endpoint(f"n{i}", "t", limits=Limits(frame_bytes=1 << 16)) for i in range(4)]
    for ep in eps:
        await ep.start()
    try:
        for src in eps:
            for dst in eps:
                if src is not dst:
                    src.add_peer(dst.node_id, dst.address)
                    await src.send(dst.node_id, "hi", tensors=[torch.arange(100_000)], timeout=T)
        for ep in eps:
            senders = sorted([(await ep.recv(timeout=T)).sender for _ in range(3)])
            assert senders == sorted(e.node_id for e in eps if e is not ep)
    finally:
        for ep in eps:
            await ep.close()


async def test_flush_and_linger_let_goodbyes_leave() -> None:
    async with Endpoint("rx", "t") as rx:
        tx = Endpoint("tx", "t")
        await tx.start()
        tx.add_peer("rx", rx.address)
        for i in range(10):  # within the send queue (16) even before the connection is up
            assert tx.try_send("rx", "bye", tag=i)
        assert await tx.flush(timeout=T)
        await tx.send("rx", "last", timeout=T)
        await tx.close(linger=T)  # returns once the queue is empty, long before T
        kinds = [(await rx.recv(timeout=T)).kind for _ in range(11)]
        assert kinds == ["bye"] * 10 + ["last"]


async def test_flush_times_out_towards_a_dead_peer() -> None:
    async with Endpoint("gone", "t") as gone:
        address = gone.address
    async with Endpoint("tx", "t") as tx:
        tx.add_peer("gone", address)
        assert tx.try_send("gone", "hb")  # queued while ZeroMQ keeps reconnecting
        assert not await tx.flush(timeout=0.05)


async def test_a_bug_reading_one_message_costs_that_message_not_the_reader(
        pair: tuple[Endpoint, Endpoint], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import p2ptrain.transport._endpoint as endpoint_mod

    monkeypatch.setattr(endpoint_mod, "decode_buffers", failing_once(endpoint_mod.decode_buffers))
    a, b = pair
    await a.send(b.node_id, "first", tensors=[torch.arange(4)], timeout=5)
    await a.send(b.node_id, "second", tensors=[torch.arange(4)], timeout=5)
    assert (await b.recv(timeout=5)).kind == "second"
    assert b.drops(a.node_id) == {"internal_error": 1}
    assert "unexpected error reading a message" in caplog.text
