"""`p2ptrain train MODEL`: a member offers a job to the ring and writes the trained model, as a user runs it.

Real processes on loopback: `p2ptrain train` next to two `p2ptrain join` processes,
found over mDNS on 127.0.0.1. The model it writes (`model.safetensors`, read back with
safetensors, no pickle) must equal what one process training the same job ends with
(rtol 1e-4), for data parallelism and for a planned pipeline, whose stages are
gathered on the submitter over the ring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from p2ptrain._errors import ConfigError
from p2ptrain.train import JobSpec, parse_model_args, train_single

from _transparency import Reference

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _p2ptrain(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "p2ptrain", *args], env=ENV, text=True, **kw)  # type: ignore[call-overload]


def _finish(p: subprocess.Popen[str], timeout: float, *others: subprocess.Popen[str]) -> tuple[str, str]:
    """``p``'s (stdout, stderr) once it exits; ``p`` and ``others`` are killed if still running after."""
    try:
        return p.communicate(timeout=timeout)
    finally:
        for q in (p, *others):
            if q.poll() is None:
                q.kill()
            q.wait()


class _Lines:
    """A process's stdout, read on a thread: a test waits for a line while the process runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        self._reader.start()

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Until a line matches ``pattern`` (or ``timeout`` seconds; the test's assertions then say what came)."""
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, ln) for ln in self.lines) and time.monotonic() < deadline:
            time.sleep(0.2)

    def text(self) -> str:
        """Everything read, once the process has exited."""
        self._reader.join(timeout=10)
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "model"), [("data", "mlp"), ("pipeline", "mlp"), ("tensor", "tinygpt"),
                                               ("auto", "tinygpt")])
