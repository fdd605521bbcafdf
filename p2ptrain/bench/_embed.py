"""``p2ptrain bench embed``: a host's control loop on time while the embedded node trains.

A robot program embeds ``async with p2ptrain.Node(...)`` and a ``JobService`` on its own
asyncio loop (the default loop: the library never installs uvloop) beside its own
periodic work. This bench is that host: one process runs a node, a job service and a
100 Hz task that sleeps until its next 10 ms deadline and records how late it woke
(``wake - deadline``; a wake later than a whole period skips the missed deadlines, as a
control loop does). The other members (``--peers`` in all, on 127.0.0.1) form the ring
with it; the host measures an idle window (ring formed, no job), then offers a job
(``--strategy data`` or ``pipeline``, tinygpt by default) and trains it with them.

Reported (milliseconds; percentiles are nearest-rank):

- ``late_p50_ms``, ``late_p99_ms``, ``late_max_ms``: the host loop's lateness from the
  job's offer to its result; ``idle_late_*`` the same with the ring formed and no job;
- ``thread_late_p99_ms``: a plain thread of the host process sleeping to the same
  deadlines (what the OS and the GIL alone cost, no event-loop callbacks);
- ``baseline_late_p99_ms``: a bare asyncio 100 Hz loop in a process of its own, over the
  same training window: the machine's scheduling noise, the baseline;
- ``slow_callbacks`` (``--diagnose``): where the host loop's thread was busy while the
  task was late — a stack sampler of the loop thread (``sys._current_frames``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="members including the host (default 3)")
    parser.add_argument("--strategy", choices=("data", "pipeline"), default="data", help="the job's strategy (default data)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--global-batch", type=int, default=48, help="samples per step (default 48: 16 per member of 3)")
    parser.add_argument("--period-ms", type=float, default=10.0, help="the host task's period (default 10: 100 Hz)")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of the idle window (default 3)")
    parser.add_argument("--model", default="tinygpt", help="the job's model, a zoo name (default tinygpt)")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for the model (repeatable; V read as int, else float, else string)")
    parser.add_argument("--switch-interval-ms", type=float, default=0.0,
                        help="sys.setswitchinterval in the host process (default 0: Python's own, 5 ms)")
    parser.add_argument("--member-nice", type=int, default=0, help="nice value of the member processes (default 0)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip JobService.warm_up() (the first job then pays the process's one-time imports)")
    parser.add_argument("--freeze-startup", action="store_true",
                        help="the host calls p2ptrain.train.freeze_startup() once warm (default: the members do, the host not)")
    parser.add_argument("--diagnose", action="store_true", help="sample the host loop thread's stacks while it is late")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values`` (nan when empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _stats(samples: list[tuple[float, float]], prefix: str = "") -> dict[str, Any]:
    late = [v * 1e3 for _, v in samples]
    return {f"{prefix}late_p50_ms": round(_pct(late, 50), 3), f"{prefix}late_p99_ms": round(_pct(late, 99), 3),
            f"{prefix}late_max_ms": round(max(late, default=math.nan), 3)}


def _window(samples: list[tuple[float, float]], t0: float, t1: float) -> list[tuple[float, float]]:
    return [s for s in samples if t0 <= s[0] <= t1]


def _next_deadline(deadline: float, now: float, period: float) -> float:
    """The first deadline after ``now`` on ``deadline``'s grid (missed ones are skipped)."""
    return deadline + period * max(1, math.floor((now - deadline) / period) + 1)


