"""Hugging Face causal LMs from local directories: the cut, transparency, LoRA, saving back, the allow-list.

Tiny GPT-2 and LLaMA models are built from configs and saved with ``save_pretrained``
into a temporary directory beside a byte-level BPE tokenizer trained on a few lines:
nothing is downloaded. Three members on the in-memory ring must compute what one
process computes (``train_single``), with and without LoRA, in data-parallel and
pipeline jobs (rtol 1e-4).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from p2ptrain._errors import JobError
from p2ptrain.train import JobService, TrainResult, check_here
from p2ptrain.train._dataparallel import DataParallelTrainer
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train._single import train_single
from p2ptrain.train.pipeline._trainer import PipelineTrainer
from p2ptrain.zoo import hf_causal_lm, save_hf

from _ring import fake_ring

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers, peft) is not installed")
pytest.importorskip("peft", reason="the hf extra (transformers, peft) is not installed")

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, peer to peer training on edge devices",
    "a leaderless ring over zeromq trains one model together",
    "robots, jetsons and laptops pool their compute on the lan",
]
SEQ = 16


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LINES * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``gpt2`` and ``llama`` model directories, ``txt`` and ``jsonl`` data files, all under ``root``."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    v, eos = len(tok), tok.eos_token_id
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=v, n_positions=64,
                                        bos_token_id=eos, eos_token_id=eos),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=v,
                                          max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos),
    }
    out = {"root": root}
    logging.getLogger("transformers").setLevel(logging.ERROR)  # config warnings about the tiny vocab
    for name, config in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    out["txt"] = root / "data.txt"
    out["txt"].write_text("\n".join(LINES * 4))
    out["jsonl"] = root / "data.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES * 4))
    return out


def _spec(dirs: dict[str, Path], name: str, strategy: str = "data", lora: int = 0, lr: float = 1e-2) -> JobSpec:
    kwargs = {"data": str(dirs["jsonl"]), "seq_len": SEQ, "lora_rank": lora}
    return JobSpec(model=f"hf:{dirs[name]}", strategy=strategy, global_batch=12, steps=4, seed=5, lr=lr,
                   micro_batches=3 if strategy == "pipeline" else 1, digest_every=0, model_kwargs=kwargs)


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_layers_compute_the_models_forward(hf_dirs: dict[str, Path], name: str, lora: int) -> None:
    w = resolve(_spec(hf_dirs, name, lora=lora))
    hf = w.info["hf_model"]
    own = {id(p) for p in hf.parameters()}
    assert {id(p) for p in w.model.parameters()} == own, "the layers must hold the model's own parameters"
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for n, p in hf.named_parameters():
            if "lora_B" in n:  # 0 at init; make the adapters count
                p.copy_(torch.randn(p.shape, generator=gen))
        ids = w.batch(range(4))[:, :-1]
        torch.testing.assert_close(w.model(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in hf.named_parameters() if p.requires_grad]
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(hf.parameters()))


def test_the_data_is_packed_tokens_and_the_build_is_deterministic(hf_dirs: dict[str, Path]) -> None:
    a = hf_causal_lm(str(hf_dirs["gpt2"]), 1, data=str(hf_dirs["jsonl"]), seq_len=SEQ, lora_rank=2)
    b = hf_causal_lm(str(hf_dirs["gpt2"]), 1, data=str(hf_dirs["jsonl"]), seq_len=SEQ, lora_rank=2)
    c = hf_causal_lm(str(hf_dirs["gpt2"]), 1, data=str(hf_dirs["txt"]), seq_len=SEQ)
    tok = a.info["tokenizer"]
    want = sum((tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for line in LINES * 4), [])
    assert a.dataset.ids.tolist() == want  # type: ignore[attr-defined]
    sample = a.dataset[1]
    assert sample.shape == (SEQ + 1,) and sample.tolist() == want[SEQ : 2 * SEQ + 1]
    assert a.data_digest == b.data_digest != c.data_digest
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)  # LoRA adapters drawn from the job seed, not the global RNG
    x, y = a.split(a.batch([0, 1]))
    with torch.no_grad():
        loss = a.criterion(a.model(x), y)  # type: ignore[misc]
    assert loss.shape == () and 4.0 < float(loss) < 7.0  # ~ln(300) at init


def _sgd(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)


def _build(spec: JobSpec, optimizer: str) -> Any:
    w = resolve(spec)
    if optimizer == "sgd":
        w.make_optimizer = _sgd
    return w


async def _distributed(spec: JobSpec, optimizer: str, offload: bool = False) -> list[Any]:
    """Train ``spec`` on three fake-ring members; returns the trainers in ring order.

    ``offload``: the first and last member run a GPU member's code path (a device copy
    of their layers, p2ptrain/_device.py) on the CPU.
    """
    async with fake_ring(3) as (_, nodes):
        ids = list(nodes[0].view.members)
        nodes = sorted(nodes, key=lambda x: ids.index(x.node_id))
        common = {"global_batch": spec.global_batch, "steps": spec.steps, "seed": spec.seed, "lr": spec.lr}
        gpu = [offload, False, offload]
        if spec.strategy == "data":
            trainers: list[Any] = [DataParallelTrainer(x, _build(spec, optimizer), digest_every=0, offload=o, **common)
                                   for x, o in zip(nodes, gpu)]
        else:
            # With LoRA the first stage holds the frozen embedding alone: nothing in it trains.
            stages = [(0, 0), (1, 2), (3, 3)] if spec.model_kwargs["lora_rank"] else [(0, 1), (2, 2), (3, 3)]
            trainers = [PipelineTrainer(x, _build(spec, optimizer), stages=stages, micro_batches=spec.micro_batches,
                                        offload=o, **common) for x, o in zip(nodes, gpu)]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
        for t, r in zip(trainers, results):
            t.result = r
    return trainers


def _trained_state(trainers: list[Any], spec: JobSpec) -> dict[str, torch.Tensor]:
    """The whole model's state_dict, each layer taken from the member that trained it."""
    if spec.strategy == "data":
        return trainers[0].w.model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for t in trainers:
        for u in t.units:
            state.update({f"{u}.{k}": v for k, v in t.layers[u].state_dict().items()})
    return state


