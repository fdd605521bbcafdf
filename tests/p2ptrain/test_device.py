"""GPU members: device choice, and rings that mix GPU and CPU members.

A member with an accelerator keeps its master weights and optimizer on the host and
computes on a device copy (p2ptrain/_device.py). Each ring test below runs twice where
torch sees a CUDA device: once on it (``cuda``), and once on the stand-in
(``offload=True`` keeps that separate copy even on the CPU), which runs every copy a
GPU member makes (weights to the device before a step, gradients back, activations and
gradients across the stage boundary, group gradient buckets packed from the device copy)
on a CPU-only machine. Each checks transparency against one process on the CPU: a ring
that mixes GPU members with plain CPU members trains what one device trains. On CUDA the
kernels round differently, so those runs compare to float tolerance, not bit for bit.
``.ci/gpu-check`` runs this file on a GPU machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from p2ptrain._device import HOST, Placement, pick_device
from p2ptrain._errors import ConfigError, JobError
from p2ptrain.train import DataParallelTrainer, JobService, JobSpec, TrainResult, workload_entry
from p2ptrain.train._job import resolve
from p2ptrain.train._single import train_single
from p2ptrain.train._strategies import make_trainer, offer_refusal
from p2ptrain.train.pipeline._trainer import PipelineTrainer, Stage
from p2ptrain.zoo import Workload, mlp, tinygpt

from _ring import started_ring


def test_auto_is_the_cpu_on_a_machine_without_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == HOST
    assert pick_device("cpu") == HOST
    assert pick_device(torch.device("cpu")) == HOST


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")


@pytest.mark.parametrize("spec, match", [
    ("gpu", "is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:x", "is not one of"),
    ("mps:1", "is not one of"),
    (3, "must be a string"),
])
def test_malformed_devices_are_refused(spec: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pick_device(spec)


def test_a_device_this_torch_cannot_use_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA device; use --device cpu"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="sees no Apple MPS device"):
        pick_device("mps")


async def test_a_job_service_refuses_an_unusable_device_before_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        JobService(object(), device="cuda")  # type: ignore[arg-type]


def test_the_device_copy_trains_and_the_host_copy_is_the_master() -> None:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    place = Placement("cpu", offload=True)
    dev = place.module(host)
    assert dev is not host and all(a is not b for a, b in zip(dev.parameters(), host.parameters()))
    assert place.twins(list(host.parameters())) == list(dev.parameters())
    with torch.no_grad():
        host[0].weight.add_(1.0)  # the optimizer (or a restore) moved the host copy
    place.push()
    torch.testing.assert_close(dev[0].weight, host[0].weight)
    x = torch.randn(5, 4)
    dev(place.to_device(x)).sum().backward()
    assert all(p.grad is None for p in host.parameters())
    place.pull()
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ref.load_state_dict(host.state_dict())
    ref(x).sum().backward()
    for p, q in zip(host.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad is None for p in dev.parameters())  # pulled: the next step starts clean


def test_a_cpu_member_makes_no_copy() -> None:
    host = nn.Linear(2, 2)
    place = Placement("cpu")
    assert place.module(host) is host and not place.separate
    x = torch.ones(1)
    assert place.to_device(x) is x and place.to_host(x) is x


def _sgd(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)


@workload_entry
def sgd_mlp(seed: int = 0, **kwargs: Any) -> Workload:
    """mlp trained with plain SGD: parameters move by lr x gradient, so a kernel's rounding stays that small.

    (Adam divides by sqrt(v) + 1e-8, which turns rounding noise on a gradient that is
    zero in exact arithmetic into a step of lr; CUDA and the CPU round differently.)
    """
    w = mlp(seed, **kwargs)
    w.make_optimizer = _sgd
    return w


@workload_entry
def sgd_tinygpt(seed: int = 0, **kwargs: Any) -> Workload:
    """tinygpt trained with plain SGD (a job entry point: this module is imported on every member)."""
    w = tinygpt(seed, **kwargs)
    w.make_optimizer = _sgd
    return w


# Where a "GPU member" computes: the stand-in on every machine (on the CPU even where torch
# sees a GPU: a job service's default device is "auto"), a real CUDA device where torch sees one.
GPU = [pytest.param({"device": "cpu", "offload": True}, id="stand-in")]
if torch.cuda.is_available():
    GPU.append(pytest.param({"device": "cuda"}, id="cuda"))


def _close(gpu: dict[str, Any]) -> dict[str, float]:
    """How close a ring with such members must be to one CPU process."""
    return {"rtol": 1e-5, "atol": 1e-6} if gpu.get("offload") else {"rtol": 1e-4, "atol": 1e-5}


def _on_gpu(place: Placement, gpu: dict[str, Any]) -> bool:
    return place.separate and place.device.type == torch.device(gpu["device"]).type


DATA = JobSpec(model=f"{__name__}:sgd_mlp", global_batch=24, steps=12, seed=3, lr=0.1, model_kwargs={"depth": 4})


@pytest.mark.parametrize("gpu", GPU)
async def test_a_data_parallel_ring_mixing_gpu_and_cpu_members_is_transparent(gpu: dict[str, Any]) -> None:
    nodes = await started_ring(3)
    try:
        trainers = [DataParallelTrainer(x, resolve(DATA), global_batch=24, steps=12, seed=3, lr=0.1,
                                        digest_every=4, **(gpu if i != 1 else {}))
                    for i, x in enumerate(nodes)]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    assert [_on_gpu(t.place, gpu) for t in trainers] == [True, False, True]
    assert len({r.digest for r in results}) == 1  # replicas bit-identical: the optimizer runs on each host
    ref_model, ref_losses = train_single(DATA)
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(results[0].losses), torch.tensor(ref_losses), **_close(gpu))
    for p, q in zip(trainers[0].w.model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **_close(gpu))


PIPE = JobSpec(model=f"{__name__}:sgd_mlp", strategy="pipeline", global_batch=24, steps=12, seed=4, lr=0.1,
               micro_batches=4, model_kwargs={"depth": 4})


async def _pipeline(layout: Callable[[list[str]], Sequence[Any]], gpus: Sequence[dict[str, Any]],
                    close: dict[str, float]) -> list[PipelineTrainer]:
    nodes = await started_ring(len(gpus))
    try:
        members = list(nodes[0].view.members)
        trainers = [PipelineTrainer(x, resolve(PIPE), stages=layout(members), global_batch=24, micro_batches=4,
                                    steps=12, seed=4, lr=0.1, **g) for x, g in zip(nodes, gpus)]
        results = await asyncio.gather(*(t.run() for t in trainers))
    finally:
        for x in nodes:
            await x.close()
    ref_model, ref_losses = train_single(PIPE)
    for r in results:
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(ref_losses), **close)
    by_stage: dict[int, list[tuple[PipelineTrainer, Any]]] = {}
    for t, r in zip(trainers, results):
        if t.stage_index is not None:
            by_stage.setdefault(t.stage_index, []).append((t, r))
    for group in by_stage.values():
        assert len({r.digest for _, r in group}) == 1
    got = [p for k in sorted(by_stage) for p in by_stage[k][0][0].stage.parameters()]  # the host copies
    for p, q in zip(got, list(ref_model.parameters()), strict=True):
        torch.testing.assert_close(p, q, **close)
    return trainers


@pytest.mark.parametrize("gpu", GPU)
async def test_a_pipeline_of_gpu_members_moves_activations_across_the_boundary_and_is_transparent(
    gpu: dict[str, Any]
) -> None:
    trainers = await _pipeline(lambda m: [Stage(0, 3, ((m[0], 6),)), Stage(4, 8, ((m[1], 6),))], [gpu, gpu],
                               _close(gpu))
    assert all(_on_gpu(t.place, gpu) for t in trainers)


@pytest.mark.parametrize("gpu", GPU)
async def test_a_hybrid_group_mixing_a_gpu_and_a_cpu_member_is_transparent(gpu: dict[str, Any]) -> None:
    # Stage 1's group sums gradient buckets packed from the GPU member's device copy.
    await _pipeline(lambda m: [Stage(0, 3, ((m[1], 6),)), Stage(4, 8, ((m[2], 4), (m[0], 2)))], [gpu, {}, gpu],
                    _close(gpu))


TINY = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16}


@pytest.mark.parametrize("strategy, shares", [("tensor", (1.0, 1.0, 2.0)), ("sequence", (1.0, 1.0, 2.0))])
@pytest.mark.parametrize("gpu", GPU)
async def test_tensor_and_sequence_jobs_mixing_gpu_and_cpu_members_are_transparent(
    gpu: dict[str, Any], strategy: str, shares: tuple[float, ...]
) -> None:
    spec = JobSpec(model=f"{__name__}:sgd_tinygpt", strategy=strategy, global_batch=4, steps=3, seed=1, lr=0.5,
                   digest_every=1, model_kwargs=TINY, shares=shares)
    # Member 0 computes on the GPU path, member 1 on its CPU, member 2 on the stand-in too:
    # two members of one process never share a real GPU here (see the test below).
    places = [gpu, {"device": "cpu"}, gpu if gpu.get("offload") else {"device": "cpu"}]
    nodes = await started_ring(len(shares))
    try:
        services = [JobService(x, **place) for x, place in zip(nodes, places)]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        try:
            mine = await asyncio.wait_for(services[0].submit(spec), 90)
        finally:
            theirs = await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
    finally:
        for x in nodes:
            await x.close()
    assert all(isinstance(t, TrainResult) and t.losses == mine.losses for t in theirs), theirs
    ref, ref_losses = train_single(spec)
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(mine.losses), torch.tensor(ref_losses), **_close(gpu))
    assert mine.state_dict is not None
    for k, want in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict[k], want, **_close(gpu), msg=k)


@pytest.mark.parametrize("strategy", ["tensor", "sequence"])
async def test_two_members_of_one_process_on_one_gpu_refuse_a_tensor_or_sequence_job_instead_of_hanging(
    strategy: str
) -> None:
    # PyTorch runs a device's backward passes on one thread per process; a tensor or sequence
    # backward waits for the other members inside it. On an H200 such a ring hung until the
    # test's timeout (two members of one process on cuda:0); the second member now refuses.
    # No CUDA is touched before the refusal, so the accelerator is named, not used.
    spec = JobSpec(model=f"{__name__}:sgd_tinygpt", strategy=strategy, global_batch=4, steps=2, model_kwargs=TINY)
    nodes = await started_ring(3)
    try:
        services = [JobService(x, device="cpu") for x in nodes]
        for s in (services[0], services[2]):
            s.device = torch.device("cuda", 0)
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        with pytest.raises(JobError, match=rf"refused job .*: {nodes[2].node_id} would share cuda:0 with "
                                           rf"{nodes[0].node_id}, a member of this job in the same process; "
                                           rf"a {strategy}-parallel backward"):
            await asyncio.wait_for(services[0].submit(spec), 30)
        await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
    finally:
        for x in nodes:
            await x.close()
    other = JobSpec(model=f"{__name__}:sgd_tinygpt", strategy="data", global_batch=4, steps=2, model_kwargs=TINY)
    assert offer_refusal(other, 3, "b", False, torch.device("cuda", 0), "j") is None  # data: no wait inside backward
    assert offer_refusal(spec, 3, "b", False, torch.device("cpu"), "j") is None  # the CPU: each caller's own thread
    # An auto job that chose this strategy meets the check where its trainer is built.
    assert offer_refusal(spec, 3, "a", False, torch.device("cuda", 0), "auto-job") is None
    with pytest.raises(JobError, match="b would share cuda:0 with a, a member of this job in the same process"):
        make_trainer(spec, SimpleNamespace(node_id="b"), resolve(spec), device=torch.device("cuda", 0), job="auto-job")


@pytest.mark.parametrize("command", [["train", "tinygpt", "--peers", "1"], ["demo"], ["join"]])
def test_the_cli_refuses_an_unusable_device_before_joining_or_writing(tmp_path: Any, command: list[str]) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    extra = ["--out", str(out)] if command[0] == "train" else ["--runs-dir", str(out)] if command[0] == "demo" else []
    done = subprocess.run([sys.executable, "-m", "p2ptrain", *command, *extra, "--device", "cuda:99"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "device 'cuda:99'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
