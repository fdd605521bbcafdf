"""``p2ptrain bench pipeline``: the planned pipeline vs its bound and its baselines, one run.

N member processes (inside testbed devices with ``--testbed PROFILE``, else uncapped on
127.0.0.1 — the output says which) train the same pipeline job (tinygpt, or ``--model``:
a zoo name, ``module:function`` or ``hf:<dir>``) twice: with the
planner's split, then with the layers split evenly. One member (the first device)
reports:

- ``achieved_sps``: measured samples/s of the planned split (median gap between the reporting
  member's step reports after warm-up: the ring's step period, whether or not it trains);
- ``predicted_sps``: the planner's cost-model prediction for the plan it chose;
- ``bound_sps``: total per-sample compute over the devices' summed speed (perfectly
  divisible work, free links, no bubble), from the same profiles;
- ``uniform_sps``: measured samples/s with the even split on the same devices;
- ``start_s``: from the job's offer to step 0's loss known on the reporting member, with
  every member's profile cache empty (the bench gives the run a cache of its own);
  ``uniform_start_s`` the same for the even-split run, which finds the caches warm;
- ``snapshot_share``: the share of step time spent copying stage state for recovery (every
  ``replica_every`` steps, see docs/recovery.md);
- ``single_sps``: measured samples/s of plain one-device training on the first device
  (the fastest in the shipped ``hetero4`` profile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=4, help="member processes (default 4)")
    parser.add_argument("--testbed", metavar="PROFILE", help="run members inside an emulated testbed, e.g. hetero4 (root)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first 3 are warm-up (default 12)")
    parser.add_argument("--global-batch", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--micro-batches", type=int, default=0, help="micro-batches per step (default 0: the planner chooses)")
    parser.add_argument("--model", default="tinygpt",
                        help="the job's model: a zoo name, module:function or hf:<dir> (default tinygpt)")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for the model (repeatable; V read as int, else float, else string)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


WARMUP = 3


async def _worker(a: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, JobSpec, train_single

    torch.set_num_threads(1)
    secret = os.environ.get("P2PTRAIN_SECRET") or None
    # Default timers: a 1/8-core device whose loop stalls under load keeps heartbeating
    # from its pulse thread (docs/recovery.md), so no longer timeout is needed.
    async with Node(cluster=a.cluster, interfaces=[a.host], ephemeral=True, secret=secret) as node:
        # One service for both runs, subscribed before any peer can offer a job.
        # A step's time is the wall time between this member's step reports, not its own
        # step time: a member the plan leaves out does no work, and its own step would
        # look instant. A report waits for the step's loss sum over the ring, so the gaps
        # are the ring's step period (the first gap starts after the plan).
        times: list[float] = []
        last: list[float] = []
        first: list[float] = []  # when step 0's loss was known here (the job had started)

        def on_step(m: Any) -> None:
            now = time.perf_counter()
            if last:
                times.append(now - last[0])
            else:
                first.append(now)
            last[:] = [now]
        spec = JobSpec(model=a.model, strategy="pipeline", global_batch=a.global_batch, micro_batches=a.micro,
                       steps=a.steps, seed=0, digest_every=0, model_kwargs=json.loads(a.model_kwargs), admit=False)
        # Every member is ours: allow the job's module, or the folder holding its hf: directory.
        allow = [os.path.dirname(os.path.abspath(a.model[3:]))] if a.model.startswith("hf:") else (
            [a.model.split(":")[0]] if ":" in a.model else [])
        svc = JobService(node, on_step=on_step, allow_entry=allow)
        await node.wait_for_peers(a.world - 1, timeout=120)
        out: dict[str, Any] = {}
        for split in ("planned", "even"):
            times.clear()
            last.clear()
            first.clear()
            svc.split = split
            if a.submit:
                t_submit = time.perf_counter()
                await svc.submit(spec)
                plan, costs, devices, model = svc.last_plan_inputs
                log = svc.last_trainer.phase_log[WARMUP:]
                phases = {k: round(statistics.median(p[k] for p in log), 4) for k in log[0]}
                out[split] = {"sps": a.global_batch / statistics.median(times[WARMUP:]), "plan": plan, "costs": costs,
                              "devices": devices, "phases": phases, "model": model, "step_s": statistics.median(times[WARMUP:]),
                              # Snapshots run every replica_every steps: their share of all step time.
                              "snapshot_share": svc.last_trainer.phase_s["snapshot"] / max(sum(times), 1e-9),
                              # Offer to step 0's loss known here: agreement, probes (or the
                              # profile cache), plan and the first step (at most one more).
                              "start_s": first[0] - t_submit}
            else:
                await svc.serve(once=True)
        if not a.submit:
            return None
        # Plain training on this device alone, set-up and first steps excluded: the
        # difference between a long and a short run of the same job.
        def timed(n: int) -> float:
            t0 = time.perf_counter()
            train_single(spec, n)
            return time.perf_counter() - t0

        loop = asyncio.get_running_loop()
        short = await loop.run_in_executor(None, timed, WARMUP)
        long = await loop.run_in_executor(None, timed, a.steps)
        single = a.global_batch * (a.steps - WARMUP) / max(long - short, 1e-9)
    from p2ptrain.plan import bound_samples_per_s

    p = out["planned"]
    return {
        "achieved_sps": round(p["sps"], 2),
        "predicted_sps": round(p["plan"].samples_per_s, 2),
        "step_s": round(p["step_s"], 4),
        "predicted_step_s": round(p["plan"].step_s, 4),
        "phases_s": p["phases"],
        "start_s": round(p["start_s"], 3),
        "uniform_start_s": round(out["even"]["start_s"], 3),
        "replica_every": spec.replica_every,
        "snapshot_share": round(p["snapshot_share"], 4),
        "bound_sps": round(bound_samples_per_s(p["costs"], p["devices"]), 2),
        "uniform_sps": round(out["even"]["sps"], 2),
        "uniform_predicted_sps": round(out["even"]["plan"].samples_per_s, 2),
        "single_sps": round(single, 2),
        "plan": p["plan"].summary(),
        "micro_batches": p["plan"].micro_batches,
        "uniform_micro_batches": out["even"]["plan"].micro_batches,
        "speeds": [round(d.speed, 3) for d in p["devices"]],
        "links_mbit": [round(d.link_bytes_per_s * 8e-6, 1) for d in p["devices"]],
        "cost_model": {k: round(v, 12 if k == "update_s_per_byte" else 5) for k, v in p["model"]._asdict().items()},
    }


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cluster", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-kwargs", required=True)  # JSON
    p.add_argument("--submit", action="store_true")
    a = p.parse_args(argv)
    res = asyncio.run(_worker(a))
    if res is not None:
        print(json.dumps(res), flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    from p2ptrain._errors import ConfigError

    if args.peers < 2:
        raise ConfigError(f"--peers must be at least 2, got {args.peers}")
    if args.steps <= WARMUP + 1:
        raise ConfigError(f"--steps must exceed {WARMUP + 1} (the first {WARMUP} are warm-up)")
    from p2ptrain.train import JobSpec, parse_model_args

    kwargs = parse_model_args(args.model_arg)
    JobSpec(model=args.model, strategy="pipeline", global_batch=args.global_batch, micro_batches=args.micro_batches,
            steps=args.steps, model_kwargs=kwargs)  # a bad flag fails here, before any process starts
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    py = [sys.executable, "-m", "p2ptrain.bench._pipeline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "P2PTRAIN_SECRET": secrets.token_hex(16)}
    with ExitStack() as stack:
        if "P2PTRAIN_PROFILE_CACHE" not in os.environ:
            # A profile cache of this run only: both runs plan from the same figures, and no
            # figure from an earlier (perhaps contended) run steers this one.
            env["P2PTRAIN_PROFILE_CACHE"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="p2ptrain-profiles-"))
        if args.testbed:
            from p2ptrain.testbed import Testbed

            tb = stack.enter_context(Testbed.up(args.testbed, args.peers, name="pp" + secrets.token_hex(2)))
            launch: list[Callable[..., subprocess.Popen[Any]]] = [d.popen for d in tb.devices]
            hosts, where = [d.address for d in tb.devices], f"testbed {args.testbed}"
        else:
            hosts, launch = ["127.0.0.1"] * args.peers, [subprocess.Popen[Any]] * args.peers
            where = "loopback, uncapped (no --testbed: devices are equal, so planned and uniform should match)"
        cluster = "bench-" + secrets.token_hex(4)
        common = ["--cluster", cluster, "--world", str(args.peers), "--steps", str(args.steps),
                  "--global-batch", str(args.global_batch), "--micro", str(args.micro_batches),
                  "--model", args.model, "--model-kwargs", json.dumps(kwargs)]
        procs = [launch[i](py + common + ["--host", hosts[i]] + (["--submit"] if i == 0 else []),
                           stdout=subprocess.PIPE, text=True, env=env) for i in range(args.peers)]
        try:
            out, _ = procs[0].communicate(timeout=900)
            for p in procs[1:]:
                p.wait(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if procs[0].returncode != 0 or not out.strip():
            raise ConfigError(f"the reporting member failed (exit {procs[0].returncode}); rerun with -v for logs")
        res = json.loads(out.strip().splitlines()[-1])
    result = {"peers": args.peers, **res, "where": where, "global_batch": args.global_batch, "job_model": args.model}
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("achieved_sps", "predicted_sps", "bound_sps", "uniform_sps", "single_sps"):
            print(f"{k:15} {result[k]}")
        print(f"plan: {result['plan']}  ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
