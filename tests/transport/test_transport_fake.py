"""The in-memory network: same API and validation as the real endpoint, explicit faults."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from p2ptrain._errors import ConfigError, TransportError
from p2ptrain.transport import BaseEndpoint, Endpoint, FakeNetwork, Fault, encode_message

from conftest import failing_once

T = 5.0


async def started(net: FakeNetwork, *names: str, **kw: object) -> list[BaseEndpoint]:
    eps = [net.endpoint(n, "c", **kw) for n in names]  # type: ignore[arg-type]
    for ep in eps:
        await ep.start()
        for other in names:
            if other != ep.node_id:
                ep.add_peer(other, f"fake://{other}")
    return eps


def test_fake_and_real_endpoints_share_the_api() -> None:
    public = {n for n in dir(BaseEndpoint) if not n.startswith("_")}
    assert public <= set(dir(Endpoint))
    assert {"send", "try_send", "recv", "add_peer", "remove_peer", "drops", "stats", "address", "flush"} <= public


async def test_round_trip_through_the_real_codec_path() -> None:
    net = FakeNetwork()
    a, b = await started(net, "a", "b")
    t = torch.randn(1000)
    await a.send("b", "g", epoch=2, tag=[1, 2], meta={"k": "v"}, tensors=[t, torch.arange(3)], timeout=T)
    msg = await b.recv(timeout=T)
    assert (msg.sender, msg.kind, msg.epoch, msg.tag, msg.meta) == ("a", "g", 2, [1, 2], {"k": "v"})
    assert torch.equal(msg.tensors[0], t) and torch.equal(msg.tensors[1], torch.arange(3))
    t.fill_(0)  # the fake copies like a wire: the receiver never aliases the sender
    assert not torch.equal(msg.tensors[0], t)
    await a.send("b", "g", tensors=[torch.randn(300)], codec="int8", timeout=T)
    assert (await b.recv(timeout=T)).tensors[0].shape == (300,)
    assert a.address == "fake://a" and a.stats["b"].sent == 2
    for ep in (a, b):
        await ep.close()
        await ep.close()


async def test_validation_path_is_the_same_as_on_the_wire() -> None:
    net = FakeNetwork()
    (b,) = await started(net, "b")
    assert net.deliver_raw("b", [b"\xc1"], identity="x")
    assert net.deliver_raw("b", encode_message(sender="y", cluster="c", kind="k"), identity="x")
    assert net.deliver_raw("b", encode_message(sender="x", cluster="other", kind="k"), identity="x")
    assert net.deliver_raw("b", [msgpack.packb({"v": 1})], identity="x")
    assert net.deliver_raw("b", encode_message(sender="x", cluster="c", kind="ok"), identity="x")
    assert (await b.recv(timeout=T)).kind == "ok"
    assert b.drops("x") == {"bad_msgpack": 1, "sender_mismatch": 1, "wrong_cluster": 2}
    await b.close()


async def test_back_pressure_and_try_send() -> None:
    net = FakeNetwork()
    a, b = await started(net, "a", "b", recv_queue=2, send_queue=2)
    sent = 0
    with pytest.raises(TransportError, match="timed out"):
        for i in range(100):  # bounded
            await a.send("b", "x", tag=i, timeout=0.05)
            sent += 1
    assert sent == 2 + 2 + 1  # decoded queue + inbox + one held by the blocked reader
    assert not a.try_send("b", "hb")
    assert [(await b.recv(timeout=T)).tag for _ in range(sent)] == list(range(sent))
    assert a.try_send("b", "hb")
    with pytest.raises(TransportError, match="unknown peer"):
        await a.send("nobody", "x")
    for ep in (a, b):
        await ep.close()


async def test_drop_and_count_faults() -> None:
    net = FakeNetwork(seed=3)
    a, b = await started(net, "a", "b")
    net.inject(Fault.DROP, src="a", dst="b", count=2)
    for i in range(4):
        await a.send("b", "x", tag=i, timeout=T)
    assert [(await b.recv(timeout=T)).tag for _ in range(2)] == [2, 3]
    assert net.faults[Fault.DROP] == 2
    net.inject(Fault.DROP, probability=0.5)
    for i in range(40):
        await a.send("b", "y", tag=i, timeout=T)
    net.heal()
    await a.send("b", "end", timeout=T)
    tags = []
    while True:
        m = await b.recv(timeout=T)
        if m.kind == "end":
            break
        tags.append(m.tag)
    assert 0 < len(tags) < 40 and tags == sorted(tags)
    for ep in (a, b):
        await ep.close()


async def test_corrupt_delay_partition_and_kill() -> None:
    net = FakeNetwork()
    a, b, c = await started(net, "a", "b", "c")
    net.inject(Fault.CORRUPT, src="a", dst="b", count=1)
    await a.send("b", "bad", timeout=T)
    await a.send("b", "good", timeout=T)
    assert (await b.recv(timeout=T)).kind == "good"
    assert b.drops("a") == {"bad_msgpack": 1}

    net.inject(Fault.DELAY, src="a", dst="b", count=1, delay=0.05)
    await a.send("b", "late", timeout=T)
    await a.send("b", "early", timeout=T)
    assert [(await b.recv(timeout=T)).kind for _ in range(2)] == ["early", "late"]

    net.partition({"a"}, {"b", "c"})
    await a.send("b", "lost", timeout=T)
    await c.send("b", "kept", timeout=T)
    assert (await b.recv(timeout=T)).kind == "kept"
    net.heal()

    net.kill("c")
    await c.send("b", "ghost", timeout=T)
    await b.send("c", "into the void", timeout=T)
    with pytest.raises(TimeoutError):
        await c.recv(timeout=0.05)
    net.revive("c")
    await c.send("b", "back", timeout=T)
    assert (await b.recv(timeout=T)).kind == "back"
    assert net.faults[Fault.PARTITION] == 1 and net.faults[Fault.DROP] == 2
    for ep in (a, b, c):
        await ep.close()


async def test_fake_misuse_is_reported() -> None:
    net = FakeNetwork()
    a = net.endpoint("a", "c")
    with pytest.raises(ConfigError, match="exists"):
        net.endpoint("a", "c")
    with pytest.raises(ConfigError):
        net.inject("drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        net.inject(Fault.DROP, probability=2.0)
    await a.start()
    with pytest.raises(ConfigError, match="fake://"):
        a.add_peer("b", "tcp://127.0.0.1:1")
    await a.close()
    assert not asyncio.all_tasks() - {asyncio.current_task()}


async def test_a_bug_reading_one_message_costs_that_message_not_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import p2ptrain.transport._fake as fake_mod

    monkeypatch.setattr(fake_mod, "decode_buffers", failing_once(fake_mod.decode_buffers))
    net = FakeNetwork()
    a, b = await started(net, "a", "b")
    await a.send("b", "first", tensors=[torch.arange(4)], timeout=T)
    await a.send("b", "second", tensors=[torch.arange(4)], timeout=T)
    assert (await b.recv(timeout=T)).kind == "second"
    assert b.drops("a") == {"internal_error": 1}
    for ep in (a, b):
        await ep.close()
