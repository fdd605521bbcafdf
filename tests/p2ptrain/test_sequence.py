"""Sequence parallelism: every member holds the model and a slice of every sequence.

The strongest test is transparency: over 2 and 3 members, with even and uneven shares,
the ring computes what one process computes on the whole batch (``train_single``), to
rtol 1e-4, for tinygpt (through a real JobService on loopback sockets) and for tiny
Hugging Face GPT-2 and LLaMA models built from configs (nothing is downloaded). The
parameters are compared after SGD: AdamW divides by sqrt(v) + 1e-8 and so turns the
~1e-10 rounding noise on gradients that are exactly zero in exact arithmetic (a key
bias: softmax ignores a shift shared by every key) into steps of ~lr / 100.
"""

from __future__ import annotations

import asyncio
import logging
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

from p2ptrain._errors import ConfigError, JobError
from p2ptrain.ring._node import Node
from p2ptrain.train import JobService, TrainResult, workload_entry
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._seqattn import causal_window
from p2ptrain.train._sequence import SequenceParallelTrainer, refusal, token_slices
from p2ptrain.train._single import train_single
from p2ptrain.train._strategies import members_fit
from p2ptrain.zoo import Workload, tinygpt

from _ring import FAST, cluster_name, fake_ring, loopback_node

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}


def _sgd(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)


@workload_entry
def tiny_sgd(seed: int, **kwargs: Any) -> Workload:
    """tinygpt trained with SGD (a job entry point: this module is imported on every member)."""
    w = tinygpt(seed, **kwargs)
    w.make_optimizer = _sgd
    return w


def _tiny_spec(shares: tuple[float, ...] = (), **kw: Any) -> JobSpec:
    fields: dict[str, Any] = {"model": f"{__name__}:tiny_sgd", "strategy": "sequence", "global_batch": 3, "steps": 3,
                              "seed": 4, "lr": 0.5, "digest_every": 1, "model_kwargs": TINY, "shares": shares, **kw}
    return JobSpec(**fields)


# ---------------------------------------------------------------------------------
# Slicing arithmetic (no network)


@pytest.mark.parametrize(("length", "members", "shares", "counts"), [
    (16, 2, (), [8, 8]),
    (17, 3, (), [6, 6, 5]),  # the remainder goes to the lower ranks
    (16, 2, (1, 2), [5, 11]),  # 5.33 and 10.67: the leftover token to the larger remainder
    (64, 2, (1, 2), [21, 43]),
    (16, 3, (1, 1, 2), [4, 4, 8]),
    (10, 3, (0.5, 0.25, 0.25), [5, 3, 2]),  # 5, 2.5, 2.5: a tie goes to the lower rank
    (4, 3, (1, 1, 1000), [1, 1, 2]),  # every member keeps one token, taken from the richest
    (3, 3, (), [1, 1, 1]),
])
def test_token_slices_are_contiguous_proportional_and_cover_the_sequence(
    length: int, members: int, shares: tuple[float, ...], counts: list[int]
) -> None:
    got = token_slices(length, members, shares)
    assert [n for _, n in got] == counts
    assert [o for o, _ in got] == [sum(counts[:i]) for i in range(members)]
    assert sum(counts) == length and min(counts) >= 1
    if shares and min(counts) > 1:  # no member's count is off its exact share by a token or more
        total = sum(Fraction(s) for s in shares)
        assert all(abs(n - length * Fraction(s) / total) < 1 for n, s in zip(counts, shares))


