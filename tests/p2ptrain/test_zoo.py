"""The zoo and the shared data order: deterministic builds, shapes, sampling, shards, mean gradients."""

from __future__ import annotations

import hashlib
import math
import os
import time

import pytest
import torch
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.train._data import GlobalSampler, global_batch_indices, shard, shard_weight
from p2ptrain.zoo import ZOO, Workload, build
from p2ptrain.zoo._datasets import stack_collate

# Small enough that a forward/backward is a few ms on a 2-core CPU.
SMALL_GPT = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("name", "kwargs"), [("tinygpt", SMALL_GPT), ("mlp", {})])
def test_same_seed_same_parameters_and_other_seed_differs(name: str, kwargs: dict) -> None:
    a, b, c = (build(name, seed, **kwargs).model for seed in (7, 7, 8))
    for pa, pb in zip(params(a), params(b)):
        assert torch.equal(pa, pb)
        assert torch.isfinite(pa).all()
    assert any(not torch.equal(pa, pc) for pa, pc in zip(params(a), params(c)))


def test_building_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    build("tinygpt", 3, **SMALL_GPT)
    build("mlp", 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_tinygpt_is_a_sequence_of_layers_with_the_right_shapes() -> None:
    w = build("tinygpt", 0, **SMALL_GPT)
    layers = w.layers()
    assert len(layers) == SMALL_GPT["n_layer"] + 2  # embedding, blocks, head
    vocab = len(w.info["vocab"])
    assert 60 < vocab < 200  # printable ASCII plus a few typographic characters
    batch = w.batch([0, 5, 9])
    assert batch.shape == (3, 17) and batch.dtype == torch.int64
    h = layers[0](batch[:, :-1])
    assert h.shape == (3, 16, 32)
    for block in layers[1:-1]:
        h = block(h)
        assert h.shape == (3, 16, 32)
    logits = layers[-1](h)
    assert logits.shape == (3, 16, vocab)
    assert torch.allclose(logits, w.model(batch[:, :-1]))
    loss = w.loss(batch)
    assert loss.dim() == 0
    # Near-uniform predictions at init: cross-entropy close to ln(vocab).
    assert abs(loss.item() - math.log(vocab)) < 0.3


def test_tinygpt_attention_is_causal() -> None:
    w = build("tinygpt", 0, **SMALL_GPT)
    x = w.batch([1, 2])[:, :-1]
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % len(w.info["vocab"])  # change the future only
    with torch.no_grad():
        assert torch.allclose(w.model(x)[:, :10], w.model(y)[:, :10], atol=1e-6)
        assert not torch.allclose(w.model(x)[:, 10:], w.model(y)[:, 10:])


def test_tinygpt_data_is_next_character_windows() -> None:
    w = build("tinygpt", 0, **SMALL_GPT)
    ds = w.dataset
    assert len(ds) > 10_000  # ~465k chars / 16
    assert torch.equal(ds[0][-1], ds[1][0])  # windows overlap by the one target id
    assert torch.equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    text = "".join(w.info["vocab"][i] for i in ds[0].tolist())
    assert len(text) == 17 and w.data_digest and len(w.data_digest) == 16
    assert build("tinygpt", 1, **SMALL_GPT).data_digest == w.data_digest  # data ignores seed


def test_tinygpt_corpus_is_the_pydoc_text_as_its_plain_definition_reads_it() -> None:
    # _corpus builds the ids a topic at a time and without set() (the GIL, see its
    # docstring); the result must be what the one-line definition gives, digest included:
    # members of one ring compare it.
    from pydoc_data.topics import topics

    from p2ptrain.zoo._tinygpt import _corpus

    text = "".join(topics[k] for k in sorted(topics))
    ids, vocab, digest = _corpus()
    assert vocab == "".join(sorted(set(text)))
    assert digest == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert ids.dtype == torch.int64 and len(ids) == len(text)
    index = {c: i for i, c in enumerate(vocab)}
    assert ids.tolist() == [index[c] for c in text]


def test_mlp_shapes_and_fixed_data() -> None:
    w = build("mlp", 0, n_in=5, hidden=8, n_out=3, n_samples=100)
    x, y = w.batch(torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 5) and y.shape == (4, 3)
    assert w.model(x).shape == (4, 3)
    assert w.loss((x, y)).dim() == 0
    assert len(w.layers()) == 5  # linear, tanh, linear, tanh, linear
    other = build("mlp", 1, n_in=5, hidden=8, n_out=3, n_samples=100)
    assert other.data_digest == w.data_digest  # the model seed does not move the data


@pytest.mark.parametrize(("name", "kwargs"), [("tinygpt", SMALL_GPT), ("mlp", {})])
def test_combined_gradient_is_the_mean_of_equal_shard_gradients(name: str, kwargs: dict) -> None:
    """The property data parallelism rests on: mean loss => mean of shard gradients."""
    w = build(name, 0, **kwargs)
    idx = global_batch_indices(len(w.dataset), 16, step=0, seed=0)

    def grads(indices: torch.Tensor) -> list[torch.Tensor]:
        w.model.zero_grad(set_to_none=True)
        w.loss(w.batch(indices)).backward()
        return [p.grad.detach().clone() for p in w.model.parameters()]

    combined = grads(idx)
    world = 4
    per_shard = [grads(shard(idx, r, world)) for r in range(world)]
    for i, g in enumerate(combined):
        mean = sum(s[i] for s in per_shard) / world
        torch.testing.assert_close(mean, g, rtol=1e-5, atol=1e-7)


def test_sampling_is_deterministic_and_each_epoch_a_permutation() -> None:
    n, gb = 103, 10  # 10 steps per epoch, 3 samples dropped
    a = [global_batch_indices(n, gb, s, seed=5) for s in range(30)]
    sampler = GlobalSampler(n, gb, seed=5)
    b = [sampler.indices(s) for s in range(30)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.dtype == torch.int64 and x.shape == (gb,) for x in a)
    for epoch in range(3):
        seen = torch.cat(a[epoch * 10 : epoch * 10 + 10])
        assert len(set(seen.tolist())) == 100 and 0 <= seen.min() and seen.max() < n
    assert not torch.equal(torch.cat(a[:10]), torch.cat(a[10:20]))  # reshuffled per epoch
    assert not torch.equal(a[0], global_batch_indices(n, gb, 0, seed=6))
    # Random access (a member that joins late) agrees with sequential access.
    assert torch.equal(GlobalSampler(n, gb, 5).indices(27), a[27])


def test_sampling_is_pinned() -> None:
    """The order is exact integer hashing: it must never change between releases or
    machines (members with different versions would train on different batches)."""
    got = global_batch_indices(1000, 8, step=3, seed=42).tolist()
    assert got == PINNED_STEP3_SEED42


PINNED_STEP3_SEED42 = [758, 326, 481, 21, 130, 358, 453, 967]


def test_shards_partition_the_global_batch() -> None:
    idx = global_batch_indices(500, 24, 2, seed=1)
    for world in (1, 2, 3, 4, 6, 8, 12, 24):
        parts = [shard(idx, r, world) for r in range(world)]
        assert {p.shape[0] for p in parts} == {24 // world}
        assert torch.equal(torch.cat(parts), idx)
        assert {shard_weight(p.shape[0], 24, world) for p in parts} == {1.0}
    parts = [shard(idx, r, 5) for r in range(5)]  # 24 over 5: the first four take one more
    assert [p.shape[0] for p in parts] == [5, 5, 5, 5, 4] and torch.equal(torch.cat(parts), idx)
    assert sum(shard_weight(p.shape[0], 24, 5) for p in parts) == pytest.approx(5.0)
    with pytest.raises(JobError, match=r"global_batch=24 is smaller than the 25 members"):
        shard(idx, 0, 25)
    with pytest.raises(JobError, match="rank 4"):
        shard(idx, 4, 4)


def test_sampler_rejects_impossible_batches() -> None:
    with pytest.raises(JobError, match="global_batch=11 does not fit a dataset of 10"):
        GlobalSampler(10, 11, 0)
    with pytest.raises(JobError, match="empty"):
        GlobalSampler(0, 1, 0)
    with pytest.raises(JobError, match="step"):
        GlobalSampler(10, 2, 0).indices(-1)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet", {}, "unknown zoo model 'resnet'; the zoo has mlp, tinygpt"),
        ("tinygpt", {"n_layers": 2}, r"'n_layers'\] is not a parameter of zoo model 'tinygpt' \(did you mean 'n_layer'\?\); it takes"),
        ("tinygtp", {}, r"unknown zoo model 'tinygtp' \(did you mean 'tinygpt'\?\); the zoo has"),
        ("tinygpt", {"zzz": 2}, r"'zzz'\] is not a parameter of zoo model 'tinygpt'; it takes"),
        ("tinygpt", {"n_layer": "2"}, "wants an int"),
        ("tinygpt", {"n_layer": 2.0}, "wants an int"),
        ("tinygpt", {"n_layer": True}, "wants an int"),
        ("tinygpt", {"n_embd": 1 << 20}, r"n_embd'\]=1048576 is out of range for 'tinygpt'; use 8..4096"),
        ("tinygpt", {"n_embd": 30, "n_head": 4}, "not a multiple of n_head"),
        ("mlp", {"n_samples": 0}, "n_samples"),
        ("mlp", {"seed": 1}, r"'seed'\] is not a parameter"),
    ],
)
def test_build_rejects_bad_arguments(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(JobError, match=message):
        build(name, 0, **kwargs)


def test_workload_contract() -> None:
    assert set(ZOO) == {"mlp", "tinygpt"}
    with pytest.raises(JobError, match="loss_fn"):
        Workload(model=nn.Linear(2, 2), dataset=[])
    with pytest.raises(JobError, match="torch.nn.Module"):
        Workload(model="net", dataset=[], criterion=nn.functional.mse_loss)  # type: ignore[arg-type]
    w = Workload(
        model=nn.Linear(2, 1),
        dataset=[(torch.ones(2), torch.zeros(1))] * 4,
        loss_fn=lambda m, b: m(b[0]).pow(2).mean(),
    )
    assert w.loss(w.batch([0, 1])).dim() == 0
    with pytest.raises(JobError, match="not an nn.Sequential"):
        w.layers()
    x, y = stack_collate([(torch.ones(2), torch.zeros(1))] * 3)
    assert x.shape == (3, 2) and y.shape == (3, 1)


def test_a_model_that_would_not_fit_in_memory_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # tinygpt n_embd=4096 n_layer=64 (both inside their ranges: 13 G parameters, 48 GiB)
    # got `p2ptrain train` killed by the system's out-of-memory killer without a word.
    import p2ptrain.zoo._workload as workload

    monkeypatch.setattr(workload, "available_memory", lambda: 8 << 30)
    t0 = time.perf_counter()
    with pytest.raises(JobError, match=r"the model holds 12,889\.4 M parameters \(48\.0 GiB\) and this device has 8\.0 GiB"):
        build("tinygpt", 0, n_embd=4096, n_layer=64)
    assert time.perf_counter() - t0 < 5  # laid out on the meta device only: nothing was allocated
    small = build("tinygpt", 0)  # 0.9 MB of parameters: far under
    monkeypatch.setattr(workload, "available_memory", lambda: None)  # not Linux: nothing to check against
    assert [p.shape for p in build("tinygpt", 0).model.parameters()] == [p.shape for p in small.model.parameters()]


def test_available_memory_reads_this_machine() -> None:
    from p2ptrain.discovery import available_memory

    free = available_memory()
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_mlp_data_is_the_same_when_members_build_it_at_once() -> None:
    # Three members building at once in one process once got a different teacher output on one of
    # them (a job refused: "members hold different training data"): its float32 matmuls' rounding
    # depended on the kernel path. One digest for every build, in every thread.
    import threading

    digests: list[str] = []

    def build_some() -> None:
        for _ in range(5):
            digests.append(build("mlp", 5, depth=4).data_digest)

    threads = [threading.Thread(target=build_some) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(digests) == 15 and len(set(digests)) == 1, set(digests)