def test_train_writes_the_model_one_process_would_train(tmp_path: Path, strategy: str, model: str) -> None:
    # Wide enough layers that the planner usually cuts the pipeline into stages on
    # different processes (then the stages come back over ZeroMQ); the model written
    # must be the whole trained one whatever the plan (a tensor job's shares are
    # gathered back into whole layers).
    model_args = {"hidden": 1024, "depth": 4} if strategy == "pipeline" else {}
    if model == "tinygpt":
        model_args = {"n_layer": 2, "n_embd": 48, "n_head": 3, "block_size": 24}
    cluster = "t-train-" + secrets.token_hex(4)
    out = tmp_path / "out"
    joins = [_p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--json",
                       "--duration", "120", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    # One join as a person watches it: a walkthrough's went from "training: step 191" to the next
    # view table with no word, so a finished job looked like a stalled one.
    joins.append(_p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "120",
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    watched = _Lines(joins[1])
    train = _p2ptrain("train", model, "--peers", "3", "--steps", "20", "--out", str(out), "--global-batch", "24",
                      "--interface", "127.0.0.1", "--cluster", cluster, "--strategy", strategy,
                      *(f"--model-arg={k}={v}" for k, v in model_args.items()),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        text, _ = _finish(train, 90)
        watched.wait_for(r"ended on this member", 15)
    finally:
        for j in joins:
            j.kill()
            j.wait()
    assert train.returncode == 0, text
    assert re.search(r"job \S+ ended on this member after step 20 \(loss \d+\.\d{4}\); waiting for the next job",
                     watched.text()), watched.text()[-3000:]
    assert "ring of 3 member(s)" in text and "done: 20 steps" in text, text
    spec = JobSpec(model=model, strategy=strategy, global_batch=24, steps=20, model_kwargs=model_args,
                   micro_batches=0 if strategy in ("pipeline", "auto") else 1)
    if strategy == "auto":  # the options it weighed, the chosen one marked
        assert "auto: the planner weighed" in text and re.search(r"\* (pipeline|sequence|tensor) ", text), text
    record = json.loads((out / "p2ptrain-job.json").read_text())
    assert JobSpec.from_wire(record["job"]) == spec and record["steps"] == 20
    # AdamW turns float32 rounding into visible steps: an attention key bias (exact gradient
    # zero: softmax ignores a shift shared by every key) moves by rounding noise alone, and
    # a pipeline sums the gradient over the plan's micro-batches (their count picked from
    # speeds measured under load) in another order than the reference's one batch. A fixed
    # atol (lr / 100 here before) passed or failed with the plan. Each tensor must be at most
    # 3x as far from the same run in float64 as one float32 process is (_transparency.py).
    saved = load_file(str(out / "model.safetensors"))
    Reference(spec).assert_state_close(saved, f"\n--- p2ptrain train said:\n{text}")
    # The record's digest is the written model's (a pipeline's was its submitter's own stage:
    # sha-256 of nothing when the plan left the submitter out).
    from p2ptrain.train import param_digest
    from p2ptrain.zoo import build

    whole = build(model, 0, **model_args).model
    whole.load_state_dict(saved)
    assert record["digest"] == param_digest(whole) != "e3b0c44298fc1c14", (record["digest"], text)


@pytest.mark.parametrize(("flags", "message"), [
    (["--model-arg", "depth"], "--model-arg 'depth' is not K=V"),
    (["--model-arg", "seed=3"], "the seed is the job's own 'seed' field"),
    (["--peers", "0"], "--peers counts the members to wait for, this one included: use 1 or more, not 0"),
    (["--checkpoint-every", "5"], "--checkpoint-every and --resume need --checkpoint-dir DIR"),
    (["--submit-only"], "(`--submit-only`) only with the pipeline or auto"),
    (["--codec", "topk:2"], "bad topk fraction '2'"),  # failed only on a remote member before
    (["--global-batch", "0"], "--global-batch must be at least 1, not 0"),  # was taken as the default
    # A plan was printed, then every member refused the job (a third walkthrough).
    (["--strategy", "tensor"], "layer 1 (Tanh) is not a transformer block the tensor strategy knows; train this model with the data"),
    (["--strategy", "sequence"], "its layers Linear, Tanh are not ones sequence parallelism knows"),
    # Silently ignored with the default data strategy (a third walkthrough).
    (["--micro-batches", "4", "--schedule", "gpipe"],
     "--micro-batches and --schedule shape a pipeline's step; the data strategy has none"),
    # These reached the members only, after the wait for --peers and the ring (a walkthrough).
    (["--model-arg", "depth=0"], "model_kwargs['depth']=0 is out of range for 'mlp'; use 1..64"),
    (["--codec", "int8:0"], "bad int8 block size '0'"),
    (["--lora-rank", "0"], "--lora-rank sets the rank of --lora's adapters; add --lora"),  # was silently ignored
])
def test_bad_flags_exit_2_before_joining_the_ring(tmp_path: Path, flags: list[str], message: str) -> None:
    p = _p2ptrain("train", "mlp", "--cluster", "t-never-" + secrets.token_hex(4), "--out", str(tmp_path / "out"), *flags,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = _finish(p, 60)
    assert p.returncode == 2, stdout + stderr
    assert message in stderr
    assert "joined cluster" not in stdout and not (tmp_path / "out").exists()


def test_an_hf_model_whose_files_are_not_here_is_refused_before_joining_the_ring(tmp_path: Path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("some text to train on")
    for argv, message in ((["--data", str(data)], "does not exist here or holds no config.json"),
                          (["--data", str(tmp_path / "none.txt")], "cannot read data file"),
                          ([], "needs model_kwargs['data']")):
        p = _p2ptrain("train", f"hf:{tmp_path / 'no-model'}", *argv, "--cluster", "t-never-" + secrets.token_hex(4),
                      "--out", str(tmp_path / "out"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = _finish(p, 60)
        assert p.returncode == 2 and message in stderr and "joined cluster" not in stdout, stdout + stderr
        assert not (tmp_path / "out").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path: Path) -> None:
    # A walkthrough found runs/ filling with empty train-* folders: one per failed run,
    # and `--out a/b` left `a` behind.
    out = tmp_path / "a" / "out"
    p = _p2ptrain("train", "mlp", "--peers", "2", "--wait", "1", "--interface", "127.0.0.1", "--cluster",
                  "t-never-" + secrets.token_hex(4), "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = _finish(p, 60)
    assert p.returncode == 2 and "the ring has 1 of the 2 members" in stdout + stderr, stdout + stderr
    assert not out.parent.exists() and tmp_path.exists()
    from p2ptrain.discovery import StaticPeer

    with pytest.raises(ConfigError, match=r"'3' is neither an IP address nor a host name \(a count of members is --peers 3\)"):
        StaticPeer.parse("3", default_port=7000)  # `--peer 3` for `--peers 3`: the hint


def test_model_args_are_ints_then_floats_then_strings() -> None:
    got = parse_model_args(["depth=4", "scale=0.5", "name=tiny", "big=1e3", "path=a=b", "word=nan"])
    assert got == {"depth": 4, "scale": 0.5, "name": "tiny", "big": 1000.0, "path": "a=b", "word": "nan"}
    assert type(got["depth"]) is int and type(got["big"]) is float


def test_bench_pipeline_checks_its_model_before_starting_members() -> None:
    p = subprocess.run([sys.executable, "-m", "p2ptrain", "bench", "pipeline", "--model", "mlp", "--model-arg", "depth",
                        "--json"], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--model-arg 'depth' is not K=V" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "how"), [(2, "Ctrl-C"), (15, "SIGTERM")])
def test_ctrl_c_on_train_stops_the_job_everywhere_and_keeps_the_model_so_far(tmp_path: Path, signum: int,
                                                                             how: str) -> None:
    # Found by a new-user walkthrough: Ctrl-C on `train` exited without a word, wrote no
    # model, and the other members trained on for nobody. A SIGTERM (systemd, docker stop,
    # timeout) did the same until a second walkthrough: exit -15, no message, no model.
    import signal

    assert signum in (signal.SIGINT, signal.SIGTERM)
    cluster = "t-stop-" + secrets.token_hex(4)
    out = tmp_path / "out"
    join = _p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "120",
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    train = _p2ptrain("train", "mlp", "--peers", "2", "--steps", "100000", "--out", str(out), "--global-batch", "24",
                      "--interface", "127.0.0.1", "--cluster", cluster, "--strategy", "data",
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_lines = _Lines(train)
    try:
        out_lines.wait_for(r"step [1-9]\d*/100000", 90)
        train.send_signal(signum)
        rc = train.wait(timeout=60)
        time.sleep(1.0)
        assert join.poll() is None, "the member must go on serving after the job stopped"
    finally:
        for p in (train, join):
            if p.poll() is None:
                p.kill()
            p.wait()
    text = out_lines.text()
    assert rc == 130, text
    assert "stopping the job on every member" in text and "stopped at step" in text, text
    record = json.loads((out / "p2ptrain-job.json").read_text())
    assert 0 < record["steps"] < 100000 and record["first_step"] == 0
    # The record keeps the losses the run saw (both were null after a stop: a walkthrough).
    logged = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "step"]
    assert record["first_loss"] == logged[0] and record["final_loss"] in logged[-2:], (record, logged[-3:])
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(
        train_single(JobSpec(model="mlp", global_batch=24, steps=1))[0].state_dict())
    assert f"stopped by its submitter ({how})" in join.stderr.read()  # type: ignore[union-attr]


def test_an_unusable_or_used_out_folder_is_a_one_line_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.safetensors").write_bytes(b"a model trained earlier")
    for out, message in ((afile, f"--out {afile}: cannot make that folder"),
                         (afile / "sub", f"--out {afile / 'sub'}: cannot make that folder"),
                         (used, f"--out {used} already holds a trained model")):
        p = _p2ptrain("train", "mlp", "--cluster", "t-never-" + secrets.token_hex(4), "--out", str(out),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = _finish(p, 60)
        assert p.returncode == 2 and message in stderr and "Traceback" not in stderr, stdout + stderr
    assert (used / "model.safetensors").read_bytes() == b"a model trained earlier"


@pytest.mark.slow
def test_train_with_nobody_else_says_it_trains_alone(tmp_path: Path) -> None:
    p = _p2ptrain("train", "mlp", "--cluster", "t-alone-" + secrets.token_hex(4), "--interface", "127.0.0.1",
                  "--steps", "3", "--wait", "3", "--out", str(tmp_path / "out"),
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, _ = _finish(p, 90)
    assert p.returncode == 0 and "no other member of cluster" in text and "training alone on this device" in text, text


@pytest.mark.slow
def test_a_wrong_secret_is_named_when_the_ring_does_not_form(tmp_path: Path) -> None:
    # It said only "heard from: nobody"; the cause was in a warning far above.
    secrets_dir = tmp_path / "s"
    secrets_dir.mkdir()
    files = []
    for name in ("a", "b"):
        f = secrets_dir / name
        f.write_text(secrets.token_hex(16))
        f.chmod(0o600)
        files.append(f)
    cluster = "t-key-" + secrets.token_hex(4)
    join = _p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "60",
                     "--secret-file", str(files[0]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = _p2ptrain("train", "mlp", "--cluster", cluster, "--interface", "127.0.0.1", "--peers", "2", "--wait", "6",
                      "--secret-file", str(files[1]), "--out", str(tmp_path / "out"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = _finish(train, 90, join)
    assert train.returncode == 2 and "the ring has 1 of the 2 members" in stderr, stderr
    # The cause first (it led with "start `p2ptrain join` on the others" and named the secret last).
    assert "after 6s: members of this cluster announced another key (see the warning above): give every member the " \
           "same --secret-file" in stderr.splitlines()[-1], stderr
    assert "but this node's is " in stderr and ": a different secret?; not connecting" in stderr, stderr


def test_an_even_data_split_over_uneven_members_suggests_auto(capsys: pytest.CaptureFixture[str]) -> None:
    # Five testbed devices from 0.125 to 0.5 of a core trained the default data job at 83
    # samples/s, below one half-core device alone (130): every member got 8 samples.
    from types import SimpleNamespace

    from p2ptrain.cli._split import print_split
    from p2ptrain.discovery import Resources
    from p2ptrain.ring import View

    def ring(*gflops: float, kinds: tuple[str, ...] = ()) -> SimpleNamespace:
        members = [SimpleNamespace(node_id=f"n{i}", resources=Resources(
            cores=1, memory_bytes=1 << 30, accelerator=kinds[i] if kinds else "cpu", gflops=g))
            for i, g in enumerate(gflops)]
        return SimpleNamespace(view=View(1, tuple(m.node_id for m in members)), members=lambda: members)

    spec = JobSpec(model="mlp", global_batch=40)
    print_split(ring(150.0, 75.0, 18.8, 18.8, 150.0), spec)
    assert "speeds differ 8.0x" in capsys.readouterr().out
    print_split(ring(150.0, 120.0, 140.0), spec)
    assert "--strategy auto" not in capsys.readouterr().out
    # A GPU's speed is not in the GFLOP/s a member announces (its CPU's): on an H200 machine two
    # members announced 2238 and 1581, while the GPU trained the 15 M model 7.2x faster than its CPU.
    print_split(ring(150.0, 120.0, 140.0, kinds=("cuda", "cpu", "jetson")), spec)
    out = capsys.readouterr().out
    assert "n0 (cuda), n2 (jetson) can compute on a GPU and n1 cannot" in out and "--strategy auto" in out
    print_split(ring(150.0, 120.0, kinds=("cuda", "cuda")), spec)
    assert "--strategy auto" not in capsys.readouterr().out


def test_train_keeps_its_replica_when_half_the_ring_dies(tmp_path: Path) -> None:
    # Two of four members were killed together: `train` lost the majority, said it was "on
    # the minority side" and exited with nothing but metrics, although a data job's
    # submitter holds the whole model.
    cluster = "t-half-" + secrets.token_hex(4)
    out = tmp_path / "out"
    joins = [_p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "120",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(3)]
    train = _p2ptrain("train", "mlp", "--peers", "4", "--steps", "100000", "--out", str(out), "--global-batch", "24",
                      "--interface", "127.0.0.1", "--cluster", cluster, "--strategy", "data",
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_lines = _Lines(train)
    try:
        out_lines.wait_for(r"step [1-9]\d*/100000", 90)
        for j in joins[:2]:
            j.kill()
        rc = train.wait(timeout=60)
    finally:
        for p in (train, *joins):
            if p.poll() is None:
                p.kill()
            p.wait()
    text = out_lines.text()
    assert rc == 2, text
    assert "lost the majority of view" in text and "this member holds the whole model" in text, text
    record = json.loads((out / "p2ptrain-job.json").read_text())
    assert 0 < record["steps"] < 100000
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(
        train_single(JobSpec(model="mlp", global_batch=24, steps=1))[0].state_dict())


def test_ctrl_c_before_the_job_trains_says_so(tmp_path: Path) -> None:
    # It exited 130 without a word while its offer waited for the others' answers.
    import signal

    cluster = "t-offer-" + secrets.token_hex(4)
    # A second `train` still waiting for a third member holds offers unanswered: the first
    # one's job stays in its offer phase.
    waiting = _p2ptrain("train", "mlp", "--peers", "3", "--wait", "60", "--out", str(tmp_path / "w"), "--interface",
                        "127.0.0.1", "--cluster", cluster, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = _p2ptrain("train", "mlp", "--peers", "2", "--steps", "50", "--out", str(tmp_path / "out"),
                      "--interface", "127.0.0.1", "--cluster", cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_lines = _Lines(train)
    try:
        out_lines.wait_for(r"^plan:", 60)
        time.sleep(1.0)  # the offer is out; its answer never comes
        train.send_signal(signal.SIGINT)
        rc = train.wait(timeout=30)
    finally:
        for p in (train, waiting):
            if p.poll() is None:
                p.kill()
            p.wait()
    text = out_lines.text()
    assert rc == 130, text
    assert "interrupted before the job started training: nothing was trained or written" in text, text


def test_a_folder_is_held_by_one_run_at_a_time(tmp_path: Path) -> None:
    # Two runs with one --out (or the default folder, started in one second) overwrote each
    # other's model and interleaved their metrics.jsonl, both exiting 0 (a walkthrough).
    from p2ptrain.cli._runs import claimed

    with claimed(tmp_path / "a" / "out", tmp_path) as out:
        with pytest.raises(ConfigError, match=rf"--out {out} is in use by another p2ptrain run \(pid {os.getpid()}\)"):
            with claimed(out, tmp_path):
                pass
        (out / "metrics.jsonl").write_text("{}\n")
        with claimed(None, tmp_path / "runs") as one, claimed(None, tmp_path / "runs") as two:
            assert one != two and one.parent == two.parent == tmp_path / "runs"
        assert not (tmp_path / "runs").exists()  # left empty: removed, its parent too
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # the lock file goes with the run
    with claimed(out, tmp_path):  # free again
        pass


def test_a_second_train_on_a_folder_in_use_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cluster = "t-never-" + secrets.token_hex(4)
    first = _p2ptrain("train", "mlp", "--peers", "2", "--wait", "60", "--interface", "127.0.0.1", "--cluster", cluster,
                      "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".p2ptrain-run.lock").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        second = _p2ptrain("train", "mlp", "--peers", "1", "--interface", "127.0.0.1", "--cluster", cluster + "-2",
                           "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = _finish(second, 60)
        assert second.returncode == 2 and f"--out {out} is in use by another p2ptrain run (pid {first.pid})" in stderr, \
            stdout + stderr
        assert "joined cluster" not in stdout and first.poll() is None
    finally:
        first.kill()
        first.communicate()


@pytest.mark.slow
def test_a_peer_paused_by_a_killed_submitter_is_named_with_when_it_comes_back(tmp_path: Path) -> None:
    # A walkthrough: `kill -9` on a two-member ring's `train` left the join paused; a new
    # `train --peers 2` failed with "heard from: vm-... (paused)" and no word of why or how long.
    cluster = "t-paused-" + secrets.token_hex(4)
    join = _p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "90",
                     "--quorum-expiry", "60", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = _p2ptrain("train", "mlp", "--peers", "2", "--steps", "100000", "--strategy", "data", "--interface", "127.0.0.1",
                      "--cluster", cluster, "--out", str(tmp_path / "one"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = _Lines(first)
    try:
        lines.wait_for(r"step [1-9]\d*/100000", 90)
        first.kill()
        first.wait()
        second = _p2ptrain("train", "mlp", "--peers", "2", "--wait", "8", "--interface", "127.0.0.1", "--cluster", cluster,
                           "--out", str(tmp_path / "two"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = _finish(second, 60)
    finally:
        _finish(first, 0.1, join)
    assert second.returncode == 2, stdout + stderr
    assert "paused when a member of its ring stopped without leaving" in stderr and "after its --quorum-expiry" in stderr, \
        stderr + lines.text()


def test_a_model_file_named_with_py_gets_the_module_name_to_use(tmp_path: Path) -> None:
    (tmp_path / "arm.py").write_text("")
    p = subprocess.run([sys.executable, "-m", "p2ptrain", "train", "arm.py:reacher", "--cluster", "t-never-x"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=ENV)
    assert p.returncode == 2 and "a module is named without .py: arm:reacher" in p.stderr, p.stderr


def test_a_second_ctrl_c_says_that_no_model_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A walkthrough: a double Ctrl-C quit with 130 and no word (the first one says it stops at the next step).
    from p2ptrain.cli import _train
    from p2ptrain.cli._main import build_parser

    async def trained_then_quit(args: object, secret: object, out: Path) -> int:
        (out / "metrics.jsonl").write_text(json.dumps({"event": "step", "step": 0, "loss": 1.0}) + "\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(_train, "_train", trained_then_quit)
    monkeypatch.setattr(_train.signal, "signal", lambda *a: None)  # leave pytest's handlers alone
    out = tmp_path / "out"
    assert _train.main(build_parser().parse_args(["train", "mlp", "--out", str(out), "--cluster", "t-never-x"])) == 130
    assert f"quit at once: no model was written (metrics: {out / 'metrics.jsonl'}" in capsys.readouterr().out


def test_a_ctrl_c_delivered_twice_at_once_stops_in_order_and_writes_the_model(tmp_path: Path) -> None:
    # A walkthrough: `timeout -s INT 15 p2ptrain train ...` quit at once and wrote no model, 2 runs
    # of 2: GNU timeout signals the command and then its process group, and the copy counted as
    # "Ctrl-C again". Both copies now make one orderly stop. (Two signals sent together reach
    # the loop's handler once; the copy here comes after the first was handled, as timeout's did.)
    out = tmp_path / "out"
    train = _p2ptrain("train", "mlp", "--peers", "1", "--steps", "100000", "--strategy", "data", "--interface",
                      "127.0.0.1", "--cluster", "t-echo-" + secrets.token_hex(4), "--out", str(out),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = _Lines(train)
    try:
        lines.wait_for(r"step [1-9]\d*/100000", 90)
        train.send_signal(signal.SIGINT)
        lines.wait_for("stopping the job on every member", 30)
        train.send_signal(signal.SIGINT)
        rc = train.wait(60)
    finally:
        _finish(train, 0.1)
    text = lines.text()
    assert rc == 130 and "stopping the job on every member at the next step" in text, text[-3000:]
    assert "quit at once" not in text and (out / "model.safetensors").exists(), text[-3000:]


def test_a_resume_with_auto_names_the_strategy_its_checkpoints_hold(tmp_path: Path) -> None:
    # A walkthrough: "--strategy auto --resume" was refused with "resume with that strategy"
    # and the user had to find the strategy in the manifests' JSON.
    from p2ptrain._errors import ConfigError
    from p2ptrain.cli._main import build_parser
    from p2ptrain.cli._train import _spec

    def args(strategy: str) -> argparse.Namespace:
        return build_parser().parse_args(["train", "tinygpt", "--strategy", strategy, "--resume", "--checkpoint-every", "20",
                                          "--checkpoint-dir", str(tmp_path), "--cluster", "t-never-x"])

    ran = _spec(args("pipeline"), 3)
    step = tmp_path / ran.lineage() / "step-00000040"  # what a member's checkpoint manifest holds of it
    step.mkdir(parents=True)
    (step / "n0.json").write_text(json.dumps({"step": 40, "lineage": ran.lineage(), "job": ran.to_wire()}))
    with pytest.raises(ConfigError, match=rf"--resume: the checkpoints in {tmp_path} \(latest: step 40\) were written by "
                                          r"the pipeline strategy that auto chose; resume with --strategy pipeline"):
        _spec(args("auto"), 3)


def test_a_stopped_tensor_job_writes_the_whole_model(tmp_path: Path) -> None:
    # Two walkthroughs: Ctrl-C on a tensor job's train printed "(keep checkpoints with
    # --checkpoint-dir)", which the tensor strategy refuses; then "so none is written":
    # the split weights were lost. The group now puts the model together as it stops.
    cluster = "t-tstop-" + secrets.token_hex(4)
    join = _p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "120",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = _p2ptrain("train", "tinygpt", "--strategy", "tensor", "--peers", "2", "--steps", "100000", "--interface",
                      "127.0.0.1", "--cluster", cluster, "--out", str(tmp_path / "out"),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = _Lines(train)
    try:
        lines.wait_for(r"step [1-9]\d*/100000", 90)
        train.send_signal(signal.SIGINT)
        rc = train.wait(60)
    finally:
        _finish(train, 0.1, join)
    text = lines.text()
    assert rc == 130 and re.search(r"stopped at step \d+ of 100000, every member with it", text), text[-3000:]
    assert "none is written" not in text and "keep checkpoints" not in text, text[-3000:]
    record = json.loads((tmp_path / "out" / "p2ptrain-job.json").read_text())
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))  # the whole model, under tinygpt's own names
    assert 0 < record["steps"] < 100000 and sorted(saved) == sorted(train_single(JobSpec(model="tinygpt", steps=1))[0].state_dict())


@pytest.mark.parametrize("submit_only", [False, True])
def test_a_stopped_pipeline_job_writes_the_model_its_submitter_holds_whole(tmp_path: Path, submit_only: bool) -> None:
    # A walkthrough: Ctrl-C on a pipeline train whose plan was one stage printed "the model is
    # spread over the members ... so none is written". A submitter that is that stage holds it
    # all; one the plan left out is told where the layers are.
    cluster = "t-pstop-" + secrets.token_hex(4)
    join = _p2ptrain("join", "--cluster", cluster, "--interface", "127.0.0.1", "--ephemeral", "--duration", "120",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if submit_only else None
    train = _p2ptrain("train", "mlp", "--strategy", "pipeline", "--peers", "2" if submit_only else "1", "--steps", "100000",
                      *(["--submit-only"] if submit_only else []), "--interface", "127.0.0.1", "--cluster", cluster,
                      "--out", str(tmp_path / "out"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = _Lines(train)
    try:
        lines.wait_for(r"step [1-9]\d*/100000", 90)
        train.send_signal(signal.SIGINT)
        rc = train.wait(60)
    finally:
        _finish(train, 0.1, *([join] if join is not None else []))
    text = lines.text()
    assert rc == 130, text[-3000:]
    # Every step applied is in the metrics: the last one's loss was missing (a walkthrough, 3 runs of 3).
    stopped = int(re.findall(r"stopped at step (\d+)", text)[-1])
    steps = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"][-1] == stopped - 1, (stopped, steps[-3:])
    # A submitter the plan left out once wrote nothing ("the model is on the plan's stages ..."): the stop
    # travels in the steps' sums, every stage ends at one step and sends its layers, as at the last step.
    assert re.search(r"stopped at step \d+ of 100000, every member with it", text), text[-3000:]
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    record = json.loads((tmp_path / "out" / "p2ptrain-job.json").read_text())
    Reference(dataclasses.replace(JobSpec.from_wire(record["job"]), steps=stopped)).assert_state_close(saved, text[-3000:])