@pytest.mark.parametrize(("length", "members", "shares", "fix"), [
    (2, 3, (), "a sequence of 2 tokens cannot be cut over 3 members"),
    (16, 3, (1, 2), "2 shares for 3 members; give one share per member in ring order"),
    (16, 2, (1, 0), "must be finite positive numbers"),
    (16, 2, (1, float("inf")), "must be finite positive numbers"),
    (16, 0, (), "at least one member"),
])
def test_token_slices_refuse_what_cannot_be_cut(length: int, members: int, shares: tuple[float, ...], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        token_slices(length, members, shares)


def test_the_causal_window_lets_a_query_see_the_keys_up_to_its_global_position() -> None:
    mask = causal_window(3, 2)  # a slice of positions 3 and 4 over keys 0..4
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_window(0, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_a_member_refuses_what_it_cannot_split_and_says_why() -> None:
    spec = JobSpec(model="tinygpt", strategy="sequence", model_kwargs={**TINY, "block_size": 2})
    assert "a sequence of 2 tokens cannot be cut over 3 members" in str(refusal(spec, resolve(spec), 3))
    assert refusal(spec, resolve(spec), 2) is None
    fits = members_fit(spec, resolve(spec))  # newcomers are asked in only while each member keeps a token
    assert fits(2) and not fits(3)
    mlp = JobSpec(model="mlp", strategy="sequence")
    assert "are not ones sequence parallelism knows" in str(refusal(mlp, resolve(mlp), 2))


# ---------------------------------------------------------------------------------
# tinygpt through JobService on loopback sockets


async def _loopback(n: int) -> list[Any]:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(n)]
    for x in nodes:
        await x.start()
    await asyncio.gather(*(x.wait_for_peers(n - 1, timeout=15) for x in nodes))
    return nodes


async def _submit(nodes: list[Any], spec: JobSpec) -> tuple[TrainResult, list[TrainResult]]:
    services = [JobService(x) for x in nodes]
    serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
    try:
        mine = await asyncio.wait_for(services[0].submit(spec), 60)
    finally:
        theirs = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
    return mine, theirs  # type: ignore[return-value]


@pytest.mark.parametrize("shares", [(1.0, 2.0), (1.0, 1.0, 2.0)])
async def test_a_sequence_job_trains_what_one_process_trains(shares: tuple[float, ...]) -> None:
    spec = _tiny_spec(shares)
    nodes = await _loopback(len(shares))
    try:
        mine, theirs = await _submit(nodes, spec)
    finally:
        for x in nodes:
            await x.close()
    ref, ref_losses = train_single(spec)
    assert {r.digest for r in [mine, *theirs]} == {mine.digest}
    assert all(r.losses == mine.losses for r in theirs)
    torch.testing.assert_close(torch.tensor(mine.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    assert mine.state_dict is not None  # weights back: the submitter holds the trained model
    for k, want in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict[k], want, rtol=1e-4, atol=1e-6, msg=k)


async def test_a_job_the_ring_cannot_cut_is_refused_by_every_member_with_the_reason() -> None:
    nodes = await _loopback(3)
    try:
        for spec, fix in [(_tiny_spec(model_kwargs={**TINY, "block_size": 2}), "a sequence of 2 tokens cannot be cut"),
                          (_tiny_spec((1.0, 2.0)), "2 shares for 3 members")]:
            services = [JobService(x) for x in nodes]
            serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
            with pytest.raises(JobError, match=fix):
                await asyncio.wait_for(services[0].submit(spec), 30)
            for s in serving:
                with pytest.raises(JobError, match=fix):
                    await asyncio.wait_for(s, 10)
    finally:
        for x in nodes:
            await x.close()


async def test_a_member_failing_without_leaving_stops_the_others_waiting_on_its_keys() -> None:
    # Member 2's host callback breaks after step 1; its node stays in the ring, so only its
    # job.abort tells the others, whose compute threads wait in step 2 for its K/V.
    def broken(m: Any) -> None:
        if m.step == 1:
            raise RuntimeError("host callback broke")

    nodes = await _loopback(3)
    try:
        services = [JobService(x, on_step=broken if i == 2 else None) for i, x in enumerate(nodes)]
        runs = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        runs.insert(0, asyncio.ensure_future(services[0].submit(_tiny_spec(steps=500))))
        results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 60)
    finally:
        for x in nodes:
            await x.close()
    assert isinstance(results[2], RuntimeError)
    for r in results[:2]:
        assert isinstance(r, JobError) and f"member {nodes[2].node_id} failed: RuntimeError: host callback broke" in str(r)


# ---------------------------------------------------------------------------------
# A member lost mid-job


async def test_the_survivors_re_slice_and_end_where_a_fault_free_run_ends() -> None:
    spec = _tiny_spec((1.0, 1.0, 2.0), steps=8, global_batch=2)
    async with fake_ring(3) as (net, nodes):
        trainers = [SequenceParallelTrainer(x, resolve(spec), global_batch=spec.global_batch, steps=spec.steps,
                                            seed=spec.seed, lr=spec.lr, digest_every=2, recover=True,
                                            shares=spec.shares) for x in nodes]
        before = [t.slices for t in trainers]
        hit = asyncio.Event()
        trainers[0].on_step = lambda m: hit.set() if m.step >= 2 else None
        tasks = [asyncio.ensure_future(t.run()) for t in trainers]
        await asyncio.wait_for(hit.wait(), 30)
        net.kill(nodes[-1].node_id)  # like kill -9: silent at once
        tasks[-1].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks[:-1]), 60)
        # The lost member's own run ends too, even if its compute thread waited on a peer's K/V.
        await asyncio.wait_for(asyncio.gather(tasks[-1], return_exceptions=True), 30)
    assert before[0] == [(0, 4), (4, 4), (8, 8)]
    ref, _ = train_single(spec)
    for t, r in zip(trainers[:-1], results):
        assert t.recoveries and r.steps == spec.steps and len(t.view) == 2
        assert t.slices == [(0, 8), (8, 8)]  # even over the survivors
        for (k, got), want in zip(t.w.model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6, msg=k)


