"""A member frozen mid-job (SIGSTOP: a suspended laptop, a robot's stalled process) comes back into the job.

The others see it silent past the failure timeout and go on without it. Before, when it
woke, it rejoined the ring but not the job: it went on with its stale part, unaware the
job had moved on, declined the job's invitation as "busy with" that very job, and sat out
the rest of the job. Now it learns that the ring went on without it (``LeftOutError``),
stops its stale part without telling the others (they are fine), and accepts the
invitation: the job ends with it on board.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from _ring import cluster_name

pytestmark = pytest.mark.slow

FREEZE_S = 5.0  # longer than the failure timeout (2 s), far shorter than the quorum expiry (30 s)


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.out = proc, ""
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.out += line.decode(errors="replace").replace("\r", "\n")


async def _start(*args: str, under: tuple[str, ...] = ()) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *under, sys.executable, "-m", "p2ptrain", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Proc(proc)


async def _until(cond: object, timeout: float, what: str, procs: list[Proc]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:.0f}s\n" + "\n=====\n".join(p.out[-3000:] for p in procs))
        await asyncio.sleep(0.1)


async def _end(procs: list[Proc]) -> None:
    for p in procs:
        if p.proc.returncode is None:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.kill()
        await p.proc.wait()
        await asyncio.gather(p.task, return_exceptions=True)


async def test_a_frozen_member_rejoins_the_job_it_was_left_out_of(tmp_path: Path) -> None:
    cl = cluster_name()
    common = ["--cluster", cl, "--interface", "127.0.0.1"]
    joins = [await _start("join", *common, "--ephemeral", "--duration", "240") for _ in range(3)]
    train = await _start("train", "tinygpt", *common, "--peers", "4", "--steps", "5000", "--out", str(tmp_path / "out"))
    procs = [*joins, train]
    frozen = joins[2]
    try:
        await _until(lambda: "training: step 1 " in frozen.out, 90, "the job training on every member", procs)
        frozen.proc.send_signal(signal.SIGSTOP)
        await _until(lambda: re.search(r"ring changed \(view \d+ -> \d+, 3 member", train.out), 30,
                     "the job going on without the frozen member", procs)
        await asyncio.sleep(FREEZE_S)
        frozen.proc.send_signal(signal.SIGCONT)
        await _until(lambda: re.search(r"ring changed \(view \d+ -> \d+, 4 member", train.out), 60,
                     "the frozen member back in the job", procs)
        rejoined = frozen.out.index("joining the running job")
        await _until(lambda: "training: step" in frozen.out[rejoined:], 30, "the frozen member training again", procs)
        train.proc.send_signal(signal.SIGINT)  # stop the job everywhere at the next step; the model is written
        assert await asyncio.wait_for(train.proc.wait(), 60) == 130
    finally:
        await _end(procs)
    stale = frozen.out[:rejoined]
    assert "the ring went on without" in stale and "its part of the job from view" in stale, frozen.out[-3000:]
    assert "busy with" not in train.out + frozen.out  # it no longer declines the job it was left out of
    others = train.out + joins[0].out + joins[1].out
    assert " failed" not in others and "ERROR" not in others, others[-3000:]  # its stale part told nobody to stop
    assert "bad_identity" not in frozen.out
    assert (tmp_path / "out" / "model.safetensors").exists()


async def test_a_frozen_submitter_and_member_stop_with_the_model_when_the_others_paused(tmp_path: Path) -> None:
    # Two of four frozen together, `train` one of them: the other two lost the majority and
    # stopped, telling nobody (they assumed the others went on), while the frozen pair woke in
    # the same view, waited forever in their step, and `train` wrote nothing (found in a walkthrough).
    cl = cluster_name()
    common = ["--cluster", cl, "--interface", "127.0.0.1"]
    joins = [await _start("join", *common, "--ephemeral", "--duration", "240") for _ in range(3)]
    out = tmp_path / "out"
    train = await _start("train", "tinygpt", *common, "--peers", "4", "--steps", "5000", "--out", str(out))
    procs = [*joins, train]
    try:
        await _until(lambda: "training: step 1 " in joins[0].out, 90, "the job training on every member", procs)
        for p in (train, joins[0]):
            p.proc.send_signal(signal.SIGSTOP)
        await _until(lambda: "lost the majority" in joins[1].out and "lost the majority" in joins[2].out, 30,
                     "the others pausing", procs)
        await asyncio.sleep(2.0)
        for p in (train, joins[0]):
            p.proc.send_signal(signal.SIGCONT)
        rc = await asyncio.wait_for(train.proc.wait(), 60)  # hung here, before
    finally:
        await _end(procs)
    assert rc == 2 and re.search(r"error: job \S+, stopped on member \S+: \S+ lost the majority", train.out), \
        train.out[-3000:]
    assert re.search(r"stopped at step \d+ of 5000; this member holds the whole model", train.out), train.out[-3000:]
    assert (out / "model.safetensors").exists()


async def test_a_pipeline_submitter_that_lost_the_majority_says_no_model_was_written(tmp_path: Path) -> None:
    # A walkthrough: two of four members lost at once in a pipeline job; `train` printed
    # only "error: ... paused and stopped training", never that no model was written or
    # where the metrics are (a data job's submitter writes the replica it holds).
    cl = cluster_name()
    common = ["--cluster", cl, "--interface", "127.0.0.1"]
    joins = [await _start("join", *common, "--ephemeral", "--duration", "240") for _ in range(3)]
    out = tmp_path / "out"
    train = await _start("train", "tinygpt", *common, "--peers", "4", "--steps", "5000", "--strategy", "pipeline",
                         "--out", str(out))
    procs = [*joins, train]
    try:
        await _until(lambda: "step 1/5000" in train.out, 120, "the job training", procs)
        for p in joins[:2]:
            p.proc.send_signal(signal.SIGSTOP)
        rc = await asyncio.wait_for(train.proc.wait(), 60)
    finally:
        await _end(procs)
    assert rc == 2 and "lost the majority" in train.out, train.out[-3000:]
    if (out / "model.safetensors").exists():  # the plan was one stage, on the submitter: it holds every layer
        assert re.search(r"stopped at step \d+ of 5000; this member holds the whole model", train.out), train.out[-3000:]
    else:
        assert re.search(r"stopped at step \d+: the model is on the plan's stages \(.+\), not whole on this member "
                         r"\(the pipeline strategy\), so none is written; metrics: \S+metrics.jsonl", train.out), \
            train.out[-3000:]


async def test_a_second_ctrl_c_on_a_join_quits_it_without_stopping_the_job(tmp_path: Path) -> None:
    # A session's check of an orderly leave: the second Ctrl-C ("quit now") on a join that
    # was handing its part over stopped the whole job on every member ("stopped on member
    # ...: the job was cancelled on this member"); a member quitting is a member lost.
    cl = cluster_name()
    common = ["--cluster", cl, "--interface", "127.0.0.1"]
    # Under GNU `timeout -s INT`, whose signal comes twice (to the command, then its process group):
    # the echo made the join quit as a kill would, where an orderly leave was asked (3 runs of 3).
    # A failure timeout longer than the test's freeze: the leaver must not pause meanwhile.
    joins = [await _start("join", *common, "--ephemeral", "--failure-timeout", "15", under=("timeout", "-s", "INT", "600"))]
    joins += [await _start("join", *common, "--ephemeral", "--duration", "240") for _ in range(2)]
    out = tmp_path / "out"
    train = await _start("train", "tinygpt", *common, "--peers", "4", "--steps", "300", "--out", str(out))
    procs = [*joins, train]
    try:
        await _until(lambda: "step 20/300" in train.out, 120, "the job training", procs)
        others = [joins[1].proc, joins[2].proc, train.proc]
        for p in others:  # the handover then waits on them: it cannot end before the second Ctrl-C
            p.send_signal(signal.SIGSTOP)
        joins[0].proc.send_signal(signal.SIGALRM)  # timeout's timer: it sends SIGINT, and its echo
        await _until(lambda: "Ctrl-C again to quit now" in joins[0].out, 30, "the handover starting", procs)
        await asyncio.sleep(0.7)  # past the echo window: a person's second Ctrl-C
        assert joins[0].proc.returncode is None, joins[0].out[-2000:]
        # To the join itself: timeout ignores the signal it sent to its own group from then on.
        child = int(Path(f"/proc/{joins[0].proc.pid}/task/{joins[0].proc.pid}/children").read_text().split()[0])
        os.kill(child, signal.SIGINT)
        quit_rc = await asyncio.wait_for(joins[0].proc.wait(), 30)
        for p in others:
            p.send_signal(signal.SIGCONT)
        rc = await asyncio.wait_for(train.proc.wait(), 120)
    finally:
        await _end(procs)
    assert quit_rc == 124 and "leaving the ring…" not in joins[0].out, joins[0].out[-2000:]  # it quit: no orderly end
    assert rc == 0 and "done: 300 steps" in train.out, train.out[-3000:]
    assert "cancelled" not in train.out and "stopped on member" not in train.out
    assert (out / "model.safetensors").exists()
