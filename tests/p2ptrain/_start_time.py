"""Job start time: ``JobService.submit`` called -> the submitter's first step done, cold and warm caches.

Run: ``.venv/bin/python tests/p2ptrain/_start_time.py [--peers 4] [--runs 5] [--json]``

Four in-process members on loopback (real sockets, ``_ring.started_ring``) train a
tinygpt pipeline job, ``--runs`` times with empty profile caches (cold) and ``--runs``
times with caches that have seen the model (warm). The first job in the process is run
apart and reported as ``process_cold`` (it also pays torch's first-optimizer imports).
Each run reports a breakdown on the submitter, in seconds:

- ``offer_ack_s``: submit -> every member accepted (offer, workload build, acks);
- ``build_s``: the submitter's workload build (inside ``offer_ack_s``);
- ``local_s``, ``barrier_s``, ``link_s``, ``gather_s``, ``plan_s``: ``agree_on_plan``'s phases;
- ``first_step_s``: plan agreed -> first step done (trainer set-up and the step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path and its name would shadow the
# installed p2ptrain: it (for _ring) and tests/ (for _wait) go on the path after the import.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

import p2ptrain.plan as plan_pkg  # noqa: E402
import p2ptrain.train._jobs as jobs_mod  # noqa: E402
from p2ptrain import JobService, JobSpec  # noqa: E402
from p2ptrain.plan import PROFILE_CACHE_ENV  # noqa: E402

sys.path += [str(_HERE), str(_HERE.parent)]  # once p2ptrain is imported (tests/p2ptrain/ would shadow it)
from _ring import started_ring  # noqa: E402

PHASES = ("offer_ack_s", "build_s", "local_s", "barrier_s", "link_s", "gather_s", "plan_s", "first_step_s")


class _Probe:
    """Wraps ``resolve`` and ``agree_on_plan`` to time the submitter's phases."""

    def __init__(self) -> None:
        self.build: dict[int, float] = {}  # thread -> seconds (resolve runs on executor threads)
        self.agree: dict[str, dict[str, float]] = {}
        real_resolve, real_agree = jobs_mod.resolve, plan_pkg.agree_on_plan
        probe = self

        def resolve(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return real_resolve(*a, **k)
            finally:
                probe.build[len(probe.build)] = time.perf_counter() - t

        async def agree(node: Any, *a: Any, **k: Any) -> Any:
            timings: dict[str, float] = {"start": time.perf_counter()}
            out = await real_agree(node, *a, timings=timings, **k)
            timings["end"] = time.perf_counter()
            probe.agree[node.node_id] = timings
            return out

        self.patches = [(jobs_mod, "resolve", resolve), (plan_pkg, "agree_on_plan", agree)]
        self.saved = [(m, n, getattr(m, n)) for m, n, _ in self.patches]

    def __enter__(self) -> _Probe:
        for m, n, f in self.patches:
            setattr(m, n, f)
        return self

    def __exit__(self, *exc: object) -> None:
        for m, n, f in self.saved:
            setattr(m, n, f)


async def one_job(nodes: list[Any], spec: JobSpec) -> dict[str, float]:
    """Submit ``spec`` from ``nodes[0]``; the breakdown of the time to its first step there."""
    first: list[float] = []
    services = [JobService(n, on_step=(lambda m: first.append(time.perf_counter())) if i == 0 else None)
                for i, n in enumerate(nodes)]
    serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
    with _Probe() as probe:
        t0 = time.perf_counter()
        await asyncio.wait_for(services[0].submit(spec), 300)
        await asyncio.wait_for(asyncio.gather(*serving), 60)
    a = probe.agree[nodes[0].node_id]
    return {
        "start_s": first[0] - t0,
        "offer_ack_s": a["start"] - t0,
        "build_s": max(probe.build.values()),
        **{k: a[k] for k in ("local_s", "barrier_s", "link_s", "gather_s", "plan_s")},
        "first_step_s": first[0] - a["end"],
        "members_cached": sum(t["cached"] for t in probe.agree.values()),
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    starts = [r["start_s"] for r in runs]
    return {"median_s": statistics.median(starts), "best_s": min(starts), "runs_s": starts,
            "median_breakdown": {k: statistics.median(r[k] for r in runs) for k in PHASES}}


async def measure(peers: int = 4, runs: int = 5, steps: int = 2, global_batch: int = 32,
                  first_cache: str | None = None) -> dict[str, Any]:
    """Cold and warm start times of a ``peers``-member tinygpt pipeline job (see the module docstring).

    ``first_cache``: the profile cache of the process's first job (kept; a second run of
    this script with the same folder gives a fresh process with warm caches).
    """
    spec = JobSpec(model="tinygpt", strategy="pipeline", global_batch=global_batch, steps=steps, seed=0,
                   digest_every=0, admit=False)
    nodes = await started_ring(peers)
    old = os.environ.get(PROFILE_CACHE_ENV)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ[PROFILE_CACHE_ENV] = first_cache or os.path.join(tmp, "first")
            process_cold = await one_job(nodes, spec)
            cold = []
            for i in range(runs):
                os.environ[PROFILE_CACHE_ENV] = os.path.join(tmp, f"cold{i}")  # empty: every member measures
                cold.append(await one_job(nodes, spec))
            warm = [await one_job(nodes, spec) for _ in range(runs)]  # cold{runs-1} has seen the model
    finally:
        if old is None:
            os.environ.pop(PROFILE_CACHE_ENV, None)
        else:
            os.environ[PROFILE_CACHE_ENV] = old
        for n in nodes:
            await n.close()
    return {"peers": peers, "process_cold": process_cold, "cold": _summary(cold), "warm": _summary(warm),
            "cold_runs": cold, "warm_runs": warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--first-cache", help="profile cache folder of the first job (kept between runs)")
    a = p.parse_args()
    torch.set_num_threads(1)  # as the suite: several members share this machine's cores
    res = asyncio.run(measure(a.peers, a.runs, first_cache=a.first_cache))
    if a.json:
        print(json.dumps(res))
        return
    print(f"process-cold first job: {res['process_cold']['start_s']:.2f} s")
    for kind in ("cold", "warm"):
        s = res[kind]
        print(f"{kind}: median {s['median_s']:.2f} s, best {s['best_s']:.2f} s, runs "
              + " ".join(f"{v:.2f}" for v in s["runs_s"]))
        print("   median breakdown: " + ", ".join(f"{k} {v:.3f}" for k, v in s["median_breakdown"].items()))


if __name__ == "__main__":
    main()
