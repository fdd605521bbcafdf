"""``p2ptrain join``: run a node on this device until Ctrl-C, showing the ring live."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.dashboard import add_arguments as add_watch_arguments
from p2ptrain.dashboard import check_arguments as check_watch_arguments
from p2ptrain.dashboard import start_watching
from p2ptrain.ring import SECRET_ENV, read_secret

from ._signals import ECHO_S, quit_after
from ._status import power_label

__all__ = ["add_arguments", "allow_cwd_imports", "exit_with_parent", "format_table", "main"]

logger = logging.getLogger(__name__)

# prctl(2) option: the signal this process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", default="default", help="cluster name; nodes of other clusters are ignored (default: default)")
    parser.add_argument("--secret-file", metavar="F", help=f"file holding the cluster secret (mode 600); or set ${SECRET_ENV}")
    parser.add_argument("--ask-secret", action="store_true", help="prompt for the cluster secret")
    parser.add_argument("--port", type=int, default=0, help="TCP port for the ring (default: a free one)")
    parser.add_argument(
        "--interface", metavar="ADDR", action="append",
        help="announce on this address (or interface: wlan0) and bind to it (repeatable: with several, binds all and "
             "announces these; default: all interfaces)",
    )
    parser.add_argument(
        "--peer", metavar="HOST:PORT", action="append", default=[],
        help="static peer for networks that block multicast (repeatable)",
    )
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="where this member trains: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps (default auto)")
    parser.add_argument("--no-mdns", action="store_true", help="do not announce or browse over mDNS (static peers only)")
    parser.add_argument("--insecure", action="store_true", help="without a secret, admit peers from any address (trusted networks only)")
    parser.add_argument(
        "--ephemeral", action="store_true",
        help="use a fresh node id instead of this device's persisted one (for several nodes on one device; a second "
             "node started without it or --node-id finds the persisted id in use, warns, and runs with a fresh one)",
    )
    parser.add_argument("--node-id", help="explicit node id (overrides the persisted one)")
    parser.add_argument("--failure-timeout", type=float, default=2.0, help="seconds without heartbeat before a peer is dead (default 2.0)")
    parser.add_argument(
        "--quorum-expiry", type=float, default=30.0, metavar="S",
        help="seconds after which silent members stop counting toward the quorum, so the survivors of half a ring "
             "form one again; a partition that lasts longer splits the ring until it heals (0: wait for them; default 30)",
    )
    parser.add_argument(
        "--allow-entry", metavar="MODULE|DIR", action="append", default=[],
        help="let jobs name MODULE:function as their model (repeatable; zoo models are always allowed); MODULE is "
             "imported from the installed packages or else from the current folder. A DIR path (containing '/') "
             "allows hf:<dir> models and their data files under it",
    )
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR",
        help="write this member's checkpoints here (jobs with checkpoint_every) and resume from them (jobs with resume)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per view change instead of the table")
    parser.add_argument("--duration", type=float, default=None, help="leave after this many seconds (default: run until Ctrl-C)")
    parser.add_argument(
        "--parent-pid", type=int, metavar="PID",
        help="exit at once (no hand-over) when process PID ends, however it ends; `p2ptrain demo` passes its own pid",
    )
    add_watch_arguments(parser)


def format_table(node: object) -> str:
    """The ring as a text table (name, address, cores, memory, compute, power class, state, epoch)."""
    rows = [("node", "address", "cores", "memory", "GFLOP/s", "power", "state", "epoch")]
    for m in node.members():  # type: ignore[attr-defined]
        r = m.resources
        rows.append(
            (
                m.node_id + (" (me)" if m.node_id == node.node_id else ""),  # type: ignore[attr-defined]
                m.address or "?",
                str(r.cores) if r else "?",
                f"{r.memory_bytes / 2**30:.1f} GiB" if r else "?",
                f"{r.gflops:.1f}" if r else "?",
                power_label(r.power, r.battery) if r else "?",
                m.state,
                str(m.epoch),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _run(args: argparse.Namespace, secret: bytes | None) -> int:
    from p2ptrain._device import accelerator_name, pick_device
    from p2ptrain.ring import Node

    device = pick_device(args.device)  # an unusable --device fails before this node joins

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    first: list[float] = []  # when the first stop signal came (its echoes are not the second)

    def stop_asked() -> None:
        first.append(time.monotonic())
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_asked)
        except (NotImplementedError, RuntimeError):
            pass
    # A member that joins during a job holds the job's members up while it gets ready (they wait
    # for it in the admission and the state's alignment): the process's one-time torch work comes
    # first, before it joins the ring (a join mid-job held a data job up 1.3-1.4 s, 2 runs of 2).
    from p2ptrain.train import warm_process

    await loop.run_in_executor(None, warm_process)
    async with Node(
        cluster=args.cluster,
        secret=secret,
        interfaces=args.interface,
        port=args.port,
        peers=args.peer,
        node_id=args.node_id,
        ephemeral=args.ephemeral,
        insecure=args.insecure,
        mdns=not args.no_mdns,
        failure_timeout=args.failure_timeout,
        quorum_expiry=args.quorum_expiry or None,
    ) as node:
        from p2ptrain.train import JobService

        last_step: list[Any] = []  # the running job's latest step and trainer, for the line that says it ended

        def on_step(m: Any) -> None:
            last_step[:] = [m, service.last_trainer]
            if args.json:
                print(json.dumps({"event": "step", **dataclasses.asdict(m)}), flush=True)
            elif m.step % 10 == 0:
                print(step_line(m, service.last_trainer), flush=True)

        service = JobService(node, on_step=on_step, allow_entry=args.allow_entry, checkpoint_dir=args.checkpoint_dir,
                             device=device)
        # The rest of the start-up (the energy meter's one read of sysfs, the garbage collector's
        # freeze) on a worker thread while the ring forms, not inside the first job's start.
        warming = asyncio.create_task(settle(service))
        serving = asyncio.create_task(service.serve())  # before anything awaits: offers are answered from now on
        watch = await start_watching(node, service, args, secret)  # the ring share; the page and event files if asked
        serving.add_done_callback(lambda _: stop.set())  # serve() ends only when cancelled, or on a bug of ours
        if args.json:
            joined = {"event": "joined", "node": node.node_id, "address": node.address, "cluster": args.cluster,
                      "device": str(device)}
            print(json.dumps(joined), flush=True)
        open_mode = "INSECURE: any address admitted" if args.insecure else "no secret: loopback peers only"
        mode = "encrypted (cluster secret)" if secret else open_mode
        if not args.json:
            print(f"joined cluster {args.cluster!r} as {node.node_id} at {own_address(node)} [{mode}], "
                  f"training on {accelerator_name(device)}; Ctrl-C to leave", flush=True)
        for line in watch.describe(as_json=args.json):
            print(line, flush=True)
        tty = sys.stdout.isatty()
        last = None
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if last_step and not service.running and not args.json:  # it went from a step line to the table, unsaid
                print(ended_line(last_step[1], last_step[0]), flush=True)
                last_step.clear()
            table = format_table(node)
            key = (node.view.epoch, node.state, table if tty else None)
            if key != last and args.json:
                last = key
                event = {"event": "view", "node": node.node_id, "epoch": node.view.epoch, "state": node.state.value,
                         "members": list(node.view.members)}
                print(json.dumps(event), flush=True)
            elif key != last:
                last = key
                if tty:
                    sys.stdout.write("\x1b[H\x1b[J")
                    for line in watch.describe():  # the screen was cleared: where the page is, again
                        print(line)
                print(f"view {node.view.epoch} ({node.state.value}), {len(node.view)} member(s):\n{table}\n", flush=True)
            # Wake at the next view change or pause, at Ctrl-C, or after a second at most: the
            # table's resources, and a resume within the same view, change with no event.
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            await _first(stop.wait(), node.changed(), timeout=wait)
        broken = serving.done() and not serving.cancelled() and serving.exception() is not None
        if broken:
            exc = serving.exception()
            logger.error("the job service stopped: %r; leaving the ring", exc, exc_info=exc)
        elif stop.is_set():
            # Ctrl-C during a job: finish the step, hand the state over, then go. A second one
            # ends the process at once, as a kill would: the others recover without it (a
            # KeyboardInterrupt here cancelled the job's task, which told every member to stop).
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                    signal.signal(sig, quit_after((first[0] if first else 0.0) + ECHO_S))  # timeout -s INT sends it twice
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            if service.running and not args.json:
                print("leaving the ring: handing this member's part of the job over (Ctrl-C again to quit now)…", flush=True)
            await service.leave(step_out=False)  # the node closes next: the others go on then
        serving.cancel()
        warming.cancel()
        await watch.close()
        if not args.json:
            print("leaving the ring…", flush=True)
    return 1 if broken else 0


async def settle(service: Any = None) -> None:
    """A member process's start-up, run while its ring forms: the one-time torch work on a
    worker thread (``service.warm_up()``, or ``warm_process`` without a service), then
    ``freeze_startup`` (process-wide: the entry point's call)."""
    from p2ptrain.train import freeze_startup, warm_process

    if service is not None:
        await service.warm_up()
    else:
        await asyncio.get_running_loop().run_in_executor(None, warm_process)
    freeze_startup()


async def _first(*waits: Awaitable[Any], timeout: float) -> None:
    """Return when the first of ``waits`` is done or ``timeout`` passed; cancel the rest."""
    futures = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures:
            f.cancel()


def allow_cwd_imports() -> None:
    """Let allowed entry modules be found in the current folder, as ``python -m`` does.

    The console script puts its own folder on ``sys.path``, not the working directory,
    so ``p2ptrain join --allow-entry mymod`` run beside ``mymod.py`` could not import
    it. The folder goes last: it never shadows an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def importable(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it; a missing parent package is False)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def exit_with_parent(pid: int) -> None:
    """End this process as soon as process ``pid`` ends, even by ``kill -9``.

    On Linux, when ``pid`` is the parent, the kernel sends SIGKILL at its death
    (``prctl(PR_SET_PDEATHSIG)``); a daemon thread also looks once a second (other
    systems, or a ``pid`` that is not the parent) and exits the process. Exiting
    without a hand-over is right here: the members a hand-over would go to are the
    parent's other children, going down with it.
    """
    is_parent = os.getppid() == pid
    if is_parent and sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the thread below still works
            pass

    def gone() -> bool:
        if is_parent:
            return os.getppid() != pid  # reparented: the parent died (perhaps before prctl)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    if gone():
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(1.0)  # a poll, not a sync: nothing to wait on for another process's end
        os._exit(1)

    threading.Thread(target=watch, name="p2ptrain-parent-watch", daemon=True).start()


def _check_allowed_entries(entries: list[str]) -> None:
    """Warn about an ``--allow-entry`` that names nothing here: a typo would only show when a job is refused."""
    for entry in entries:
        if "/" in entry:
            if not os.path.isdir(entry):
                logger.warning("--allow-entry %s: no such directory here; jobs naming files under it are refused", entry)
        elif not importable(entry):
            logger.warning("--allow-entry %s: no module of that name is importable here (the current folder "
                           "included); jobs naming it will be refused", entry)



def own_address(node: Any) -> str:
    """Where the other members dial ``node`` (its bound ``tcp://0.0.0.0:P`` read as a fault, a walkthrough)."""
    return next((m.address for m in node.members() if m.node_id == node.node_id), None) or node.address


def step_line(m: Any, trainer: Any) -> str:
    """A step as a member's console shows it: training it, or following a pipeline that left it out.

    A member the plan left out (a newcomer after a join, a slow device) printed "training:
    step 161" while 0% busy (a walkthrough).
    """
    idle = getattr(trainer, "seat", True) is None  # a pipeline trainer without a seat in the layout
    what = "following (left out of the plan)" if idle else "training"
    return f"{what}: step {m.step + 1} loss {m.loss:.4f} {m.samples_per_s:.0f} samples/s"


def ended_line(trainer: Any, m: Any) -> str:
    """The line a member's console shows when a job that stepped here ends (done, stopped or failed:
    the log above says which); a walkthrough's join went from "training: step 191" to the next view
    table, so whoever watched it could not tell a finished job from a stalled one."""
    job = getattr(trainer, "job", None) or "-"
    return f"job {job} ended on this member after step {m.step + 1} (loss {m.loss:.4f}); waiting for the next job"


def main(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration must be a positive number of seconds, not {args.duration} (leave it out: until Ctrl-C)")
    if args.allow_entry:
        allow_cwd_imports()
        _check_allowed_entries(args.allow_entry)
    if args.checkpoint_dir:
        try:  # here, not in every member once a checkpointing job arrives
            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir}: cannot make that folder: "
                              f"{'it is a file' if isinstance(exc, FileExistsError) else exc.strerror or exc}") from None
    secret = read_secret(secret_file=args.secret_file)
    if args.ask_secret:
        secret = getpass.getpass("cluster secret: ").strip().encode()
        if not secret:
            raise ConfigError("empty secret")
    check_watch_arguments(args, secret)
    return asyncio.run(_run(args, secret))
