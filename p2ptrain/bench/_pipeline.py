"""``p2ptrain bench pipeline``: the planned pipeline vs its bound and its baselines, one run.

N member processes (inside testbed devices with ``--testbed PROFILE``, else uncapped on
127.0.0.1 — the output says which) train the same pipeline job (tinygpt, or ``--model``:
a zoo name, ``module:function`` or ``hf:<dir>``) twice: with the
planner's split, then with the layers split evenly. One member (the first device)
reports:

- ``achieved_sps``: measured samples/s of the planned split (median gap between the reporting
  member's step reports after warm-up, the last report's left out: the ring's step
  period, whether or not it trains);
- ``predicted_sps``: the planner's cost-model prediction for the plan it chose (the plan
  it runs after a measured re-plan, see ``replanned_at``);
- ``replanned_at`` / ``first_plan``: the step at which the job moved to a plan made on its
  measured compute (None: it kept its first plan), and that first plan with its prediction;
- ``bound_sps``: total per-sample compute over the devices' summed speed (perfectly
  divisible work, free links, no bubble), from the same profiles;
- ``uniform_sps``: measured samples/s with the even split on the same devices;
- ``start_s``: from the job's offer to step 0's loss known on the reporting member, with
  every member's profile cache empty (the bench gives the run a cache of its own);
  ``uniform_start_s`` the same for the even-split run, which finds the caches warm
  (``P2PTRAIN_PROFILE_CACHE=DIR`` kept across runs makes the planned run warm too);
  ``start_phases_s`` / ``uniform_start_phases_s``: where that went on the reporting member:
  ``offer_s`` (every member builds the workload and accepts), the plan agreement's phases
  (``probe_s``: the speed probes' turns, ``link_s``, ...; ``cached``: 1.0 warm) and
  ``after_plan_s`` (the trainer, its first snapshot and step 0 with its loss sum). Members
  join the ring once warm (``p2ptrain.train.warm_process``), as ``p2ptrain join``'s have
  been up a while;
- ``stage_s``: the reporting member's own stage (its ``layers``), the plan's forward +
  backward seconds per micro-batch for it (``predicted``, the executor's per-op cost
  included) and what its compute thread took (``measured``: the median forward plus the
  median backward), where a prediction's error starts; null when the plan leaves it out;
- ``snapshot_share``: the share of step time spent copying stage state for recovery (every
  ``replica_every`` steps, see docs/recovery.md);
- ``thread_cpu_ms_per_step``: the reporting member's CPU milliseconds per step after
  warm-up, by kind of thread (:func:`thread_cpu_s`): what the ring costs a member beside
  its compute (``loop``, ``zmq``);
- ``single_sps``: measured samples/s of plain one-device training on the first device
  (the fastest in the shipped ``hetero4`` profile): the median of single steps, timed
  before the ring's runs while the other members wait idle and again after them, the
  others gone (``single_sps_before_after``: each half's rate; ``single_cv``: the steps'
  coefficient of variation);
- ``options``: what the planner predicted for the options it weighed (``alone``: the
  best plan on one device, ``all``: the best on every device, ``chosen``);
- ``host_load``: the host's 1-minute load average at the start and the end (the devices'
  caps sum to the host's cores in ``hetero4``: anything else running slows them);
- ``probe``: each member's probed speed (relative to the fastest), the spread of its
  repeats (``speed_cv``), its message hop, and, with ``--testbed``, its CPU cap and
  ``speed_vs_cap``: its speed ratio over its cap ratio (1.0: the probe saw the cap).
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
from pathlib import Path
from typing import Any

from p2ptrain._logs import log_to_stderr

__all__ = ["add_arguments", "main", "worker_args"]


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
    from p2ptrain.train import JobService, JobSpec, freeze_startup, warm_process
    from p2ptrain.zoo import allowed_entries

    torch.set_num_threads(1)
    secret = os.environ.get("P2PTRAIN_SECRET") or None
    # A ring's members are processes that have been up a while (``p2ptrain join`` warms
    # up as it starts): a member joins the ring only once warm, so the job's start does
    # not pay a process's one-time imports (seconds on a quarter core).
    await asyncio.get_running_loop().run_in_executor(None, warm_process)
    freeze_startup()  # as p2ptrain join does once warm: no full collection walks the imports mid-job
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
        plans: list[Any] = []
        agreed: list[float] = []  # when this member had each plan (the agreed one first)

        def on_plan(plan: Any) -> None:
            agreed.append(time.perf_counter())
            plans.append(plan)

        cpu: list[dict[str, float]] = []  # this process's thread CPU when the steps after warm-up began, and at the end

        def on_step(m: Any) -> None:
            now = time.perf_counter()
            if len(times) in (WARMUP - 1, a.steps - 2):
                cpu.append(thread_cpu_s())
            if last:
                times.append(now - last[0])
            else:
                first.append(now)
            last[:] = [now]
        spec = JobSpec(model=a.model, strategy="pipeline", global_batch=a.global_batch, micro_batches=a.micro,
                       steps=a.steps, seed=0, digest_every=0, model_kwargs=json.loads(a.model_kwargs), admit=False)
        svc = JobService(node, on_step=on_step, allow_entry=allowed_entries(a.model))  # every member is ours
        print(json.dumps({"node_id": node.node_id}), flush=True)  # the bench maps ids to devices (caps)
        await node.wait_for_peers(a.world - 1, timeout=120)
        out: dict[str, Any] = {}
        if a.submit:
            # Plain training on this device alone, first: the other members wait idle
            # for the job, so the device has its own capacity, as the planner's probes do.
            single_steps = await asyncio.get_running_loop().run_in_executor(None, _single_steps, spec, a.steps)
        for split in ("planned", "even"):
            times.clear()
            last.clear()
            first.clear()
            svc.split = split
            if a.submit:
                plans.clear()
                agreed.clear()
                svc.on_plan = on_plan
                cpu.clear()
                t_submit = time.perf_counter()
                await svc.submit(spec)
                steady = ({k: (v - cpu[0].get(k, 0.0)) / (a.steps - WARMUP - 1) for k, v in cpu[-1].items()}
                          if len(cpu) == 2 else {})
                plan, costs, devices, model = svc.last_plan_inputs
                log = svc.last_trainer.phase_log[WARMUP:]
                phases = {k: round(statistics.median(p[k] for p in log), 4) for k in log[0]}
                # Each step is reported once its closing sum is in, the last one too: every gap is a step.
                gaps = times[WARMUP:]
                out[split] = {"stage": _own_stage(plan, node.node_id, svc.last_trainer),
                              "sps": a.global_batch / statistics.median(gaps), "plan": plan, "costs": costs,
                              "devices": devices, "phases": phases, "model": model, "step_s": statistics.median(gaps),
                              # Snapshots run every replica_every steps: their share of all step time.
                              "snapshot_share": svc.last_trainer.phase_s["snapshot"] / max(sum(times), 1e-9),
                              # Offer to step 0's loss known here: agreement, probes (or the
                              # profile cache), plan and the first step (at most one more).
                              "start_s": first[0] - t_submit, "start_phases": _start_phases(
                                  svc.last_plan_timings, first[0] - t_submit, first[0] - agreed[0]),
                              "replanned_at": (svc.last_trainer.moved_at or [None])[0], "first_plan": plans[0],
                              # This process's CPU per step after warm-up, by kind of thread.
                              "thread_cpu_ms": {k: round(v * 1e3, 2) for k, v in steady.items() if v > 0}}
            else:
                await svc.serve(once=True)
        if not a.submit:
            return None
        me = node.node_id
        # Stay until the others have left: a member still closing its last step must not
        # find the ring gone.
        deadline = time.perf_counter() + 10
        while len(node.view) > 1 and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        # Plain training again, the others idle or gone: the host drifts over a run of a
        # minute, and a baseline on both sides of the ring's runs does not favour either.
        single_after = await asyncio.get_running_loop().run_in_executor(None, _single_steps, spec, a.steps)
    from p2ptrain.plan import bound_samples_per_s

    p = out["planned"]
    halves = [a.global_batch / statistics.median(t) for t in (single_steps, single_after)]
    single_steps += single_after
    single = a.global_batch / statistics.median(single_steps)
    devices = p["devices"]
    fastest = max(d.speed for d in devices)
    return {
        "node_id": me,
        "single_cv": round(statistics.pstdev(single_steps) / statistics.fmean(single_steps), 4),
        "options": {k: round(v, 2) for k, v in p["plan"].options},
        "probe": {"node_ids": [d.node_id for d in devices], "speed": [round(d.speed / fastest, 3) for d in devices],
                  "speed_cv": [round(d.speed_cv, 4) for d in devices], "hop_ms": [round(d.hop_s * 1e3, 3) for d in devices]},
        "achieved_sps": round(p["sps"], 2),
        "predicted_sps": round(p["plan"].samples_per_s, 2),
        # A planned job checks its plan against its measured compute at one step and may
        # move to a better one: that step (None: it kept its plan) and the first plan.
        "replanned_at": p["replanned_at"],
        "first_plan": {"predicted_sps": round(p["first_plan"].samples_per_s, 2), "plan": p["first_plan"].summary()},
        "step_s": round(p["step_s"], 4),
        "predicted_step_s": round(p["plan"].step_s, 4),
        "phases_s": p["phases"],
        "stage_s": p["stage"],
        "start_s": round(p["start_s"], 3),
        "uniform_start_s": round(out["even"]["start_s"], 3),
        "start_phases_s": {k: round(v, 3) for k, v in p["start_phases"].items()},
        "uniform_start_phases_s": {k: round(v, 3) for k, v in out["even"]["start_phases"].items()},
        "replica_every": spec.replica_every,
        "snapshot_share": round(p["snapshot_share"], 4),
        "thread_cpu_ms_per_step": p["thread_cpu_ms"],
        "bound_sps": round(bound_samples_per_s(p["costs"], p["devices"]), 2),
        "uniform_sps": round(out["even"]["sps"], 2),
        "uniform_predicted_sps": round(out["even"]["plan"].samples_per_s, 2),
        "single_sps": round(single, 2),
        "single_sps_before_after": [round(h, 2) for h in halves],
        "plan": p["plan"].summary(),
        "micro_batches": p["plan"].micro_batches,
        "uniform_micro_batches": out["even"]["plan"].micro_batches,
        "speeds": [round(d.speed, 3) for d in p["devices"]],
        "links_mbit": [round(d.link_bytes_per_s * 8e-6, 1) for d in p["devices"]],
        "cost_model": {k: round(v, 14 if k.endswith("per_byte") else 5) for k, v in p["model"]._asdict().items()},
    }


def _start_phases(agreement: dict[str, float], start_s: float, after_s: float) -> dict[str, float]:
    """The reporting member's start, phase by phase: ``offer_s`` (the offer until this member
    began agreeing: every member builds the workload and accepts), the agreement's own phases
    (:func:`~p2ptrain.plan.agree_on_plan`'s timings; ``cached``/``probed`` are flags, not
    seconds) and ``after_plan_s`` (the agreed plan until step 0's loss is known here: the
    trainer, its first snapshot, step 0 and its loss sum over the ring)."""
    spent = sum(v for k, v in agreement.items() if k.endswith("_s"))
    return {"offer_s": max(0.0, start_s - after_s - spent), **agreement, "after_plan_s": after_s}


def _own_stage(plan: Any, me: str, trainer: Any) -> dict[str, Any] | None:
    """The reporting member's stage: its layers, the plan's forward + backward seconds per
    micro-batch (``predicted``) and the median of its own forwards plus that of its
    backwards over the ops kept (``measured``; the warm-up steps' among them). None when the
    plan leaves it out."""
    stage = next((st for st in plan.stages if me in st.node_ids), None)
    ops = list(getattr(trainer, "timeline", []))
    fwd = [end - start for kind, _, start, end in ops if kind == 0]
    bwd = [end - start for kind, _, start, end in ops if kind == 1]
    if stage is None or not fwd or not bwd:
        return None
    return {"layers": [stage.first_layer, stage.last_layer], "predicted": round(stage.compute_s, 4),
            "measured": round(statistics.median(fwd) + statistics.median(bwd), 4)}


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads so far, summed by kind of thread.

    Kinds: ``loop`` (the main thread: the event loop), ``zmq`` (ZeroMQ's I/O threads, which
    name themselves) and ``python`` (every other thread: the compute thread, the pulse, the
    codec and executor threads; Python before 3.14 gives them no OS name). Linux only
    (empty elsewhere); threads that ended are not counted.
    """
    tick, out = os.sysconf("SC_CLK_TCK"), dict[str, float]()
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = "loop" if task.name == str(os.getpid()) else "zmq" if name.startswith("ZMQbg") else "python"
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _single_steps(spec: Any, steps: int) -> list[float]:
    """Seconds of each plain one-device training step after warm-up (as ``train_single`` trains)."""
    from p2ptrain.train import GlobalSampler, resolve

    w = resolve(spec)
    model = w.model
    model.train()
    opt = w.make_optimizer(model.parameters(), spec.lr)
    sampler = GlobalSampler(len(w.dataset), spec.global_batch, spec.seed)
    times = []
    for step in range(WARMUP + max(steps - WARMUP, 9)):
        t0 = time.perf_counter()
        loss = w.loss(w.batch(sampler.indices(step)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())
        times.append(time.perf_counter() - t0)
    return times[WARMUP:]


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
    p.add_argument("--verbose", type=int, default=0)
    a = p.parse_args(argv)
    log_to_stderr(a.verbose)  # stderr, which the members share with the bench
    from p2ptrain.bench._member import member_process

    member_process()  # uvloop and a warm C heap, as p2ptrain join runs a member
    res = asyncio.run(_worker(a))
    if res is not None:
        print(json.dumps(res), flush=True)
    return 0


def worker_args(args: argparse.Namespace, cluster: str, kwargs: dict[str, Any]) -> list[str]:
    """The options every member process of the bench starts with (``--host`` and ``--submit`` apart)."""
    # The bench's -v reaches its members: "rerun with -v for logs" has to show theirs.
    return ["--cluster", cluster, "--world", str(args.peers), "--steps", str(args.steps),
            "--global-batch", str(args.global_batch), "--micro", str(args.micro_batches),
            "--model", args.model, "--model-kwargs", json.dumps(kwargs), "--verbose", str(args.verbose)]


def main(args: argparse.Namespace) -> int:
    from p2ptrain._errors import ConfigError

    if args.peers < 2:
        raise ConfigError(f"--peers must be at least 2, got {args.peers}")
    if args.steps < WARMUP + 5:
        raise ConfigError(f"--steps must be at least {WARMUP + 5}: the first {WARMUP} are warm-up, and the rate is "
                          "the median of at least 3 step gaps after them")
    from p2ptrain.train import JobSpec, check_here, parse_model_args

    kwargs = parse_model_args(args.model_arg)
    check_here(JobSpec(model=args.model, strategy="pipeline", global_batch=args.global_batch,
                       micro_batches=args.micro_batches, steps=args.steps, model_kwargs=kwargs))  # before any process starts
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    load0 = os.getloadavg()[0]
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
            caps = [d.plan.cpus for d in tb.devices]
        else:
            caps = [None] * args.peers
            hosts, launch = ["127.0.0.1"] * args.peers, [subprocess.Popen[Any]] * args.peers
            where = "loopback, uncapped (no --testbed: devices are equal, so planned and uniform should match)"
        cluster = "bench-" + secrets.token_hex(4)
        common = worker_args(args, cluster, kwargs)
        procs = [launch[i](py + common + ["--host", hosts[i]] + (["--submit"] if i == 0 else []),
                           stdout=subprocess.PIPE, text=True, env=env) for i in range(args.peers)]
        outs: list[str] = []
        try:
            out, _ = procs[0].communicate(timeout=900)
            if procs[0].returncode == 0:  # else the others wait for a job that never comes: killed below
                outs = [out] + [p.communicate(timeout=60)[0] for p in procs[1:]]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if procs[0].returncode != 0 or not out.strip():
            raise ConfigError(f"the reporting member failed (exit {procs[0].returncode}); rerun with -v for logs")
        res = json.loads(out.strip().splitlines()[-1])
        _add_caps(res, outs, caps)
    result = {"peers": args.peers, **res, "where": where, "global_batch": args.global_batch, "job_model": args.model,
              # The host's 1-minute load at the start and the end: a busy host's figures are noise.
              "host_load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("achieved_sps", "predicted_sps", "bound_sps", "uniform_sps", "single_sps"):
            print(f"{k:15} {result[k]}")
        print(f"plan: {result['plan']}  ({where})")
    return 0


def _add_caps(res: dict[str, Any], outs: list[str], caps: list[float | None]) -> None:
    """Put each member's CPU cap beside its probed speed, and the probe's ratio over the caps'."""
    by_id: dict[str, float | None] = {}
    for out, cap in zip(outs, caps):
        for line in out.strip().splitlines()[:1]:  # each member's first line names it
            by_id[json.loads(line)["node_id"]] = cap
    probe = res["probe"]
    cpus = [by_id.get(n) for n in probe["node_ids"]]
    if all(c is not None for c in cpus):
        top = max(c for c in cpus if c is not None)
        probe["cpus"] = cpus
        probe["speed_vs_cap"] = [round(v / (c / top), 3) for v, c in zip(probe["speed"], cpus) if c is not None]
        res["probe_ratio"] = round(max(probe["speed"]) / min(probe["speed"]), 3)
        res["cap_ratio"] = round(top / min(c for c in cpus if c is not None), 3)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
