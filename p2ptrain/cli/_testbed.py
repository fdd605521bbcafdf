"""``p2ptrain testbed``: emulate a LAN of edge devices on this machine (needs root).

::

    p2ptrain testbed up --devices 4 --profile hetero     # namespaces, bridge, tc, cgroups
    p2ptrain testbed run dev0 -- python -m p2ptrain join # a command inside device 0
    p2ptrain testbed status [--json]
    p2ptrain testbed down                                # idempotent; also after a crash
    p2ptrain testbed profiles                            # the shipped profiles
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError, P2PTrainError
from p2ptrain.testbed import (
    DEFAULT_NAME,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET,
    Testbed,
    TestbedPlan,
    load_profile,
    profile_names,
    require_root,
)

__all__ = ["add_arguments", "main"]

_DEFAULT_PROFILE = "hetero"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=DEFAULT_NAME, help=f"testbed name, part of every namespace/cgroup name (default {DEFAULT_NAME})")
    common.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=f"where the state file lives (default {DEFAULT_STATE_DIR})"
    )
    return common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``testbed`` subcommands to ``parser``."""
    common = _common()
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", parents=[common], help="create the devices: namespaces, bridge, rate limits, CPU/memory caps")
    up.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices (profile entries are cycled)")
    up.add_argument(
        "--profile", default=_DEFAULT_PROFILE, metavar="NAME|FILE",
        help=f"shipped profile name or .toml file (default {_DEFAULT_PROFILE}; see `p2ptrain testbed profiles`)",
    )
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"private IPv4 subnet for device addresses (default {DEFAULT_SUBNET})")
    up.add_argument("--dry-run", action="store_true", help="print the commands and cgroup writes, change nothing (no root needed)")
    up.add_argument("--json", action="store_true", help="print the status as one JSON object")

    run = sub.add_parser("run", parents=[common], help="run a command inside a device's namespace and cgroups; its exit code is ours")
    run.add_argument("device", metavar="DEVICE", help="device name (dev0) or index (0)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command to run")

    status = sub.add_parser("status", parents=[common], help="devices, addresses, rates, CPU/memory caps, what is not emulated")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("down", parents=[common], help="remove everything `up` made (idempotent)")
    sub.add_parser("profiles", help="list the shipped profiles")


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def _print_status(status: dict[str, Any]) -> None:
    print(f"testbed {status['name']}: profile {status['profile']}, subnet {status['subnet']}, bridge in netns {status['bridge_netns']}")
    print(f"cgroups: {status['cgroup_layout']}")
    rows = [("DEVICE", "KIND", "ADDRESS", "UP/DOWN Mbit/s", "CPUS", "MEMORY MiB", "POWER", "NETNS", "")]
    for d in status["devices"]:
        mem = _fmt(d["memory_mib"]) if d["memory_limited"] else "-"
        rate = f"{_fmt(d['up_mbit'])}/{_fmt(d['down_mbit'])}"
        power = (d.get("power") or "-") + (f" (battery {d['battery']:.0%})" if d.get("battery") is not None else "")
        rows.append((d["name"], d["kind"], d["address"], rate, _fmt(d["cpus"]), mem, power, d["netns"], "" if d["alive"] else "MISSING"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"note: {status['note']}")


def _print_plan(plan: TestbedPlan) -> None:
    print(f"# testbed {plan.name}: {len(plan.devices)} devices, profile {plan.profile}, subnet {plan.subnet}")
    for step in plan.steps():
        print(step.describe())


def _up(args: argparse.Namespace) -> int:
    if args.dry_run:
        _print_plan(Testbed.plan_for(args.profile, args.devices, name=args.name, subnet=args.subnet))
        return 0
    tb = Testbed.up(args.profile, args.devices, name=args.name, subnet=args.subnet, state_dir=args.state_dir)
    status = tb.status()
    if args.json:
        print(json.dumps(status))
    else:
        _print_status(status)
        print(f"run a command inside a device: p2ptrain testbed run --name {args.name} dev0 -- COMMAND")
    return 0


def _run(args: argparse.Namespace) -> int:
    require_root()
    argv = list(args.argv)
    if argv and argv[0].startswith("-") and "--" in argv:
        # argparse hands everything after DEVICE to the command; options written between
        # DEVICE and `--` (`run dev0 --name x -- cmd`) are still ours.
        cut = argv.index("--")
        opts, argv = argv[:cut], argv[cut + 1 :]
        if opts:
            extra, unknown = _common().parse_known_args(opts)
            if unknown:
                raise ConfigError(f"unknown options before `--`: {' '.join(unknown)}; options are --name and --state-dir")
            args.name, args.state_dir = extra.name, extra.state_dir
    tb = Testbed.attach(args.name, state_dir=args.state_dir)
    device = tb.device(args.device)
    try:
        proc = device.popen(argv, preexec_fn=_ends_with(os.getpid()))
    except OSError as exc:
        raise P2PTrainError(f"could not start {argv[0]!r} in {device.name}: {exc}") from exc
    code = _wait_passing_signals(proc)
    # A child killed by a signal reports -N; shells say 128+N, and so do we.
    return 128 - code if code < 0 else code


def _ends_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the command gets SIGTERM when ``run`` (``parent``) dies, even by ``kill -9``.

    ``prctl(PR_SET_PDEATHSIG)`` survives the ``exec`` chain into the command (``sh``,
    ``ip netns exec`` and ``env`` exec, none forks). Without it a killed ``run`` left its
    command running, reparented to init. ``run`` has no threads, so a preexec_fn is safe.
    """
    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: the command outlives run, as before
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # run died before prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _wait_passing_signals(proc: subprocess.Popen[Any]) -> int:
    """Wait for the command, leaving its signals to it.

    A terminal's Ctrl-C goes to the whole foreground process group, the command included:
    ``run`` ignores its own copy and waits, so a ``train`` stopping at its next step can
    write its model and a ``join`` hand its part over (``subprocess.run`` would kill the
    command 0.25 s after our KeyboardInterrupt). SIGTERM and SIGHUP sent to ``run`` alone
    are passed on to the command.
    """
    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    handlers: dict[signal.Signals, Any] = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: forward, signal.SIGHUP: forward}
    saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return proc.wait()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _status(args: argparse.Namespace) -> int:
    require_root()
    try:
        status = Testbed.attach(args.name, state_dir=args.state_dir).status()
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"name": args.name, "up": False, "note": str(exc)}))
        else:
            print(str(exc))
        return 0
    if args.json:
        print(json.dumps(status))
    else:
        _print_status(status)
    return 0


def _down(args: argparse.Namespace) -> int:
    require_root()
    report = Testbed.teardown(args.name, state_dir=args.state_dir)
    if not (report.namespaces or report.cgroups or report.killed or report.left):
        print(f"testbed {args.name}: nothing to remove")
    else:
        print(
            f"testbed {args.name}: removed {len(report.namespaces)} namespaces and {len(report.cgroups)} cgroups,"
            f" stopped {len(report.killed)} processes"
        )
    if report.left:
        print(f"could not remove: {', '.join(report.left)}", file=sys.stderr)
        return 1
    return 0


def _profiles(_args: argparse.Namespace) -> int:
    for name in profile_names():
        profile = load_profile(name)
        print(f"{name:10s} {profile.description}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one ``testbed`` action; errors become a message on stderr and exit code 1."""
    action = {"up": _up, "run": _run, "status": _status, "down": _down, "profiles": _profiles}[args.action]
    try:
        return action(args)
    except P2PTrainError as exc:
        print(f"p2ptrain testbed {args.action}: error: {exc}", file=sys.stderr)
        return 1