# SGD compares the computation itself: parameters move by lr x gradient, so equal
# parameters mean equal gradients. AdamW divides by sqrt(v) + 1e-8, which turns the
# ~1e-10 rounding noise on gradients that are exactly zero in exact arithmetic (GPT-2's
# key bias: softmax ignores a shift shared by every key) into steps of ~lr / 100, so
# with AdamW the parameters are compared to atol lr / 100 (the losses still to rtol 1e-4).
@pytest.mark.parametrize(("name", "strategy", "lora", "optimizer", "offload"), [
    ("gpt2", "data", 0, "sgd", False), ("gpt2", "data", 4, "sgd", False), ("gpt2", "pipeline", 0, "sgd", False),
    ("gpt2", "pipeline", 4, "sgd", False), ("llama", "pipeline", 4, "sgd", False), ("llama", "data", 0, "adamw", False),
    # GPU members' code path (device copies) in a ring with a CPU member, with and without LoRA.
    ("gpt2", "pipeline", 4, "sgd", True), ("llama", "data", 4, "adamw", True),
])
async def test_three_members_train_what_one_process_trains(
    hf_dirs: dict[str, Path], tmp_path: Path, name: str, strategy: str, lora: int, optimizer: str, offload: bool
) -> None:
    spec = _spec(hf_dirs, name, strategy, lora, lr=0.3 if optimizer == "sgd" else 1e-2)
    trainers = await _distributed(spec, optimizer, offload)
    ref, ref_losses = train_single(spec, workload=_build(spec, optimizer))
    torch.testing.assert_close(torch.tensor(trainers[0].result.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    state, want = _trained_state(trainers, spec), ref.state_dict()
    assert sorted(state) == sorted(want)
    atol = 1e-6 if optimizer == "sgd" else spec.lr / 100
    for k in want:
        torch.testing.assert_close(state[k], want[k], rtol=1e-4, atol=atol, msg=k)
    if strategy == "pipeline":
        # Saving back: the trained layers go into a fresh copy of the model, out with save_pretrained.
        fresh = resolve(spec)
        fresh.model.load_state_dict(state)
        save_hf(fresh, tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
        ids = fresh.batch(range(2))[:, :-1]
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, ref(ids), rtol=1e-4, atol=1e-5)
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
        prompt = tok("the quick", return_tensors="pt")
        out = back.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[1] == prompt["input_ids"].shape[1] + 4


def test_a_job_from_the_network_names_only_allowed_directories(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(hf_dirs, "gpt2")
    with pytest.raises(JobError, match="not inside a directory this node allows; start the node with --allow-entry"):
        resolve(spec, allowed_modules=())
    with pytest.raises(JobError, match="not inside a directory"):
        resolve(spec, allowed_modules=[str(tmp_path)])  # an allowed directory, but not this one
    root = str(hf_dirs["root"])
    assert resolve(spec, allowed_modules=["some.module", root]).info["family"] == "gpt2"
    # A link inside an allowed directory that points outside it does not get through.
    os.symlink(hf_dirs["gpt2"], tmp_path / "link")
    linked = JobSpec(**{**spec.to_wire_fields(), "model": f"hf:{tmp_path / 'link'}"})
    with pytest.raises(JobError, match="Hugging Face model directory"):
        resolve(linked, allowed_modules=[str(tmp_path)])
    # The data file must be allowed too.
    (tmp_path / "d.txt").write_text("x" * 100)
    outside = JobSpec(**{**spec.to_wire_fields(), "model_kwargs": {**spec.model_kwargs, "data": str(tmp_path / "d.txt")}})
    with pytest.raises(JobError, match="data file"):
        resolve(outside, allowed_modules=[root])


async def test_a_job_service_runs_an_allowed_hf_job_and_refuses_it_elsewhere(
    hf_dirs: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec(hf_dirs, "gpt2", "pipeline", lora=4)

    async def submit(allow: list[str]) -> TrainResult:
        async with fake_ring(3) as (_, nodes):
            services = [JobService(n, allow_entry=allow) for n in nodes]
            serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
            try:
                return await asyncio.wait_for(services[0].submit(spec), 60)
            finally:
                await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)

    with pytest.raises(JobError, match="is not inside a directory this node allows"):
        await submit(["some.module"])
    result = await submit(["some.module", str(hf_dirs["root"])])
    ref, ref_losses = train_single(spec)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert result.state_dict is not None  # weights back: the whole model on the submitter
    fresh = resolve(spec)
    fresh.model.load_state_dict(result.state_dict)
    for k, want in ref.state_dict().items():
        torch.testing.assert_close(result.state_dict[k], want, rtol=1e-4, atol=spec.lr / 100, msg=k)
    save_hf(fresh, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize(("model", "fix"), [
    ("hf:", "followed by a directory path"),
    ("hf:/models/a\x00b", "printable"),
    ("hf:/models/a\nb", "printable"),
    ("hf: /models", "printable"),
    ("hf:/" + "m" * 200, "longer than 200"),
])
def test_the_spec_checks_an_hf_path(model: str, fix: str) -> None:
    with pytest.raises(JobError, match=fix):
        JobSpec(model=model)


def test_an_hf_spec_travels_and_a_relative_path_resolves_per_member(
    hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec(model="hf:gpt2", model_kwargs={"data": "data.txt", "seq_len": 8})
    assert JobSpec.from_wire(spec.to_wire()) == spec
    monkeypatch.chdir(hf_dirs["root"])  # relative to each member's working directory
    assert resolve(spec, allowed_modules=["./"]).info["family"] == "gpt2"


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({}, "needs model_kwargs\\['data'\\] \\(`--data PATH` on the command line\\)"),
    ({"seq_len": 65}, "'seq_len'\\]=65 is out of range"),
    ({"lora_rank": "4"}, "wants an int"),
    ({"lora": 4}, "not a parameter of model 'hf:"),
    ({"data": "/no/such.txt"}, "cannot read data file"),
    ({"data": "data.csv"}, "must be .txt"),
])
def test_bad_hf_kwargs_get_a_clear_error(hf_dirs: dict[str, Path], kwargs: dict[str, Any], fix: str) -> None:
    kw = {"data": str(hf_dirs["txt"]), **kwargs} if "data" not in kwargs and kwargs else kwargs
    spec = JobSpec(model=f"hf:{hf_dirs['gpt2']}", model_kwargs=kw)
    with pytest.raises(JobError, match=fix):
        resolve(spec)
    with pytest.raises(JobError, match=fix):  # and where the job is written (seq_len reached the members only)
        check_here(spec)


def test_tensor_with_lora_is_refused_where_the_job_is_written(hf_dirs: dict[str, Path]) -> None:
    # A walkthrough: `--strategy tensor --lora` formed the ring and waited 14 s for every member to refuse it.
    spec = JobSpec(model=f"hf:{hf_dirs['gpt2']}", strategy="tensor",
                   model_kwargs={"data": str(hf_dirs["txt"]), "seq_len": SEQ, "lora_rank": 4})
    with pytest.raises(JobError, match="the tensor strategy .* takes no LoRA adapters; train with LoRA under the data"):
        check_here(spec)


def test_an_empty_data_file_is_refused_where_the_job_is_written(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(JobError, match=f"data file '{empty}' holds no text to train on"):
        check_here(JobSpec(model=f"hf:{hf_dirs['gpt2']}", model_kwargs={"data": str(empty)}))


def test_a_missing_directory_and_a_bad_jsonl_line_are_named(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(JobError, match="holds no config.json"):
        resolve(JobSpec(model=f"hf:{tmp_path}", model_kwargs={"data": str(hf_dirs["txt"])}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(JobError, match="line 2 needs a string field 'text'"):
        resolve(JobSpec(model=f"hf:{hf_dirs['gpt2']}", model_kwargs={"data": str(bad)}))


def test_the_zoo_and_the_trainers_import_no_transformers() -> None:
    # transformers costs ~2 s to import: only a job that names an hf: model pays for it.
    code = "import sys, p2ptrain.zoo, p2ptrain.train; print(sorted({'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_example_workload_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    # Imported as `my_workload`, the way a member with it on its Python path would.
    path = Path(__file__).resolve().parents[2] / "examples" / "my_workload.py"
    spec = importlib.util.spec_from_file_location("my_workload", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_workload", module)
    spec.loader.exec_module(module)
    assert module.ENTRY == "my_workload:reacher"
    losses = module.run(module.Config(members=2, steps=20))
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_p2ptrain_train_fine_tunes_a_local_hf_model_with_lora_over_three_processes(
        hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Issue 12's acceptance, as a user runs it: two `join` members and `train ... --lora --out`."""
    import os
    import secrets
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cluster, out = "t-hf-" + secrets.token_hex(4), tmp_path / "out"
    run = [sys.executable, "-m", "p2ptrain"]
    joins = [subprocess.Popen([*run, "join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--json",
                               "--duration", "150", "--allow-entry", str(hf_dirs["root"])],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    train = subprocess.Popen([*run, "train", f"hf:{hf_dirs['gpt2']}", "--data", str(hf_dirs["jsonl"]), "--lora",
                              "--lora-rank", "4", "--model-arg", f"seq_len={SEQ}", "--strategy", "pipeline",
                              "--micro-batches", "3", "--global-batch", "12", "--steps", "6", "--seed", "5",
                              "--lr", "0.01", "--peers", "3", "--out", str(out), "--cluster", cluster,
                              "--interface", "127.0.0.1"], env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        text, _ = train.communicate(timeout=120)
    finally:
        for p in [train, *joins]:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert train.returncode == 0, text
    assert "done: 6 steps" in text, text
    record = json.loads((out / "p2ptrain-job.json").read_text())
    spec = JobSpec.from_wire(record["job"])
    assert spec.model_kwargs["lora_rank"] == 4 and spec.strategy == "pipeline"
    _, losses = train_single(spec)
    assert record["final_loss"] == pytest.approx(losses[-1], rel=1e-4)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("the quick", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] == ids.shape[1] + 4


def test_an_hf_model_too_big_for_the_free_memory_is_refused_before_its_weights_load(
        hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import p2ptrain.zoo._workload as workload

    spec = JobSpec(model=f"hf:{hf_dirs['gpt2']}", model_kwargs={"data": str(hf_dirs["txt"])})
    monkeypatch.setattr(workload, "available_memory", lambda: 1 << 16)  # 64 KiB free
    for check in (check_here, resolve):
        with pytest.raises(JobError, match=r"M parameters \(0\.0 GiB\) and this device has 0\.0 GiB of memory available"):
            check(spec)
    monkeypatch.setattr(workload, "available_memory", lambda: None)
    check_here(spec)


def test_the_demo_trains_a_hugging_face_model_its_peers_are_allowed_to_build(hf_dirs: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    # A walkthrough: `demo --model hf:DIR` was refused by every peer it started ("not inside a
    # directory this node allows; start the node with --allow-entry DIR"), which the user
    # cannot pass to the demo's peers. The model's and the data's folders are now allowed.
    data = tmp_path / "elsewhere" / "data.txt"  # the data file outside the model's folder
    data.parent.mkdir()
    data.write_text(hf_dirs["txt"].read_text())
    done = subprocess.run([sys.executable, "-m", "p2ptrain", "demo", "--model", f"hf:{hf_dirs['gpt2']}", "--model-arg",
                           f"data={data}", "--model-arg", f"seq_len={SEQ}", "--peers", "2", "--steps", "2",
                           "--strategy", "data", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "done: 2 steps" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_model_directory_without_its_tokenizer_is_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    # A walkthrough: save_pretrained of the model alone; transformers made an empty tokenizer,
    # every document became no tokens, and the job trained 20 steps on end-of-text marks, exit 0.
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf_dirs["gpt2"].iterdir():
        if f.name.startswith(("config", "generation", "model")):
            shutil.copy(f, bare / f.name)
    spec = JobSpec(model=f"hf:{bare}", model_kwargs={"data": str(hf_dirs["txt"]), "seq_len": SEQ})
    with pytest.raises(JobError, match=r"holds no tokenizer \(tokenizer.json, .*\); save the model's tokenizer there too"):
        check_here(spec)
    with pytest.raises(JobError, match=r"holds no tokenizer"):
        resolve(spec, allowed_modules=None)


def test_a_model_directory_with_pickled_weights_is_refused_with_the_conversion(hf_dirs: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    # A walkthrough: transformers' "Error no file named model.safetensors found" did not say
    # that .bin weights are refused on purpose, nor how to convert them.
    import shutil

    binned = tmp_path / "binned"
    shutil.copytree(hf_dirs["gpt2"], binned)
    (binned / "model.safetensors").rename(binned / "pytorch_model.bin")  # the name is what is checked
    with pytest.raises(JobError, match=r"holds its weights as .bin files \(pickle, which p2ptrain never loads\); "
                                       r"convert them once .*save_pretrained\(DIR, safe_serialization=True\)"):
        check_here(JobSpec(model=f"hf:{binned}", model_kwargs={"data": str(hf_dirs["txt"]), "seq_len": SEQ}))
