"""The runs behind ``p2ptrain study``: one job under each parallelism, on the same members, metered.

Each row of :data:`ROWS` is one run of the same job (model, global batch, steps, seed)
on freshly started member processes, one per device (inside testbed devices with a
testbed profile, else uncapped on 127.0.0.1). Members are named ``dev0``, ``dev1``, ... so
the ring order is the device order. The first member offers the job and trains too.

Every member prints one JSON line when its job ends: its step reports (time, the tensor
bytes it had sent), the ring's per-member joules of each step (the step sums carry
them, see :mod:`p2ptrain.train._energy`), its peak resident memory, its energy meter's
source, and, on the offering member, the plan with its predictions. :func:`summarise`
turns those lines into a row; nothing is measured in the parent.

Rows:

- ``data``: one replica per member, the batch split evenly.
- ``sequence``, ``tensor``: every sequence (or every block's heads and MLP columns)
  split over all members, shares given by :func:`shares_for` (the testbed's CPU caps).
- ``pipeline``: a pure pipeline, one device per stage, every device used, cuts planned.
- ``planner`` / ``time``: the job's own choice, ``strategy="auto"`` (a hybrid pipeline of
  data-parallel groups, devices may be left out, or sequence or tensor parallelism where
  it predicts them faster) for the fastest step.
- ``planner`` / ``energy``: the same, for the fewest joules per sample within
  ``max_slowdown`` times the fastest option's step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

__all__ = ["ROWS", "WARMUP", "Row", "run_study", "shares_for", "summarise"]

WARMUP = 3  # steps left out of every rate and J/sample: first-step allocation, caches, the plan's probes


@dataclass(frozen=True)
class Row:
    """One run of the study: a strategy, the planner's objective, and how the job is offered."""

    strategy: str  # what the row is called: data, sequence, tensor, pipeline, planner
    objective: str  # time or energy
    job_strategy: str  # JobSpec.strategy
    split: str = "planned"  # JobService split (pipeline jobs): planned, pipeline


ROWS = (
    Row("data", "time", "data"),
    Row("sequence", "time", "sequence"),
    Row("tensor", "time", "tensor"),
    Row("pipeline", "time", "pipeline", split="pipeline"),
    Row("planner", "time", "auto"),
    Row("planner", "energy", "auto"),
)


