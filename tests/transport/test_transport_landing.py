"""Receive into the destination (``expect``): pieces land in place, in any order, and a
malformed or mismatched piece never touches the destination."""

from __future__ import annotations

import pytest
import torch
import zmq.asyncio

from p2ptrain._errors import ConfigError
from p2ptrain.transport import BaseEndpoint, Endpoint, FakeNetwork, Limits, encode_message

from conftest import RawPeer

T = 10.0
LIMITS = Limits(frame_bytes=4096)  # small frames: every piece below spans several


async def _fake_pair() -> tuple[BaseEndpoint, BaseEndpoint, FakeNetwork]:
    net = FakeNetwork()
    a, b = net.endpoint("a", "c", limits=LIMITS), net.endpoint("b", "c", limits=LIMITS)
    for ep, other in ((a, "b"), (b, "a")):
        await ep.start()
        ep.add_peer(other, f"fake://{other}")
    return a, b, net


@pytest.mark.parametrize("size", [3, 1000, (1 << 19) + 3])  # inline, and off the loop in the codec thread (> 2 MiB)
async def test_pieces_land_added_or_copied_in_any_order(size: int) -> None:
    a, b, _ = await _fake_pair()
    dest = torch.ones(2 * size)
    first, second = dest[:size], dest[size:]
    b.expect("p", epoch=3, tag=[0, 1], sender="a", into=first, add=True)
    b.expect("p", epoch=3, tag=[0, 2], sender="a", into=second, add=False)
    x, y = torch.randn(size), torch.randn(size)
    await a.send("b", "p", epoch=3, tag=[0, 2], tensors=[y], timeout=T)  # out of order
    await a.send("b", "p", epoch=3, tag=[0, 1], tensors=[x], timeout=T)
    got = [await b.recv(timeout=T) for _ in range(2)]
    assert [m.tag for m in got] == [[0, 2], [0, 1]]
    assert got[0].landed is second and got[1].landed is first and not got[0].tensors
    assert torch.equal(first, 1 + x) and torch.equal(second, y)
    # A landing is claimed once: a duplicate takes the ordinary path.
    await a.send("b", "p", epoch=3, tag=[0, 1], tensors=[x], timeout=T)
    dup = await b.recv(timeout=T)
    assert dup.landed is None and torch.equal(dup.tensors[0], x) and torch.equal(first, 1 + x)
    await a.close()
    await b.close()


async def test_a_mismatched_message_is_delivered_as_usual_and_leaves_the_destination() -> None:
    a, b, _ = await _fake_pair()
    dest = torch.zeros(100)
    b.expect("p", epoch=0, tag=1, sender="a", into=dest, add=True)
    await a.send("b", "p", tag=1, tensors=[torch.ones(99)], timeout=T)  # wrong shape
    await a.send("b", "p", tag=1, tensors=[torch.ones(100)], codec="fp16", timeout=T)  # lossy codec
    await a.send("b", "p", tag=1, tensors=[torch.ones(100, dtype=torch.float64)], timeout=T)  # wrong dtype
    for _ in range(3):
        msg = await b.recv(timeout=T)
        assert msg.landed is None and len(msg.tensors) == 1
    assert not dest.any()
    b.forget("p", epoch=0, tag=1)
    await a.send("b", "p", tag=1, tensors=[torch.ones(100)], timeout=T)
    assert (await b.recv(timeout=T)).landed is None and not dest.any()
    await a.close()
    await b.close()


async def test_only_the_expected_sender_lands() -> None:
    net = FakeNetwork()
    eps = [net.endpoint(n, "c") for n in "abc"]
    for ep in eps:
        await ep.start()
        for other in "abc":
            if other != ep.node_id:
                ep.add_peer(other, f"fake://{other}")
    a, b, c = eps
    dest = torch.zeros(10)
    b.expect("p", epoch=0, tag=0, sender="a", into=dest)
    await c.send("b", "p", tag=0, tensors=[torch.ones(10)], timeout=T)
    assert (await b.recv(timeout=T)).landed is None and not dest.any()
    await a.send("b", "p", tag=0, tensors=[torch.full((10,), 2.0)], timeout=T)
    assert (await b.recv(timeout=T)).landed is dest and torch.equal(dest, torch.full((10,), 2.0))
    for ep in eps:
        await ep.close()


async def test_truncated_frames_are_dropped_counted_and_the_landing_stays_armed() -> None:
    a, b, net = await _fake_pair()
    dest = torch.zeros(3000)
    b.expect("p", epoch=0, tag=7, sender="a", into=dest, add=True)
    frames = encode_message(sender="a", cluster="c", kind="p", tag=7, tensors=[torch.ones(3000)], limits=LIMITS)
    assert len(frames) == 4  # envelope + 3 frames of <= 4096 bytes
    assert net.deliver_raw("b", [*frames[:-1], bytes(memoryview(frames[-1]))[:-4]], identity="a")  # short last frame
    assert net.deliver_raw("b", frames[:-1], identity="a")  # a frame missing
    assert net.deliver_raw("b", [*frames, b"x" * 8], identity="a")  # one too many
    await a.send("b", "p", tag=7, tensors=[torch.full((3000,), 2.0)], timeout=T)
    msg = await b.recv(timeout=T)
    assert msg.landed is dest and torch.equal(dest, torch.full((3000,), 2.0))  # the bad ones never touched it
    assert b.drops("a") == {"frame_length": 1, "truncated": 1, "extra_frames": 1}
    await a.close()
    await b.close()


async def test_expect_validates_and_is_bounded() -> None:
    a, b, _ = await _fake_pair()
    with pytest.raises(ConfigError):
        b.expect("p", epoch=0, tag=0, sender="a", into=torch.zeros(4, 4).t())  # not contiguous
    for i in range(4096):
        b.expect("p", epoch=0, tag=i, sender="a", into=torch.zeros(1))
    with pytest.raises(ConfigError, match="forget"):
        b.expect("p", epoch=0, tag=-1, sender="a", into=torch.zeros(1))
    b.forget("p", epoch=0, tag=0)
    b.expect("p", epoch=0, tag=-1, sender="a", into=torch.zeros(1))
    await a.close()
    await b.close()


async def test_landing_over_zeromq_takes_the_frames_without_a_copy(zctx: zmq.asyncio.Context) -> None:
    async with Endpoint("me", "test", limits=LIMITS) as ep:
        evil = RawPeer(zctx, "evil", ep.address)
        dest = torch.ones(50_000)
        ep.expect("p", epoch=0, tag=[1, 2], sender="evil", into=dest, add=True)
        x = torch.randn(50_000)
        good = encode_message(sender="evil", cluster="test", kind="p", tag=[1, 2], tensors=[x], limits=LIMITS)
        await evil.send([*good[:-1], bytes(memoryview(good[-1]))[:-4]])  # malformed: dropped, counted
        await evil.send(good)
        msg = await ep.recv(timeout=T)
        assert msg.landed is dest and torch.equal(dest, 1 + x)
        assert ep.drops("evil") == {"frame_length": 1}
        # Not expected: a one-frame tensor is received as ZeroMQ's frame itself, still correct.
        await evil.send_good("test", tag=3, tensors=[torch.arange(500)], limits=LIMITS)
        msg = await ep.recv(timeout=T)
        assert msg.landed is None and torch.equal(msg.tensors[0], torch.arange(500))
