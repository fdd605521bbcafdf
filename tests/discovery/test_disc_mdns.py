"""MdnsDiscovery instances in one process, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable

import pytest
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from p2ptrain._errors import ConfigError, DiscoveryError
from p2ptrain.discovery import SERVICE_TYPE, MdnsDiscovery, PeerEvent, PeerRecord, measure_convergence
from p2ptrain.discovery._interfaces import plan_interfaces
from p2ptrain.discovery._records import encode_txt, instance_label, service_name

from _disc_helpers import LOOPBACK, RES, make_record, next_event
from _wait import until

Factory = Callable[..., MdnsDiscovery]


async def test_four_nodes_find_each_other_fast(nodes: Factory, cluster: str) -> None:
    discs = [nodes(make_record(cluster, f"n{i}", port=7000 + i)) for i in range(4)]
    start = time.perf_counter()
    await asyncio.gather(*(d.start() for d in discs))
    views = await asyncio.gather(*(d.wait_for_peers(3, timeout=5.0) for d in discs))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"4 nodes converged in {elapsed:.2f} s, goal is well under 2 s"
    for i, view in enumerate(views):
        assert sorted(view) == sorted(f"n{j}" for j in range(4) if j != i)  # self excluded
        assert view[f"n{(i + 1) % 4}"] == discs[(i + 1) % 4].record
    assert discs[0].record is not None and discs[0].record.addresses == ("127.0.0.1",)
    assert discs[0].stats["found"] == 3 and discs[0].stats["malformed"] == 0


async def test_late_joiner_is_welcomed(nodes: Factory, cluster: str) -> None:
    """A node joining right after others learns of them from their welcome announcements,
    not from query answers held back by the 1 s multicast rate limit (RFC 6762 §6)."""
    early = [nodes(make_record(cluster, f"e{i}", port=7000 + i)) for i in range(3)]
    await asyncio.gather(*(d.start() for d in early))
    await asyncio.gather(*(d.wait_for_peers(2, timeout=5.0) for d in early))
    late = nodes(make_record(cluster, "late", port=7010))
    start = time.perf_counter()
    await late.start()
    assert sorted(await late.wait_for_peers(3, timeout=5.0)) == ["e0", "e1", "e2"]
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(d.wait_for_peers(3, timeout=5.0) for d in early))
    assert all(d.stats["welcomes_sent"] >= 1 for d in early)
    assert elapsed < 0.7, f"late joiner took {elapsed:.2f} s; rate-limited answers take ~1 s"


async def test_events_found_updated_lost(nodes: Factory, cluster: str) -> None:
    a = nodes(make_record(cluster, "a"))
    b = nodes(make_record(cluster, "b", port=7001))
    await a.start()
    async with a.events() as stream:
        await b.start()
        found = await next_event(stream)
        assert found == PeerEvent("found", b.record)
        # resources change: re-announced under the same name, seen as "updated"
        assert b.record is not None
        busy = dataclasses.replace(b.record, resources=dataclasses.replace(RES, gflops=3.5, battery=0.25))
        await b.update(busy)
        updated = await next_event(stream)
        assert updated.kind == "updated" and updated.record.resources.battery == 0.25
        # a late subscriber first hears of the peers already known
        async with a.events() as late:
            assert await next_event(late, timeout=0.5) == PeerEvent("found", busy)
        await b.close()  # goodbye packets
        lost = await next_event(stream)
        assert lost == PeerEvent("lost", busy)
    assert a.peers() == {}


async def test_quick_changes_and_a_change_back_end_in_the_last_state(nodes: Factory, cluster: str) -> None:
    """Updates faster than the 1 s a DNS cache keeps superseded records (RFC 6762 §10.2)."""
    observer = nodes(make_record(cluster, "obs"))
    node = nodes(make_record(cluster, "x"))
    await observer.start()
    async with observer.events() as stream:
        await node.start()
        await next_event(stream)
        assert node.record is not None
        for battery in (0.5, 0.4, 0.5, 0.4, 0.5):  # back and forth within well under 1 s
            await node.update(
                dataclasses.replace(node.record, resources=dataclasses.replace(RES, battery=battery))
            )
        await next_event(stream, where=lambda e: e.record == node.record and e.kind == "updated")
    assert observer.peers() == {"x": node.record}


async def test_restart_with_higher_incarnation_replaces(nodes: Factory, cluster: str) -> None:
    """Same id, higher incarnation, new port: one entry, replaced, never duplicated."""
    observer = nodes(make_record(cluster, "obs"))
    node = nodes(make_record(cluster, "x", port=7100, incarnation=10))
    await observer.start()
    async with observer.events() as stream:
        await node.start()
        assert (await next_event(stream)).record.port == 7100
        await node.update(make_record(cluster, "x", port=7200, incarnation=11))
        ev = await next_event(stream)
        assert ev.kind == "updated" and (ev.record.port, ev.record.incarnation) == (7200, 11)
        # a zombie of an older incarnation, announcing under the same name, does not win
        zombie_rec = make_record(cluster, "x", port=7300, incarnation=9, addresses=("127.0.0.1",))
        zombie = AsyncZeroconf(interfaces=LOOPBACK)
        try:
            await zombie.async_register_service(
                _info(zombie_rec, _props(zombie_rec)), cooperating_responders=True
            )
            await until(lambda: observer.stats["ignored_stale"] >= 1, 3.0, "stale record counted")
        finally:
            await zombie.async_close()
    assert list(observer.peers()) == ["x"] and observer.peers()["x"].port == 7200


async def test_another_device_under_this_nodes_id_is_named_not_followed(nodes: Factory, cluster: str, caplog) -> None:
    """A cloned disk image: a second device announces this node's id from another address.

    The two cannot see each other (each takes the other's announcement for its own), so
    the node says so, once, with the fix; its own announcements stay quiet."""
    me = nodes(make_record(cluster, "jetson-1", port=7100, incarnation=10))
    await me.start()
    await until(lambda: me.stats["ignored_self"] >= 1, 3.0, "its own announcement heard")
    assert me.stats["same_id_elsewhere"] == 0  # and taken for its own
    twin_rec = make_record(cluster, "jetson-1", port=7100, incarnation=12, addresses=("127.0.0.2",))
    twin = AsyncZeroconf(interfaces=LOOPBACK)
    with caplog.at_level(logging.WARNING, logger="p2ptrain.discovery._table"):
        try:
            await twin.async_register_service(_info(twin_rec, _props(twin_rec)), cooperating_responders=True)
            await until(lambda: me.stats["same_id_elsewhere"] >= 1, 3.0, "the twin counted")
        finally:
            await twin.async_close()
    warned = [r for r in caplog.records if "another device announces this node's id jetson-1" in r.getMessage()]
    # One warning per sighting; a resolve may mix the two devices' records, which can make it two.
    assert 1 <= len(warned) <= 2 and "node_id" in warned[0].getMessage() and "--node-id" in warned[0].getMessage()
    assert me.peers() == {}


async def test_other_cluster_is_ignored(nodes: Factory, cluster: str) -> None:
    observer = nodes(make_record(cluster, "obs"))
    stranger = nodes(make_record(cluster + "-other", "same-id"))
    friend = nodes(make_record(cluster, "same-id", port=7002))  # same id, other cluster: no clash
    await observer.start()
    await stranger.start()
    await until(lambda: observer.stats["ignored_other_cluster"] >= 1, 3.0, "other cluster counted")
    assert observer.other_clusters()[cluster + "-other"] == 1  # named, for a user who typed the wrong one
    await friend.start()
    view = await observer.wait_for_peers(1, timeout=3.0)
    assert view == {"same-id": friend.record}
    assert await stranger.wait_for_peers(0, timeout=0.1) == {}


async def test_browse_only(nodes: Factory, cluster: str) -> None:
    watcher = nodes(None, cluster=cluster)
    a = nodes(make_record(cluster, "a"))
    await a.start()
    await watcher.start()  # starts after the peer: its first query collects it
    assert list(await watcher.wait_for_peers(1, timeout=3.0)) == ["a"]
    assert watcher.record is None
    with pytest.raises(ConfigError, match="browse-only"):
        await watcher.update(make_record(cluster, "a"))


async def test_malformed_announcements_are_counted_not_fatal(nodes: Factory, cluster: str) -> None:
    observer = nodes(None, cluster=cluster)
    await observer.start()
    good = make_record(cluster, "good", addresses=("127.0.0.1",))
    bad_txts = {
        "missing-keys": {b"v": b"1", b"cl": cluster.encode()},
        "bad-port": _props(dataclasses.replace(good, node_id="bad-port")) | {b"port": b"99999"},
        "bad-utf8": _props(dataclasses.replace(good, node_id="bad-utf8")) | {b"fp": b"\xff\xfe"},
        # a valid record announced under another node's name (forged identity)
        "no-seq": encode_txt(dataclasses.replace(good, node_id="no-seq").to_txt()),
        "forged": _props(good),
    }
    azc = AsyncZeroconf(interfaces=LOOPBACK)
    try:
        for node_id, props in bad_txts.items():
            info = _info(dataclasses.replace(good, node_id=node_id), props)
            await azc.async_register_service(info, cooperating_responders=True)
        await until(lambda: observer.stats["malformed"] >= len(bad_txts), 3.0, "malformed counted")
        # discovery still works after them
        real = nodes(make_record(cluster, "real"))
        await real.start()
        assert list(await observer.wait_for_peers(1, timeout=3.0)) == ["real"]
    finally:
        await azc.async_close()


def _props(record: PeerRecord, seq: int = 0) -> dict[bytes, bytes]:
    return encode_txt(record.to_txt() | {"seq": str(seq)})


def _info(record: PeerRecord, props: dict[bytes, bytes]) -> AsyncServiceInfo:
    """A raw zeroconf service under a node's name, with TXT properties of our choosing."""
    return AsyncServiceInfo(
        SERVICE_TYPE,
        service_name(record.cluster, record.node_id),
        port=record.port,
        properties=props,
        server=f"{instance_label(record.cluster, record.node_id)}.local.",
        parsed_addresses=["127.0.0.1"],
    )


async def test_close_is_idempotent_and_start_after_close_fails(nodes: Factory, cluster: str) -> None:
    a = nodes(make_record(cluster, "a"))
    async with a:
        pass
    await a.close()
    with pytest.raises(DiscoveryError, match="closed"):
        await a.start()
    stream = a.events()
    assert [e async for e in stream] == []


def test_config_errors(cluster: str) -> None:
    with pytest.raises(ConfigError, match="cluster"):
        MdnsDiscovery(make_record(cluster, "a"), cluster="other", interfaces=LOOPBACK)
    with pytest.raises(ConfigError, match="cluster name"):
        MdnsDiscovery(None, cluster="", interfaces=LOOPBACK)
    with pytest.raises(ConfigError, match="not on this host"):
        MdnsDiscovery(None, cluster=cluster, interfaces=["203.0.113.9"])
    with pytest.raises(ConfigError, match="neither an IP address nor an interface"):
        MdnsDiscovery(None, cluster=cluster, interfaces=["nosuchif0"])
    with pytest.raises(ConfigError, match="::1"):
        MdnsDiscovery(None, cluster=cluster, interfaces=["::1"])
    named = MdnsDiscovery(make_record(cluster, "a"), cluster=cluster, interfaces=["lo"])
    assert named.record is not None and named.record.addresses == ("127.0.0.1",)


def test_interface_plan() -> None:
    """Interface choice is resolved without opening sockets (None = every interface)."""
    everything = plan_interfaces(None)
    assert everything.zeroconf_interfaces is InterfaceChoice.All
    assert "127.0.0.1" not in everything.announce or everything.announce == ("127.0.0.1",)
    both = plan_interfaces(["127.0.0.1", "lo"])  # an address and a name, same interface
    assert both.zeroconf_interfaces == ["127.0.0.1"] and both.announce == ("127.0.0.1",)
    assert both.ip_version is IPVersion.V4Only
    with pytest.raises(ConfigError, match="non-empty list"):
        plan_interfaces("127.0.0.1")  # type: ignore[arg-type]


async def test_measure_convergence(loopback_multicast: None) -> None:
    seconds = await measure_convergence(4)
    assert 0 < seconds < 2.0


async def test_status_names_the_clusters_it_heard_when_its_own_is_silent(
        nodes: Factory, cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A user who typed the wrong --cluster saw only "no members ... answered"."""
    from p2ptrain.cli import _status
    from p2ptrain.cli._main import build_parser

    other = nodes(make_record(cluster + "-lab", "robot-1"))
    await other.start()
    argv = ["status", "--cluster", cluster, "--interface", "127.0.0.1", "--wait", "1.0"]
    loop = asyncio.get_running_loop()
    # Exit 1: a health check could not tell an empty cluster from a full one (a walkthrough).
    assert await loop.run_in_executor(None, _status.main, build_parser().parse_args(argv)) == 1
    # (Other processes on this host's loopback may announce clusters of their own.)
    none, heard = capsys.readouterr().out.splitlines()
    assert none == f"no members of cluster {cluster!r} answered within 1.0s"
    assert heard.startswith("heard other clusters: ") and heard.endswith("; pick one with --cluster NAME")
    assert f"'{cluster}-lab' (1 member)" in heard
    assert await loop.run_in_executor(None, _status.main, build_parser().parse_args([*argv, "--json"])) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["cluster"], out["members"], out["other_clusters"][f"{cluster}-lab"]) == (cluster, [], 1)


def test_status_exits_0_when_members_answered(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The other side of exit 1 (nobody answered): a cluster that answered exits 0, text and --json."""
    from p2ptrain.cli import _status
    from p2ptrain.cli._main import build_parser

    async def heard(args: object) -> tuple[list[object], dict[str, int]]:
        return [make_record("lab", "robot-1", addresses=("127.0.0.1",))], {}

    monkeypatch.setattr(_status, "_browse", heard)
    argv = ["status", "--cluster", "lab", "--interface", "127.0.0.1", "--wait", "0.1"]
    assert _status.main(build_parser().parse_args(argv)) == 0
    assert "robot-1" in capsys.readouterr().out
    assert _status.main(build_parser().parse_args([*argv, "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["members"][0]["node"] == "robot-1"
