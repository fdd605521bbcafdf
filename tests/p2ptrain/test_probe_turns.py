"""Speed probes take turns only among members that share a host; separate devices probe at once."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

import pytest
import torch

import p2ptrain.plan._probe as probe_mod
from p2ptrain.plan._probe import host_key, partner, probe_in_turns, turns
from p2ptrain.ring import Collectives
from p2ptrain.zoo import mlp

from _ring import fake_ring


def test_members_of_one_host_take_turns_and_other_hosts_share_them() -> None:
    assert turns([True, True, True, False], [7, 7, 9, 11]) == [[0, 2], [1]]
    assert turns([True] * 4, [1, 2, 3, 4]) == [[0, 1, 2, 3]]  # separate devices: one turn per round
    assert turns([True] * 3, [5, 5, 5]) == [[0], [1], [2]]  # one host (the testbed): a turn each
    assert turns([False, False], [1, 2]) == []  # every figure cached: no turns at all
    assert turns([False, True, True], [1, 1, 1]) == [[1], [2]]


def test_capped_members_of_one_host_share_a_turn_while_their_quotas_leave_half_the_host() -> None:
    # hetero4 on a 2-core host: the 1.0-core device alone, the 0.5 and both 0.25 together.
    assert turns([True] * 4, [5] * 4, [1.0, 0.5, 0.25, 0.25], [2.0] * 4) == [[0], [1, 2, 3]]
    # edge4: 0.6, 0.55, 0.3, 0.1 cores: first fit from the largest.
    assert turns([True] * 4, [5] * 4, [0.6, 0.55, 0.3, 0.1], [2.0] * 4) == [[0, 2, 3], [1]]
    # Uncapped members keep a whole host busy each: a turn of their own, as before.
    assert turns([True] * 3, [5] * 3, [2.0] * 3, [2.0] * 3) == [[0], [1], [2]]
    # Two hosts pack apart, and their turns are shared.
    assert turns([True] * 4, [1, 1, 2, 2], [0.5, 0.5, 4.0, 1.0], [2.0, 2.0, 4.0, 4.0]) == [[0, 1, 2], [3]]
    # The most any member of the host reports sets its room.
    assert turns([True, True, False], [5, 5, 5], [1.0, 1.0, 8.0], [2.0, 4.0, 2.0]) == [[0, 1]]
    assert turns([False, True, True], [5] * 3, [0.1, 0.1, 0.1], [2.0] * 3) == [[1, 2]]
    # Members of one cgroup share its quota: never in one turn.
    assert turns([True] * 4, [5] * 4, [0.25] * 4, [2.0] * 4, [7, 7, 8, 9]) == [[0, 2, 3], [1]]


def test_a_turn_of_every_member_leaves_one_idle_on_a_crowded_host() -> None:
    # Two quarter cores of one host would both probe, each pinging the other busy: one waits.
    assert turns([True, True], [5, 5], [0.25, 0.25], [2.0, 2.0]) == [[0], [1]]
    assert turns([True] * 3, [5, 5, 9], [0.25, 0.25, 4.0], [2.0, 2.0, 16.0]) == [[0, 2], [1]]
    assert turns([True] * 3, [1, 2, 3], [1.0] * 3, [2.0] * 3) == [[0, 1, 2]]  # separate devices: all at once


def test_a_prober_pings_the_next_member_not_probing_in_its_turn() -> None:
    assert partner(0, [0], 4) == 1
    assert partner(1, [1, 2, 3], 4) == 0  # the others of its turn are busy: wrap to the idle one
    assert partner(3, [1, 2, 3], 4) == 0
    assert partner(2, [0, 1, 2, 3], 4) == 3  # everyone probes (separate devices): the successor
    assert partner(1, [0, 1], 2) == 0


def test_only_a_capped_cpu_member_demands_less_than_its_host(monkeypatch) -> None:
    monkeypatch.setattr(probe_mod, "affinity_cores", lambda: 2)
    monkeypatch.setattr(probe_mod, "cpu_quota", lambda: 2.0)  # a quota of every usable core caps nothing
    assert probe_mod.cpu_demand(torch.device("cpu")) == probe_mod.host_cores() and probe_mod.probe_quota(torch.device("cpu")) is None
    monkeypatch.setattr(probe_mod, "cpu_quota", lambda: None)
    assert probe_mod.cpu_demand(torch.device("cpu")) == probe_mod.host_cores()  # pinned or not: alone
    monkeypatch.setattr(probe_mod, "cpu_quota", lambda: 0.25)
    assert probe_mod.cpu_demand(torch.device("cpu")) == 0.25
    assert probe_mod.cpu_demand(torch.device("meta")) == probe_mod.host_cores()  # an accelerator member


def test_the_cgroup_key_is_stable_and_exact_in_a_float64() -> None:
    k = probe_mod.cgroup_key()
    assert k == probe_mod.cgroup_key() and 0 <= k < 1 << 48 and int(float(k)) == k


def test_the_host_key_is_stable_and_exact_in_a_float64() -> None:
    k = host_key()
    assert k == host_key() and 0 <= k < 1 << 48 and int(float(k)) == k


async def _probe_all(monkeypatch, hosts: list[int]) -> tuple[list[tuple[float, float]], list]:
    """Run every member's turns with a fake 100 ms repeat; returns the repeats' (start, end) and the figures."""
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def fake_round(self, rounds=5):
        t0 = time.perf_counter()
        time.sleep(0.1)  # long enough that concurrent turns overlap on a loaded machine
        with lock:
            spans.append((t0, time.perf_counter()))
        return 0.1

    monkeypatch.setattr(probe_mod.SpeedProbe, "round", fake_round)
    monkeypatch.setattr(probe_mod.SpeedProbe, "warm", lambda self: None)
    monkeypatch.setattr(probe_mod.SpeedProbe, "fit",
                        lambda self, busy_hop_s=0.0: probe_mod.Speed(1e-3, 0.0, 0.0, 1e-9, 0.0, busy_hop_s))
    w = mlp(seed=0, depth=2)
    async with fake_ring(len(hosts)) as (_, nodes):
        view, job = nodes[0].view, secrets.token_hex(3)
        probes = [probe_mod.SpeedProbe(w, w.layers(), w.layers(), 4, torch.device("cpu")) for _ in nodes]
        speeds = await asyncio.wait_for(asyncio.gather(*(
            probe_in_turns(n, view, Collectives(n, view=view, name=job), p, job=job, host=h)
            for n, p, h in zip(nodes, probes, hosts))), 30)
    return spans, speeds


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


async def test_separate_devices_probe_at_once_and_still_time_their_hops(monkeypatch) -> None:
    spans, speeds = await _probe_all(monkeypatch, [1, 2, 3])
    assert len(spans) == 3 * probe_mod.SPEED_ROUNDS
    assert _most_at_once(spans) == 3
    assert all(s is not None and s.busy_hop_s > 0 for s in speeds)  # every ping was answered


async def test_two_separate_devices_probe_at_once_and_answer_each_others_ping(monkeypatch) -> None:
    spans, speeds = await _probe_all(monkeypatch, [1, 2])  # each is the other's successor and predecessor
    assert len(spans) == 2 * probe_mod.SPEED_ROUNDS and _most_at_once(spans) == 2
    assert all(s is not None and s.busy_hop_s > 0 for s in speeds)


async def test_members_sharing_a_host_never_probe_together(monkeypatch) -> None:
    spans, speeds = await _probe_all(monkeypatch, [4, 4, 9])
    assert len(spans) == 3 * probe_mod.SPEED_ROUNDS
    assert _most_at_once(spans) == 2  # the third member's host is its own
    spans, _ = await _probe_all(monkeypatch, [4, 4, 4])
    assert _most_at_once(spans) == 1


async def test_capped_members_of_one_host_probe_together_and_every_ping_is_answered(monkeypatch) -> None:
    # Five quarter-core members of a 2-core host: four fit in half of it, the fifth waits.
    monkeypatch.setattr(probe_mod, "host_cores", lambda: 2)
    monkeypatch.setattr(probe_mod, "cpu_demand", lambda device: 0.25)
    keys = iter(range(1, 100))
    monkeypatch.setattr(probe_mod, "cgroup_key", lambda: next(keys))  # a cgroup each, as testbed devices have
    spans, speeds = await _probe_all(monkeypatch, [4] * 5)
    assert len(spans) == 5 * probe_mod.SPEED_ROUNDS
    assert _most_at_once(spans) == 4
    assert all(s is not None and s.busy_hop_s > 0 for s in speeds)  # idle and busy partners alike answered


def test_update_and_sum_figures_are_every_members_at_speed_one_whichever_is_first() -> None:
    # Measured on hetero4: with a 0.25-core member first in the view, its update figure
    # (7.4x the 1.0-core member's for the same work, not 4x) priced every plan's update.
    from p2ptrain.plan._agree import at_speed_one

    figures, speeds = [1.68e-8, 2.3e-9, 0.0], [1.0, 4.076, 2.0]  # the last measured nothing
    assert at_speed_one(figures, speeds) == pytest.approx(2.3e-9 * 4.076)
    # Speeds relative to another first member scale every figure alike: the same update.
    rescaled = [v / 4.076 for v in speeds]
    assert at_speed_one(figures[::-1], rescaled[::-1]) == pytest.approx(2.3e-9)
    assert at_speed_one([0.0, 0.0], [1.0, 2.0]) == 0.0
