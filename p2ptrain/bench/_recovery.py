"""``p2ptrain bench recovery``: a member killed mid-job; the ring's recovery vs a restart from disk.

N member processes (on 127.0.0.1, or inside testbed devices with ``--testbed PROFILE``)
train the same tinygpt job twice. Each time the parent kills one member with SIGKILL
(like ``kill -9``; never member 0, which submits the job and reports) at the moment
member 0 has applied ``--kill-at`` steps:

1. **recovery** (p2ptrain): the survivors go on by themselves (``JobService(recover=True)``,
   the default, with the default failure timeout): they agree a view without the lost
   member, re-plan (pipeline) and train to the end;
2. **restart** (the baseline, what ``torchrun`` does): the parent stops every member
   (SIGTERM, as torchrun's agent does) and starts fresh processes, as many as survived,
   on the survivors' devices; they form a new ring and resume from the latest
   checkpoint on disk (``JobSpec(resume=True)``).

Reported:

- ``detect_s``: kill -> every survivor has installed a view without the lost member;
- ``recover_s``: kill -> every survivor has applied its first step in that view;
- ``restart_s``: kill -> every restarted process has applied its first step;
  ``ratio`` is recover_s / restart_s (times: smaller is better);
- ``lost_steps`` / ``restart_lost_steps``: steps done again (the step reached when
  the member was killed minus the step training went on from);
- ``steps_total``: steps a survivor applied in the recovery run, replays included;
- ``params_rel_diff``: ``||p - p_ref|| / ||p_ref||`` over all parameters, ``p`` the
  survivors' final parameters (each writes its own layers, or the whole model for data
  parallelism, to a safetensors file) and ``p_ref`` those of :func:`train_single` on
  the same job in this process with no fault (N members must compute what one process
  computes);
- ``final_loss`` and ``fault_free_final_loss``.

Members (this module run as ``python -m p2ptrain.bench._recovery``) report events as
JSON lines on stdout stamped with ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for
the whole machine on Linux, testbed namespaces included); the parent subtracts its
kill time. Their logs go to files: an error shows their tails, ``-v`` all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from p2ptrain._logs import log_to_stderr

__all__ = ["add_arguments", "main"]

# Bounds on every wait: a member that hangs fails the bench with its log, never hangs it.
START_TIMEOUT_S = 180.0  # processes up, ring formed, plan agreed, steps up to --kill-at
FINISH_TIMEOUT_S = 300.0  # recovery and the rest of the job
STOP_TIMEOUT_S = 10.0  # SIGTERM -> exit, before SIGKILL
_Event = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=4, help="member processes, at least 3 (default 4)")
    parser.add_argument("--strategy", choices=("data", "pipeline"), default="data", help="parallelism (default data)")
    parser.add_argument("--testbed", metavar="PROFILE", help="run members inside an emulated testbed, e.g. hetero4 (root)")
    parser.add_argument("--steps", type=int, default=40, help="steps of the job (default 40)")
    parser.add_argument("--kill-at", type=int, default=15, help="kill a member once member 0 applied this many steps (default 15)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints on disk (default 10)")
    parser.add_argument("--split", choices=("planned", "even"), default="planned",
                        help="pipeline: the planner's split, or the layers split evenly over every member (default planned)")
    parser.add_argument("--replica-every", type=int, default=10, help="pipeline: steps between stage copies to a peer (default 10)")
    parser.add_argument("--global-batch", type=int, default=0,
                        help="samples per step; default: the least multiple of peers and peers-1 that is >= 24")
    parser.add_argument("--codec", default="none", help="gradient/activation codec (default none: exact)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# --- member processes ------------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def _worker(a: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, JobSpec

    torch.set_num_threads(1)
    spec = JobSpec(**json.loads(a.spec))
    secret = os.environ.get("P2PTRAIN_SECRET") or None
    async with Node(cluster=a.cluster, interfaces=[a.host], ephemeral=True, secret=secret) as node:
        node.on_view_change(lambda v: _emit("view", epoch=v.epoch, members=list(v.members)))
        def applied(step: int, epoch: int) -> None:
            # A member a pipeline plan leaves out holds no layers: its steps are no work.
            idle = spec.strategy == "pipeline" and not getattr(svc.last_trainer, "units", True)
            _emit("step", step=step, epoch=epoch, idle=idle)

        svc = JobService(node, checkpoint_dir=a.checkpoint_dir, split=a.split, on_applied=applied,
                         on_plan=lambda p: _emit("plan", plan=p.summary()))
        _emit("node", id=node.node_id, failure_timeout_s=node.membership.failure_timeout)
        await node.wait_for_peers(a.world - 1, timeout=START_TIMEOUT_S)
        res = await svc.submit(spec) if a.submit else await svc.serve(once=True)
        assert res is not None
        trainer = svc.last_trainer
        if spec.strategy == "pipeline":
            named = {f"{u}.{n}": p for u in trainer.units for n, p in trainer.layers[u].named_parameters()}
        else:
            named = dict(trainer.w.model.named_parameters())
        save_file({k: p.detach().clone().contiguous() for k, p in named.items()}, a.params_out)
        _emit("done", first_step=res.first_step, steps=res.steps, final_loss=res.losses[-1] if res.losses else None,
              recoveries=[dataclasses.asdict(r) for r in trainer.recoveries])


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    for flag in ("--cluster", "--spec", "--checkpoint-dir", "--params-out"):  # --spec: the job's fields as JSON
        p.add_argument(flag, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--submit", action="store_true")
    p.add_argument("--split", default="planned")
    p.add_argument("--verbose", type=int, default=0)
    a = p.parse_args(argv)
    log_to_stderr(a.verbose)
    from p2ptrain.bench._member import member_process

    member_process()  # uvloop and a warm C heap, as p2ptrain join runs a member
    try:
        asyncio.run(_worker(a))
    except Exception as exc:
        logging.getLogger(__name__).exception("member failed")
        _emit("error", error=f"{type(exc).__name__}: {exc}"[:2000])
        return 1
    return 0


# --- the parent ------------------------------------------------------------------------


class _Fleet:
    """The bench's member processes: started, read (one thread per stdout) and always stopped.

    Args:
        launch: starts one process on device ``i`` (``subprocess.Popen`` or a testbed device's).
        hosts: each device's address.
        env: the members' environment.
        logs: the folder for the members' logs.
    """

    def __init__(self, launch: list[Callable[..., subprocess.Popen[Any]]], hosts: list[str], env: dict[str, str],
                 logs: Path, verbose: int) -> None:
        self.launch, self.hosts, self.env, self.logs, self.verbose = launch, hosts, env, logs, verbose
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.events: dict[str, list[_Event]] = {}
        self.ended: set[str] = set()
        self.stopping: set[str] = set()  # killed or stopped on purpose: their exit is no failure
        self._queue: queue.Queue[tuple[str, _Event | None]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._files: list[IO[Any]] = []

    def start(self, key: str, device: int, argv: list[str]) -> str:
        log = open(self.logs / f"{key}.log", "w")  # noqa: SIM115 (closed in close())
        self._files.append(log)
        cmd = [sys.executable, "-m", "p2ptrain.bench._recovery", *argv, "--host", self.hosts[device],
               "--verbose", str(self.verbose)]
        proc = self.launch[device](cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env)
        self.procs[key], self.events[key] = proc, []
        thread = threading.Thread(target=self._read, args=(key, proc), daemon=True, name=f"bench-{key}")
        thread.start()
        self._threads.append(thread)
        return key

    def _read(self, key: str, proc: subprocess.Popen[Any]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a stray print; events are JSON lines
            if isinstance(event, dict):
                self._queue.put((key, event))
        self._queue.put((key, None))

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Take events until ``done()`` holds.

        Raises:
            JobError: a member failed or exited unasked, or ``timeout`` passed first
                (the message carries the members' log tails).
        """
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"no {what} within {timeout:.0f}s")
            try:
                key, event = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if event is None:
                self.ended.add(key)
                code = self.procs[key].wait()
                finished = any(e["event"] == "done" for e in self.events[key])
                if key not in self.stopping and not (finished and code == 0):
                    raise self.error(f"member {key} exited with code {code} while waiting for {what}")
                continue
            self.events[key].append(event)
            if event.get("event") == "error":
                raise self.error(f"member {key} failed: {event.get('error')}")

    def error(self, what: str) -> Exception:
        """A :class:`JobError` saying ``what``, with the members' log tails."""
        from p2ptrain._errors import JobError

        return JobError(what + self.tails())

    def first(self, key: str, kind: str, pred: Callable[[_Event], bool] = lambda e: True) -> _Event | None:
        return next((e for e in self.events[key] if e["event"] == kind and pred(e)), None)

    def kill(self, key: str) -> float:
        """SIGKILL ``key``; returns the monotonic time just before the signal."""
        self.stopping.add(key)
        t = time.monotonic()
        self.procs[key].kill()
        return t

    def stop(self, keys: list[str]) -> None:
        """SIGTERM ``keys``, SIGKILL what is still alive after :data:`STOP_TIMEOUT_S`, read them to the end."""
        self.stopping.update(keys)
        for k in keys:
            if self.procs[k].poll() is None:
                self.procs[k].terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for k in keys:
            try:
                self.procs[k].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs[k].kill()
        self.wait(lambda: set(keys) <= self.ended, STOP_TIMEOUT_S + 5, "end of output from stopped members")

    def tails(self, lines: int = 25) -> str:
        out = []
        for key in self.procs:
            text = (self.logs / f"{key}.log").read_text(errors="replace").splitlines()
            if text:
                out.append(f"\n--- {key} log (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:]))
        return "".join(out)

    def close(self) -> None:
        """Kill and reap every process still running (safe to call twice)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for f in self._files:
            f.close()


def _default_batch(peers: int) -> int:
    step = math.lcm(peers, peers - 1)
    return step * math.ceil(24 / step)


def _check(args: argparse.Namespace) -> None:
    from p2ptrain._errors import ConfigError

    if args.peers < 3:
        raise ConfigError(f"--peers must be at least 3, got {args.peers}: with 2 the survivor is no majority and stops")
    if args.peers > 16:
        raise ConfigError(f"--peers {args.peers} is more member processes than this bench is meant for; use 3..16")
    if args.global_batch < 0:
        raise ConfigError(f"--global-batch must be positive (or 0 for the default), got {args.global_batch}")
    if args.steps < 3:  # a kill needs a step before it and two after
        raise ConfigError(f"--steps must be at least 3 (a step before the kill and two after), got {args.steps}")
    if args.kill_at < 1 or args.kill_at > args.steps - 2:
        raise ConfigError(f"--kill-at must be in 1..{args.steps - 2} (--steps {args.steps} minus 2, so steps remain "
                          f"after the recovery), got {args.kill_at}")
    for flag in ("checkpoint_every", "replica_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    gb, n = args.global_batch, args.peers
    if gb < 0 or (args.strategy == "data" and gb and gb < n):
        raise ConfigError(f"--global-batch {gb} is smaller than the {n} members: data parallelism needs a sample "
                          f"for each; use {n} or more (default {_default_batch(n)})")


def _spec(args: argparse.Namespace) -> Any:
    from p2ptrain._errors import CodecError, ConfigError, JobError
    from p2ptrain.train import JobSpec, check_here

    try:
        spec = JobSpec(model="tinygpt", strategy=args.strategy, global_batch=args.global_batch or _default_batch(args.peers),
                       steps=args.steps, seed=0, codec=args.codec, micro_batches=0 if args.strategy == "pipeline" else 1,
                       digest_every=0, checkpoint_every=args.checkpoint_every, replica_every=args.replica_every)
        check_here(spec)  # the codec's parameter (int8:0), before any member starts
        return spec
    except (JobError, CodecError) as exc:
        raise ConfigError(str(exc)) from None


def _run(fleet: _Fleet, name: str, devices: list[int], spec: Any, args: argparse.Namespace, tmp: Path, ckpt: str) -> list[str]:
    """Start one member per device in ``devices``, the first submitting ``spec``; returns their keys."""
    cluster = f"bench-{name}-{secrets.token_hex(3)}"
    wire = json.dumps(spec.to_wire_fields())
    keys = []
    for k, d in enumerate(devices):
        argv = ["--cluster", cluster, "--world", str(len(devices)), "--spec", wire, "--split", args.split,
                "--checkpoint-dir", str(tmp / ckpt / str(d)), "--params-out", str(tmp / "params" / f"{name}-{d}.safetensors")]
        keys.append(fleet.start(f"{name}-{d}", d, argv + (["--submit"] if k == 0 else [])))
    return keys


def _work(e: _Event) -> bool:  # a step that trained something (not one of a member the plan leaves out)
    return e["event"] == "step" and not e["idle"]


def _wait_kill_at(fleet: _Fleet, key: str, kill_at: int) -> _Event:
    """Wait until member ``key`` has applied ``kill_at`` steps; returns that step's event."""
    fleet.wait(lambda: fleet.first(key, "step", lambda e: e["step"] + 1 >= kill_at) is not None, START_TIMEOUT_S,
               f"step {kill_at} at {key}")
    return next(e for e in fleet.events[key] if e["event"] == "step" and e["step"] + 1 >= kill_at)


def _recovery(fleet: _Fleet, args: argparse.Namespace, spec: Any, tmp: Path) -> dict[str, Any]:
    keys = _run(fleet, "recovery", list(range(args.peers)), spec, args, tmp, "recovery")
    reporter, victim, survivors = keys[0], keys[-1], keys[:-1]
    epoch = _wait_kill_at(fleet, reporter, args.kill_at)["epoch"]
    t_kill = fleet.kill(victim)
    fleet.wait(lambda: all(fleet.first(k, "done") for k in survivors), FINISH_TIMEOUT_S, "end of the job at every survivor")
    node = fleet.first(victim, "node")
    assert node is not None
    lost_id = node["id"]
    detect, recover, resume, reached, total = [], [], [], 0, 0
    for k in survivors:
        view = fleet.first(k, "view", lambda e: e["epoch"] > epoch and lost_id not in e["members"])
        if view is None:
            raise fleet.error(f"member {k} finished the job without a view that lacks the lost member")
        detect.append(view["t"] - t_kill)
        steps = [e for e in fleet.events[k] if _work(e)]
        after = [e for e in steps if e["epoch"] > epoch]
        if after:  # a member the new plan leaves out trains nothing: no first step to time
            recover.append(after[0]["t"] - t_kill)
            resume.append(after[0]["step"])
        reached = max([reached] + [e["step"] + 1 for e in steps if e["epoch"] <= epoch])
        total = max(total, len(steps))
    if not recover:
        raise fleet.error("no survivor trained a step in the new view")
    done = fleet.first(reporter, "done")
    assert done is not None
    plans = [e["plan"] for e in fleet.events[reporter] if e["event"] == "plan"]
    return {
        "detect_s": round(max(detect), 4),
        "recover_s": round(max(recover), 4),
        "reached_step": reached,
        "resume_step": min(resume),
        "lost_steps": reached - min(resume),
        "steps_total": total,
        "final_loss": done["final_loss"],
        "recoveries": done["recoveries"],
        "failure_timeout_s": node["failure_timeout_s"],
        **({"plans": plans} if plans else {}),
        "_survivors": survivors,
    }


def _restart(fleet: _Fleet, args: argparse.Namespace, spec: Any, tmp: Path) -> dict[str, Any]:
    n = args.peers
    keys = _run(fleet, "before", list(range(n)), spec, args, tmp, "restart")
    reporter, victim, others = keys[0], keys[-1], keys[:-1]
    _wait_kill_at(fleet, reporter, args.kill_at)
    t_kill = fleet.kill(victim)
    fleet.stop(others)
    fleet.stop([victim])
    reached = max(e["step"] + 1 for k in keys for e in fleet.events[k] if _work(e))
    # torchrun jobs keep checkpoints where a restart finds them (shared storage): the lost
    # member's files join a survivor's directory (a pipeline needs its layers).
    shutil.copytree(tmp / "restart" / str(n - 1), tmp / "restart" / "0", dirs_exist_ok=True)
    resumed = type(spec)(**{**spec.to_wire_fields(), "resume": True})
    fresh = _run(fleet, "restart", list(range(n - 1)), resumed, args, tmp, "restart")

    def firsts() -> list[_Event]:  # every restarted member's first step that trained something, once all have one
        out = [fleet.first(k, "step") for k in fresh]
        if any(e is None for e in out):
            return []
        return [e for e in out if e is not None and not e["idle"]]

    fleet.wait(lambda: bool(firsts()), START_TIMEOUT_S, "a first step at every restarted member")
    ring = fleet.first(fresh[0], "view", lambda e: len(e["members"]) == n - 1)
    fleet.stop(fresh)
    resume = min(e["step"] for e in firsts())
    return {
        "restart_s": round(max(e["t"] for e in firsts()) - t_kill, 4),
        "restart_ring_s": round(ring["t"] - t_kill, 4) if ring else None,
        "restart_reached_step": reached,
        "restart_resume_step": resume,
        "restart_lost_steps": reached - resume,
    }


def _compare(spec: Any, params: Path, survivors: list[str]) -> tuple[float | None, float, list[str]]:
    """(params_rel_diff, fault-free final loss, parameters no survivor wrote) against one process."""
    import torch
    from safetensors.torch import load_file

    from p2ptrain.train import resolve, train_single

    workload = resolve(spec)
    _, losses = train_single(spec, workload=workload)
    ref = {name: p.detach() for name, p in workload.model.named_parameters()}
    worst: dict[str, float] = {}
    for key in survivors:
        for name, got in load_file(str(params / f"{key}.safetensors")).items():
            if name in ref:
                worst[name] = max(worst.get(name, 0.0), float(torch.sum((got.double() - ref[name].double()) ** 2)))
    missing = sorted(set(ref) - set(worst))
    norm = math.sqrt(sum(float(torch.sum(p.double() ** 2)) for p in ref.values()))
    diff = None if missing else math.sqrt(sum(worst.values())) / norm
    return diff, losses[-1], missing


def main(args: argparse.Namespace) -> int:
    _check(args)
    spec = _spec(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    env = {**{k: v for k, v in os.environ.items() if k != "P2PTRAIN_SECRET"}, "OMP_NUM_THREADS": "1"}
    try:
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2ptrain-recovery-")))
            for sub in ("logs", "params"):
                (tmp / sub).mkdir()
            if "P2PTRAIN_PROFILE_CACHE" not in os.environ:  # this run's profiles only (no earlier run's)
                env["P2PTRAIN_PROFILE_CACHE"] = str(tmp / "profiles")
            launch: list[Callable[..., subprocess.Popen[Any]]]
            if args.testbed:
                from p2ptrain.testbed import Testbed

                tb = stack.enter_context(Testbed.up(args.testbed, args.peers, name="rc" + secrets.token_hex(2)))
                launch = [d.popen for d in tb.devices]
                hosts, where = [d.address for d in tb.devices], f"testbed {args.testbed}"
                # Testbed devices are not on loopback: they admit each other with the secret (CURVE).
                env["P2PTRAIN_SECRET"] = secrets.token_hex(16)
            else:
                launch, hosts, where = [subprocess.Popen] * args.peers, ["127.0.0.1"] * args.peers, "loopback 127.0.0.1"
            fleet = _Fleet(launch, hosts, env, tmp / "logs", args.verbose)
            stack.callback(fleet.close)
            try:
                rec = _recovery(fleet, args, spec, tmp)
                rst = _restart(fleet, args, spec, tmp)
            finally:
                if args.verbose:
                    print(fleet.tails(lines=10**6), file=sys.stderr)
            fleet.close()  # the CPU is the reference run's now
            diff, ref_loss, missing = _compare(spec, tmp / "params", rec.pop("_survivors"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    result: dict[str, Any] = {
        "strategy": args.strategy, "peers": args.peers, "where": where, "global_batch": spec.global_batch,
        "steps": args.steps, "kill_at": args.kill_at, "codec": args.codec, "checkpoint_every": args.checkpoint_every,
        **({"split": args.split, "replica_every": args.replica_every} if args.strategy == "pipeline" else {}),
        **rec, **rst,
        "ratio": round(rec["recover_s"] / rst["restart_s"], 4),
        "fault_free_final_loss": ref_loss, "params_rel_diff": diff,
        **({"params_missing": missing} if missing else {}),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("detect_s", "recover_s", "restart_s", "lost_steps", "restart_lost_steps", "steps_total",
                  "final_loss", "fault_free_final_loss", "params_rel_diff"):
            print(f"{k:22} {result[k]}")
        print(f"{args.strategy}, {args.peers} members on {where}; failure timeout {result['failure_timeout_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
