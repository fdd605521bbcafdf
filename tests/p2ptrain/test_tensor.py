"""Tensor parallelism: the shard arithmetic, the split layers against the whole ones, jobs on loopback rings.

The split layers are checked without a network first: each member runs in a thread of
this process with its own copy of the model, and the collectives are simulated with a
barrier (:class:`ThreadGroup`). Then real rings of 2 and 3 loopback members run
``strategy="tensor"`` jobs through :class:`~p2ptrain.train.JobService` and must train
what one process trains (``train_single``): tinygpt, a tiny GPT-2 and a tiny LLaMA with
grouped-query attention, with even and uneven shares.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from p2ptrain import JobError
from p2ptrain._errors import ConfigError, JobStopped
from p2ptrain.ring import View
from p2ptrain.train import JobService, JobSpec, StepMetrics, TrainResult, resolve, train_single, workload_entry
from p2ptrain.train._tensor import TensorParallelTrainer
from p2ptrain.train._tp_comm import RingComm
from p2ptrain.train._tp_layers import TPContext
from p2ptrain.train._tp_shard import make_plan, ranges, split_counts
from p2ptrain.train._tp_surgery import Surgery, shard_model
from p2ptrain.zoo import Workload, tinygpt

from _ring import cluster_name, loopback_node, started_ring, until

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16}


@workload_entry
def sgd_tinygpt(seed: int = 0, **kwargs: Any) -> Workload:
    """tinygpt trained with plain SGD: parameters move by lr x gradient, so equal parameters mean equal gradients.

    (AdamW divides by sqrt(v) + 1e-8, which turns the ~1e-10 rounding noise on gradients
    that are exactly zero in exact arithmetic, the key bias, into visible steps.)
    """
    w = tinygpt(seed, **kwargs)
    w.make_optimizer = lambda params, lr: torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)
    return w


@workload_entry
def momentum_tinygpt(seed: int = 0, **kwargs: Any) -> Workload:
    """tinygpt with SGD and momentum: exact like SGD, with optimizer state that a re-split must carry over."""
    w = tinygpt(seed, **kwargs)
    w.make_optimizer = lambda params, lr: torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.9)
    return w


class _Gate:
    """Holds every member's compute thread inside a step (the loop runs on) until the test opens it."""

    def __init__(self) -> None:
        self.armed = False
        self.opened = threading.Event()


GATE = _Gate()


@workload_entry
def gated_tinygpt(seed: int = 0, **kwargs: Any) -> Workload:
    """:func:`sgd_tinygpt` whose loss waits at :data:`GATE` once it is armed (what it computes is unchanged)."""
    w = sgd_tinygpt(seed, **kwargs)
    criterion = w.criterion
    assert criterion is not None

    def gated(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if GATE.armed:
            GATE.opened.wait(30)
        return criterion(out, targets)

    w.criterion = gated
    return w


# --- shard arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "shares", "want"), [
    (4, [1, 3], [1, 3]), (4, [1, 1, 2], [1, 1, 2]), (4, [1, 1, 1], [2, 1, 1]), (5, [100, 1, 1], [3, 1, 1]),
    (3, [1, 1, 1], [1, 1, 1]), (10, [1, 1e-9], [9, 1]), (7, [2, 1], [5, 2]), (128, [1, 1, 2], [32, 32, 64]),
])
def test_split_counts_rounds_to_the_exact_total_with_at_least_one_each(total: int, shares: list[float], want: list[int]) -> None:
    assert split_counts(total, shares) == want


def test_split_counts_properties_hold_for_random_shares() -> None:
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 6)
        shares = [rng.choice([rng.random() * 10 + 1e-3, 1.0]) for _ in range(n)]
        total = rng.randint(n, 200)
        got = split_counts(total, shares)
        assert sum(got) == total and min(got) >= 1
        ideal = [total * s / sum(shares) for s in shares]
        # Never more than one unit away from its ideal, unless the floor of one lifted it.
        assert all(abs(c - x) < 1 + 1e-9 or c == 1 for c, x in zip(got, ideal))
        assert split_counts(total, shares) == got