async def test_an_orderly_leave_is_recovered_from_at_once_not_after_the_old_views_drain() -> None:
    # A walkthrough: Ctrl-C on a sequence job's `join` stalled the ring 2.1-2.4 s (the failure
    # timeout) in 2 of 5 tries, where the others recovered in 0.1 s. The leaver stops at a
    # step boundary; the others are already in the next step's K/V all-gather. Its successor's
    # wait on it ends at once, but the members after it wait on a live neighbour that will
    # never send: they sat out the old view's drain.
    spec = _tiny_spec(steps=8, global_batch=2, digest_every=0)
    async with fake_ring(4) as (net, nodes):
        trainers = [SequenceParallelTrainer(x, resolve(spec), global_batch=spec.global_batch, steps=spec.steps,
                                            seed=spec.seed, lr=spec.lr, recover=True) for x in nodes]
        leaver = trainers[1]
        leaver.on_step = lambda m: leaver.leave() if m.step == 2 else None
        started: dict[int, float] = {}
        for i, t in enumerate(trainers):
            real = t._recover

            async def timed(exc: Any, i: int = i, real: Any = real) -> None:
                started.setdefault(i, time.monotonic())
                await real(exc)

            t._recover = timed  # type: ignore[method-assign]
        tasks = [asyncio.ensure_future(t.run()) for t in trainers]
        await asyncio.wait_for(tasks[1], 30)  # the leaver stopped after step 2
        await asyncio.sleep(0.3)  # the others wait in step 3's K/V exchange
        left = time.monotonic()
        await nodes[1].close()
        results = await asyncio.wait_for(asyncio.gather(*tasks[0:1], *tasks[2:]), 60)
    assert leaver.left_at == 3 and [r.steps for r in results] == [spec.steps] * 3
    late = {i: round(t - left, 3) for i, t in sorted(started.items())}
    assert set(late) == {0, 2, 3} and max(late.values()) < FAST["failure_timeout"] / 2, f"recoveries began {late} s after the leave"
    ref, _ = train_single(spec)
    for t in trainers[0:1] + trainers[2:]:
        for (k, got), want in zip(t.w.model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6, msg=k)


