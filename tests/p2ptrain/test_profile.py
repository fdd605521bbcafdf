"""The layer profiler: sensible numbers, no side effects on the model, and its cache."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from p2ptrain._errors import ConfigError
from p2ptrain.plan._profile import LayerCost, model_digest, profile_layers, profile_layers_cached
from p2ptrain.zoo import tinygpt


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 2))


def test_profile_smoke_numbers_and_no_side_effects() -> None:
    model = _tiny().train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # an existing grad must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    rng = torch.random.get_rng_state()

    costs = profile_layers(list(model), x, repeats=2)

    assert len(costs) == 5
    assert all(c.fwd_s > 0 for c in costs)
    assert all(c.bwd_s > 0 for c in costs)  # every layer here has a float input to differentiate
    assert [c.param_bytes for c in costs] == [(8 * 32 + 32) * 4, 0, 2 * 32 * 4, 0, (32 * 2 + 2) * 4]
    assert [c.act_bytes for c in costs] == [32 * 4, 32 * 4, 32 * 4, 32 * 4, 2 * 4]
    assert costs[0].saved_bytes >= 8 * 4  # Linear keeps its input for the weight gradient
    # Parameters, buffers (BatchNorm running stats), grads, mode and RNG are as they were.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[4].weight.grad is None
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_profile_runs_on_the_zoo_gpt_with_token_input() -> None:
    work = tinygpt(n_layer=1, n_embd=16, n_head=2, block_size=8)
    layers = work.layers()
    inputs, _ = work.split(work.batch(range(2)))
    costs = profile_layers(layers, inputs, repeats=1)
    assert len(costs) == 3
    assert costs[0].param_bytes == sum(p.numel() * 4 for p in layers[0].parameters())
    assert costs[0].act_bytes == 8 * 16 * 4  # (T, C) fp32 hidden states per sample
    assert costs[-1].act_bytes == 8 * len(work.info["vocab"]) * 4


def test_profile_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="at least one layer"):
        profile_layers([], torch.zeros(1, 1))
    with pytest.raises(ConfigError, match="batch dimension"):
        profile_layers([nn.Identity()], torch.zeros(()))
    with pytest.raises(ConfigError, match="repeats"):
        profile_layers([nn.Identity()], torch.zeros(1, 1), repeats=0)
    with pytest.raises(ConfigError, match="must return one tensor"):
        profile_layers([nn.LSTM(2, 2)], torch.zeros(1, 3, 2))


def test_digest_ignores_values_but_not_architecture() -> None:
    a, b = _tiny(), _tiny()
    with torch.no_grad():
        b[0].weight.add_(1.0)
    assert model_digest(list(a)) == model_digest(list(b))
    assert model_digest(list(a)) != model_digest([nn.Linear(8, 33), *list(a)[1:]])
    assert model_digest(list(a)) != model_digest(list(a)[:-1])


def test_cache_round_trip_and_corrupt_file(tmp_path) -> None:
    layers = list(_tiny())
    x = torch.randn(2, 8)
    first = profile_layers_cached(layers, x, cache_dir=tmp_path, tag="t", repeats=1)
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["tag"] == "t"
    assert profile_layers_cached(layers, x, cache_dir=tmp_path, tag="t") == first  # from the file
    # Another tag or batch shape is another key.
    profile_layers_cached(layers, torch.randn(3, 8), cache_dir=tmp_path, tag="t", repeats=1)
    assert len(list(tmp_path.glob("profile-*.json"))) == 2
    files[0].write_text("{not json")
    again = profile_layers_cached(layers, x, cache_dir=tmp_path, tag="t", repeats=1)
    assert all(isinstance(c, LayerCost) for c in again)
    assert json.loads(files[0].read_text())["version"] == 1  # rewritten


def test_budget_bounds_the_time() -> None:
    layers = list(_tiny())
    x = torch.randn(2, 8)
    t0 = time.perf_counter()
    costs = profile_layers(layers, x, repeats=10_000, budget_s=0.0)  # one timed run per layer
    assert time.perf_counter() - t0 < 2.0
    assert all(c.fwd_s > 0 for c in costs)


def _count_calls(layers) -> list[int]:
    calls = [0] * len(layers)
    for i, m in enumerate(layers):
        m.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_twin_blocks_are_measured_once_and_fed_forward_without_a_graph() -> None:
    work = tinygpt(n_layer=4, n_embd=16, n_head=2, block_size=8)
    layers = work.layers()
    calls = _count_calls(layers)
    inputs, _ = work.split(work.batch(range(2)))
    costs = profile_layers(layers, inputs, repeats=3)
    # The embedding, the first block and the head are measured (a forward for the saved
    # bytes, a warm-up and 3 timed runs); the other blocks run once for their successor's input.
    assert calls == [5, 5, 1, 1, 1, 5]
    assert costs[2] == costs[3] == costs[4] == costs[1]
    assert costs[5] != costs[1]


def test_layers_with_other_settings_or_shapes_are_not_twins() -> None:
    from p2ptrain.zoo._tinygpt import Block

    torch.manual_seed(0)
    layers = [Block(16, 2), Block(16, 4), Block(16, 4), nn.Dropout(0.1), nn.Dropout(0.5), nn.Linear(16, 16),
              nn.Linear(16, 16, bias=False)]
    calls = _count_calls(layers)
    profile_layers(layers, torch.randn(2, 8, 16), repeats=1)
    # Heads differ (same parameters), so do dropout rates and a bias; only the third block is a twin.
    assert calls == [3, 3, 1, 3, 3, 3, 3]


class _Head(nn.Module):
    """Keeps its width in a dictionary, which the twin key does not read."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.cfg = {"k": k}

    def forward(self, x):
        return x[:, : self.cfg["k"]] * 2


def test_a_convolutions_stride_and_an_outputs_size_tell_twins_apart() -> None:
    convs = [nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, stride=2, padding=1)]
    costs = profile_layers(convs, torch.randn(2, 3, 8, 8), repeats=1)
    assert [c.act_bytes for c in costs] == [3 * 64 * 4, 3 * 64 * 4, 3 * 16 * 4]
    # Equal keys, other output: the second head is measured, not copied.
    layers = [_Head(8), _Head(8), _Head(4)]
    calls = _count_calls(layers)
    costs = profile_layers(layers, torch.randn(2, 8), repeats=1)
    assert [c.act_bytes for c in costs] == [32, 32, 16]
    assert calls == [3, 1, 4]  # the third: the twin's forward, then its own measuring


def test_a_layer_whose_runs_are_long_enough_is_timed_fewer_times(monkeypatch) -> None:
    # On a quarter-core member a 15 M-parameter model's block took 0.2 s a run: 1.5 s of a
    # layer profile every member of the ring waits for. Short layers still get every repeat.
    import p2ptrain.plan._profile as profile_mod

    class Slow(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.06)  # with its backward, a timed run over ENOUGH_TIMED_S / 2
            return super().forward(x)

    torch.manual_seed(0)
    layers = [nn.Linear(8, 8), Slow(8, 8), nn.Linear(8, 2)]
    calls = _count_calls(layers)
    monkeypatch.setattr(profile_mod, "ENOUGH_TIMED_S", 0.1)
    costs = profile_layers(layers, torch.randn(4, 8), repeats=3)
    # A forward for the saved bytes and a warm-up, then timed runs: all 3 of the fast
    # layers', 2 of the slow one's (0.12 s >= 0.1 s).
    assert calls == [5, 4, 5]
    assert costs[1].fwd_s * 4 >= 0.06 and costs[0].fwd_s * 4 < 0.06
