"""The liveness rules, mostly without a network: timer checks, a woken member not blaming its peers, the pulse's life."""

from __future__ import annotations

import asyncio
import threading

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.ring import Beat, Membership, Node
from p2ptrain.ring._liveness import STALL_LIMIT_TIMEOUTS, Liveness

from _ring import cluster_name, loopback_node


def _liveness(**kw: object) -> Liveness:
    opts: dict[str, object] = {"interval": 0.25, "failure_timeout": 2.0, "stall_limit": None, "name": "n", "stats": {}}
    opts.update(kw)
    return Liveness(**opts)  # type: ignore[arg-type]


def test_the_stall_limit_defaults_to_ten_failure_timeouts_and_is_checked() -> None:
    assert _liveness().stall_limit == STALL_LIMIT_TIMEOUTS * 2.0 == 20.0
    assert _liveness(stall_limit=0).stall_limit == 0  # the pulse off
    assert _liveness(stall_limit=2.0).stall_limit == 2.0
    with pytest.raises(ConfigError, match=r"stall_limit \(1.0s\) must be 0 \(no pulse\) or at least the failure timeout"):
        _liveness(stall_limit=1.0)
    with pytest.raises(ConfigError, match="must exceed two heartbeat intervals"):
        _liveness(failure_timeout=0.5)
    with pytest.raises(ConfigError, match="heartbeat_interval must be > 0"):
        _liveness(interval=0)


def test_a_member_that_wakes_from_a_long_stall_still_holds_its_peers_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 3 of ``_liveness``: the peers' heartbeats waited unread in the socket; the stall is not theirs."""
    t = [1000.0]
    monkeypatch.setattr("p2ptrain.ring._heartbeat.time.monotonic", lambda: t[0])
    stats: dict[str, int] = {}
    live = _liveness(stats=stats)
    m = Membership("a", 1, failure_timeout=2.0)
    beat = Beat(0, ("b",), ("a", "b"), 7)
    m.on_beat("b", beat, live.now())
    m.tick(live.now())
    assert m.view.members == ("a", "b")
    t[0] += 3 * 2.0  # the loop was blocked for three failure timeouts
    now = live.now()  # the first look after the stall, as every handler of the node starts with
    assert m.alive(now) == {"a", "b"} and m.tick(now) is None and m.view.members == ("a", "b")
    assert stats["loop_stalls"] == 1
    m.on_beat("b", beat, now)  # what waited in the socket is read
    for _ in range(7):  # then the loop runs normally and b is silent for 1.75 s: still alive
        t[0] += 0.25
        assert "b" in m.alive(live.now())
    for _ in range(2):  # silent for 2.25 s, past the failure timeout: dead
        t[0] += 0.25
    assert m.alive(live.now()) == {"a"}


def _pulse_threads(node: Node) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"p2ptrain-pulse-{node.node_id}" and t.is_alive()]


async def test_the_pulse_lives_as_long_as_the_heartbeat_task() -> None:
    """Nobody beats for a node whose heartbeat task is gone, so its pulse must not vouch for it either."""
    node = loopback_node(cluster_name(), mdns=False)
    off = loopback_node(cluster_name(), mdns=False, stall_limit=0)
    try:
        await node.start()
        await off.start()
        assert len(_pulse_threads(node)) == 1 and _pulse_threads(off) == []
        (hb,) = [t for t in node._tasks if t.get_name().startswith("p2ptrain-hb-")]
        hb.cancel()
        await asyncio.gather(hb, return_exceptions=True)
        assert _pulse_threads(node) == []
    finally:
        await node.close()
        await off.close()


async def test_a_member_whose_reader_a_large_message_holds_does_not_find_its_peers_dead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 3 for the reader: a message over DEFER_BYTES is copied and decoded in the codec
    thread while the reader waits, and every later message (heartbeats too) waits unread
    behind it. Measured: a 140 MB replica on a quarter-core testbed device held its reader
    past the failure timeout, and the member paused with "only 1 of view 3's 4 members
    reachable", ending the job on every member."""
    import time

    import torch

    import p2ptrain.transport._base as base

    real = base.read_deferred
    hold_s = 2.5  # 2.5 failure timeouts of the shrunk ring timers

    def slow(*a: object, **kw: object) -> object:
        time.sleep(hold_s)  # a quarter-core device copying and decoding 140 MB
        return real(*a, **kw)

    monkeypatch.setattr(base, "read_deferred", slow)
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(3)]
    try:
        for x in nodes:
            await x.start()
        await asyncio.gather(*(x.wait_for_peers(2, timeout=15) for x in nodes))
        a, c = nodes[0], nodes[2]
        view = c.view
        held0 = c.endpoint.reader_held_s()
        await a.endpoint.send(c.node_id, "bulk", epoch=view.epoch, tensors=[torch.zeros(2 << 20)])  # 8 MiB
        states = []
        deadline = time.monotonic() + hold_s + 2.0
        while time.monotonic() < deadline:
            states.append((c.state, c.view))
            await asyncio.sleep(0.05)
        assert c.endpoint.reader_held_s() - held0 > hold_s / 2  # the message did hold the reader
        assert all(st.name != "PAUSED" and v == view for st, v in states), {s for s, _ in states}
        assert all(x.view == view for x in nodes)
    finally:
        for x in nodes:
            await x.close()


def test_a_hold_counts_past_its_grace() -> None:
    from p2ptrain.transport._base import HELD_GRACE_S, _held_part

    assert _held_part(HELD_GRACE_S / 2) == 0.0  # a message's normal cost
    assert _held_part(HELD_GRACE_S + 1.5) == pytest.approx(1.5)  # the clock caps a run of holds