async def test_a_member_that_joins_mid_job_takes_a_slice_and_the_job_still_ends_where_one_process_ends() -> None:
    spec = _tiny_spec((1.0, 1.0, 2.0), steps=40, global_batch=2, digest_every=5)
    async with fake_ring(3) as (net, nodes):
        services = [JobService(x) for x in nodes]
        late = Node(cluster="c", node_id="n9", network=net, **FAST)
        joined = asyncio.Event()

        def on_step(m: Any) -> None:
            time.sleep(0.01)  # a slower step, so the join lands mid-job
            if m.step == 3:
                joined.set()

        services[0].on_step = on_step
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        submitted = asyncio.ensure_future(services[0].submit(spec))
        await asyncio.wait_for(joined.wait(), 30)
        await late.start()
        late.connect(nodes[0].address)
        newcomer = JobService(late)
        joining = asyncio.ensure_future(newcomer.serve(once=True))
        try:
            results = await asyncio.wait_for(asyncio.gather(submitted, *serving), 60)
            results.append(await asyncio.wait_for(joining, 30))
        finally:
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
            await late.close()
    assert 0 < results[-1].first_step < spec.steps and results[-1].steps == spec.steps
    trainers = [s.last_trainer for s in [*services, newcomer]]
    assert all(t.slices == [(0, 4), (4, 4), (8, 4), (12, 4)] for t in trainers)  # even over four
    ref, _ = train_single(spec)
    for t in trainers:
        for got, want in zip(t.w.model.parameters(), ref.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------
# Hugging Face causal LMs


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers, peft) is not installed")
    pytest.importorskip("peft", reason="the hf extra (transformers, peft) is not installed")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = ["the quick brown fox jumps over the lazy dog", "a leaderless ring over zeromq trains one model"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines * 5, trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    v, eos = len(fast), fast.eos_token_id
    root = tmp_path_factory.mktemp("hfseq")
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=v, n_positions=32,
                                        bos_token_id=eos, eos_token_id=eos),
        # One K/V head for two query heads: grouped-query attention, as LLaMA-style models have.
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=v,
                                          max_position_embeddings=32, bos_token_id=eos, eos_token_id=eos),
    }
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = {"data": root / "data.txt"}
    out["data"].write_text("\n".join(lines * 8))
    for name, config in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
        out[name] = root / name
        model.save_pretrained(out[name])
        fast.save_pretrained(out[name])
    return out


@pytest.mark.parametrize(("name", "shares", "lora"), [
    ("gpt2", (1.0, 2.0), 0), ("llama", (1.0, 1.0, 2.0), 0), ("llama", (2.0, 1.0), 4),
])
async def test_hugging_face_models_train_what_one_process_trains(
    hf_dirs: dict[str, Path], name: str, shares: tuple[float, ...], lora: int
) -> None:
    spec = JobSpec(model=f"hf:{hf_dirs[name]}", strategy="sequence", global_batch=3, steps=3, seed=5, lr=0.3,
                   digest_every=1, shares=shares, model_kwargs={"data": str(hf_dirs["data"]), "seq_len": 12,
                                                                 "lora_rank": lora})

    def build() -> Workload:
        w = resolve(spec)
        w.make_optimizer = _sgd
        return w

    async with fake_ring(len(shares)) as (_, nodes):
        trainers = [SequenceParallelTrainer(x, build(), global_batch=spec.global_batch, steps=spec.steps, seed=spec.seed,
                                            lr=spec.lr, digest_every=1, shares=spec.shares) for x in nodes]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
    ref, ref_losses = train_single(spec, workload=build())
    assert len({r.digest for r in results}) == 1
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    for (k, got), want in zip(trainers[0].w.model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=k)
    hf = trainers[0].w.info["hf_model"]
    assert hf.config._attn_implementation == "sdpa"  # the switch to the sequence attention is undone
