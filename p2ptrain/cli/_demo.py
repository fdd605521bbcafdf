"""``p2ptrain demo``: local peers find each other over mDNS and train tinygpt together.

This process is one member; ``--peers - 1`` more run as ``p2ptrain join`` processes on
127.0.0.1 (started with ``--parent-pid``, so they die with this process however it
ends). They find each other over mDNS on loopback, agree on a ring, and this member
offers the job to the ring (leaderless: every member accepts it and derives the same
plan). Settings that the ring would refuse are refused before any process starts.

A run that trains writes ``runs/<time>/`` (a run that fails before its first step
leaves nothing there):

- ``metrics.jsonl``: one JSON object per line, each with ``event`` and ``t`` (seconds
  since the demo started):

  - ``run`` (first line): the settings: ``cluster``, ``peers``, the job's fields
    (``model``, ``strategy``, ``global_batch``, ``steps``, ``codec``, ...) and
    ``members``, the ids of the ring's members in ring order;
  - ``plan`` (pipeline): ``stages`` as ``{members, shares, layers}``, ``micro_batches``,
    ``predicted_step_s``, ``predicted_samples_per_s``; again after each re-plan;
  - ``ring_change``: ``step``, ``from_epoch``, ``to_epoch``, ``members`` (ids);
  - ``step``: ``step``, ``loss``, ``step_s`` and ``samples_per_s`` of the ring (wall
    time between two steps on this member, waiting for the others included),
    ``member_step_s``, ``compute_s`` and ``comm_wait_s`` of this member, ``members``
    (ids), ``stages`` (count; 1 for data parallel), ``epoch``, ``busy`` as
    ``{member id: busy share of the step}`` (pipeline: every member; data: this one),
    and ``joules`` / ``joules_measured`` as ``{member id: ...}``: each member's energy of
    the step, measured by a sensor or estimated by a power model (docs/energy.md).
- ``run.png``: the loss curve and the pipeline timeline (labelled with matplotlib,
  ``pip install 'p2ptrain[plot]'``; a basic picture without it).
- ``peers.log``: the output of the ``join`` processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError, DiscoveryError
from p2ptrain.cli._progress import _Metrics, _Progress, _steps_run
from p2ptrain.cli._runs import discard_if_empty, new_run_dir, pipeline_flags
from p2ptrain.dashboard import add_arguments as add_watch_arguments
from p2ptrain.dashboard import check_arguments as check_watch_arguments
from p2ptrain.dashboard import start_watching

__all__ = ["add_arguments", "main"]

# The peers' output the error shows when one exits early (its log goes with the empty run folder).
_LOG_TAIL_LINES = 15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="local members, this process included (default 3)")
    parser.add_argument(
        "--strategy", default="pipeline", choices=["pipeline", "data", "sequence", "tensor", "auto"],
        help="pipeline: each member holds a run of layers, split by the planner (default); data: full replica per member; "
             "sequence: a slice of every sequence per member; tensor: a share of every block per member; "
             "auto: the planner's plan, or sequence or tensor parallelism where it predicts them better",
    )
    parser.add_argument("--schedule", default=None, choices=["1f1b", "gpipe"], help="pipeline schedule (default 1f1b)")
    parser.add_argument("--micro-batches", type=int, default=0, help="pipeline micro-batches per step (default 0: the planner chooses)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--codec", default="none", help="gradient codec: none, fp16, bf16, int8[:B], topk[:F] (default none)")
    parser.add_argument("--model", default="tinygpt", help="zoo model or module:function (default tinygpt)")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for the model (repeatable; V read as int, else float, else string)")
    parser.add_argument(
        "--global-batch", type=int, default=None,
        help="samples per step over the ring (default: 8 per member); data: at least --peers; "
             "pipeline: a multiple of --micro-batches when given",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and the sample order (default 0)")
    parser.add_argument("--runs-dir", default="runs", help="where metrics go (default ./runs)")
    parser.add_argument(
        "--kill-one-at", type=int, metavar="STEP",
        help="kill -9 one peer process when the job reaches STEP, to watch the ring recover (needs --peers >= 3)",
    )
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="every member writes its checkpoints here (shared by the local members)")
    parser.add_argument("--objective", default="time", choices=["time", "energy"],
                        help="what the planner optimises (pipeline, auto): time (fastest plan) or energy (fewest J/sample; default time)")
    parser.add_argument("--max-slowdown", type=float, default=0.0, metavar="X",
                        help="with --objective energy: no plan slower than X times the fastest (e.g. 1.2; default: no bound)")
    parser.add_argument("--max-j-per-sample", type=float, default=0.0, metavar="J",
                        help="with --objective time: no plan predicted above J joules per sample (e.g. 0.05; default: no bound)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="where every local member trains: auto, cpu, cuda, cuda:N, mps (default auto)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="write checkpoints every N steps (default 0: never)")
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --checkpoint-dir")
    add_watch_arguments(parser)


def _build_spec(args: argparse.Namespace) -> Any:
    """The job, checked here before any process starts: one clear message, exit 2.

    Raises:
        JobError: a field the job itself refuses (model, codec, ranges).
        ConfigError: a global batch the ring would refuse once formed.
    """
    from p2ptrain.train import JobSpec, parse_model_args

    gb = args.global_batch if args.global_batch is not None else 8 * args.peers
    micro, schedule = pipeline_flags(args)
    if args.strategy == "data" and gb < args.peers:
        raise ConfigError(f"--global-batch {gb} is smaller than the {args.peers} members of a data-parallel ring; "
                          f"use {args.peers} or more")
    if args.strategy in ("pipeline", "auto") and micro and gb % micro:
        raise ConfigError(f"--global-batch {gb} does not split into --micro-batches {micro}; use a multiple of {micro} "
                          "or leave --micro-batches out (the planner then picks a count that divides it)")
    return JobSpec(model=args.model, strategy=args.strategy, global_batch=gb, steps=args.steps, seed=args.seed,
                   lr=args.lr, codec=args.codec, digest_every=25, micro_batches=micro, schedule=schedule,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, objective=args.objective,
                   max_slowdown=args.max_slowdown, max_j_per_sample=args.max_j_per_sample,
                   model_kwargs=parse_model_args(getattr(args, "model_arg", [])))


def check_entry_module(model: str, command: str = "the demo") -> None:
    """Refuse a ``module:function`` model whose module cannot be found here (the peers share this folder).

    Raises:
        ConfigError: the module is not importable from here.
    """

    from p2ptrain.cli._join import allow_cwd_imports, importable

    allow_cwd_imports()  # the peers run `python -m`, which finds modules here too
    module = model.split(":")[0]
    if not importable(module):
        raise ConfigError(f"--model {model}: no module {module!r} is importable here (installed packages or "
                          f"{os.getcwd()}); run {command} from the folder that holds {module.replace('.', '/')}.py")


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return ""
    return "\n".join("  | " + line for line in lines)


async def _demo(args: argparse.Namespace, spec: Any, run_dir: Path) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from p2ptrain.cli._join import settle
    from p2ptrain.cli._split import print_split
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService, param_digest
    from p2ptrain.zoo import allowed_entries

    cluster = "demo-" + secrets.token_hex(3)
    entry = allowed_entries(spec.model, spec.model_kwargs)  # an hf: model's folders too (a walkthrough: refused)
    extra = ["--checkpoint-dir", args.checkpoint_dir] if args.checkpoint_dir else []
    extra += ["--device", args.device]
    extra += [a for m in entry for a in ("--allow-entry", m)]
    print(f"p2ptrain demo: {args.peers} members on 127.0.0.1, cluster {cluster!r}, strategy {args.strategy}, codec {args.codec}")
    log_path = run_dir / "peers.log"
    log = open(log_path, "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster, "--interface", "127.0.0.1",
             "--ephemeral", "--json", "--duration", str(max(600, args.steps * 10)), "--parent-pid", str(os.getpid()),
             *extra],
            stdout=log, stderr=log, env=env,
        )
        for _ in range(args.peers - 1)
    ]
    metrics = _Metrics(run_dir / "metrics.jsonl")
    try:
        async with Node(cluster=cluster, interfaces=["127.0.0.1"], ephemeral=True) as node:
            print(f"waiting for {args.peers - 1} peer(s) to be found over mDNS…", flush=True)
            t0 = time.perf_counter()
            settling = asyncio.create_task(settle())  # the one-time torch work while the ring forms
            while len(node.view) < args.peers:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    log.flush()
                    raise ConfigError(f"a peer process exited early (code {dead[0].returncode}); its output:\n"
                                      f"{_log_tail(log_path)}")
                try:
                    await node.wait_for_peers(args.peers - 1, timeout=1.0)
                except TimeoutError as exc:
                    if time.perf_counter() - t0 > 90:
                        raise DiscoveryError(f"the local peers did not form a ring within 90 s ({exc}); the peers' "
                                             f"output:\n{_log_tail(log_path)}") from None
            print(f"ring agreed in {time.perf_counter() - t0:.2f}s (view {node.view.epoch}):")
            service: Any = None

            def members_of() -> list[str]:
                trainer = service.last_trainer if service is not None else None
                view = getattr(trainer, "view", None) or node.view
                return list(view.members)

            progress = _Progress(spec.steps, spec.global_batch, sys.stdout, metrics, me=node.node_id,
                                 pipeline=args.strategy in ("pipeline", "auto"), members_of=members_of,
                                 at_step=_killer(args.kill_one_at, procs), ring_of=lambda: list(node.view.members))
            try:
                release = version("p2ptrain")
            except PackageNotFoundError:  # run from a source tree
                release = "unknown"
            metrics.write("run", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), p2ptrain=release,
                          cluster=cluster, peers=args.peers, kill_one_at=args.kill_one_at,
                          checkpoint_dir=args.checkpoint_dir, **spec.to_wire_fields(), members=list(node.view.members))
            if args.strategy not in ("pipeline", "auto"):
                print_split(node, spec)
                progress.expected = list(node.view.members)
            else:
                print("profiling the layers on every member and agreeing on a plan…", flush=True)
            await settling
            t1 = time.perf_counter()
            service = JobService(node, on_step=progress, on_plan=progress.plan, on_choice=progress.choice,
                                 checkpoint_dir=args.checkpoint_dir, allow_entry=entry, device=args.device)
            watch = await start_watching(node, service, args, None, say=lambda line: print(line, flush=True))
            try:
                res = await service.submit(spec)
            finally:
                await watch.close()
            dt = time.perf_counter() - t1
            trainer = service.last_trainer
            # A pipeline's stages came back here (weights back): the digest is of the whole model.
            ran = service.last_choice.strategy if service.last_choice is not None else args.strategy
            same = ("replicas identical, digest " + res.digest if ran in ("data", "sequence")
                    else "model digest " + param_digest(trainer.w.model))
            print(f"done: {_steps_run(res, spec.resume)} in {dt:.1f}s, planning included ({progress.rate():.0f} samples/s while training); "
                  f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}; {same}")
            _picture(run_dir, args, res, trainer, progress.events)
    finally:
        metrics.close()
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


def _picture(run_dir: Path, args: argparse.Namespace, res: Any, trainer: Any, events: list[int]) -> None:
    from p2ptrain.cli._plot import PLOT_HINT, write_run_png

    timelines = getattr(trainer, "timelines", []) if trainer else []
    members = list(trainer.view.members) if trainer is not None and hasattr(trainer, "view") else []
    title = f"p2ptrain demo: {args.model}, {args.strategy}, {args.peers} members, codec {args.codec}"
    how = write_run_png(run_dir / "run.png", res.losses, timelines, events=[s - res.first_step for s in events],
                        members=members, first_step=res.first_step, title=title)
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    if how == "matplotlib":
        timeline = ", pipeline timeline" if timelines else ""
        print(f"picture (loss against step{timeline}): {run_dir / 'run.png'}")
    else:
        print(f"picture: {run_dir / 'run.png'} is a basic one without axes or labels; for the labelled one: {PLOT_HINT}")


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


def main(args: argparse.Namespace) -> int:
    if args.peers < 1 or args.peers > 16:
        raise ConfigError(f"--peers must be 1..16 on one machine, got {args.peers}")
    if args.kill_one_at is not None and args.peers < 3:
        raise ConfigError(f"--kill-one-at needs --peers >= 3 (the survivors must hold a majority), not {args.peers}")
    if args.kill_one_at is not None and not 1 <= args.kill_one_at < args.steps:
        raise ConfigError(f"--kill-one-at {args.kill_one_at} must be a STEP in 1..{args.steps - 1} (--steps {args.steps})")
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        raise ConfigError("--checkpoint-every and --resume need --checkpoint-dir DIR")
    from p2ptrain._device import pick_device
    from p2ptrain.train import check_here

    pick_device(args.device)  # before any folder or process exists
    check_watch_arguments(args, None, has_secret=False)  # the demo's members have no secret: a page on loopback only
    spec = _build_spec(args)
    if args.resume:
        from p2ptrain.cli._train import resumed_spec

        spec = resumed_spec(spec, args.checkpoint_dir, args.global_batch is not None)
    if ":" in spec.model and not spec.model.startswith("hf:"):  # hf:DIR names a folder, not a module
        check_entry_module(spec.model)
    check_here(spec)  # a bad value, path or codec parameter: here, not in a member once the ring formed
    run_dir = new_run_dir(Path(args.runs_dir))
    try:
        return asyncio.run(_demo(args, spec, run_dir))
    except KeyboardInterrupt:  # the demo's members go down with it (--parent-pid)
        where = f"; what it logged: {run_dir / 'metrics.jsonl'}" if (run_dir / "metrics.jsonl").exists() else ""
        print(f"\ninterrupted: the demo and its members stopped{where}", flush=True)
        return 130
    finally:
        discard_if_empty(run_dir)
