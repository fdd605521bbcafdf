"""The ``p2ptrain`` command line: a thin layer over the library.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them up, switches uvloop on (entry points
only, never on import), keeps freed memory in the C heap for ZeroMQ's receive buffers
(:func:`p2ptrain.transport.keep_heap_warm`, also an entry point's choice) and sets up
logging.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from p2ptrain._entry import install_uvloop
from p2ptrain._logs import log_to_stderr

__all__ = ["main"]

# subcommand -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("p2ptrain.cli._demo", "run several local peers that find each other and train together"),
    "join": ("p2ptrain.cli._join", "run a node on this device until Ctrl-C: show the ring, train jobs offered to it"),
    "train": ("p2ptrain.cli._train", "join the ring, offer it a job, train it here too and write the trained model (safetensors)"),
    "status": ("p2ptrain.cli._status", "browse the LAN and print the members of a cluster, without joining (exit 1: none answered)"),
    "energy": ("p2ptrain.cli._energy", "this device's joules and watts over a few seconds, measured or estimated (labelled)"),
    "study": ("p2ptrain.cli._study", "the same job under each parallelism and the planner's choice: time, energy, memory, wire"),
    "testbed": ("p2ptrain.cli._testbed", "emulate edge devices on this machine: namespaces, rate limits, CPU/memory caps (root)"),
}

# Commands that run a member in this process (tensors on the wire).
_MEMBERS = ("join", "train", "demo")

# bench name -> (module, one-line help)
_BENCHES: dict[str, tuple[str, str]] = {
    "transport": ("p2ptrain.bench._transport", "p2ptrain endpoint vs plain pyzmq, two processes on loopback"),
    "codecs": ("p2ptrain.bench._codecs", "encode/decode speed, wire ratio and error of each codec"),
    "discovery": ("p2ptrain.bench._discovery", "seconds until N local nodes agree on the full ring"),
    "pipeline": ("p2ptrain.bench._pipeline", "planned pipeline vs its bound, an even split and one device, in one run"),
    "allreduce": ("p2ptrain.bench._allreduce", "ring all-reduce vs torch.distributed gloo, same processes and bytes"),
    "recovery": ("p2ptrain.bench._recovery", "a member killed mid-job: the survivors' recovery vs a restart from disk, one run"),
    "embed": ("p2ptrain.bench._embed", "a host's 100 Hz asyncio task beside an embedded node that trains: its lateness vs idle"),
}


def _available(table: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, text) in table.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, text)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs test that checks --help)."""
    parser = argparse.ArgumentParser(
        prog="p2ptrain",
        description="Train one PyTorch model on the trusted devices of a LAN, peer to peer.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, text) in _available(_COMMANDS).items():
        p = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    bench = sub.add_parser(
        "bench",
        help="measure p2ptrain against its plain-library baseline",
        description="Benchmarks: each prints one JSON object with --json.",
    )
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for name, (module, text) in _available(_BENCHES).items():
        p = bsub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2ptrain`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose)
    install_uvloop()
    if args.command in _MEMBERS:
        from p2ptrain.transport import keep_heap_warm  # imports torch: only where a member runs

        keep_heap_warm()  # an entry point's choice, like uvloop: received frames stop faulting their pages in
    module = importlib.import_module(args._module)
    from p2ptrain._errors import P2PTrainError

    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except P2PTrainError as exc:
        # Our own errors carry the bad value and the fix; a traceback adds nothing.
        print(f"p2ptrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
