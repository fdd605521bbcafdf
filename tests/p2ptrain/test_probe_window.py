"""A model whose whole pass takes seconds is probed on a window of its layers, scaled back to the whole."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch

import p2ptrain.plan._probe as probe_mod
from p2ptrain.plan import LayerCost
from p2ptrain.plan._probe import LONG_ROUNDS, SPEED_PROBE_S, SPEED_ROUNDS, cpu_demand, host_cores
from p2ptrain.plan._together import host_setting, probe_together
from p2ptrain.plan._window import WINDOW_OVER_S, WINDOW_PASS_S, Window, probe_window, window_input
from p2ptrain.ring import Collectives
from p2ptrain.zoo import tinygpt

from _ring import fake_ring


def _costs(per_layer: list[float]) -> list[LayerCost]:
    return [LayerCost(s / 3, 2 * s / 3, 1000, 100, 200) for s in per_layer]


def test_the_windows_budgets_are_the_probes_rounds() -> None:
    assert WINDOW_OVER_S == pytest.approx(SPEED_PROBE_S / LONG_ROUNDS)
    assert WINDOW_PASS_S == pytest.approx(SPEED_PROBE_S / SPEED_ROUNDS / 2)


def test_a_model_whose_pass_fits_the_budget_is_probed_whole() -> None:
    # tinygpt's defaults at a micro-batch of 8: a few ms a sample on a slow device.
    assert probe_window(_costs([1e-3] * 6), 8) == Window(0, 5)
    assert probe_window(_costs([1.0, 1.0]), 8) == Window(0, 1)  # two layers: nothing to leave out


def test_a_long_pass_is_probed_from_the_second_layer_within_one_rounds_budget() -> None:
    # 10 layers of 2 ms a sample: 160 ms a pass of 8, within WINDOW_OVER_S (200 ms): whole.
    assert probe_window(_costs([2e-3] * 10), 8) == Window(0, 9)
    # 10 layers of 5 ms a sample: 400 ms a pass; 40 ms a layer, so one layer fits 60 ms.
    w = probe_window(_costs([5e-3] * 10), 8)
    assert (w.first, w.last) == (1, 1) and w.work == pytest.approx(0.1) and w.span == pytest.approx(0.1)
    # Cheaper middle layers: as many as fit, never the head.
    w = probe_window(_costs([0.01] + [1e-3] * 8 + [0.01]), 8)
    assert (w.first, w.last) == (1, 7)  # 7 layers of 8 ms fit 60 ms, 8 would not
    assert w.work == pytest.approx(7e-3 / 0.028) and w.span == pytest.approx(0.7)
    w = probe_window(_costs([0.02] + [5e-4] * 8 + [0.02]), 8)
    assert (w.first, w.last) == (1, 8)  # every middle layer fits: still not the head
    # One layer at least, however long it is.
    assert probe_window(_costs([1e-3, 10.0, 1e-3]), 8)[:2] == (1, 1)


def test_a_window_holds_parameters_and_a_real_share_of_the_work() -> None:
    # An MLP: Linear, Tanh, Linear, ..., Linear; a Linear 40 ms a pass of 8, a Tanh 0.8 ms and no weights.
    costs = [LayerCost(1e-4 / 3, 2e-4 / 3, 0, 100, 100) if k % 2 else LayerCost(5e-3 / 3, 1e-2 / 3, 4096, 100, 100)
             for k in range(9)]
    w = probe_window(costs, 8)
    assert (w.first, w.last) == (1, 3)  # not the Tanh alone: too small a share, and no weights
    # A model whose middle layers hold no parameters is probed whole.
    flat = [LayerCost(0.1, 0.1, 4096, 8, 8)] + [LayerCost(0.1, 0.1, 0, 8, 8)] * 3 + [LayerCost(0.1, 0.1, 4096, 8, 8)]
    assert probe_window(flat, 8) == Window(0, 4)
    tiny = [LayerCost(1.0, 1.0, 4096, 8, 8)] + [LayerCost(1e-4, 1e-4, 64, 8, 8)] * 3 + [LayerCost(1.0, 1.0, 4096, 8, 8)]
    assert probe_window(tiny, 8) == Window(0, 4)  # every middle layer together is under 5% of the work


def test_the_update_is_timed_on_the_first_layers_up_to_a_byte_limit(monkeypatch) -> None:
    made: list[int] = []
    real = probe_mod.torch.full_like

    def full_like(t, v):
        made.append(t.numel() * t.element_size())
        return real(t, v)

    monkeypatch.setattr(probe_mod.torch, "full_like", full_like)
    layers = [torch.nn.Linear(256, 256) for _ in range(4)]  # 263 KB each
    w = tinygpt(seed=0, n_layer=1, n_embd=16, block_size=8)
    assert probe_mod.update_probe(w, layers, limit=600_000) > 0
    assert sum(made) == 2 * (256 * 257 * 4)  # two layers fit 600 KB, the third would not
    made.clear()
    assert probe_mod.update_probe(w, layers, limit=1) > 0 and len(made) == 1  # one parameter at least


def test_the_windows_figures_scale_back_to_the_whole_model(monkeypatch) -> None:
    """Passes priced by a known model: the fit through a window recovers its per-sample and fixed time."""
    w = tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8)
    layers = w.layers()
    index = {id(m): i for i, m in enumerate(layers)}
    per_layer = [0.5e-3, 2e-3, 3e-3, 2e-3, 3e-3, 0.5e-3]  # per sample
    fixed = 6e-3  # the whole model's, spread evenly over its 6 layers
    ran: set[int] = set()

    def passes(probed, x, duration_s):
        ks = [index[id(m)] for m in probed]
        ran.update(ks)
        t = sum(fixed / len(layers) + x.shape[0] * per_layer[k] for k in ks)
        return 1, t, t, t

    monkeypatch.setattr(probe_mod, "timed_passes", passes)
    monkeypatch.setattr(probe_mod, "probe_quota", lambda device: None)
    window = probe_window(_costs(per_layer), 8, over_s=0.05, pass_s=0.05)
    assert (window.first, window.last) == (1, 2)  # 8 * 5 ms = 40 ms; a third layer would make 56
    speed = probe_mod.speed_fit(probe_mod.SpeedProbe(w, layers, layers, 8, torch.device("cpu"), window))
    assert ran == {1, 2}
    assert speed.per_sample_s == pytest.approx(sum(per_layer)) and speed.fixed_s == pytest.approx(fixed)
    assert window.part(speed.per_sample_s, speed.fixed_s) == pytest.approx((5e-3, 2e-3))


def test_a_window_runs_on_the_hidden_states_of_the_layers_before_it() -> None:
    w = tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8)
    layers = w.layers()
    calls = [0] * len(layers)
    for i, m in enumerate(layers):
        m.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    probe = probe_mod.SpeedProbe(w, layers, layers, 8, torch.device("cpu"), Window(1, 3, 0.5, 0.5))
    probe.warm()
    probe.warm()  # again: still the window's inputs, not the blocks run on hidden states
    assert probe.inputs[0].shape == (8, 8, 16) and probe.inputs[0].requires_grad  # hidden states, as a stage gets
    calls[:] = [0] * len(layers)
    probe.round(probe_mod.SPEED_ROUNDS)
    speed = probe.fit()
    assert calls[0] == calls[4] == calls[5] == 0 and min(calls[1:4]) >= 2  # the window's layers only
    assert speed.per_sample_s > 0 and speed.update_s > 0
    assert all(p.grad is None for m in layers for p in m.parameters())  # the model is left as it was


async def test_the_together_pass_runs_the_window_on_every_member() -> None:
    w = tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8)
    models = [w.layers(), tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8).layers()]
    window = Window(1, 2, 0.4, 1 / 3)
    x = w.split(w.batch(list(range(4))))[0]
    ran: list[set[int]] = [set(), set()]
    for k, layers in enumerate(models):
        for i, m in enumerate(layers):
            m.register_forward_hook(lambda mod, args, out, i=i, k=k: ran[k].add(i))
    async with fake_ring(2) as (_, nodes):
        view, job = nodes[0].view, secrets.token_hex(3)
        kept = await asyncio.wait_for(asyncio.gather(*(
            probe_together(Collectives(n, view=view, name=job), layers, x, 1e-3, window=window)
            for n, layers in zip(nodes, models))), 30)
    assert all(0 < k <= 1 for k in kept)
    assert ran == [{0, 1, 2}, {0, 1, 2}]  # the embedding makes the window's inputs; the rest never runs
    assert window_input(models[0], x, Window(0, 5)) is x


def _two_counted_members(n_layer: int) -> tuple[list[list[torch.nn.Module]], torch.Tensor, list[int]]:
    """Two members' copies of a small tinygpt, a micro-batch, and each copy's count of forwards."""
    w = tinygpt(seed=0, n_layer=n_layer, n_embd=16, block_size=8)
    models = [w.layers(), tinygpt(seed=0, n_layer=n_layer, n_embd=16, block_size=8).layers()]
    ran = [0, 0]
    for k, layers in enumerate(models):
        layers[0].register_forward_hook(lambda mod, args, out, k=k: ran.__setitem__(k, ran[k] + 1))
    return models, w.split(w.batch(list(range(4))))[0], ran


async def test_members_on_their_own_hosts_skip_the_together_pass() -> None:
    models, x, ran = _two_counted_members(4)
    async with fake_ring(2) as (_, nodes):
        view = nodes[0].view

        async def together(hosts: list[int]) -> list[float]:
            job = secrets.token_hex(3)
            return list(await asyncio.wait_for(asyncio.gather(*(
                probe_together(Collectives(n, view=view, name=job), layers, x, 1e-3, host=h)
                for n, layers, h in zip(nodes, models, hosts))), 30))

        assert await together([11, 12]) == [1.0, 1.0]  # separate devices cannot slow each other
        assert ran == [0, 0]  # and nothing computed
        kept = await together([11, 11])  # one host: they compute together
        assert all(0 < k <= 1 for k in kept) and min(ran) >= 2


async def test_a_cached_and_a_fresh_member_run_the_together_pass_in_step() -> None:
    """One member warm from its cache (an untimed pass first), one fresh: the same collectives on both."""
    w = tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8)
    models = [w.layers(), tinygpt(seed=0, n_layer=4, n_embd=16, block_size=8).layers()]
    x = w.split(w.batch(list(range(4))))[0]
    async with fake_ring(2) as (_, nodes):
        view, job = nodes[0].view, secrets.token_hex(3)
        colls = [Collectives(n, view=view, name=job) for n in nodes]
        kept = await asyncio.wait_for(asyncio.gather(*(
            probe_together(c, layers, x, 1e-3, warm=warm, host=7)
            for c, layers, warm in zip(colls, models, (True, False)))), 30)
        assert all(0 < k <= 1 for k in kept)
        rows = await asyncio.wait_for(asyncio.gather(*(c.all_gather(torch.tensor([float(i), 2.0])) for i, c in enumerate(colls))), 10)
    assert [r.tolist() for r in rows[0]] == [[0.0, 2.0], [1.0, 2.0]]  # the next collective pairs up as sent


async def test_a_share_every_sharing_member_remembers_skips_the_pass_and_a_new_setting_runs_it() -> None:
    """Members of one host that measured their shares in this setting before take them as they are;
    one member without its share makes every member pass again, and each remembers the new share."""
    models, x, ran = _two_counted_members(2)
    setting = host_setting(cpu_demand(x.device), [cpu_demand(x.device)] * 2, host_cores(), Window(0, len(models[0]) - 1))
    async with fake_ring(2) as (_, nodes):
        view = nodes[0].view

        async def together(remembered: list[dict[str, float]]) -> list[float]:
            job = secrets.token_hex(3)
            return list(await asyncio.wait_for(asyncio.gather(*(
                probe_together(Collectives(n, view=view, name=job), layers, x, 1e-3, host=5, remembered=r)
                for n, layers, r in zip(nodes, models, remembered))), 30))

        assert await together([{setting: 0.8}, {setting: 0.6, "cores 64; elsewhere": 0.5}]) == [0.8, 0.6]
        assert ran == [0, 0]  # nothing computed
        mine: list[dict[str, float]] = [{setting: 0.8}, {"cores 64; elsewhere": 0.5}]
        kept = await together(mine)  # the second member has not met this setting: both pass again
        assert min(ran) >= 2 and all(0 < k <= 1 for k in kept)
        assert [m[setting] for m in mine] == kept and list(mine[1]) == ["cores 64; elsewhere", setting]


def test_the_host_setting_names_the_cores_the_quotas_on_the_host_and_the_layers() -> None:
    s = host_setting(0.25, [1.0, 0.25, 0.5, 0.25], 2, Window(0, 5))
    assert s == "cores 2; on host 0.250,0.250,0.500,1.000; mine 0.250; layers 0-5"
    assert s != host_setting(0.5, [1.0, 0.25, 0.5, 0.25], 2, Window(0, 5))  # another member's seat
    assert s != host_setting(0.25, [1.0, 0.25, 0.5], 2, Window(0, 5))  # one member fewer


def test_after_the_layer_profile_the_warm_up_runs_only_the_small_size(monkeypatch) -> None:
    # The layer profile has just run the model on the micro-batch: a second untimed pass of
    # that size cost every cold start 0.2-0.3 s on the quarter-core devices.
    w = tinygpt(seed=0, n_layer=2, n_embd=16, block_size=8)
    layers = w.layers()
    sizes: list[int] = []
    monkeypatch.setattr(probe_mod, "speed_probe", lambda probed, x, duration: sizes.append(x.shape[0]) or 0.0)
    probe_mod.SpeedProbe(w, layers, layers, 8, torch.device("cpu")).warm()
    assert sizes == [8, 2]
    sizes.clear()
    probe_mod.SpeedProbe(w, layers, layers, 8, torch.device("cpu"), profiled=True).warm()
    assert sizes == [2]
