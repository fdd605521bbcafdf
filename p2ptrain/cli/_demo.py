"""``p2ptrain demo``: local peers find each other over mDNS and train tinygpt together.

This process is one member; ``--peers - 1`` more run as ``p2ptrain join`` processes on
127.0.0.1. They find each other over mDNS on loopback, agree on a ring, and this
member offers the job to the ring (leaderless: every member accepts it and derives the
same plan). Progress shows here; metrics go to ``runs/<time>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from p2ptrain._errors import ConfigError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="local members, this process included (default 3)")
    parser.add_argument(
        "--strategy", default="pipeline", choices=["pipeline", "data"],
        help="pipeline: each member holds a run of layers, split by the planner (default); data: full replica per member",
    )
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"], help="pipeline schedule (default 1f1b)")
    parser.add_argument("--micro-batches", type=int, default=0, help="pipeline micro-batches per step (default 0: the planner chooses)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--codec", default="none", help="gradient codec: none, fp16, bf16, int8[:B], topk[:F] (default none)")
    parser.add_argument("--model", default="tinygpt", help="zoo model or module:function (default tinygpt)")
    parser.add_argument("--global-batch", type=int, default=None, help="samples per step over the ring (default: 8 per member)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and the sample order (default 0)")
    parser.add_argument("--runs-dir", default="runs", help="where metrics go (default ./runs)")
    parser.add_argument(
        "--kill-one-at", type=int, metavar="STEP",
        help="kill -9 one peer process when the job reaches STEP, to watch the ring recover (needs --peers >= 3)",
    )
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="every member writes its checkpoints here (shared by the local members)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="write checkpoints every N steps (default 0: never)")
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --checkpoint-dir")


class _Progress:
    """One updating line on a terminal; a line every 10 steps otherwise."""

    def __init__(self, total: int, out: IO[str], metrics: IO[str], at_step: Any = None) -> None:
        self.total, self.out, self.metrics = total, out, metrics
        self.at_step = at_step  # called with each step's metrics first (the fault injector)
        self.events: list[int] = []  # steps where the ring changed
        self.epoch: int | None = None
        self.tty = out.isatty()
        self.t0 = time.perf_counter()
        self.last: Any = None
        self.train_s = 0.0  # summed step times: training without the planning before it

    def __call__(self, m: Any) -> None:
        if self.at_step is not None:
            self.at_step(m)
        if self.epoch is not None and m.epoch != self.epoch:
            self.events.append(m.step)
            if self.tty:
                self.out.write("\n")
            print(f"ring changed (view {self.epoch} -> {m.epoch}, {m.members} stage(s)/member(s) now): "
                  f"training goes on from step {m.step + 1}", file=self.out, flush=True)
        self.epoch = m.epoch
        self.last = m
        self.train_s += m.step_s
        self.metrics.write(json.dumps({"t": round(time.perf_counter() - self.t0, 4), **dataclasses.asdict(m)}) + "\n")
        self.metrics.flush()
        done = m.step + 1
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        if m.busy:  # pipeline: every member's busy share of the step, in ring order
            busy = "busy " + " ".join(f"{100 * b:3.0f}%" for b in m.busy)
        else:
            busy = f"busy {100 * m.compute_s / m.step_s if m.step_s else 0.0:3.0f}% (this member)"
        line = f"[{bar}] step {done}/{self.total}  loss {m.loss:.4f}  {m.samples_per_s:6.0f} samples/s  {busy}"
        if self.tty:
            self.out.write("\r" + line)
            if done == self.total:
                self.out.write("\n")
            self.out.flush()
        elif done % 10 == 0 or done == self.total or done == 1:
            print(line, file=self.out, flush=True)


async def _demo(args: argparse.Namespace, run_dir: Path) -> int:
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, JobSpec

    cluster = "demo-" + secrets.token_hex(3)
    gb = args.global_batch or 8 * args.peers
    micro = args.micro_batches if args.strategy == "pipeline" else 1
    spec = JobSpec(model=args.model, strategy=args.strategy, global_batch=gb, steps=args.steps, seed=args.seed,
                   lr=args.lr, codec=args.codec, digest_every=25, micro_batches=micro, schedule=args.schedule,
                   checkpoint_every=args.checkpoint_every, resume=args.resume)
    ckpt = ["--checkpoint-dir", args.checkpoint_dir] if args.checkpoint_dir else []
    print(f"p2ptrain demo: {args.peers} members on 127.0.0.1, cluster {cluster!r}, strategy {args.strategy}, codec {args.codec}")
    log = open(run_dir / "peers.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster, "--interface", "127.0.0.1",
             "--ephemeral", "--json", "--duration", str(max(600, args.steps * 10)), *ckpt],
            stdout=log, stderr=log, env=env,
        )
        for _ in range(args.peers - 1)
    ]
    try:
        async with Node(cluster=cluster, interfaces=["127.0.0.1"], ephemeral=True) as node:
            print(f"waiting for {args.peers - 1} peer(s) to be found over mDNS…", flush=True)
            t0 = time.perf_counter()
            while len(node.view) < args.peers:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise ConfigError(f"a peer process exited early (code {dead[0].returncode}); see {run_dir / 'peers.log'}")
                try:
                    await node.wait_for_peers(args.peers - 1, timeout=1.0)
                except TimeoutError:
                    if time.perf_counter() - t0 > 90:
                        raise
            print(f"ring agreed in {time.perf_counter() - t0:.2f}s (view {node.view.epoch}):")
            if args.strategy == "data":
                _print_plan(node, spec)
            else:
                print("profiling the layers on every member and agreeing on a plan…", flush=True)
            with open(run_dir / "metrics.jsonl", "w") as metrics:
                progress = _Progress(spec.steps, sys.stdout, metrics, _killer(args.kill_one_at, procs))
                t1 = time.perf_counter()
                service = JobService(node, on_step=progress, on_plan=_show_pipeline_plan, checkpoint_dir=args.checkpoint_dir)
                res = await service.submit(spec)
            dt = time.perf_counter() - t1
            same = "replicas identical" if args.strategy == "data" else "stage"
            rate = spec.global_batch * res.steps / progress.train_s if progress.train_s else 0.0
            print(f"done: {res.steps} steps in {dt:.1f}s, planning included ({rate:.0f} samples/s while training); "
                  f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}; {same} digest {res.digest}")
            from p2ptrain.cli._plot import write_run_png

            trainer = service.last_trainer
            write_run_png(run_dir / "run.png", res.losses, getattr(trainer, "timelines", []) if trainer else [],
                          events=[s - res.first_step for s in progress.events])
            timeline = ", per-stage timeline" if args.strategy == "pipeline" else ""
            print(f"metrics: {run_dir / 'metrics.jsonl'}; picture (loss curve{timeline}): {run_dir / 'run.png'}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # graceful leave
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
    return 0


def _killer(step: int | None, procs: list[subprocess.Popen[Any]]) -> Any:
    """An ``on_step`` hook that kills the last peer process (SIGKILL, like ``kill -9``) at ``step``."""
    if step is None:
        return None
    done = False

    def at_step(m: Any) -> None:
        nonlocal done
        if not done and m.step + 1 >= step and procs[-1].poll() is None:
            done = True
            procs[-1].kill()
            print(f"\n--kill-one-at {step}: killed peer process {procs[-1].pid} (kill -9); the ring detects it "
                  "within the failure timeout and goes on without it", flush=True)

    return at_step


def _show_pipeline_plan(plan: Any) -> None:
    print(plan.table(), flush=True)


def _print_plan(node: Any, spec: Any) -> None:
    world = len(node.view)
    print(
        f"plan: data parallel, full replica on each member, {spec.global_batch // world} of {spec.global_batch} samples per member per step"
    )
    print(f"  {'rank':<5}{'node':<22}{'cores':>6}{'GFLOP/s':>10}  shard")
    for m in node.members():
        r = node.view.rank(m.node_id)
        per = spec.global_batch // world
        res = m.resources
        print(f"  {r:<5}{m.node_id:<22}{(res.cores if res else '?'):>6}{(f'{res.gflops:.1f}' if res else '?'):>10}  "
              f"samples {r * per}..{(r + 1) * per - 1} of each global batch")


def main(args: argparse.Namespace) -> int:
    if args.peers < 1 or args.peers > 16:
        raise ConfigError(f"--peers must be 1..16 on one machine, got {args.peers}")
    if args.kill_one_at is not None and (args.peers < 3 or not 1 <= args.kill_one_at < args.steps):
        raise ConfigError("--kill-one-at needs --peers >= 3 (the survivors must hold a majority) and a STEP in 1..steps-1")
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        raise ConfigError("--checkpoint-every and --resume need --checkpoint-dir DIR")
    run_dir = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_demo(args, run_dir))
