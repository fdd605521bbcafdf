"""Rough edges a first user hit (issue 12), each kept fixed by a test.

Real processes on 127.0.0.1 where the edge is about processes: the README's library
example against `p2ptrain join`, two joins on one state folder, the demo killed with
`kill -9`, a demo that fails before training, `--allow-entry` from the module's folder.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from p2ptrain import ConfigError, JobService, JobSpec, StepMetrics, workload_entry
from p2ptrain.cli._main import build_parser
from p2ptrain.ring import check_secret, claim_node_id, read_secret

from _ring import cluster_name, loopback_node
from _wait import until

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Joiner:
    """A `p2ptrain join --json` process and the events it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.node = ""
        self.view: dict[str, Any] = {}
        self.stderr = ""
        self.tasks = [asyncio.ensure_future(self._out()), asyncio.ensure_future(self._err())]

    async def _out(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "joined":
                self.node = ev["node"]
            elif ev["event"] == "view":
                self.view = ev

    async def _err(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr += line.decode(errors="replace")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def join(cluster: str, *extra: str, program: list[str] | None = None, env: dict[str, str] | None = None,
               cwd: str | None = None) -> Joiner:
    proc = await asyncio.create_subprocess_exec(
        *(program or [sys.executable, "-m", "p2ptrain"]), "join", "--cluster", cluster, "--interface", "127.0.0.1",
        "--json", "--duration", "120", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or ENV, cwd=cwd,
    )
    return Joiner(proc)


# --- 1. the README's library example, with a secret file that ends in a newline -------------


def readme_library_example() -> str:
    """The python block under README.md's "As a library" heading, as a user copies it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### As a library"):]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README.md's 'As a library' section lost its python block"
    return found.group(1)


def _swap(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README's library example no longer holds {old!r} once; update this test with it"
    return code.replace(old, new)


def test_a_secret_reads_the_same_from_a_file_the_environment_and_the_library(tmp_path: Path, monkeypatch) -> None:
    token = secrets.token_hex(16)
    path = tmp_path / "secret"
    path.write_text(token + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("P2PTRAIN_SECRET", token + "\n")
    assert read_secret(secret_file=path) == read_secret() == token.encode()
    assert check_secret(path.read_bytes()) == check_secret(token + "\r\n") == token.encode()
    with pytest.raises(ConfigError, match="surrounding whitespace not counted"):
        check_secret(b"short-secret   \n\n\n\n\n\n\n")


@pytest.mark.slow
async def test_the_readme_library_example_trains_with_join_processes(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(16) + "\n")  # as `print(token) > secret` writes it
    secret.chmod(0o600)
    cl = cluster_name()
    code = readme_library_example()
    code = _swap(code, '"/etc/p2ptrain/secret"', repr(str(secret)))
    code = _swap(code, 'cluster="lab"', f"cluster={cl!r}")
    code = _swap(code, "ephemeral=True", 'ephemeral=True, interfaces=["127.0.0.1"]')  # tests stay on loopback
    code = _swap(code, "steps=100", "steps=2")  # the wiring is under test, not the training
    joins = [await join(cl, "--ephemeral", "--secret-file", str(secret)) for _ in range(2)]
    try:
        await until(lambda: all(j.node for j in joins), 60, "both joins up")
        example = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE, env=ENV)
        out, err = await asyncio.wait_for(example.communicate(), 150)
        assert example.returncode == 0, (out + err).decode()
        assert float(out.decode().splitlines()[-1]) > 0  # result.losses[-1]
    finally:
        for j in joins:
            await j.stop()


# --- 2. two `p2ptrain join` on one device's state folder ---------------------------------------


def test_a_second_node_on_the_same_state_folder_gets_a_fresh_id_and_a_warning(tmp_path: Path, caplog) -> None:
    first = claim_node_id(state_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="p2ptrain.ring._identity"):
        second = claim_node_id(state_dir=tmp_path)
    try:
        assert first.persisted and not second.persisted and second.node_id != first.node_id
        assert f"pid {os.getpid()}" in caplog.text and "--ephemeral" in caplog.text and first.node_id in caplog.text
        first.release()
        third = claim_node_id(state_dir=tmp_path)
        assert third.persisted and third.node_id == first.node_id  # the device keeps its id across restarts
        third.release()
    finally:
        first.release()
        second.release()


def test_a_node_that_loses_the_lock_never_writes_the_persisted_id(tmp_path: Path) -> None:
    # Two joins started at once: the lock's holder may not have written the id yet. The
    # loser used to create one of its own, so the file named an id no node ran with (CI
    # caught it in the test below).
    fd = os.open(tmp_path / "node_id.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        loser = claim_node_id(state_dir=tmp_path)
        assert not loser.persisted and not (tmp_path / "node_id").exists()
    finally:
        os.close(fd)
    holder = claim_node_id(state_dir=tmp_path)
    assert holder.persisted and (tmp_path / "node_id").read_text().strip() == holder.node_id
    holder.release()


@pytest.mark.slow
async def test_two_joins_on_one_state_folder_form_a_ring(tmp_path: Path) -> None:
    cl = cluster_name()
    env = {**ENV, "XDG_STATE_HOME": str(tmp_path / "state")}
    joins = [await join(cl, env=env) for _ in range(2)]  # no --ephemeral: both want the persisted id
    try:
        await until(lambda: all(len(j.view.get("members", ())) == 2 for j in joins), 60, "a ring of the two joins")
        persisted = (tmp_path / "state" / "p2ptrain" / "node_id").read_text().strip()
        assert joins[0].node != joins[1].node and persisted in {joins[0].node, joins[1].node}
    finally:
        for j in joins:
            await j.stop()
    warned = [j for j in joins if "runs with the persisted node id" in j.stderr]
    assert len(warned) == 1 and "--ephemeral" in warned[0].stderr and warned[0].node != persisted, [j.stderr for j in joins]


# --- 3, 4, 5. the demo's rates, metrics.jsonl and run.png --------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_member_left_out_of_the_plan_shows_the_rings_rate(tmp_path: Path) -> None:
    import io

    from p2ptrain.cli._demo import _Metrics, _Progress

    clock = FakeClock()
    metrics = _Metrics(tmp_path / "metrics.jsonl", clock)
    out = io.StringIO()
    progress = _Progress(5, 24, out, metrics, me="a", pipeline=True, members_of=lambda: ["a", "b", "c"], clock=clock)
    from types import SimpleNamespace

    stage = SimpleNamespace(node_ids=("b", "c"), shares=(12, 12), first_layer=0, last_layer=3)
    plan = SimpleNamespace(table=lambda: "stage  devices", members=("b", "c"), micro_batches=1, micro_batch_size=24,
                           schedule="1f1b", step_s=0.2, samples_per_s=120.0, stages=[stage], objective="time", joules=())
    progress.plan(plan)  # the plan is agreed; the table names only who trains (a walkthrough: "left out" was in run.png only)
    assert "left out of the plan: a (this member)" in out.getvalue()
    for step in range(5):
        clock.t += 0.2  # the ring takes 200 ms a step; this member, left out, spends 0.1 ms
        progress(StepMetrics(step, 3.0 - step / 10, 24 / 1e-4, 1e-4, 0.0, 1e-4, 2, 1, [0.0, 0.9, 0.8]))
    metrics.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["predicted_samples_per_s"] == 120.0
    recs = recs[1:]  # the steps
    assert [r["samples_per_s"] for r in recs] == [120.0] * 5
    assert progress.rate() == pytest.approx(120.0)
    assert "240000" not in out.getvalue() and "120 samples/s" in out.getvalue()
    assert "busy a 0% b 90% c 80%" in out.getvalue()  # whose share is whose (a walkthrough: "busy   0%  94%  91%")
    assert recs[0]["busy"] == {"a": 0.0, "b": 0.9, "c": 0.8} and recs[0]["stages"] == 2
    assert recs[0]["members"] == ["a", "b", "c"] and recs[0]["member_step_s"] == 1e-4


def test_a_member_lost_before_the_first_step_is_not_named_in_the_run_record_or_the_split(tmp_path: Path) -> None:
    # A walkthrough: a member killed 1.6 s after `train` started; the data job ran on 3,
    # but the console's split and metrics.jsonl's run record named the 4 of the ring then.
    import io

    from p2ptrain.cli._demo import _Metrics, _Progress

    clock = FakeClock()
    metrics = _Metrics(tmp_path / "metrics.jsonl", clock)
    out = io.StringIO()
    progress = _Progress(3, 24, out, metrics, me="a", pipeline=False, members_of=lambda: ["a", "b", "e"], clock=clock)
    metrics.write("run", cluster="c", members=["a", "b", "c", "d"])
    progress.expected = ["a", "b", "c", "d"]  # the split was shown for these
    progress.start()
    for step in range(3):
        clock.t += 0.1
        progress(StepMetrics(step, 1.0, 240.0, 0.1, 0.05, 0.0, 3, 1))
    metrics.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "run" and recs[0]["members"] == ["a", "b", "e"], recs[0]
    assert [r["members"] for r in recs[1:]] == [["a", "b", "e"]] * 3
    said = out.getvalue()
    assert "the job started on 3 member(s), not the 4 above: c, d left before it began; e came in" in said, said
    assert said.count("the job started on") == 1


def test_a_plan_after_a_loss_does_not_name_the_lost_member_left_out(tmp_path: Path) -> None:
    # A walkthrough: after a recovery the plan printed "left out of the plan: ..., vm-99dd7fa8",
    # the member just killed: the job's members were still those of the view before.
    import io
    from types import SimpleNamespace

    from p2ptrain.cli._demo import _Metrics, _Progress

    out = io.StringIO()
    progress = _Progress(5, 24, out, _Metrics(tmp_path / "m.jsonl"), me="a", pipeline=True,
                         members_of=lambda: ["a", "b", "c", "dead"], ring_of=lambda: ["a", "b", "c"])
    stage = SimpleNamespace(node_ids=("b",), shares=(24,), first_layer=0, last_layer=3)
    progress.plan(SimpleNamespace(table=lambda: "stage  devices", members=("b",), micro_batches=1, micro_batch_size=24,
                                  schedule="1f1b", step_s=0.2, samples_per_s=120.0, stages=[stage], objective="time",
                                  joules=()))
    assert "left out of the plan: a (this member), c\n" in out.getvalue(), out.getvalue()


def test_a_join_left_out_of_the_plan_says_it_follows_not_trains() -> None:
    # A walkthrough: a newcomer the re-plan left out printed "training: step 161 ..." at 0% busy.
    from types import SimpleNamespace

    from p2ptrain.cli._join import step_line

    m = SimpleNamespace(step=160, loss=2.5, samples_per_s=300.0)
    assert step_line(m, SimpleNamespace(seat=None)) == "following (left out of the plan): step 161 loss 2.5000 300 samples/s"
    assert step_line(m, SimpleNamespace(seat=object())).startswith("training: step 161 ")
    assert step_line(m, SimpleNamespace()).startswith("training: step 161 ")  # a data-parallel trainer has no seat
    assert step_line(m, None).startswith("training: step 161 ")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return w, h


TIMELINES = [[(0, 0, 0.0, 0.010), (0, 1, 0.010, 0.020), (1, 1, 0.030, 0.045), (1, 0, 0.045, 0.060), (2, -1, 0.06, 0.07)],
             [(0, 0, 0.011, 0.021), (1, 0, 0.021, 0.031), (0, 1, 0.031, 0.041), (1, 1, 0.041, 0.051)], []]


def test_run_png_is_labelled_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from p2ptrain.cli._plot import write_run_png

    path = tmp_path / "run.png"
    how = write_run_png(path, [4.0, 3.5, float("nan"), 3.0, 2.8], TIMELINES, events=[2], members=["a", "b", "c"],
                        first_step=10, title="test run")
    w, h = _png_size(path)
    assert how == "matplotlib" and 600 <= w <= 2000 and 300 <= h <= 1500
    assert 10_000 < path.stat().st_size < 1_000_000


def test_without_matplotlib_the_demo_draws_a_basic_picture_and_says_how_to_get_the_labelled_one(
        tmp_path: Path, monkeypatch, capsys) -> None:
    from types import SimpleNamespace

    from p2ptrain.cli._demo import _picture

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    args = SimpleNamespace(model="tinygpt", strategy="pipeline", peers=3, codec="none")
    res = SimpleNamespace(losses=[4.0, 3.0, 2.5], first_step=0)
    trainer = SimpleNamespace(timelines=TIMELINES, view=SimpleNamespace(members=("a", "b", "c")))
    _picture(tmp_path, args, res, trainer, [1])
    assert _png_size(tmp_path / "run.png") > (0, 0)
    assert "pip install 'p2ptrain[plot]'" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_logs_its_settings_and_plausible_rates(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "p2ptrain", "demo", "--peers", "2", "--steps", "4", "--runs-dir", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = runs.iterdir()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    head, steps = recs[0], [r for r in recs if r["event"] == "step"]
    assert head["event"] == "run" and head["strategy"] == "pipeline" and head["steps"] == 4 and head["global_batch"] == 16
    assert len(head["members"]) == 2 and head["peers"] == 2
    assert any(r["event"] == "plan" for r in recs)
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for r in steps:
        assert r["members"] == head["members"] and isinstance(r["stages"], int) and 1 <= r["stages"] <= 2
        assert set(r["busy"]) == set(head["members"])
        assert r["step_s"] >= r["member_step_s"] and r["samples_per_s"] == pytest.approx(16 / r["step_s"], rel=1e-3)
    # The rates agree with the wall clock: what the ring did, not what this member did.
    wall = steps[-1]["t"] - steps[0]["t"]
    done = re.search(r"\(([0-9]+) samples/s while training\)", out.stdout)
    assert done and int(done.group(1)) <= 1.1 * 16 * 3 / wall, out.stdout
    assert "picture (loss against step, pipeline timeline)" in out.stdout
    assert _png_size(run / "run.png") >= (600, 300)


# --- 6. kill -9 of the demo takes its peers along ------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc (Linux)")
async def test_kill_9_of_the_demo_takes_its_peers_along(tmp_path: Path) -> None:
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2ptrain", "demo", "--peers", "3", "--strategy", "data", "--steps", "100000",
        "--runs-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=ENV)
    kids: list[int] = []
    try:
        assert demo.stdout is not None
        seen = b""
        while b"ring agreed" not in seen:
            line = await asyncio.wait_for(demo.stdout.readline(), 90)
            assert line, seen.decode()
            seen += line
        kids = _children(demo.pid)
        assert len(kids) == 2, kids
        demo.kill()  # SIGKILL: no finally, no signal handler runs in the demo
        await demo.wait()
        await until(lambda: not any(_alive(k) for k in kids), 10, "the demo's peers gone after kill -9 of the demo")
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


# --- 7, 8. a demo that fails leaves no run folder; a bad batch is refused at once ------------


@pytest.mark.slow
def test_a_demo_that_fails_before_training_leaves_no_run_folder(tmp_path: Path) -> None:
    # The demo's own check builds the model once (check_here); every member's build then fails.
    (tmp_path / "p2pt_once_job.py").write_text(
        "import os\n\nimport p2ptrain\nfrom p2ptrain.zoo import mlp\n\n\n@p2ptrain.workload_entry\n"
        "def make(seed=0):\n"
        "    flag = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'built-once')\n"
        "    if os.path.exists(flag):\n"
        "        raise RuntimeError('built a second time')\n"
        "    open(flag, 'w').close()\n"
        "    return mlp(seed)\n")
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "p2ptrain", "demo", "--peers", "2", "--strategy", "data", "--steps", "2",
           "--model", "p2pt_once_job:make", "--runs-dir", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV, cwd=tmp_path)
    assert out.returncode == 2 and "built a second time" in out.stderr, out.stdout + out.stderr
    assert "ring agreed" in out.stdout  # it failed after the peers started, not in the argument checks
    assert list(runs.iterdir()) == []


def test_a_model_module_that_cannot_be_found_is_refused_before_any_process_starts(tmp_path: Path, monkeypatch) -> None:
    from p2ptrain.cli import _demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the demo puts the working folder on it
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    args = build_parser().parse_args(["demo", "--model", "p2pt_no_such_module:make", "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(ConfigError, match="no module 'p2pt_no_such_module' is importable here"):
        _demo.main(args)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--strategy", "data", "--peers", "3", "--global-batch", "2"],
     "--global-batch 2 is smaller than the 3 members of a data-parallel ring; use 3 or more"),
    (["--strategy", "pipeline", "--micro-batches", "4", "--global-batch", "10"],
     "--global-batch 10 does not split into --micro-batches 4"),
    # Were silently ignored (a third walkthrough).
    (["--strategy", "data", "--schedule", "gpipe"], "--schedule shape a pipeline's step; the data strategy has none"),
    (["--strategy", "tensor", "--micro-batches", "4"], "--micro-batches shape a pipeline's step; the tensor strategy has none"),
])
def test_a_batch_the_ring_would_refuse_is_refused_before_any_process_starts(tmp_path: Path, monkeypatch, argv, message) -> None:
    from p2ptrain.cli import _demo

    def no_process(*a: Any, **k: Any) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    args = build_parser().parse_args(["demo", *argv, "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(ConfigError, match=re.escape(message)):
        _demo.main(args)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "error", "message"), [
    # A second new-user walkthrough: both formed a 3-member ring and failed in a member ~7 s later.
    (["--model-arg", "n_head=5"], "JobError", "n_embd=64 is not a multiple of n_head=5"),
    (["--codec", "int8:0"], "CodecError", "bad int8 block size '0'"),
])
def test_a_model_value_or_codec_parameter_the_members_would_refuse_is_refused_here(
        tmp_path: Path, monkeypatch, argv: list[str], error: str, message: str) -> None:
    import p2ptrain._errors
    from p2ptrain.cli import _demo

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    args = build_parser().parse_args(["demo", *argv, "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(getattr(p2ptrain._errors, error), match=re.escape(message)):
        _demo.main(args)
    assert not (tmp_path / "runs").exists()


def test_output_folders_that_are_files_are_one_line_errors(tmp_path: Path, monkeypatch, caplog) -> None:
    # A second walkthrough: `demo --runs-dir FILE` was a NotADirectoryError traceback, and
    # `join --checkpoint-dir FILE` joined, then failed every checkpointing job on every member.
    from p2ptrain.cli import _demo, _join

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ConfigError, match=f"--runs-dir {afile}: cannot make a run folder there"):
        _demo.main(build_parser().parse_args(["demo", "--runs-dir", str(afile)]))
    monkeypatch.setattr(_join.asyncio, "run", lambda *a, **k: pytest.fail("the node started"))
    with pytest.raises(ConfigError, match=f"--checkpoint-dir {afile}: cannot make that folder: it is a file"):
        _join.main(build_parser().parse_args(["join", "--checkpoint-dir", str(afile)]))
    with caplog.at_level("WARNING"):
        _join._check_allowed_entries(["p2pt_no_such_module", str(tmp_path / "none"), str(tmp_path), "json"])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "--allow-entry p2pt_no_such_module", f"--allow-entry {tmp_path / 'none'}"]


@pytest.mark.parametrize(("argv", "message"), [
    (["status", "--wait", "-1"], "--wait must be a number of seconds in (0, 3600], not -1.0"),  # "answered within -1.0s"
    (["join", "--duration", "-1"], "--duration must be a positive number of seconds, not -1.0"),  # joined and left at once
])
def test_a_negative_time_is_refused(monkeypatch, argv: list[str], message: str) -> None:
    import asyncio

    from p2ptrain.cli import _join, _status

    monkeypatch.setattr(asyncio, "run", lambda *a, **k: pytest.fail("it ran"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        {"status": _status, "join": _join}[argv[0]].main(build_parser().parse_args(argv))


def test_interfaces_given_as_one_string_are_refused() -> None:
    # A walkthrough's Node(interfaces="127.0.0.1") failed on "'1' is neither an IP address": the
    # string was taken as its characters, and the node picked 0.0.0.0 to bind to first.
    import p2ptrain

    with pytest.raises(ConfigError, match=re.escape("interfaces must be a list of addresses, e.g. ['127.0.0.1']")):
        p2ptrain.Node(interfaces="127.0.0.1", ephemeral=True)


async def test_an_interface_named_by_its_name_binds_its_address() -> None:
    # `status --interface lo` worked, `join --interface lo` failed: "host 'lo' must be an IP address".
    import ifaddr

    import p2ptrain

    lo = next(a.nice_name for a in ifaddr.get_adapters() if any(ip.ip == "127.0.0.1" for ip in a.ips))
    async with p2ptrain.Node(cluster=cluster_name(), interfaces=[lo], ephemeral=True) as node:
        assert node.interfaces == ["127.0.0.1"] and node.address.startswith("tcp://127.0.0.1:")
    with pytest.raises(ConfigError, match=r"'no-such-nic0' is neither an IP address nor an interface of this host"):
        p2ptrain.Node(interfaces=["no-such-nic0"], ephemeral=True)


def test_a_bad_cluster_name_and_a_batch_that_does_not_split_are_refused_where_they_are_written() -> None:
    # A library walkthrough: Node(cluster="w21 space") failed only at start(), and check_here passed
    # a pipeline job whose batch every member refuses (8 samples in 5 micro-batches).
    import p2ptrain
    from p2ptrain.train import check_here

    with pytest.raises(ConfigError, match=r"cluster name 'w21 space' must be 1-63 characters"):
        p2ptrain.Node(cluster="w21 space", ephemeral=True)
    with pytest.raises(p2ptrain.JobError, match=r"global_batch 8 does not split into 5 micro-batches; use a multiple of 5"):
        check_here(JobSpec(model="mlp", strategy="pipeline", micro_batches=5, global_batch=8))


def test_a_model_that_is_no_sequence_of_layers_is_refused_for_a_pipeline_where_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A walkthrough: `train mymod:nonseq --strategy pipeline` waited for its peers (120 s with none),
    # then every member refused it once the ring formed.
    import p2ptrain
    from p2ptrain.train import check_here

    (tmp_path / "p2pt_nonseq.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import p2ptrain
        from p2ptrain.zoo import TensorPairs

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 1)

            def forward(self, x):
                return self.a(x)

        @p2ptrain.workload_entry
        def make(seed=0):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(64, 4, generator=g)
            return p2ptrain.Workload(model=Net(), dataset=TensorPairs(x, x.sum(1, keepdim=True)),
                                     criterion=nn.functional.mse_loss, data_digest="nonseq")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    check_here(JobSpec(model="p2pt_nonseq:make", strategy="data", global_batch=8))  # data parallelism takes it
    for strategy in ("pipeline", "auto"):
        with pytest.raises(p2ptrain.JobError, match="the model is a Net, not an nn.Sequential"):
            check_here(JobSpec(model="p2pt_nonseq:make", strategy=strategy, global_batch=8))


def test_the_join_train_asks_for_is_the_one_the_job_needs() -> None:
    # A walkthrough: the hint said `p2ptrain join --cluster X`, and members started so refused a
    # module:function job (no --allow-entry).
    from p2ptrain.cli._train import join_command

    def hint(*argv: str) -> str:
        return join_command(build_parser().parse_args(["train", *argv]))

    assert hint("tinygpt", "--cluster", "lab") == "p2ptrain join --cluster lab"
    assert hint("mymod:make", "--cluster", "lab", "--secret-file", "/etc/s") == \
        "p2ptrain join --cluster lab --secret-file /etc/s --allow-entry mymod"
    assert hint("hf:/srv/models/gpt2", "--checkpoint-dir", "c") == \
        "p2ptrain join --cluster default --allow-entry /srv/models --checkpoint-dir DIR"


def test_a_failing_entry_point_given_only_data_is_not_told_how_model_args_are_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A walkthrough: `--data nope.csv` ended with "--model-arg values are read as an int, ...".
    import p2ptrain
    from p2ptrain.train import resolve

    (tmp_path / "p2pt_data_fails.py").write_text(textwrap.dedent("""
        import p2ptrain

        @p2ptrain.workload_entry
        def make(seed=0, data="", width=4):
            raise FileNotFoundError(data)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(p2ptrain.JobError) as only_data:
        resolve(JobSpec(model="p2pt_data_fails:make", model_kwargs={"data": "nope.csv"}))
    assert "called with data='nope.csv' (str))" in str(only_data.value) and "--model-arg" not in str(only_data.value)
    with pytest.raises(p2ptrain.JobError, match=r"width=5 \(int\); --model-arg values are read as an int"):
        resolve(JobSpec(model="p2pt_data_fails:make", model_kwargs={"data": "nope.csv", "width": 5}))


def test_the_demo_says_so_once_and_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "demo", "--strategy", "data", "--global-batch", "2",
                          "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 2 and out.stderr.count("is smaller than the 3 members") == 1, out.stderr
    assert list(tmp_path.iterdir()) == []


# --- 9. `p2ptrain join --allow-entry mymod` run from mymod's folder ------------------------------


@pytest.mark.slow
async def test_join_imports_an_allowed_module_from_its_working_folder(tmp_path: Path, monkeypatch) -> None:
    script = Path(sys.executable).with_name("p2ptrain")
    if not script.exists():
        pytest.skip(f"no console script at {script} (p2ptrain not installed in this environment)")
    (tmp_path / "p2pt_cwd_job.py").write_text(textwrap.dedent("""
        import p2ptrain
        from p2ptrain.zoo import mlp

        @p2ptrain.workload_entry
        def make(seed=0):
            return mlp(seed)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # the submitter imports it too
    cl = cluster_name()
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    child = await join(cl, "--ephemeral", "--allow-entry", "p2pt_cwd_job", program=[str(script)], env=env,
                       cwd=str(tmp_path))
    me = loopback_node(cl)
    await me.start()
    try:
        await me.wait_for_peers(1, timeout=60)
        spec = JobSpec(model="p2pt_cwd_job:make", global_batch=8, steps=2)
        res = await asyncio.wait_for(JobService(me, allow_entry=["p2pt_cwd_job"]).submit(spec), 90)
        assert res.steps == 2
    finally:
        await me.close()
        await child.stop()


def test_steps_lost_at_a_ring_change_are_logged_and_rates_stay_possible(tmp_path: Path) -> None:
    # metrics.jsonl skipped steps 173 and 174 at a join without a word, and a step
    # reported right after the one before it showed 23102 samples/s (step_s 0.0014).
    import io

    from p2ptrain.cli._demo import _Metrics, _Progress

    clock = FakeClock()
    metrics = _Metrics(tmp_path / "metrics.jsonl", clock)
    progress = _Progress(10, 24, io.StringIO(), metrics, me="a", pipeline=False, members_of=lambda: ["a", "b"], clock=clock)
    progress.start()
    for step, gap in ((0, 2.0), (1, 0.1), (2, 0.0005), (5, 0.1)):  # step 0 sets up; 2 settled at once; 3, 4 lost
        clock.t += gap
        progress(StepMetrics(step, 1.0, 24 / 0.0005, 0.0005, 0.0004, 0.0001, 2, 1 if step < 5 else 2))
    metrics.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in recs if r["event"] in ("step", "step_lost")] == [
        ("step", 0), ("step", 1), ("step", 2), ("step_lost", 3), ("step_lost", 4), ("step", 5)]
    assert [r["samples_per_s"] for r in recs if r["event"] == "step"] == [12.0, 240.0, 240.0, 240.0], recs


def test_steps_replayed_after_a_rollback_are_announced(tmp_path: Path) -> None:
    # A walkthrough: a pipeline job that lost a lone stage went back to its replica at step 40
    # and metrics.jsonl read 43, 44, 45, 40, 41, ... with no word: steps counted twice.
    import io

    from p2ptrain.cli._demo import _Metrics, _Progress

    clock = FakeClock()
    metrics = _Metrics(tmp_path / "metrics.jsonl", clock)
    progress = _Progress(10, 24, io.StringIO(), metrics, me="a", pipeline=False, members_of=lambda: ["a", "b"], clock=clock)
    progress.start()
    for step in (0, 1, 2, 3, 1, 2, 3, 4):  # back to the copy at step 1 after step 3
        clock.t += 0.1
        progress(StepMetrics(step, 1.0, 240.0, 0.1, 0.1, 0.0, 2, 1 if step < 3 else 2))
    metrics.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = [(r["event"], r["step"]) for r in recs if r["event"] in ("step", "step_lost", "rolled_back")]
    assert got == [("step", 0), ("step", 1), ("step", 2), ("step", 3), ("rolled_back", 1),
                   ("step", 1), ("step", 2), ("step", 3), ("step", 4)], got
    assert next(r for r in recs if r["event"] == "rolled_back")["last"] == 3


@pytest.mark.parametrize("command", ["join", "train", "status", "demo", "study"])
def test_the_readme_names_the_options_each_command_has_and_the_ones_that_matter(command: str) -> None:
    # A walkthrough: the README's `status` row showed no --interface (so nobody learned to keep it
    # on one network), and the join and demo rows left out options their --help lists.
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `p2ptrain {command} "))
    usage = row.split("` |", 1)[0]
    named = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage))
    sub = next(a for a in build_parser()._actions if a.dest == "command")  # type: ignore[attr-defined]
    has = {opt for a in sub.choices[command]._actions for opt in a.option_strings if opt.startswith("--")}  # type: ignore[union-attr]
    assert named <= has, f"the README names options `{command}` lacks: {sorted(named - has)}"
    missing = has - named - {"--help", "--parent-pid"}  # the demo's own plumbing
    assert not missing, f"the README's `{command}` row leaves out {sorted(missing)}"


@pytest.mark.parametrize(("argv", "message"), [
    # A walkthrough: -1685 GB/s, StatisticsError tracebacks, raw allocator errors, NaN in the JSON.
    (["transport", "--transfers", "-1"], "--transfers must be at least 0, got -1"),
    (["transport", "--size", "100GiB"], "--size 100GiB: 4 copies of 100.0 GiB would not fit in the"),
    (["codecs", "--size", "1TiB"], "4 copies of 1024.0 GiB would not fit"),
    (["discovery", "--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["allreduce", "--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["recovery", "--steps", "0"], "--steps must be at least 3 (a step before the kill and two after), got 0"),
    (["embed", "--idle-s", "0"], "--idle-s must hold at least 10 of the host's periods (0.1 s), got 0.0"),
])
def test_a_bench_refuses_counts_and_sizes_it_cannot_run(argv: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "bench", *argv, "--json"], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""



def _regress(seed: int, out: int, hidden_in: int, n: int) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from p2ptrain.zoo import TensorPairs, Workload

    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(hidden_in, out))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    return Workload(model=model, dataset=TensorPairs(x, x.sum(1, keepdim=True)), criterion=F.mse_loss)


@workload_entry
def forward_raises(seed: int = 0) -> Any:
    return _regress(seed, 1, 8, 64)  # the second Linear takes 8 features, the first gives 16


@workload_entry
def wrong_shape(seed: int = 0) -> Any:
    return _regress(seed, 4, 16, 64)  # 4 outputs against 1 target


@workload_entry
def five_samples(seed: int = 0) -> Any:
    return _regress(seed, 1, 16, 5)


@pytest.mark.parametrize(("entry", "strategy", "match"), [
    ("forward_raises", "data", r"forward_raises: one forward and loss on 2 samples of the first batch failed: RuntimeError: "
                               r"mat1 and mat2 shapes cannot be multiplied"),
    ("wrong_shape", "data", r"Using a target size \(torch.Size\(\[2, 1\]\)\) that is different to the input size "
                            r"\(torch.Size\(\[2, 4\]\)\).*; the model's output must match its targets"),
    ("five_samples", "pipeline", r"global_batch=24 does not fit a dataset of 5 samples; choose 1 <= global_batch <= 5"),
])
def test_a_model_that_cannot_train_is_refused_where_the_job_is_written(entry: str, strategy: str, match: str) -> None:
    # A walkthrough of one's own model: a forward that raises printed a traceback on every
    # member once the ring formed (data); 5 samples against a batch of 24 an IndexError
    # traceback (pipeline); 4 outputs against 1 target trained 20 steps and exited 0.
    from p2ptrain import JobError
    from p2ptrain.train import check_here

    with pytest.raises(JobError, match=match):
        check_here(JobSpec(model=f"{__name__}:{entry}", strategy=strategy, global_batch=24))
    check_here(JobSpec(model=f"{__name__}:five_samples", strategy=strategy, global_batch=4))  # a model that trains


_BUILT = iter(range(1_000_000))


@workload_entry
def global_rng_weights(seed: int = 0) -> Any:
    # As a beginner's model does (default nn.Linear init from torch's global RNG): every
    # member builds other weights. A counter stands in for the RNG's state, so they always differ.
    return _regress(seed + next(_BUILT), 1, 16, 64)


async def test_replicas_that_differ_before_the_first_step_name_the_initial_weights_as_the_cause() -> None:
    # A walkthrough: "replicas diverged: vm-25a9ca9c, vm-663e4d43 differ from the majority digest
    # 49b519d740c0a5bc" with three members that all differed, and no word on why.
    from p2ptrain import JobError

    from _ring import started_ring

    nodes = await started_ring(3)
    try:
        services = [JobService(x, device="cpu") for x in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        with pytest.raises(JobError, match=r"replicas differ on every member \(.*\); before the first step, so the members "
                                           r"built different initial weights: draw every weight from a torch.Generator"):
            await asyncio.wait_for(services[0].submit(JobSpec(model=f"{__name__}:global_rng_weights", strategy="data",
                                                              global_batch=6, steps=3)), 60)
        await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
    finally:
        for x in nodes:
            await x.close()


def test_a_module_edited_since_a_job_imported_it_is_refused_not_trained_as_the_old_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A walkthrough: the forward was edited (Tanh to ReLU) between two jobs; the fresh submitter
    # trained the new code, the long-running joins the old, and the job exited 0.
    from p2ptrain import JobError
    from p2ptrain.train import resolve

    name = "p2pt_edited_" + secrets.token_hex(3)
    src = tmp_path / f"{name}.py"
    code = ("import p2ptrain\nfrom p2ptrain.zoo import mlp\n\n\n@p2ptrain.workload_entry\n"
            "def f(seed: int = 0):\n    return mlp(seed{})\n")
    src.write_text(code.format(""))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = JobSpec(model=f"{name}:f")
    resolve(spec)
    resolve(spec)  # the same file: the same code
    src.write_text(code.format(", depth=3"))
    with pytest.raises(JobError, match=rf"{name}:f.*{name}.py changed since this process imported '{name}' for an "
                                       r"earlier job, and it still runs the old code; restart it \(p2ptrain join\)"):
        resolve(spec)


def test_a_ring_change_names_who_went_and_who_came(tmp_path: Path) -> None:
    # A walkthrough: after a kill -9 the train's output named no lost member anywhere.
    import io

    from p2ptrain.cli._demo import _Metrics, _Progress

    clock, out = FakeClock(), io.StringIO()
    metrics = _Metrics(tmp_path / "metrics.jsonl", clock)
    ring = ["a", "b", "c"]
    progress = _Progress(10, 24, out, metrics, me="a", pipeline=False, members_of=lambda: list(ring), clock=clock)
    progress.start()
    for step in range(4):
        if step == 2:
            ring[:] = ["a", "c", "d"]
        clock.t += 0.1
        progress(StepMetrics(step, 1.0, 240.0, 0.1, 0.1, 0.0, 3, 1 if step < 2 else 2))
    metrics.close()
    assert "ring changed (view 1 -> 2, 3 member(s) now; b gone; d came in): training goes on from step 3" in out.getvalue()
    change = next(json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"ring_change"' in x)
    assert change["gone"] == ["b"] and change["came"] == ["d"], change