def test_split_counts_refuses_fewer_units_than_members() -> None:
    with pytest.raises(ConfigError, match="2 attention heads cannot be split over 3 members"):
        split_counts(2, [1, 1, 1], "attention heads")
    with pytest.raises(ConfigError, match="positive"):
        split_counts(4, [1, 0])


def test_the_plan_splits_kv_heads_by_whole_groups_and_replicates_them_otherwise() -> None:
    aligned = make_plan(4, 2, 64, [1, 1])
    assert aligned.heads == ((0, 2), (2, 4)) and aligned.kv_heads == ((0, 1), (1, 2)) and aligned.kv_split
    ragged = make_plan(4, 2, 64, [1, 3])
    assert ragged.heads == ((0, 1), (1, 4)) and ragged.kv_heads == ((0, 1), (0, 2)) and not ragged.kv_split
    assert ragged.columns == ((0, 16), (16, 64))
    assert ranges([2, 1], scale=8) == [(0, 16), (16, 24)]
    with pytest.raises(ConfigError, match="do not group"):
        make_plan(4, 3, 64, [1])


# --- the split layers against the whole model (threads, no network) ----------------------------


class ThreadGroup:
    """Collectives between threads of this process: each call waits for every member's piece."""

    def __init__(self, n: int) -> None:
        self.n, self.barrier, self.slots = n, threading.Barrier(n, timeout=30), [torch.empty(0)] * n

    def comm(self, rank: int) -> Any:
        group = self

        class _Comm:
            def _share(self, x: torch.Tensor) -> list[torch.Tensor]:
                group.slots[rank] = x.detach().clone()
                group.barrier.wait()
                got = list(group.slots)
                group.barrier.wait()
                return got

            def all_gather(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
                got = self._share(x)
                assert [t.shape[0] for t in got] == list(counts)
                return torch.cat(got)

            def reduce_scatter(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
                s, e = ranges(counts)[rank]
                return sum((t[s:e] for t in self._share(x)), torch.zeros_like(x[s:e]))

            def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
                return sum(self._share(x), torch.zeros_like(x))

        return _Comm()


def _member_loss(w: Workload, model: nn.Module, tp: TPContext, batch: Any) -> torch.Tensor:
    inputs, targets = w.split(batch)
    out, flat = model(inputs), targets.reshape(-1)
    assert w.criterion is not None
    if not tp.sequence_parallel:
        loss: torch.Tensor = w.criterion(out, flat)
        return loss
    s, e = tp.tokens()
    part: torch.Tensor = w.criterion(out, flat[s:e]) * ((e - s) / flat.numel())
    return part


def _split_run(w: Workload, shares: Sequence[float], sp: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward and backward of ``w.model`` split over ``len(shares)`` threads: the loss and every whole gradient."""
    batch = w.batch(range(3))
    group = ThreadGroup(len(shares))
    out: list[Any] = [None] * len(shares)

    def member(r: int) -> None:
        model = copy.deepcopy(w.model)
        names = {id(p): n for n, p in model.named_parameters()}
        owners = {id(m): n for n, m in model.named_modules()}
        tp = TPContext(group.comm(r), r, shares, sequence_parallel=sp)
        surgery = shard_model(model, tp)
        loss = _member_loss(w, model, tp, batch)
        loss.backward()
        split = {id(s.local) for s in surgery.shards}
        replicated = {names[id(p)]: p.grad for p in model.parameters() if id(p) not in split}
        out[r] = (loss.item(), surgery, owners, replicated)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    loss = sum(o[0] for o in out) if sp else out[0][0]
    grads: dict[str, torch.Tensor] = {}
    for name in out[0][3]:
        grads[name] = sum(o[3][name] for o in out) if sp else out[0][3][name]  # summed over the token owners
    surgery, owners = out[0][1], out[0][2]
    for i, shard in enumerate(surgery.shards):
        pieces = [o[1].shards[i].local.grad for o in out]
        surgery.install(shard, pieces)  # the whole gradient, put together like the whole weight at the end
        grads[f"{owners[id(shard.module)]}.{shard.attr}"] = getattr(shard.module, shard.attr).detach()
    return loss, grads


def _whole_run(w: Workload) -> tuple[float, dict[str, torch.Tensor]]:
    model = copy.deepcopy(w.model)
    inputs, targets = w.split(w.batch(range(3)))
    assert w.criterion is not None
    loss = w.criterion(model(inputs), targets)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check_split_matches_whole(w: Workload, shares: Sequence[float], sp: bool) -> None:
    want_loss, want = _whole_run(w)
    loss, got = _split_run(w, shares, sp)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("shares", "sp"), [
    ([1, 1], True), ([1, 3], True), ([1, 1, 2], True), ([1, 3], False), ([1, 1, 1, 1], True),
])
def test_tinygpt_split_computes_the_whole_loss_and_gradients(shares: list[float], sp: bool) -> None:
    _check_split_matches_whole(tinygpt(3, **TINY), shares, sp)


def test_the_surgery_undone_gives_the_model_back_under_its_own_names() -> None:
    w = tinygpt(1, **TINY)
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    members = [copy.deepcopy(w.model) for _ in range(3)]
    surgeries: list[Surgery] = [shard_model(m, TPContext(ThreadGroup(1).comm(0), r, [1, 1, 2]))
                                for r, m in enumerate(members)]
    kept = sum(p.numel() for p in members[2].parameters())
    assert kept < sum(v.numel() for v in before.values())  # a member holds its share only
    first = surgeries[0]
    for i, shard in enumerate(first.shards):
        first.install(shard, [s.shards[i].local.detach() for s in surgeries])
    first.reattach()
    after = members[0].state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    with pytest.raises(JobError, match="expected"):
        first.install(surgeries[1].shards[0], [surgeries[1].shards[0].local.detach()] * 3)


def test_a_model_the_tensor_strategy_does_not_know_is_refused() -> None:
    seq = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    with pytest.raises(JobError, match="not a transformer block the tensor strategy knows"):
        shard_model(seq, TPContext(ThreadGroup(1).comm(0), 0, [1, 1]))
    w = tinygpt(0, **TINY)

    class Odd(nn.Module):  # a tinygpt block's parts, but another computation
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.ln1, self.attn, self.ln2, self.mlp = block.ln1, block.attn, block.ln2, block.mlp  # type: ignore[union-attr]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.ln2(x))

    w.model[1] = Odd(w.model[1])
    with pytest.raises(JobError, match="does not compute what its tensor-parallel split computes"):
        shard_model(w.model, TPContext(ThreadGroup(1).comm(0), 0, [1, 1]))


# --- Hugging Face models ---------------------------------------------------------------------------

LINES = ["the quick brown fox jumps over the lazy dog", "tensor parallel heads on the edge of the lan",
         "a leaderless ring of robots and laptops", "every member holds a share of every block"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 (4 heads) and LLaMA (4 query heads over 2 key/value heads) with a byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    v, eos = len(fast), fast.eos_token_id
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=v, n_positions=64,
                                        bos_token_id=eos, eos_token_id=eos),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                          max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos),
    }
    root = tmp_path_factory.mktemp("hf_tensor")
    out = {"root": root, "data": root / "data.jsonl"}
    out["data"].write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES * 4))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for name, config in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out[name] = root / name
    return out


def _hf_spec(dirs: dict[str, Path], name: str, shares: Sequence[float] = (), lora: int = 0, **kw: Any) -> JobSpec:
    kwargs = {"data": str(dirs["data"]), "seq_len": 12, "lora_rank": lora}
    fields: dict[str, Any] = {"global_batch": 4, "steps": 3, "seed": 5, "lr": 1e-2, "digest_every": 2, **kw}
    return JobSpec(model=f"hf:{dirs[name]}", strategy="tensor", shares=tuple(shares), model_kwargs=kwargs, **fields)


@pytest.mark.parametrize(("name", "shares", "sp"), [
    ("gpt2", [1, 3], True), ("gpt2", [1, 1], False), ("llama", [1, 1], True), ("llama", [1, 1, 2], True),
])
def test_hf_split_computes_the_whole_loss_and_gradients(
    hf_dirs: dict[str, Path], name: str, shares: list[float], sp: bool
) -> None:
    _check_split_matches_whole(resolve(_hf_spec(hf_dirs, name)), shares, sp)


def test_lora_is_refused_with_the_strategies_that_train_it(hf_dirs: dict[str, Path]) -> None:
    w = resolve(_hf_spec(hf_dirs, "gpt2", lora=2))
    with pytest.raises(JobError, match="LoRA"):
        shard_model(w.model, TPContext(ThreadGroup(1).comm(0), 0, [1, 1]))


# --- the ring's collectives ---------------------------------------------------------------------


async def test_ring_comm_gathers_scatters_and_sums_uneven_rows() -> None:
    nodes = await started_ring(3)
    try:
        view = nodes[0].view
        nodes.sort(key=lambda x: view.rank(x.node_id))
        loop = asyncio.get_running_loop()
        comms = [RingComm(x, view, loop, job="j") for x in nodes]
        counts = [1, 2, 4]
        rows = [torch.arange(c * 3, dtype=torch.float32).reshape(c, 3) + 100 * r for r, c in enumerate(counts)]
        full = [torch.randn(7, 3, generator=torch.Generator().manual_seed(r)) for r in range(3)]

        def member(r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            c = comms[r]
            return c.all_gather(rows[r], counts), c.reduce_scatter(full[r], counts), c.all_reduce(full[r])

        got = await asyncio.wait_for(asyncio.gather(*(loop.run_in_executor(None, member, r) for r in range(3))), 30)
    finally:
        for x in nodes:
            await x.close()
    total = full[0] + full[1] + full[2]
    for r, (gathered, scattered, summed) in enumerate(got):
        assert torch.equal(gathered, torch.cat(rows))
        s, e = ranges(counts)[r]
        torch.testing.assert_close(scattered, total[s:e])
        assert torch.equal(summed, got[0][2])  # bit-identical everywhere
        torch.testing.assert_close(summed, total)
    assert comms[0].sent_bytes == (2 * 1 * 3 + 6 * 3 + 2 * 7 * 3) * 4


# --- jobs on loopback rings ----------------------------------------------------------------------


async def _run_job(spec: JobSpec, n: int, *, allow: Sequence[str] = (), timeout: float = 90,
                   offload: bool = False) -> tuple[TrainResult, list[Any]]:
    """Submit ``spec`` on the first of ``n`` loopback members; returns the submitter's result and the others'.

    ``offload``: every member but the second runs a GPU member's code path (a device copy
    of its layers, p2ptrain/_device.py) on the CPU.
    """
    nodes = await started_ring(n)
    try:
        services = [JobService(x, allow_entry=allow, offload=offload and i != 1) for i, x in enumerate(nodes)]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        try:
            mine = await asyncio.wait_for(services[0].submit(spec), timeout)
        finally:
            theirs = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
        return mine, theirs
    finally:
        for x in nodes:
            await x.close()


def _assert_trains_like_one_process(spec: JobSpec, mine: TrainResult, atol: float) -> None:
    ref, ref_losses = train_single(spec)
    torch.testing.assert_close(torch.tensor(mine.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert mine.state_dict is not None and sorted(mine.state_dict) == sorted(ref.state_dict())
    for k, want in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict[k], want, rtol=1e-4, atol=atol, msg=k)


@pytest.mark.parametrize(("n", "shares", "optimizer", "offload"), [
    (2, (1.0, 3.0), "sgd", False), (3, (1.0, 1.0, 2.0), "sgd", False), (3, (), "adamw", False),
    (3, (1.0, 1.0, 2.0), "sgd", True),
])
async def test_a_tensor_job_trains_what_one_process_trains(
    n: int, shares: tuple[float, ...], optimizer: str, offload: bool
) -> None:
    model = f"{__name__}:sgd_tinygpt" if optimizer == "sgd" else "tinygpt"
    lr = 0.5 if optimizer == "sgd" else 1e-2
    spec = JobSpec(model=model, strategy="tensor", global_batch=4, steps=3, seed=1, lr=lr, digest_every=2,
                   model_kwargs=TINY, shares=shares)
    mine, theirs = await _run_job(spec, n, offload=offload)
    assert all(isinstance(t, TrainResult) and t.losses == mine.losses for t in theirs), theirs
    # AdamW: see sgd_tinygpt; GPT-2-style key biases have exactly-zero gradients.
    _assert_trains_like_one_process(spec, mine, atol=1e-6 if optimizer == "sgd" else lr / 100)


@pytest.mark.parametrize(("name", "n", "shares"), [("gpt2", 2, (1.0, 3.0)), ("llama", 3, (1.0, 1.0, 2.0))])
async def test_an_hf_tensor_job_trains_what_one_process_trains(
    hf_dirs: dict[str, Path], name: str, n: int, shares: tuple[float, ...]
) -> None:
    spec = _hf_spec(hf_dirs, name, shares)
    mine, _ = await _run_job(spec, n, allow=[str(hf_dirs["root"])])
    _assert_trains_like_one_process(spec, mine, atol=spec.lr / 100)
    fresh = resolve(spec)
    assert mine.state_dict is not None
    fresh.model.load_state_dict(mine.state_dict)  # the whole model, loadable as the Hugging Face one


@pytest.mark.parametrize(("n", "kwargs", "fix"), [
    (3, {"model_kwargs": {**TINY, "n_head": 2}}, "2 attention heads, fewer than the 3 members"),
    (2, {"shares": (1.0, 2.0, 3.0)}, "shares has 3 entries but the ring has 2 members"),
])
async def test_a_tensor_job_that_cannot_be_split_is_refused_with_the_reason(n: int, kwargs: dict[str, Any], fix: str) -> None:
    spec = JobSpec(**{"model": "tinygpt", "strategy": "tensor", "global_batch": 4, "steps": 2, "model_kwargs": TINY,
                      **kwargs})
    with pytest.raises(JobError, match=fix):
        await _run_job(spec, n, timeout=30)


async def test_a_trainer_built_by_hand_refuses_what_it_cannot_do() -> None:
    nodes = await started_ring(2)
    try:
        common = {"global_batch": 4, "steps": 1}
        with pytest.raises(ConfigError, match="shares has 1 entries"):
            TensorParallelTrainer(nodes[0], tinygpt(0, **TINY), shares=[1.0], **common)
        with pytest.raises(ConfigError, match="checkpoints"):
            TensorParallelTrainer(nodes[0], tinygpt(0, **TINY), checkpoint_every=1, **common)
        with pytest.raises(JobError, match="mid-job"):
            TensorParallelTrainer(nodes[0], tinygpt(0, **TINY), joining=True, **common)
        alone = View(nodes[0].view.epoch, (nodes[0].node_id,))
        trainer = TensorParallelTrainer(nodes[0], tinygpt(0, **TINY), view=alone, **common)
        assert len((await trainer.run()).losses) == 1  # a group of one trains too
    finally:
        for x in nodes:
            await x.close()


async def test_without_sequence_parallelism_the_group_trains_the_same() -> None:
    spec = JobSpec(model=f"{__name__}:sgd_tinygpt", strategy="tensor", global_batch=4, steps=3, seed=4, lr=0.5,
                   model_kwargs=TINY)
    nodes = await started_ring(2)
    try:
        trainers = [TensorParallelTrainer(x, resolve(spec), global_batch=4, steps=3, seed=4, lr=0.5, digest_every=1,
                                          shares=[3.0, 1.0], sequence_parallel=False) for x in nodes]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
    finally:
        for x in nodes:
            await x.close()
    ref, ref_losses = train_single(spec)
    for t, r in zip(trainers, results):
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
        for k, want in ref.state_dict().items():  # every member ends with the whole model
            torch.testing.assert_close(t.w.model.state_dict()[k], want, rtol=1e-4, atol=1e-6, msg=k)


async def test_losing_a_member_stops_the_job_on_every_survivor() -> None:
    spec = JobSpec(model="tinygpt", strategy="tensor", global_batch=4, steps=10_000, seed=0, digest_every=0,
                   model_kwargs=TINY)
    nodes = await started_ring(3)
    stepped = asyncio.Event()
    try:
        services = [JobService(x, on_step=lambda m: stepped.set()) for x in nodes]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        await asyncio.wait_for(stepped.wait(), 60)  # training is under way
        victim = nodes[2]
        serving[1].cancel()
        victim._closed = True  # a crash: the endpoint vanishes without a goodbye
        for t in victim._tasks:
            t.cancel()
        await victim.endpoint.close()
        for task, other in ((submitted, nodes[1]), (serving[0], nodes[0])):
            with pytest.raises(JobError, match=f"member {victim.node_id} left or failed") as lost:
                await asyncio.wait_for(task, 20)
            # A walkthrough: the survivor whose error arrived first was named as the one that failed.
            assert f"member {other.node_id} failed" not in str(lost.value), lost.value
        await asyncio.gather(serving[1], return_exceptions=True)
    finally:
        for x in nodes[:2]:
            await x.close()


async def test_a_member_failing_without_leaving_the_ring_stops_the_others_promptly(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec(model="tinygpt", strategy="tensor", global_batch=4, steps=10_000, seed=0, digest_every=0,
                   model_kwargs=TINY)
    nodes = await started_ring(3)
    victim = nodes[2].node_id
    real = TensorParallelTrainer._loss

    def faulty(self: TensorParallelTrainer, batch: Any) -> torch.Tensor:
        if self.node.node_id == victim and self.next_step == 2:
            raise RuntimeError("injected fault")  # the others wait for its pieces inside their forward pass
        return real(self, batch)

    monkeypatch.setattr(TensorParallelTrainer, "_loss", faulty)
    try:
        services = [JobService(x) for x in nodes]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        for task in (submitted, serving[0]):
            with pytest.raises(JobError, match=f"member {victim} failed: RuntimeError: injected fault"):
                await asyncio.wait_for(task, 30)
        with pytest.raises(RuntimeError, match="injected fault"):
            await asyncio.wait_for(serving[1], 10)
    finally:
        for x in nodes:
            await x.close()


async def test_a_stopped_tensor_job_puts_the_model_together_for_its_submitter() -> None:
    # A walkthrough: Ctrl-C on a tensor job's train wrote no model ("the model is spread over
    # the members"): the split weights were nowhere whole, and the group stopped at once.
    spec = JobSpec(model=f"{__name__}:sgd_tinygpt", strategy="tensor", global_batch=4, steps=100_000, seed=3, lr=0.5,
                   digest_every=0, model_kwargs=TINY, shares=(1.0, 1.0, 2.0))
    nodes = await started_ring(3)
    try:
        steps: list[int] = []
        submitter = JobService(nodes[0], on_step=lambda m: steps.append(m.step))
        serving = [asyncio.ensure_future(JobService(x).serve(once=True)) for x in nodes[1:]]
        job = asyncio.ensure_future(submitter.submit(spec))
        await until(lambda: len(steps) >= 2, 60, "the first steps")
        assert submitter.stop("stopped by its submitter")
        with pytest.raises(JobStopped, match=r"stopped by its submitter at step \d+") as stopped:
            await asyncio.wait_for(job, 30)
        for s in serving:  # each says who stopped it and why, as for a data-parallel job
            with pytest.raises(JobStopped, match=f"stopped on member {nodes[0].node_id}: stopped by its submitter"):
                await asyncio.wait_for(s, 30)
    finally:
        for x in nodes:
            await x.close()
    at = stopped.value.step
    assert 2 <= at < 100_000 and steps[-1] == at - 1
    trainer = submitter.last_trainer
    assert isinstance(trainer, TensorParallelTrainer) and trainer.whole
    ref, _ = train_single(JobSpec(**{**spec.__dict__, "steps": at}))
    got = trainer.w.model.state_dict()
    assert sorted(got) == sorted(ref.state_dict())  # the model under its own names, as one process trains it
    for k, want in ref.state_dict().items():
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-6, msg=k)


async def test_a_member_joining_the_ring_mid_job_does_not_stop_it(caplog: pytest.LogCaptureFixture) -> None:
    """The group redoes the step the view change broke and trains what one process trains; the newcomer stays out."""
    spec = JobSpec(model=f"{__name__}:gated_tinygpt", strategy="tensor", global_batch=4, steps=6, seed=3, lr=0.5,
                   digest_every=2, model_kwargs=TINY, shares=(1.0, 2.0))
    cl = cluster_name()
    nodes = await started_ring(2, cl)
    newcomer = loopback_node(cl)
    GATE.armed, GATE.opened = False, threading.Event()
    try:
        def on_step(m: StepMetrics) -> None:
            if m.step == 1:
                GATE.armed = True  # the next step's forward waits while the ring changes

        services = [JobService(nodes[0], on_step=on_step), JobService(nodes[1])]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        serving = asyncio.ensure_future(services[1].serve(once=True))
        await until(lambda: GATE.armed, 60, "the job's second step")
        await newcomer.start()
        waiting = asyncio.ensure_future(JobService(newcomer).serve())  # a `p2ptrain join` that came late
        await until(lambda: all(len(x.view) == 3 for x in nodes), 30, "the newcomer in every member's view")
        GATE.armed = False
        GATE.opened.set()
        mine = await asyncio.wait_for(submitted, 60)
        other = await asyncio.wait_for(serving, 30)
        # A walkthrough: the newcomer sat idle with no word of the job that would not take it.
        await until(lambda: "runs without this member" in caplog.text, 10, "the newcomer told")
    finally:
        GATE.armed = False
        GATE.opened.set()
        for x in [*nodes, newcomer]:
            await x.close()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert mine.losses == other.losses
    assert "the tensor-parallel group goes on from step 2" in caplog.text  # the broken step, redone
    told = [r for r in caplog.records if "runs without this member" in r.getMessage()]
    assert len(told) == 1 and "takes no members mid-job (its weights are split over 2 members); this member waits for " \
        "the next job" in told[0].getMessage(), [r.getMessage() for r in told]
    _assert_trains_like_one_process(spec, mine, atol=1e-6)


@pytest.mark.parametrize("recover", [True, False])
async def test_a_member_leaving_in_order_hands_its_share_over(recover: bool) -> None:
    """The others go on re-split over themselves (optimizer state included), or with recover=False all stop."""
    spec = JobSpec(model=f"{__name__}:momentum_tinygpt", strategy="tensor", global_batch=4, steps=7, seed=2, lr=0.1,
                   digest_every=2, model_kwargs=TINY, shares=(2.0, 1.0, 1.0))
    nodes = await started_ring(3)
    try:
        leaver = JobService(nodes[1])

        def on_step(m: StepMetrics) -> None:
            if m.step == 2:
                asyncio.ensure_future(leaver.leave())

        services = [JobService(nodes[0], on_step=on_step, recover=recover), leaver, JobService(nodes[2])]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        left = await asyncio.wait_for(serving[0], 60)
        await nodes[1].close()  # the leaver goes once its run has ended (as p2ptrain join does)
        mine = await asyncio.wait_for(submitted, 60)
        other = await asyncio.wait_for(serving[1], 30)
    finally:
        for x in nodes:
            await x.close()
    assert 3 <= left.steps < spec.steps
    if recover:
        assert mine.steps == other.steps == spec.steps and mine.losses == other.losses
        _assert_trains_like_one_process(spec, mine, atol=1e-6)
    else:
        assert mine.steps == other.steps == left.steps  # the group stopped together, the model gathered
        _assert_trains_like_one_process(JobSpec(**{**spec.to_wire_fields(), "steps": left.steps}), mine, atol=1e-6)