def shares_for(cpus: Sequence[float | None]) -> tuple[float, ...]:
    """Sequence/tensor shares for devices with these CPU caps: proportional, or even when any is uncapped."""
    if not cpus or any(c is None for c in cpus):
        return ()
    return tuple(float(c) for c in cpus if c is not None)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from p2ptrain._errors import trace_unless_ours
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, JobSpec, freeze_startup, warm_process, wire_bytes
    from p2ptrain.zoo import allowed_entries

    torch.set_num_threads(1)
    secret = os.environ.get("P2PTRAIN_SECRET") or None
    # Members of a ring have been up a while (``p2ptrain join`` warms up as it starts):
    # a member joins once warm, so no probe turn pays a process's one-time imports.
    await asyncio.get_running_loop().run_in_executor(None, warm_process)
    freeze_startup()  # as p2ptrain join does once warm
    spec = JobSpec(model=a.model, strategy=a.job_strategy, global_batch=a.global_batch, steps=a.steps, seed=0,
                   digest_every=0, model_kwargs=json.loads(a.model_kwargs), admit=False, objective=a.objective,
                   max_slowdown=a.max_slowdown if a.objective == "energy" else 0.0,
                   shares=tuple(json.loads(a.shares)) if a.job_strategy in ("sequence", "tensor") else ())
    out: dict[str, Any] = {"node": a.node_id, "steps": [], "ok": False}
    async with Node(cluster=a.cluster, interfaces=[a.host], node_id=a.node_id, ephemeral=True, secret=secret) as node:
        sent = wire_bytes(node)  # tensor bytes sent + received; the sum over members counts each byte twice
        svc = JobService(node, split=a.split, allow_entry=allowed_entries(a.model),
                         on_step=lambda m: out["steps"].append(
                             [time.perf_counter(), sent(), m.loss, list(m.joules), list(m.measured)]))
        await node.wait_for_peers(a.world - 1, timeout=120)
        out["members"] = list(node.view.members)
        out["rss_before"] = _rss_bytes()
        try:
            if a.submit:
                t0 = time.perf_counter()
                await svc.submit(spec)
                out["start_s"] = out["steps"][0][0] - t0 if out["steps"] else None
            else:
                await svc.serve(once=True)
            out["ok"] = True
        except Exception as exc:  # the row reports it; the study goes on with the next
            out["error"] = f"{type(exc).__name__}: {exc}"
            logging.getLogger(__name__).warning("the job failed on %s: %s", a.node_id, exc, exc_info=trace_unless_ours(exc))
        trainer = svc.last_trainer
        energy = getattr(trainer, "energy", None)
        out["energy_source"] = getattr(energy, "source", "")
        if a.submit and svc.last_plan_inputs is not None:
            plan, costs, devices, model = svc.last_plan_inputs
            # The agreed measurements, for pricing the rows that run no planner.
            out["inputs"] = {"costs": [[c.fwd_s, c.bwd_s, c.param_bytes, c.act_bytes, c.saved_bytes] for c in costs],
                             "devices": [dataclasses.asdict(d) for d in devices], "model": model._asdict()}
            out["plan"] = {"summary": plan.summary(), "members": list(plan.members), "step_s": plan.step_s,
                           "samples_per_s": plan.samples_per_s,
                           "j_per_sample": plan.j_per_sample if plan.joules else None,
                           "joules": dict(plan.joules), "objective": plan.objective}
            choice = svc.last_choice
            if choice is not None and choice.strategy != "pipeline":  # auto chose sequence or tensor parallelism
                out["plan"].update(summary=choice.strategy, members=list(out["members"]), step_s=choice.step_s,
                                   samples_per_s=spec.global_batch / choice.step_s, joules={},
                                   j_per_sample=choice.j_per_sample if math.isfinite(choice.j_per_sample) else None)
            if choice is not None:
                out["plan"]["choice"] = [[n, round(sps, 2), round(j, 6) if math.isfinite(j) else None]
                                         for n, sps, j in choice.options]
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return out


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    for name in ("--cluster", "--node-id", "--model", "--model-kwargs", "--job-strategy", "--split", "--objective", "--shares"):
        p.add_argument(name, required=True)
    p.add_argument("--host", default="127.0.0.1")
    for name in ("--world", "--steps", "--global-batch"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--max-slowdown", type=float, default=0.0)
    p.add_argument("--submit", action="store_true")
    a = p.parse_args(argv)
    from p2ptrain.bench._member import member_process

    member_process()  # uvloop and a warm C heap, as p2ptrain join runs a member
    print(json.dumps(asyncio.run(_worker(a))), flush=True)
    return 0


def summarise(row: Row, reports: Sequence[dict[str, Any] | None], *, global_batch: int,
              memory_limits: Sequence[int | None] = ()) -> dict[str, Any]:
    """One study row from the members' reports (``None`` for a member that printed nothing).

    ``j_per_sample`` counts the devices the job used (a plan may leave some out: their
    idle draw does not depend on the job, the accounting the planner predicts with);
    ``j_per_sample_ring`` counts every device in the ring. Rates and joules leave out
    the first :data:`WARMUP` steps.
    """
    out: dict[str, Any] = {"strategy": row.strategy, "objective": row.objective}
    lead = reports[0] if reports else None
    peaks = [r["peak_rss"] if r else None for r in reports]
    out["peak_mem_by_device"] = peaks
    out["peak_mem_bytes"] = max((p for p in peaks if p), default=None)
    over = [i for i, (p, lim) in enumerate(zip(peaks, memory_limits)) if p and lim and p > lim]
    failed = [i for i, r in enumerate(reports) if r is None or not r.get("ok")]
    out["fits"] = not over and not any(r is None for r in reports)
    errors = [r.get("error", "") for r in reports if r and r.get("error")]
    if failed or lead is None or len(lead["steps"]) <= WARMUP + 1:
        dead = [f"dev{i}" for i, r in enumerate(reports) if r is None]
        out["error"] = "; ".join(errors[:1] + ([f"{', '.join(dead)} died (out of memory?)"] if dead else [])) or "too few steps"
        out.update(samples_per_s=None, j_per_sample=None, energy_source=None, wire_bytes_per_step=None)
        return out
    steps = lead["steps"][WARMUP:]
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    chose = (lead.get("plan") or {}).get("summary")
    ran_plan = row.job_strategy == "pipeline" or (row.job_strategy == "auto" and chose not in ("sequence", "tensor"))
    if ran_plan and len(gaps) > 1:
        # A pipeline member reports each step once the next one has run, and the last one
        # right after the one before: that gap is no step.
        gaps = gaps[:-1]
    out["step_s"] = round(statistics.median(gaps), 5)
    # The joules below cover every timed step: their window's mean step, beside the median.
    out["mean_step_s"] = round(statistics.fmean(gaps), 5)
    out["samples_per_s"] = round(global_batch / out["step_s"], 2)
    members = lead["members"]
    plan = lead.get("plan")
    used = set(plan["members"]) if plan else set(members)
    per = [0.0] * len(members)
    for s in steps[1:]:  # each step's joules are those since the previous report
        for i, j in enumerate(s[3][: len(members)]):
            per[i] += j
    samples = global_batch * (len(steps) - 1)
    out["j_per_sample"] = round(sum(j for m, j in zip(members, per) if m in used) / samples, 6)
    out["j_per_sample_ring"] = round(sum(per) / samples, 6)
    out["j_per_sample_by_device"] = {m: round(j / samples, 6) for m, j in zip(members, per)}
    measured = all(all(s[4]) for s in steps if s[4])
    sources = sorted({r["energy_source"] for r in reports if r and r.get("energy_source")})
    out["energy_source"] = "measured" if measured and any(s[4] for s in steps) else "estimated"
    out["energy_sources"] = sources
    # Each member's tensor bytes in and out over the timed steps; the sum counts every byte twice.
    moved = 0
    for r in reports:
        assert r is not None
        st = r["steps"]
        if len(st) > WARMUP + 1:
            moved += st[-1][1] - st[WARMUP][1]
    out["wire_bytes_per_step"] = int(moved / 2 / max(len(steps) - 1, 1))
    out["final_loss"] = round(lead["steps"][-1][2], 4)
    out["start_s"] = round(lead["start_s"], 3) if lead.get("start_s") is not None else None
    if lead.get("inputs"):
        out["inputs"] = lead["inputs"]
        # What the planner believed of each device: speed (1.0 = the profiling device), its CV, its hop.
        out["probed"] = {d["node_id"]: {"speed": round(d["speed"], 4), "speed_cv": round(d.get("speed_cv", 0.0), 4),
                                        "hop_ms": round(1e3 * d.get("hop_s", 0.0), 3)} for d in lead["inputs"]["devices"]}
    if plan:
        out["plan"] = plan["summary"]
        out["predicted_samples_per_s"] = round(plan["samples_per_s"], 2)
        out["predicted_j_per_sample"] = round(plan["j_per_sample"], 6) if plan["j_per_sample"] is not None else None
        out["members_used"] = plan["members"]
        if plan.get("choice"):  # an auto row: every option it weighed, [strategy, samples/s, J/sample]
            out["auto_options"] = plan["choice"]
    else:
        out["members_used"] = members
    return out


def run_study(
    *,
    testbed: str | None,
    peers: int | None,
    model: str = "tinygpt",
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 12,
    global_batch: int = 32,
    max_slowdown: float = 1.25,
    rows: Sequence[Row] = ROWS,
    progress: Callable[[str], None] = lambda line: None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run every row and return the study's JSON object (see ``p2ptrain study --help``).

    Raises:
        ConfigError: bad arguments, or the testbed cannot be made.
    """
    from p2ptrain._errors import ConfigError
    from p2ptrain.train import JobSpec, check_here

    kwargs = dict(model_kwargs or {})
    if steps <= WARMUP + 2:
        raise ConfigError(f"--steps must exceed {WARMUP + 2} (the first {WARMUP} are warm-up)")
    for row in rows:  # a bad flag fails here, before any process starts
        JobSpec(model=model, strategy=row.job_strategy, global_batch=global_batch, steps=steps, model_kwargs=kwargs)
    from p2ptrain._errors import JobError

    unsplittable: dict[Row, str] = {}
    for row in rows:  # and a bad value, or a model a row's strategy cannot split (an MLP for sequence)
        try:
            check_here(JobSpec(model=model, strategy=row.job_strategy, global_batch=global_batch, steps=steps,
                               model_kwargs=kwargs))
        except JobError as exc:
            if row.job_strategy not in ("sequence", "tensor"):
                raise
            unsplittable[row] = str(exc)
    if unsplittable:
        names = {r: r.strategy if r.strategy != "planner" else f"planner-{r.objective}" for r in rows}
        keep = " ".join(f"--only {names[r]}" for r in rows if r not in unsplittable)
        first = next(iter(unsplittable))
        raise JobError(f"the {' and '.join(names[r] for r in unsplittable)} row(s) cannot run this model: "
                       f"{unsplittable[first]}" + (f" (leave them out: {keep})" if keep else ""))
    py = [sys.executable, "-m", "p2ptrain.bench._study"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "P2PTRAIN_SECRET": secrets.token_hex(16)}
    with ExitStack() as stack:
        # One profile cache for the whole study: every row plans from the same figures.
        env.setdefault("P2PTRAIN_PROFILE_CACHE", stack.enter_context(tempfile.TemporaryDirectory(prefix="p2ptrain-study-")))
        if testbed:
            from p2ptrain.testbed import Testbed, load_profile

            n = peers or len(load_profile(testbed).devices)
            tb = stack.enter_context(Testbed.up(testbed, n, name="st" + secrets.token_hex(2)))
            launch: list[Callable[..., subprocess.Popen[Any]]] = [d.popen for d in tb.devices]
            hosts = [d.address for d in tb.devices]
            devices: list[dict[str, Any]] = [{"name": d.name, "kind": d.plan.kind, "cpus": d.plan.cpus, "power": d.plan.power,
                        "battery": d.plan.battery, "memory_mib": d.plan.memory_mib} for d in tb.devices]
            where = f"testbed {testbed}"
        else:
            n = peers or 3
            hosts, launch = ["127.0.0.1"] * n, [subprocess.Popen[Any]] * n
            devices = [{"name": f"dev{i}", "kind": "host", "cpus": None, "power": None, "battery": None, "memory_mib": None}
                       for i in range(n)]
            where = "loopback, uncapped (no --testbed): the members share this machine's cores"
        if n < 2:
            raise ConfigError(f"the study needs at least 2 devices, got {n}")
        limits = [int(d["memory_mib"]) << 20 if d["memory_mib"] else None for d in devices]
        shares = shares_for([float(d["cpus"]) if d["cpus"] is not None else None for d in devices])
        out_rows = []
        for k, row in enumerate(rows):
            progress(f"[{k + 1}/{len(rows)}] {row.strategy} ({row.objective}) on {n} devices ...")
            common = ["--cluster", "study-" + secrets.token_hex(4), "--world", str(n), "--steps", str(steps),
                      "--global-batch", str(global_batch), "--model", model, "--model-kwargs", json.dumps(kwargs),
                      "--job-strategy", row.job_strategy, "--split", row.split, "--objective", row.objective,
                      "--max-slowdown", str(max_slowdown), "--shares", json.dumps(list(shares))]
            procs = [launch[i](py + common + ["--host", hosts[i], "--node-id", f"dev{i}"] + (["--submit"] if i == 0 else []),
                               stdout=subprocess.PIPE, text=True, env=env) for i in range(n)]
            reports = _collect(procs, timeout_s)
            res = summarise(row, reports, global_batch=global_batch, memory_limits=limits)
            progress("      " + (f"{res['samples_per_s']} samples/s, {res['j_per_sample']} J/sample" if res.get("samples_per_s")
                                 else f"failed: {res.get('error')}"))
            out_rows.append(res)
    inputs = next((r.pop("inputs") for r in out_rows if r.get("inputs")), None)
    for r in out_rows:
        r.pop("inputs", None)
    planner = predict(out_rows, inputs, global_batch=global_batch, shares=shares, max_slowdown=max_slowdown)
    return {"where": where, "model": model, "model_kwargs": kwargs, "planner": planner,
            "inputs": inputs, "global_batch": global_batch, "steps": steps,
            "warmup": WARMUP, "max_slowdown": max_slowdown, "shares": list(shares), "devices": devices,
            "rows": out_rows, **compare(out_rows)}


def _collect(procs: list[subprocess.Popen[Any]], timeout_s: float) -> list[dict[str, Any] | None]:
    """Each member's JSON line (``None`` for one that died or printed none); every process reaped."""
    deadline = time.monotonic() + timeout_s
    reports: list[dict[str, Any] | None] = []
    try:
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                text = ""
            lines = [ln for ln in (text or "").splitlines() if ln.startswith("{")]
            reports.append(json.loads(lines[-1]) if lines and p.returncode == 0 else None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return reports


def predict(rows: Sequence[dict[str, Any]], inputs: dict[str, Any] | None, *, global_batch: int,
            shares: Sequence[float], max_slowdown: float) -> dict[str, Any] | None:
    """Fill in the planner's prediction for the rows that ran no planner, and rank every row.

    From the measurements a pipeline row agreed on (``inputs``), the data, sequence and
    tensor rows get ``predicted_samples_per_s`` and ``predicted_j_per_sample``
    (:func:`p2ptrain.plan.price_strategy`). Returns the strategies ranked by predicted
    time, and the one the energy objective picks (fewest predicted J/sample within
    ``max_slowdown`` of the fastest prediction); ``None`` without inputs.
    """
    from p2ptrain.plan import Device, DevicePower, LayerCost, price_strategy

    if not inputs:
        return None
    costs = [LayerCost(*c) for c in inputs["costs"]]
    devices = [Device(**{**d, "power": DevicePower(**d["power"]) if d.get("power") else None}) for d in inputs["devices"]]
    for r in rows:
        if r["strategy"] in ("data", "sequence", "tensor"):
            price = price_strategy(r["strategy"], costs, devices, global_batch=global_batch,
                                   shares=shares if r["strategy"] != "data" else (), **inputs["model"])
            r["predicted_samples_per_s"] = round(price.samples_per_s, 2)
            r["predicted_j_per_sample"] = round(price.j_per_sample, 6) if price.joules else None
            r["predicted_fits"] = price.fits
    priced = [r for r in rows if r.get("predicted_samples_per_s")]
    if not priced:
        return None
    fastest = max(r["predicted_samples_per_s"] for r in priced)
    frugal = [r for r in priced if r.get("predicted_j_per_sample") and r["predicted_samples_per_s"] * max_slowdown >= fastest]
    label = lambda r: r["strategy"] if r["strategy"] != "planner" else f"planner-{r['objective']}"  # noqa: E731
    return {"by_time": [label(r) for r in sorted(priced, key=lambda r: -r["predicted_samples_per_s"])],
            "energy_choice": label(min(frugal, key=lambda r: r["predicted_j_per_sample"])) if frugal else None}


def compare(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``energy_vs_time`` and ``energy_prediction`` from the planner's two rows (``None`` where missing)."""
    by = {(r["strategy"], r["objective"]): r for r in rows}
    t, e = by.get(("planner", "time")), by.get(("planner", "energy"))
    out: dict[str, Any] = {"energy_vs_time": None, "energy_prediction": None}
    if t and e and t.get("j_per_sample") and e.get("j_per_sample"):
        out["energy_vs_time"] = {"j_ratio": round(e["j_per_sample"] / t["j_per_sample"], 3),
                                 "step_ratio": round(e["step_s"] / t["step_s"], 3)}
    if e and e.get("predicted_j_per_sample") and e.get("j_per_sample"):
        out["energy_prediction"] = {"predicted_j_per_sample": e["predicted_j_per_sample"],
                                    "metered_j_per_sample": e["j_per_sample"],
                                    "ratio": round(e["j_per_sample"] / e["predicted_j_per_sample"], 3)}
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(_worker_main(sys.argv[1:]))
