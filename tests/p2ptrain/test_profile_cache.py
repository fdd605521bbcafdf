"""The profile cache: what its key sees, how it survives bad files, and that a warm job skips profiling."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

import p2ptrain.plan._agree as agree_mod
import p2ptrain.plan._cache as cache_mod
import p2ptrain.plan._probe as probe_mod
import p2ptrain.plan._together as together_mod
from p2ptrain import JobService, JobSpec
from p2ptrain.plan import (
    CHECK_JOBS,
    CORRECTION_LIMITS,
    PROFILE_CACHE_ENV,
    REPROFILE_ENV,
    STALE_RATIO,
    LayerCost,
    LocalProfile,
    ProfileCache,
    agree_on_plan,
    default_profile_cache,
    device_fingerprint,
    profile_key,
)
from p2ptrain.zoo import mlp, tinygpt

from _ring import cluster_name, fake_ring, loopback_node


def _x(w, mb: int = 4):
    return w.split(w.batch(list(range(mb))))[0]


def _profile(k: float = 1.0, n: int = 2) -> LocalProfile:
    return LocalProfile(tuple(LayerCost(1e-4 * k, 2e-4 * k, 100, 40, 80) for _ in range(n)), 1e-3 * k, 1e-4, 1e-9)


def test_key_follows_structure_batch_device_and_torch_not_weights(monkeypatch) -> None:
    a, b = mlp(seed=0), mlp(seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    key = profile_key(a.layers(), _x(a))
    assert profile_key(b.layers(), _x(b)) == key  # other weights, same key
    deeper = mlp(seed=0, depth=3)
    assert profile_key(deeper.layers(), _x(deeper)) != key
    assert profile_key(a.layers(), _x(a, 8)) != key  # another micro-batch
    assert profile_key(a.layers(), _x(a), optimizer="sgd") != key
    assert profile_key(a.layers(), _x(a), device="other-device") != key
    fp = device_fingerprint()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert device_fingerprint() != fp and profile_key(a.layers(), _x(a)) != key
    monkeypatch.undo()
    monkeypatch.setattr(cache_mod, "cpu_quota", lambda: 0.25)
    assert device_fingerprint() != fp  # a testbed's CPU cap is another device


def test_round_trip_bounded_and_newest_kept(tmp_path) -> None:
    cache = ProfileCache(tmp_path, max_entries=3)
    assert cache.get("k0") is None
    for i in range(5):
        cache.put(f"k{i}", _profile(i + 1))
        time.sleep(0.002)  # distinct store stamps
    assert cache.keys() == ["k4", "k3", "k2"]
    assert cache.get("k0") is None and cache.get("k4") == _profile(5)
    assert json.loads((tmp_path / "profiles.json").read_text())["version"] == 3
    assert not list(tmp_path.glob(".profiles-*.tmp"))  # no temporary left behind


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"version": 3, "entries": {"k": {"profile": {"costs": []}}}}',
                                  b'{"version": 3, "entries": {"k": {"profile": {"costs": [{"fwd_s": -1}]}}}}',
                                  b'{"version": 3, "entries": {"k": {"profile": {"costs": [{"fwd_s": 1, "bwd_s": 1, '
                                  b'"param_bytes": 1, "act_bytes": 1}], "per_sample_s": NaN, "fixed_s": 0, '
                                  b'"update_s": 0}}}}',
                                  b"\xff\xfe", b"[" * 100_000])
def test_a_corrupt_file_or_entry_is_ignored_and_rewritten(tmp_path, body) -> None:
    (tmp_path / "profiles.json").write_bytes(body)
    cache = ProfileCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", _profile())
    assert cache.get("k") == _profile()


@pytest.mark.parametrize(("version", "typical", "read"), [(3, 1.3, True), (3, 0.5, False), (2, 1.3, False), (1, 1.3, False)])
def test_median_era_files_and_a_typical_under_one_are_measured_again(tmp_path, version, typical, read,
                                                                      caplog) -> None:
    # Version 1 held median speeds; version 2 wall-clock speeds of capped members; version 3
    # their quota seconds, with ``typical`` beside them.
    entry = {**_profile().to_json(), "typical": typical}
    (tmp_path / "profiles.json").write_text(json.dumps({"version": version,
                                                        "entries": {"k": {"stored": time.time(), "profile": entry}}}))
    with caplog.at_level(logging.INFO, logger="p2ptrain.plan._cache"):
        got = ProfileCache(tmp_path).get("k")
    assert (got is not None) == read
    assert got is None or got.typical == typical
    if version < 3:  # an older release's file is an upgrade, not damage: said, without a warning
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "another p2ptrain release" in caplog.text


def test_an_oversized_file_is_not_parsed(tmp_path) -> None:
    (tmp_path / "profiles.json").write_bytes(b" " * (5 << 20))
    assert ProfileCache(tmp_path).get("k") is None


def test_env_turns_the_cache_off_or_moves_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(PROFILE_CACHE_ENV, "off")
    assert default_profile_cache(tmp_path) is None
    monkeypatch.setenv(PROFILE_CACHE_ENV, str(tmp_path / "elsewhere"))
    cache = default_profile_cache(tmp_path)
    assert cache is not None and cache.directory == tmp_path / "elsewhere"
    monkeypatch.delenv(PROFILE_CACHE_ENV)
    cache = default_profile_cache(tmp_path)
    assert cache is not None and cache.directory == tmp_path


def _fixed_measurements(monkeypatch) -> list[int]:
    """Deterministic local figures and links; returns the list that counts local measurements."""
    calls: list[int] = []

    def profile_local(on, x):
        return [LayerCost(1e-4 * (i + 1), 2e-4, 4096, 256, 512) for i in range(len(on))]

    def fit(self, busy_hop_s=0.0):
        calls.append(1)
        return probe_mod.Speed(2e-3, 1e-4, 0.0, 1e-9, 0.0, busy_hop_s)

    async def link(node, view, nbytes=0, *, job=""):
        return 1e8, 1e-4, 0.0

    monkeypatch.setattr(agree_mod, "_profile_local", profile_local)
    monkeypatch.setattr(probe_mod.SpeedProbe, "warm", lambda self: None)
    monkeypatch.setattr(probe_mod.SpeedProbe, "round", lambda self, rounds=5: 0.0)
    monkeypatch.setattr(probe_mod.SpeedProbe, "fit", fit)

    async def together(coll, on, x, solo_s, *, pool=None, warm=True, window=None, remembered=None):
        await coll.barrier()
        return 1.0

    monkeypatch.setattr(agree_mod, "probe_together", together)
    monkeypatch.setattr(agree_mod, "measure_link", link)
    return calls


async def _agree_all(nodes, w, caches, **kw):
    view, job = nodes[0].view, secrets.token_hex(3)
    return await asyncio.wait_for(asyncio.gather(*(
        agree_on_plan(n, view, w, global_batch=16, micro_batches=4, cache=c, job=job, **kw)
        for n, c in zip(nodes, caches))), 20)


async def test_a_warm_job_skips_profiling_and_plans_as_the_cold_one(tmp_path, monkeypatch) -> None:
    calls = _fixed_measurements(monkeypatch)
    w = mlp(seed=0, depth=3)
    async with fake_ring(3) as (_, nodes):
        caches = [ProfileCache(tmp_path / n.node_id) for n in nodes]
        cold = await _agree_all(nodes, w, caches)
        assert len(calls) == 3
        # Each member's hop while it probed went into its cache entry and its device.
        entries = [c.get(c.keys()[0]) for c in caches]
        assert all(e is not None and e.busy_hop_s > 0 for e in entries)
        assert all(d.hop_s >= 1e-4 for d in cold[0][2])
        warm = await _agree_all(nodes, mlp(seed=5, depth=3), caches)  # new weights: still warm
        assert len(calls) == 3
        assert [r[0] for r in warm] == [r[0] for r in cold] and cold[0][0] == cold[1][0] == cold[2][0]
        assert [r[1:4] for r in warm] == [r[1:4] for r in cold]
        # Each member names the entry of its figures, stored cold and read warm (the job checks them).
        assert [(r.entry.node_id, r.entry.key, r.entry.checked) for r in warm if r.entry] == [
            (n.node_id, c.keys()[0], 0.0) for n, c in zip(nodes, caches)]
        assert [r.entry for r in cold] == [r.entry for r in warm]
        await _agree_all(nodes, w, caches, reprofile=True)
        assert len(calls) == 6
        monkeypatch.setenv(REPROFILE_ENV, "1")
        await _agree_all(nodes, w, caches)
        assert len(calls) == 9
        monkeypatch.delenv(REPROFILE_ENV)
        await _agree_all(nodes, mlp(seed=0, depth=4), caches)  # another model: measured
        assert len(calls) == 12


def test_the_jobs_checks_correct_the_figures_only_on_the_whole_model_and_within_limits() -> None:
    base = _profile(n=3)
    assert base.correction(3) == 1.0  # no job ran on them yet
    assert replace(base, checks=(0.5, 0.6, 2.0), checked_on="0-2").correction(3) == pytest.approx(0.6)
    assert replace(base, checks=(0.5,), checked_on="0-1").correction(3) == 1.0  # a part of the model
    assert replace(base, checks=(0.5,), checked_on="median 0-2").correction(3) == 1.0  # others' ratios
    assert replace(base, checks=(0.01,), checked_on="0-2").correction(3) == CORRECTION_LIMITS[0]
    assert replace(base, checks=(19.0,), checked_on="0-2").correction(3) == CORRECTION_LIMITS[1]


async def test_a_warm_job_plans_on_what_the_jobs_on_the_figures_measured(tmp_path, monkeypatch) -> None:
    # A cached probe that read a device at half its speed stays cached; the jobs on it
    # measured the device computing in half the priced time, and the next plan believes them.
    _fixed_measurements(monkeypatch)
    w = mlp(seed=0, depth=3)
    async with fake_ring(3) as (_, nodes):
        caches = [ProfileCache(tmp_path / n.node_id) for n in nodes]
        cold = await _agree_all(nodes, w, caches)
        key = caches[1].keys()[0]
        entry = caches[1].get(key)
        assert entry is not None
        caches[1].put(key, replace(entry, checks=(0.5, 0.5), checked_on=f"0-{len(entry.costs) - 1}"), refresh=False)
        warm = await _agree_all(nodes, w, caches)
    speeds = [[d.speed for d in a.devices] for a in (cold[0], warm[0])]
    assert speeds[1][1] == pytest.approx(2 * speeds[0][1])
    assert speeds[1][0] == speeds[0][0] and speeds[1][2] == speeds[0][2]  # the others' figures as they were
    assert [a.entry.applied for a in warm if a.entry] == [1.0, 0.5, 1.0]
    stored = caches[1].get(key)
    assert stored is not None and stored.per_sample_s == entry.per_sample_s  # the entry keeps what was measured


async def test_real_measurements_round_trip_through_the_cache(tmp_path, monkeypatch) -> None:
    """One member, real probes: the warm run reads back exactly what the cold one measured, at once."""
    profiled: list[int] = []
    real = agree_mod.profile_layers
    monkeypatch.setattr(agree_mod, "profile_layers", lambda *a, **k: profiled.append(1) or real(*a, **k))
    w = tinygpt(seed=0, n_layer=1, n_embd=16, n_head=2, block_size=16)
    cache = ProfileCache(tmp_path)
    async with fake_ring(1) as (_, nodes):
        view = nodes[0].view
        t_cold: dict[str, float] = {}
        cold = await agree_on_plan(nodes[0], view, w, global_batch=8, micro_batches=2, cache=cache, timings=t_cold)
        t_warm: dict[str, float] = {}
        warm = await agree_on_plan(nodes[0], view, w, global_batch=8, micro_batches=2, cache=cache, timings=t_warm)
    assert profiled == [1] and t_cold["cached"] == 0.0 and t_warm["cached"] == 1.0
    assert warm == cold  # plan, reference costs, devices, cost model, the entry of its figures: bit for bit
    assert warm.entry is not None and warm.entry.key in cache.keys() and warm.entry.node_id == nodes[0].node_id
    assert t_warm["local_s"] + t_warm["probe_s"] < 0.2 < t_cold["local_s"] + t_cold["probe_s"]


async def test_a_second_job_on_the_ring_takes_every_members_figures_from_its_state_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(PROFILE_CACHE_ENV, raising=False)  # the node's state_dir decides
    measured: list[int] = []
    real = probe_mod.SpeedProbe.fit
    monkeypatch.setattr(probe_mod.SpeedProbe, "fit", lambda self, *a: measured.append(1) or real(self, *a))
    monkeypatch.setattr(probe_mod, "SPEED_PROBE_S", 0.05)  # the figures' quality is not under test
    cl = cluster_name()
    nodes = [loopback_node(cl, state_dir=tmp_path / str(i)) for i in range(3)]
    plans: list = []
    try:
        for n in nodes:
            await n.start()
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        spec = JobSpec(model="mlp", strategy="pipeline", global_batch=24, micro_batches=4, steps=2, seed=1)
        for _ in range(2):
            services = [JobService(n, on_plan=plans.append) for n in nodes]
            serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
            await asyncio.wait_for(services[0].submit(spec), 60)
            await asyncio.wait_for(asyncio.gather(*serving), 30)
            assert len(measured) == 3  # the first job measured on each member, the second on none
    finally:
        for n in nodes:
            await n.close()
    assert all(ProfileCache(tmp_path / str(i)).keys() for i in range(3))
    assert plans[3] == plans[4] == plans[5]


async def test_two_jobs_that_contradict_a_members_cached_figures_drop_them_and_the_next_job_measures(
        tmp_path, monkeypatch) -> None:
    # The figures a device measured once go stale when the device or its host changes
    # (measured: a host 35% faster an hour later, predictions 25-33% low for every warm job).
    monkeypatch.delenv(PROFILE_CACHE_ENV, raising=False)  # the node's state_dir decides
    monkeypatch.setattr(probe_mod, "SPEED_PROBE_S", 0.05)
    cl = cluster_name()
    nodes = [loopback_node(cl, state_dir=tmp_path / str(i)) for i in range(3)]
    caches = [ProfileCache(tmp_path / str(i)) for i in range(3)]
    spec = JobSpec(model="tinygpt", strategy="pipeline", global_batch=24, micro_batches=4, steps=10, seed=1)

    async def job() -> None:
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        await asyncio.wait_for(services[0].submit(spec), 60)
        await asyncio.wait_for(asyncio.gather(*serving), 30)

    try:
        for n in nodes:
            await n.start()
        await asyncio.gather(*(n.wait_for_peers(2, timeout=15) for n in nodes))
        await job()
        entries = [c.get(c.keys()[0]) for c in caches]
        # The job noted, on each member whose stage carried half the model or more, what its
        # compute took over its figures' price (the cost model's own error here).
        assert all(e is not None and e.checked >= 0 for e in entries)
        key, first = caches[0].keys()[0], entries[0]
        assert first is not None
        # Member 0's figures now say it is six times faster than it is (beyond what a busy host's
        # noise does to a ratio, within CHECKED_RANGE), so the next plan runs the whole model on it;
        # say the first jobs found them right on those terms (the layers they priced).
        whole = f"0-{len(first.costs) - 1}"
        doctored = replace(first, costs=tuple(replace(c, fwd_s=c.fwd_s / 6, bwd_s=c.bwd_s / 6) for c in first.costs),
                           per_sample_s=first.per_sample_s / 6, fixed_s=first.fixed_s / 6,
                           checks=(first.checked if first.checked_on == whole else 1.0,) * CHECK_JOBS,
                           checked_on=whole)
        caches[0].put(key, doctored)

        async def written(done: Callable[[], bool]) -> None:
            for _ in range(50):  # notes and drops are written off the loop
                if done():
                    return
                await asyncio.sleep(0.1)

        await job()  # member 0 carries the model now: one job far off is noted, not yet believed
        await written(lambda: (e := caches[0].get(key)) is not None and e.off > 0)
        struck = caches[0].get(key)
        assert struck is not None and struck.off > STALE_RATIO * struck.checked and struck.checks == doctored.checks
        await job()  # a second in a row: the figures are dropped
        await written(lambda: not caches[0].keys())
        assert caches[0].keys() == []
        await job()  # member 0 measures again and stores what it measured (not its doctored figures)
        again = caches[0].get(key)
        assert again is not None and again.per_sample_s != doctored.per_sample_s
    finally:
        for n in nodes:
            await n.close()


def test_an_entry_older_than_the_max_age_is_measured_again(tmp_path) -> None:
    cache_mod.ProfileCache(tmp_path).put("k", _profile())
    assert cache_mod.ProfileCache(tmp_path).get("k") == _profile()
    time.sleep(0.01)
    assert cache_mod.ProfileCache(tmp_path, max_age_s=0.005).get("k") is None  # stale: profile afresh


def test_the_probes_spread_is_kept_and_older_entries_read_as_unknown(tmp_path) -> None:
    full = LocalProfile(_profile().costs, 1e-3, 1e-4, 1e-9, speed_cv=0.07, reduce_s=2e-10)
    cache = ProfileCache(tmp_path)
    cache.put("new", full)
    assert cache.get("new") == full
    body = json.loads(cache.path.read_text())
    for key in ("speed_cv", "reduce_s"):  # as stored before these figures existed
        del body["entries"]["new"]["profile"][key]
    cache.path.write_text(json.dumps(body))
    assert cache.get("new") == LocalProfile(full.costs, 1e-3, 1e-4, 1e-9)


def test_shared_host_shares_round_trip_and_bad_ones_are_measured_again(tmp_path) -> None:
    shares = {f"setting {i}": 0.5 + i / 100 for i in range(cache_mod.MAX_SETTINGS + 2)}
    kept = _profile().remembering(shares)
    assert [k for k, _ in kept.together] == list(shares)[-cache_mod.MAX_SETTINGS:]  # the newest kept
    cache = ProfileCache(tmp_path)
    cache.put("k", kept)
    assert cache.get("k") == kept
    for bad in ({"s": 1.5}, {"s": 0}, {"s": "x"}, ["s", 0.5], {f"s{i}": 0.5 for i in range(cache_mod.MAX_SETTINGS + 1)}):
        body = json.loads(cache.path.read_text())
        body["entries"]["k"]["profile"]["together"] = bad
        cache.path.write_text(json.dumps(body))
        assert cache.get("k") is None, bad


def test_a_new_share_keeps_the_entrys_age(tmp_path, monkeypatch) -> None:
    """Storing a share met later does not make day-old speed figures young again."""
    cache = ProfileCache(tmp_path, max_age_s=100.0)
    now = [1000.0]
    monkeypatch.setattr(cache_mod.time, "time", lambda: now[0])
    cache.put("k", _profile())
    now[0] += 60
    cache.put("k", _profile().remembering({"s": 0.9}), refresh=False)
    assert cache.get("k") == _profile().remembering({"s": 0.9})
    now[0] += 60  # 120 s after the figures were measured
    assert cache.get("k") is None
    cache.put("new", _profile(), refresh=False)  # nothing stored under it: stamped now
    assert cache.get("new") == _profile()


async def test_a_warm_job_on_a_shared_host_takes_its_shares_from_the_caches(tmp_path, monkeypatch) -> None:
    """Two members of one host, real probes: the cold job times the together pass and every member
    keeps its share; the next job computes nothing before its links and plans alike."""
    passes: list[float] = []
    real = together_mod.speed_probe
    monkeypatch.setattr(together_mod, "speed_probe", lambda *a: passes.append(a[-1]) or real(*a))
    # Each member its own model, as each process has: the together pass computes on every
    # member at once, and two threads' backward passes into one module's gradients crash torch.
    ws = [tinygpt(seed=0, n_layer=1, n_embd=16, n_head=2, block_size=16) for _ in range(2)]
    async with fake_ring(2) as (_, nodes):
        caches = [ProfileCache(tmp_path / n.node_id) for n in nodes]
        runs, counts = [], []
        for _ in range(2):
            view, job = nodes[0].view, secrets.token_hex(3)
            runs.append(await asyncio.wait_for(asyncio.gather(*(
                agree_on_plan(n, view, w, global_batch=8, micro_batches=2, cache=c, job=job)
                for n, c, w in zip(nodes, caches, ws))), 60))
            counts.append(len(passes))
    assert counts[0] > 0 and counts[1] == counts[0]  # the cold job passed together, the warm one did not
    for c in caches:
        (entry,) = [c.get(k) for k in c.keys()]
        assert len(entry.together) == 1 and 0 < entry.together[0][1] <= 1
    assert runs[1][0][3].shared_speed == runs[0][0][3].shared_speed  # the same shares priced
    assert runs[1][0][0].samples_per_s == pytest.approx(runs[0][0][0].samples_per_s, rel=0.5)


def test_the_speed_fit_takes_the_fastest_of_its_repeats_and_states_their_spread(monkeypatch) -> None:
    monkeypatch.setattr(probe_mod, "SPEED_PROBE_S", 0.05)
    w = mlp(seed=0, depth=2)
    calls: list[float] = []
    real = probe_mod.timed_passes

    def passes(layers, x, duration_s):
        n, wall, cpu_s, thread_s = real(layers, x, duration_s)
        wall *= 3.0 if len(calls) == 4 else 1.0  # one repeat hit by someone's load (after two warm-up passes)
        calls.append(wall / n)
        return n, wall, cpu_s, thread_s

    monkeypatch.setattr(probe_mod, "timed_passes", passes)
    monkeypatch.setattr(probe_mod, "probe_quota", lambda device: None)  # an uncapped member: the wall clock
    speed = probe_mod.speed_fit(probe_mod.SpeedProbe(w, w.layers(), w.layers(), 8, torch.device("cpu")))
    assert len(calls) == 2 + 2 * probe_mod.SPEED_ROUNDS  # a warm-up of each size, then the rounds
    assert speed.per_sample_s > 0 and speed.fixed_s >= 0 and speed.cv > 0.2  # the slow repeat shows in the spread
    big = calls[2::2]
    # Noise only slows a repeat: the fastest is the capacity, the slow one only widens the spread.
    assert speed.per_sample_s * 8 + speed.fixed_s == pytest.approx(min(big))
    assert speed.update_s > 0 and speed.reduce_s > 0 and speed.busy_hop_s == 0.0
    assert speed.typical == pytest.approx(statistics.median(big) / min(big)) and speed.typical > 1


def test_a_capped_member_is_fitted_on_its_quota_seconds_and_its_clock_sets_the_slowdown(monkeypatch) -> None:
    w = mlp(seed=0, depth=2)
    # The clock's seconds: the warm-up's two passes, then big, small in each round.
    walls = iter([0.1, 0.1, 0.030, 0.012, 0.050, 0.011, 0.034, 0.010, 0.090, 0.016, 0.032, 0.012])

    def passes(layers, x, duration_s):
        # Quarter-core quota: 6 ms of CPU per big pass, 2 of it per small pass, whatever the clock says.
        big = x.shape[0] == 8
        return 1, next(walls), (6e-3 if big else 2e-3), (5e-3 if big else 1.5e-3)

    monkeypatch.setattr(probe_mod, "timed_passes", passes)
    monkeypatch.setattr(probe_mod, "probe_quota", lambda device: 0.25)
    speed = probe_mod.speed_fit(probe_mod.SpeedProbe(w, w.layers(), w.layers(), 8, torch.device("cpu")))
    # Quota seconds: 24 ms a big pass and 8 ms a small one: 8/3 ms a sample, 8/3 ms fixed.
    assert speed.per_sample_s == pytest.approx(16e-3 / 6) and speed.fixed_s == pytest.approx(24e-3 - 8 * 16e-3 / 6)
    assert speed.typical == pytest.approx(0.034 / 0.024)  # the clock's median big pass over the capacity's
    assert probe_mod.quota_seconds(1.0, 0.9, 2.0) == 0.9  # over a core: the compute thread's own seconds


async def test_times_are_priced_at_the_rings_median_slowdown_and_speeds_stay_capacities(tmp_path, monkeypatch) -> None:
    _fixed_measurements(monkeypatch)
    slow = iter([1.1, 1.3, 2.0])  # each member's median repeat over its fastest; the ring's median is 1.3
    monkeypatch.setattr(probe_mod.SpeedProbe, "fit", lambda self, busy_hop_s=0.0: probe_mod.Speed(
        2e-3, 1e-4, 0.0, 1e-9, 0.0, busy_hop_s, next(slow)))
    w = mlp(seed=0, depth=3)
    async with fake_ring(3) as (_, nodes):
        caches = [ProfileCache(tmp_path / n.node_id) for n in nodes]
        (plan, ref, devices, _, _), *_ = await _agree_all(nodes, w, caches)
    assert sum(c.fwd_s + c.bwd_s for c in ref) == pytest.approx(2e-3 * 1.3)
    assert [d.speed for d in devices] == [1.0, 1.0, 1.0] and all(d.fixed_s == pytest.approx(1.3e-4) for d in devices)
    assert sorted(c.get(c.keys()[0]).typical for c in caches) == [1.1, 1.3, 2.0]  # cached with each member's figures


async def test_cold_and_warm_jobs_probe_the_same_window_and_price_the_together_pass_on_it(tmp_path, monkeypatch) -> None:
    """A long model: the turns and the together pass run a window, with cached figures as without."""
    seen: list[tuple[tuple, float]] = []
    probes: list[tuple] = []
    _fixed_measurements(monkeypatch)

    def profile_local(on, x):
        return [LayerCost(0.02, 0.04, 4096, 256, 512) for _ in on]  # 60 ms a sample a layer: seconds a pass

    def fit(self, busy_hop_s=0.0):
        probes.append(self.window)
        return probe_mod.Speed(0.36, 0.06, 0.0, 1e-9, 0.0, busy_hop_s)  # the whole model's, as fit() scales

    async def together(coll, on, x, solo_s, *, pool=None, warm=True, window=None, remembered=None):
        seen.append((window, solo_s, x.shape[0]))
        await coll.barrier()
        return 1.0

    monkeypatch.setattr(agree_mod, "_profile_local", profile_local)
    monkeypatch.setattr(probe_mod.SpeedProbe, "fit", fit)
    monkeypatch.setattr(agree_mod, "probe_together", together)
    w = tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8)
    async with fake_ring(2) as (_, nodes):
        caches = [ProfileCache(tmp_path / n.node_id) for n in nodes]
        for _ in range(2):
            view, job = nodes[0].view, secrets.token_hex(3)
            timings = [{} for _ in nodes]
            await asyncio.wait_for(asyncio.gather(*(
                agree_on_plan(n, view, w, global_batch=8, micro_batches=2, cache=c, job=job, timings=t)
                for n, c, t in zip(nodes, caches, timings))), 20)
            assert all(t["probed"] == pytest.approx(1 / 6) for t in timings)
    one = (1, 1, pytest.approx(1 / 6), pytest.approx(1 / 6))
    assert [tuple(p) for p in probes] == [one] * 2  # cold only; the warm job read the cache
    # A pass of 4 samples through the one layer: 4 * 0.36 / 6 + 0.06 / 6 seconds, cold and warm alike.
    assert len(seen) == 4 and all(tuple(win) == one for win, _, _ in seen)
    assert all(solo == pytest.approx(4 * 0.06 + 0.01) and n == 4 for _, solo, n in seen)
