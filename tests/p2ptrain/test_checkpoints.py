"""Checkpoints on disk: a whole ring restarted resumes where it stopped, on any member count.

Each member writes its part of the state (safetensors + a JSON manifest, atomically);
a restarted ring puts the latest complete step together from what the members' disks
hold and goes on. Transparency again: the resumed run ends with the parameters of one
process training the whole job without a stop. A corrupt or truncated file is refused
whole with an error naming it, never loaded half-way.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from p2ptrain import JobError, JobService
from p2ptrain.train import DataParallelTrainer, JobSpec, resolve, train_single
from p2ptrain.train._store import Checkpoints
from p2ptrain.train.pipeline._trainer import PipelineTrainer, even_split

from _ring import cluster_name, fake_ring, loopback_node

DP = JobSpec(model="mlp", global_batch=24, steps=8, seed=3, lr=0.05, checkpoint_every=4)
PP = JobSpec(model="mlp", strategy="pipeline", global_batch=24, steps=10, seed=4, lr=1e-2, micro_batches=4,
             model_kwargs={"depth": 4}, checkpoint_every=5)


async def _dp(members: int, spec: JobSpec, root: Path) -> list[DataParallelTrainer]:
    async with fake_ring(members) as (_, nodes):
        trainers = [DataParallelTrainer(x, resolve(spec), global_batch=spec.global_batch, steps=spec.steps, seed=spec.seed,
                                        lr=spec.lr, checkpoints=Checkpoints(root, spec.lineage(), x.node_id),
                                        checkpoint_every=spec.checkpoint_every, resume=spec.resume,
                                        manifest={"job": spec.to_wire()}) for x in nodes]
        results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
        for t, r in zip(trainers, results):
            t.result = r  # type: ignore[attr-defined]
        return trainers


def _assert_params(model: torch.nn.Module, spec: JobSpec) -> None:
    ref, _ = train_single(spec)
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)


async def test_a_data_parallel_ring_restarted_on_fewer_members_resumes_from_disk(tmp_path: Path) -> None:
    await _dp(3, DP, tmp_path)
    steps = sorted(p.name for p in (tmp_path / DP.lineage()).iterdir())
    assert steps == ["step-00000004", "step-00000008"]
    manifest = json.loads((tmp_path / DP.lineage() / "step-00000008" / "n0.json").read_text())
    assert manifest["step"] == 8 and manifest["units"] == [0] and manifest["job"]["model"] == "mlp"
    longer = JobSpec(**{**DP.to_wire_fields(), "steps": 14, "resume": True})
    trainers = await _dp(2, longer, tmp_path)
    assert trainers[0].result.first_step == 8 and len(trainers[0].result.losses) == 6  # type: ignore[attr-defined]
    _assert_params(trainers[0].w.model, longer)


async def test_a_pipeline_ring_restarted_on_a_different_member_count_resumes_from_disk(tmp_path: Path) -> None:
    n_layers = len(resolve(PP).layers())

    async def run(members: int, spec: JobSpec) -> list[PipelineTrainer]:
        async with fake_ring(members) as (_, nodes):
            ids = list(nodes[0].view.members)
            trainers = [PipelineTrainer(x, resolve(spec), stages=even_split(n_layers, members), global_batch=24,
                                        micro_batches=4, steps=spec.steps, seed=4, lr=1e-2, resume=spec.resume,
                                        checkpoints=Checkpoints(tmp_path, spec.lineage(), x.node_id),
                                        checkpoint_every=spec.checkpoint_every)
                        for x in sorted(nodes, key=lambda n: ids.index(n.node_id))]
            results = await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
            assert {r.first_step for r in results} == {10 if spec.resume else 0}
            return trainers

    await run(3, PP)
    longer = JobSpec(**{**PP.to_wire_fields(), "steps": 13, "resume": True})
    trainers = await run(2, longer)
    ref, _ = train_single(longer)
    for t in trainers:
        for u in t.units:
            for got, want in zip(t.layers[u].parameters(), list(ref)[u].parameters()):
                torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)


async def test_a_resume_that_finds_some_layers_on_no_member_is_refused_not_started_over(tmp_path: Path) -> None:
    # Found walking through the CLI: the member whose disk alone held the first stage's
    # layers was not restarted; the others' checkpoints were partial and the job quietly
    # trained again from step 0 (exit 0, a WARNING the only sign).
    n_layers = len(resolve(PP).layers())

    async def run(members: int, spec: JobSpec) -> list[PipelineTrainer]:
        async with fake_ring(members) as (_, nodes):
            ids = list(nodes[0].view.members)
            trainers = [PipelineTrainer(x, resolve(spec), stages=even_split(n_layers, members), global_batch=24,
                                        micro_batches=4, steps=spec.steps, seed=4, lr=1e-2, resume=spec.resume,
                                        checkpoints=Checkpoints(tmp_path, spec.lineage(), x.node_id),
                                        checkpoint_every=spec.checkpoint_every)
                        for x in sorted(nodes, key=lambda n: ids.index(n.node_id))]
            await asyncio.wait_for(asyncio.gather(*(t.run() for t in trainers)), 60)
            return trainers

    first = await run(3, PP)
    gone = first[0]  # the first stage's member: its disk goes with it
    for f in (tmp_path / PP.lineage()).glob(f"step-*/{gone.node.node_id}.*"):
        f.unlink()
    longer = JobSpec(**{**PP.to_wire_fields(), "steps": 13, "resume": True})
    lost = ", ".join(str(u) for u in gone.units) if len(gone.units) < 2 else f"{min(gone.units)}-{max(gone.units)}"
    # It names who held them, and where (a walkthrough's five devices looked alike on disk; --ephemeral
    # node ids change at every start, so an id alone did not say which device to start again).
    span = f"{min(gone.units)}-{max(gone.units)}"
    with pytest.raises(JobError, match=rf"cannot resume: .*no step with every layer: the latest, step 10, "
                                       rf"lacks layers {lost} .*; at step 10 they were on {gone.node.node_id} at "
                                       rf"{gone.node.address} \(layers {span}\)\. Start the members that wrote the missing layers"):
        await run(2, longer)


async def test_corrupt_or_truncated_checkpoints_are_refused_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await _dp(2, DP, tmp_path)
    lineage = tmp_path / DP.lineage()
    # One copy of step 8 truncated: the other member's copy serves.
    data = lineage / "step-00000008" / "n0.safetensors"
    data.write_bytes(data.read_bytes()[:100])
    resumed = JobSpec(**{**DP.to_wire_fields(), "steps": 10, "resume": True})
    trainers = await _dp(2, resumed, tmp_path)
    assert trainers[0].result.first_step == 8  # type: ignore[attr-defined]
    assert "corrupt or truncated" in caplog.text and "n0.safetensors" in caplog.text
    _assert_params(trainers[0].w.model, resumed)
    # Every copy of every step damaged: resuming stops with the reasons, nothing loaded.
    for f in lineage.glob("step-*/*.safetensors"):
        f.write_bytes(b"\0" * 64 + f.read_bytes()[64:])
    with pytest.raises(JobError, match="cannot resume: .*corrupt or truncated .*sha256 is not the manifest's"):
        await _dp(2, JobSpec(**{**DP.to_wire_fields(), "steps": 12, "resume": True}), tmp_path)


async def test_a_member_without_a_checkpoint_directory_refuses_a_checkpointing_job(tmp_path: Path) -> None:
    cl = cluster_name()
    nodes = [loopback_node(cl) for _ in range(2)]
    for n in nodes:
        await n.start()
    try:
        await asyncio.gather(*(n.wait_for_peers(1, timeout=15) for n in nodes))
        serving = asyncio.ensure_future(JobService(nodes[1]).serve(once=True))
        with pytest.raises(JobError, match="no checkpoint directory; start it with --checkpoint-dir"):
            await asyncio.wait_for(JobService(nodes[0], checkpoint_dir=tmp_path).submit(DP), 30)
        with pytest.raises(JobError):
            await asyncio.wait_for(serving, 10)
    finally:
        for n in nodes:
            await n.close()


async def test_resume_point_finds_the_job_with_the_global_batch_it_trained(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from p2ptrain.cli._train import resumed_spec
    from p2ptrain.train import lineage_difference, resume_point

    await _dp(2, DP, tmp_path)  # checkpoints at steps 4 and 8, global batch 24
    (tmp_path / "junk" / "step-00000001").mkdir(parents=True)
    (tmp_path / "junk" / "step-00000001" / "x.json").write_text("{not json")  # never trusted, never fatal
    other = replace(DP, global_batch=32, resume=True)  # what a third member's default would be
    found = resume_point(other, tmp_path)
    assert found is not None and found[0].global_batch == 24 and found[1] == 8
    assert found[0].lineage() == DP.lineage()
    assert resume_point(replace(DP, seed=99), tmp_path) is None  # another job altogether
    assert resumed_spec(other, str(tmp_path), batch_given=False).global_batch == 24
    assert resumed_spec(other, str(tmp_path), batch_given=True).global_batch == 32
    assert "use --global-batch 24 to resume it" in capsys.readouterr().out
    # Another --lr (a walkthrough): "no checkpoint of this job" now names what differs.
    assert resumed_spec(replace(DP, lr=DP.lr * 2, resume=True), str(tmp_path), batch_given=False).lr == DP.lr * 2
    said = capsys.readouterr().out
    assert f"its latest {DP.model} checkpoint (step 8) was trained with lr {DP.lr!r} (here {DP.lr * 2!r})" in said, said
    assert lineage_difference(replace(DP, model="tinygpt"), tmp_path) is None  # no checkpoint of that model at all


def test_a_resume_whose_checkpoint_already_reaches_the_steps_asked_is_refused(tmp_path: Path) -> None:
    # `--steps 5 --resume` past a step-10 checkpoint said "done: steps 10..9" and wrote the old model again.
    import subprocess
    import sys

    asyncio.run(_dp(2, DP, tmp_path))  # checkpoints at steps 4 and 8
    p = subprocess.run([sys.executable, "-m", "p2ptrain", "train", DP.model, "--strategy", "data", "--global-batch",
                        str(DP.global_batch), "--steps", "8", "--seed", str(DP.seed), "--lr", str(DP.lr),
                        "--checkpoint-dir", str(tmp_path), "--resume",
                        "--cluster", "t-never-x", "--interface", "127.0.0.1", "--out", str(tmp_path / "out"),
                        *(f"--model-arg={k}={v}" for k, v in DP.model_kwargs.items())],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--resume: the checkpoint at step 8 in" in p.stderr and "already reaches --steps 8" in p.stderr, p.stderr
    assert "joined cluster" not in p.stdout and not (tmp_path / "out").exists()


def test_steps_before_the_kept_ones_go_whichever_run_wrote_them(tmp_path: Path) -> None:
    # `train --checkpoint-dir D --resume`, four runs: each took a fresh node id and pruned only
    # its own files, so D held eight whole checkpoints under four names (a walkthrough).
    units = {0: {"w": torch.ones(3)}}
    for run, steps in enumerate(((5, 10), (15, 20), (25,))):
        cp = Checkpoints(tmp_path, "lin", f"run{run}")
        for step in steps:
            cp.write(step, units)
    left = sorted((d.name, sorted(f.name for f in d.iterdir())) for d in (tmp_path / "lin").iterdir())
    # run2 has written one step: run1's 15 and 20 stay (20 is where a resume goes on from).
    assert left == [("step-00000015", ["run1.json", "run1.safetensors"]), ("step-00000020", ["run1.json", "run1.safetensors"]),
                    ("step-00000025", ["run2.json", "run2.safetensors"])]
    cp.write(30, units)  # two of its own: the earlier runs' steps go
    assert sorted(d.name for d in (tmp_path / "lin").iterdir()) == ["step-00000025", "step-00000030"]
    assert sorted(cp.scan()) == [25, 30]