async def _tick(period: float, out: list[tuple[float, float]], limit_s: float, shown: list[float] | None = None) -> None:
    """The host's periodic task: sleep to each deadline, record ``(wake, lateness)`` (bounded in time).

    ``shown[0]`` is kept at the next deadline (for :class:`_LateSampler`).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    deadline = loop.time() + period
    while deadline < end:
        if shown is not None:
            shown[:] = [deadline]
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        now = loop.time()  # time.monotonic(): comparable across the bench's processes
        out.append((now, now - deadline))
        deadline = _next_deadline(deadline, now, period)


def _tick_thread(period: float, out: list[tuple[float, float]], stop: threading.Event) -> None:
    """The same deadlines on a plain thread: no event loop, only the OS and the GIL."""
    deadline = time.monotonic() + period
    while not stop.is_set():
        time.sleep(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        out.append((now, now - deadline))
        deadline = _next_deadline(deadline, now, period)


class _LateSampler:
    """While the host task is overdue, samples the stacks of the threads that ran: who had the CPU and the GIL.

    The task publishes its next deadline in ``deadline``; every ``interval`` this thread
    reads each thread's CPU clock and, while the task is more than ``late_s`` overdue,
    counts the innermost frames of every thread whose clock moved since the last look
    (parked threads do not count). The loop thread shows up as ``MainThread``.
    """

    def __init__(self, deadline: list[float], late_s: float, interval: float = 0.0005) -> None:
        self.deadline, self.late_s, self.interval = deadline, late_s, interval
        self.busy: Counter[str] = Counter()
        self.cpu: dict[str, float] = {}  # CPU seconds per thread name during late episodes
        self.events: list[tuple[float, str]] = []
        self.samples = 0
        self.recording = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embed-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = threading.get_ident()
        prev: dict[int, float] = {}
        while not self._stop.wait(self.interval):
            threads = {t.ident: t.name for t in threading.enumerate() if t.ident not in (None, me)}
            moved: dict[int, float] = {}
            for tid in threads:
                try:
                    c = time.clock_gettime(time.pthread_getcpuclockid(tid))
                except (OSError, ProcessLookupError):
                    continue
                if tid in prev and c > prev[tid]:
                    moved[tid] = c - prev[tid]
                prev[tid] = c
            now = time.monotonic()
            if not self.recording or now - self.deadline[0] < self.late_s:
                continue
            self.samples += 1
            frames = sys._current_frames()
            for tid, dt in moved.items():
                name = threads[tid]
                if name == "embed-thread-tick":
                    continue
                self.cpu[name] = self.cpu.get(name, 0.0) + dt
                stack: list[str] = []
                f: Any = frames.get(tid)
                while f is not None and len(stack) < 5:
                    where = f.f_code.co_filename.replace(os.sep, "/").split("/site-packages/")[-1].rsplit("/", 2)[-2:]
                    stack.append(f"{f.f_code.co_name}@{'/'.join(where)}:{f.f_lineno}")
                    f = f.f_back
                key = f"[{name}] " + " < ".join(stack)
                self.busy[key] += 1
                self.events.append((now, key))

    def report(self, top: int = 15) -> list[dict[str, Any]]:
        n = max(self.samples, 1)
        return [{"stack": k, "share": round(c / n, 3)} for k, c in self.busy.most_common(top)]

    def during(self, t0: float, t1: float, top: int = 4) -> list[str]:
        """The stacks sampled most often between ``t0`` and ``t1`` (one late episode)."""
        seen = Counter(k for t, k in self.events if t0 <= t <= t1)
        return [f"{c}x {k}" for k, c in seen.most_common(top)]


# --- the processes --------------------------------------------------------------------------


async def _host(a: argparse.Namespace) -> dict[str, Any]:
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, JobSpec, freeze_startup

    if a.switch_interval_ms > 0:
        sys.setswitchinterval(a.switch_interval_ms / 1e3)
    period = a.period_ms / 1e3
    ticks: list[tuple[float, float]] = []
    thread_ticks: list[tuple[float, float]] = []
    stop = threading.Event()
    shown = [math.inf]
    ticker = asyncio.create_task(_tick(period, ticks, limit_s=900, shown=shown))
    thread = threading.Thread(target=_tick_thread, args=(period, thread_ticks, stop), name="embed-thread-tick", daemon=True)
    thread.start()
    sampler = _LateSampler(shown, late_s=0.005) if a.diagnose else None
    if sampler is not None:
        sampler.start()
    step_s: list[float] = []
    last: list[float] = []
    marks: list[float] = []

    def on_step(m: Any) -> None:
        now = time.monotonic()
        marks.append(now)
        if last:
            step_s.append(now - last[0])
        last[:] = [now]

    try:
        async with Node(cluster=a.cluster, interfaces=["127.0.0.1"], ephemeral=True, secret=a.secret) as node:
            svc = JobService(node, on_step=on_step)
            w0 = time.monotonic()
            if a.warm_up:
                await svc.warm_up()  # before the control loop counts, as a host does
            if a.freeze_startup:
                freeze_startup()  # the host's choice, like the switch interval
            warm_s = time.monotonic() - w0
            await node.wait_for_peers(a.world - 1, timeout=120)
            i0 = time.monotonic()
            await asyncio.sleep(a.idle_s)
            i1 = time.monotonic()
            spec = JobSpec(model=a.model, strategy=a.strategy, global_batch=a.global_batch, steps=a.steps, seed=0,
                           micro_batches=0 if a.strategy == "pipeline" else 1, model_kwargs=json.loads(a.model_kwargs),
                           admit=False)
            t0 = time.monotonic()
            if sampler is not None:
                sampler.recording = True
            result = await svc.submit(spec)
            t1 = time.monotonic()
            if sampler is not None:
                sampler.recording = False
    finally:
        ticker.cancel()
        stop.set()
        thread.join(timeout=5)
        if sampler is not None:
            sampler.stop()
    train, idle = _window(ticks, t0, t1), _window(ticks, i0, i1)
    out: dict[str, Any] = {
        **_stats(train), **_stats(idle, "idle_"),
        "samples": len(train), "idle_samples": len(idle),
        "missed_deadlines": sum(1 for _, v in train if v > period),
        # After step 0's report: the steady state, without the job's set-up (workload,
        # trainer, first optimizer) before it.
        **_stats(_window(ticks, marks[0], t1) if marks else [], "steady_"),
        "setup_s": round(marks[0] - t0, 3) if marks else None,
        "setup_late_max_ms": _stats(_window(ticks, t0, marks[0]) if marks else [])["late_max_ms"],
        "thread_late_p99_ms": _stats(_window(thread_ticks, t0, t1))["late_p99_ms"],
        "thread_late_max_ms": _stats(_window(thread_ticks, t0, t1))["late_max_ms"],
        "train_s": round(t1 - t0, 3), "step_s": round(statistics.median(step_s), 4) if step_s else None,
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
        "switch_interval_ms": round(sys.getswitchinterval() * 1e3, 3),
        "warm_up": a.warm_up, "warm_up_s": round(warm_s, 3), "freeze_startup": a.freeze_startup,
        "window": [t0, t1],
    }
    if sampler is not None:
        out["late_stacks"] = sampler.report()
        out["late_samples"] = sampler.samples
        out["late_cpu_s"] = {k: round(v, 4) for k, v in sorted(sampler.cpu.items(), key=lambda kv: -kv[1])}
        out["worst_stacks"] = [sampler.during(t - v, t) for t, v in sorted(train, key=lambda s: -s[1])[:5]]
    if a.diagnose:
        worst = sorted(train, key=lambda s: -s[1])[:8]
        out["worst"] = [[round(t - t0, 3), round(v * 1e3, 1)] for t, v in worst]
    return out


async def _member(a: argparse.Namespace) -> None:
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, freeze_startup

    async with Node(cluster=a.cluster, interfaces=["127.0.0.1"], ephemeral=True, secret=a.secret) as node:
        service = JobService(node)
        await service.warm_up()  # as p2ptrain join does while its ring forms
        freeze_startup()
        await service.serve(once=True)


async def _baseline(a: argparse.Namespace) -> list[tuple[float, float]]:
    """A bare 100 Hz loop until stdin closes (or ``--limit-s``): the machine's own noise."""
    loop = asyncio.get_running_loop()
    ticks: list[tuple[float, float]] = []
    closed = loop.run_in_executor(None, sys.stdin.read)
    ticker = asyncio.create_task(_tick(a.period_ms / 1e3, ticks, limit_s=a.limit_s))
    await asyncio.wait([closed, ticker], return_when=asyncio.FIRST_COMPLETED)
    ticker.cancel()
    return ticks


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("host", "member", "baseline"))
    p.add_argument("--cluster", default="")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--strategy", default="data")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--model", default="tinygpt")
    p.add_argument("--model-kwargs", default="{}")  # JSON
    p.add_argument("--switch-interval-ms", type=float, default=0.0)
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false")
    p.add_argument("--freeze-startup", action="store_true")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--limit-s", type=float, default=900.0)
    a = p.parse_args(argv)
    a.secret = os.environ.get("P2PTRAIN_SECRET") or None
    if a.nice:
        os.nice(a.nice)
    if a.role == "member":
        from p2ptrain.bench._member import member_process

        member_process()  # uvloop and a warm C heap, as p2ptrain join runs a member (the host keeps its own loop)
        asyncio.run(_member(a))
    elif a.role == "baseline":
        print(json.dumps(asyncio.run(_baseline(a))), flush=True)
    else:  # asyncio.run: the default loop, as a host that embeds the library has it
        print(json.dumps(asyncio.run(_host(a))), flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    from p2ptrain._errors import ConfigError
    from p2ptrain.train import JobSpec, check_here, parse_model_args

    if args.peers < 2:
        raise ConfigError(f"--peers must be at least 2 (the host and one member), got {args.peers}")
    if not 1.0 <= args.period_ms <= 1000.0:
        raise ConfigError(f"--period-ms must be in 1..1000, got {args.period_ms}")
    if not args.idle_s * 1000 >= 10 * args.period_ms:  # fewer ticks make no p99 (it printed NaN, which JSON lacks)
        raise ConfigError(f"--idle-s must hold at least 10 of the host's periods ({args.period_ms * 10 / 1000:g} s), "
                          f"got {args.idle_s}")
    kwargs = parse_model_args(args.model_arg)
    check_here(JobSpec(model=args.model, strategy=args.strategy, global_batch=args.global_batch, steps=args.steps,
                       model_kwargs=kwargs))  # a bad flag or value fails here, before any process starts
    if args.strategy == "data" and args.global_batch < args.peers:
        raise ConfigError(f"--global-batch {args.global_batch} is smaller than the {args.peers} members; "
                          f"use {args.peers} or more")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    py = [sys.executable, "-m", "p2ptrain.bench._embed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "P2PTRAIN_SECRET": secrets.token_hex(16)}
    common = ["--cluster", "embed-" + secrets.token_hex(4), "--world", str(args.peers), "--period-ms", str(args.period_ms)]
    host_flags = ["--strategy", args.strategy, "--steps", str(args.steps), "--global-batch", str(args.global_batch),
                  "--idle-s", str(args.idle_s), "--model", args.model, "--model-kwargs", json.dumps(kwargs),
                  "--switch-interval-ms", str(args.switch_interval_ms)]
    host_flags += (["--diagnose"] if args.diagnose else []) + (["--no-warm-up"] if args.no_warm_up else [])
    host_flags += ["--freeze-startup"] if args.freeze_startup else []
    procs: list[subprocess.Popen[str]] = []
    try:
        base = subprocess.Popen(py + ["baseline", "--period-ms", str(args.period_ms)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        procs.append(base)
        procs += [subprocess.Popen(py + ["member", "--nice", str(args.member_nice)] + common, stdout=subprocess.DEVNULL, env=env, text=True)
                  for _ in range(args.peers - 1)]
        host = subprocess.Popen(py + ["host"] + common + host_flags, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(host)
        out, _ = host.communicate(timeout=900)
        base_out, _ = base.communicate(input="", timeout=60)
        for p in procs[1:-1]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if host.returncode != 0 or not out.strip():
        raise ConfigError(f"the host process failed (exit {host.returncode}); rerun with -v for logs")
    res = json.loads(out.strip().splitlines()[-1])
    t0, t1 = res.pop("window")
    baseline = _window([(t, v) for t, v in json.loads(base_out.strip().splitlines()[-1])], t0, t1)
    result = {
        "host_period_ms": args.period_ms, "strategy": args.strategy, "steps": args.steps, "peers": args.peers,
        "model": args.model, "global_batch": args.global_batch, **res,
        **_stats(baseline, "baseline_"), "member_nice": args.member_nice,
        "loop": "asyncio default (no uvloop)", "cpus": len(os.sched_getaffinity(0)),
        "where": "loopback 127.0.0.1, uncapped",
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("late_p50_ms", "late_p99_ms", "late_max_ms", "idle_late_p99_ms", "thread_late_p99_ms",
                  "baseline_late_p99_ms"):
            print(f"{k:22} {result[k]}")
        print(f"{result['strategy']}: {result['steps']} steps in {result['train_s']} s, {result['samples']} ticks")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
