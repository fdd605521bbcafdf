"""``p2ptrain bench allreduce``: p2ptrain's ring all-reduce vs torch.distributed gloo.

Both sides run the same number of OS processes, each reducing a float32 tensor of the
same size; a barrier precedes every timed call and a call's time is the slowest
rank's. The figure reported is the median over ``--repeat`` calls after a warm-up.
With ``--bucket BYTES`` the tensor is summed as a training step sums its gradients:
cut into buckets of that size, all launched at once (p2ptrain's data-parallel trainer
and torch DDP's asynchronous per-bucket all-reduces alike).
With ``--testbed PROFILE`` the processes run inside emulated edge devices (network
namespaces with rate-limited links and CPU caps; needs root), otherwise on 127.0.0.1.

Worker processes are this module run as ``python -m p2ptrain.bench._allreduce``; each
prints one JSON line with its timings.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=4, help="processes (default 4)")
    parser.add_argument("--size", default="64MiB", help="bytes of float32 per tensor, e.g. 64MiB (default)")
    parser.add_argument(
        "--codec", default="none", help="p2ptrain wire codec: none, fp16, bf16, int8[:B], topk[:F] (gloo always sends fp32)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per side (default 5)")
    parser.add_argument("--bucket", default=None, metavar="BYTES",
                        help="sum the tensor in concurrent buckets of this size, as a training step sums its "
                             "gradients, e.g. 4MiB (default: one all-reduce of the whole tensor)")
    parser.add_argument("--testbed", metavar="PROFILE", help="run the peers inside an emulated testbed (root)")
    parser.add_argument("--model", default=None,
                        help="size the tensor as this model's gradient (a zoo name, module:function or hf:<dir>); "
                             "overrides --size")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for --model (repeatable; V read as int, else float, else string)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _gradient_bytes(model: str, model_args: list[str]) -> int:
    """Bytes of ``model``'s fp32 gradient: 4 per trainable parameter."""
    from p2ptrain.train import JobSpec, parse_model_args, resolve

    w = resolve(JobSpec(model=model, model_kwargs=parse_model_args(model_args)))
    return 4 * sum(p.numel() for p in w.model.parameters() if p.requires_grad)


# --- workers ------------------------------------------------------------------------------


async def _p2p_worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from p2ptrain.ring import Collectives, Node

    torch.set_num_threads(1)
    # Testbed devices are not on loopback: they need the cluster secret (CURVE) to admit
    # each other. The parent hands a fresh one through the environment.
    node = Node(cluster=a.cluster, interfaces=[a.host], ephemeral=True, secret=os.environ.get("P2PTRAIN_SECRET") or None)
    async with node:
        await node.wait_for_peers(a.world - 1, timeout=60)
        coll = Collectives(node)
        x = torch.randn(a.numel, generator=torch.Generator().manual_seed(a.rank))
        buckets = x.split(a.bucket_numel) if a.bucket_numel else (x,)
        times = []
        for _ in range(a.repeat + 1):
            await coll.barrier()
            t0 = time.perf_counter()
            await asyncio.gather(*(coll.all_reduce(b, op="sum", codec=a.codec, key=("bench", i))
                                   for i, b in enumerate(buckets)))
            times.append(time.perf_counter() - t0)
        await coll.barrier()
        # Leave together so nobody's goodbye changes the view under a running call.
    return {"rank": node.view.rank(node.node_id), "times": times[1:]}


def _gloo_worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world, timeout=datetime.timedelta(seconds=120)
    )
    x = torch.randn(a.numel, generator=torch.Generator().manual_seed(a.rank))
    buckets = x.split(a.bucket_numel) if a.bucket_numel else (x,)
    times = []
    for _ in range(a.repeat + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for work in [dist.all_reduce(b, async_op=True) for b in buckets]:
            work.wait()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": a.rank, "times": times[1:]}


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["p2p", "gloo"])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--repeat", type=int, required=True)
    p.add_argument("--bucket-numel", type=int, default=0)
    p.add_argument("--codec", default="none")
    p.add_argument("--cluster", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--master", default="")
    a = p.parse_args(argv)
    from p2ptrain.bench._member import member_process

    # As `p2ptrain join` starts a member: uvloop, and ZeroMQ's receive buffers stop
    # faulting their pages in per message (transport._heap). gloo runs no event loop and
    # receives into buffers it keeps; both roles get it so the two sides run alike.
    member_process()
    out = asyncio.run(_p2p_worker(a)) if a.role == "p2p" else _gloo_worker(a)
    print(json.dumps(out), flush=True)
    return 0


# --- the parent ---------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _launch(cmds: list[list[str]], launchers: list[Any], timeout: float, env: dict[str, str]) -> list[dict[str, Any]]:
    procs = [launch(cmd, stdout=subprocess.PIPE, text=True, env=env) for cmd, launch in zip(cmds, launchers)]
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for pr in procs:
            out, _ = pr.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if pr.returncode != 0:
                from p2ptrain._errors import P2PTrainError

                raise P2PTrainError(f"bench worker failed with exit code {pr.returncode}; rerun with -v for its log")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    return outs


def _slowest(outs: list[dict[str, Any]]) -> float:
    per_call = [max(o["times"][i] for o in outs) for i in range(len(outs[0]["times"]))]
    return statistics.median(per_call)


def main(args: argparse.Namespace) -> int:
    from p2ptrain._errors import ConfigError
    from p2ptrain._units import parse_size

    model = getattr(args, "model", None)
    size = _gradient_bytes(model, getattr(args, "model_arg", [])) if model else parse_size(args.size)
    if args.peers < 2:
        raise ConfigError(f"--peers must be at least 2, got {args.peers}")
    if size < 4 or size % 4:
        raise ConfigError(f"--size {args.size} is not a positive whole number of float32 values")
    from p2ptrain.bench._checks import at_least, fits_in_memory

    at_least("--repeat", args.repeat, 1)
    fits_in_memory(f"--size {args.size}", size, 3 * args.peers)  # each rank: its tensor, a result, receive buffers
    from p2ptrain.kernels import get_codec

    get_codec(args.codec)  # a bad codec or parameter: here, not as a worker's exit code
    numel = size // 4
    bucket_arg = getattr(args, "bucket", None)
    bucket = parse_size(bucket_arg) if bucket_arg is not None else 0
    if bucket_arg is not None and (bucket % 4 or bucket < 4096):
        raise ConfigError(f"--bucket {args.bucket} must be a whole number of float32 values, at least 4KiB")
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C so the testbed is taken down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    py = [sys.executable, "-m", "p2ptrain.bench._allreduce"]
    with ExitStack() as stack:
        if args.testbed:
            from p2ptrain.testbed import Testbed

            tb = stack.enter_context(Testbed.up(args.testbed, args.peers, name="bench" + secrets.token_hex(2)))
            hosts = [d.address for d in tb.devices]
            launchers: list[Callable[..., subprocess.Popen[Any]]] = [d.popen for d in tb.devices]
            where = f"testbed {args.testbed}"
            from p2ptrain.testbed import DEVICE_IFACE

            # gloo binds to what the hostname resolves to (loopback) unless told the device's link.
            env = {**os.environ, "P2PTRAIN_SECRET": secrets.token_hex(16), "GLOO_SOCKET_IFNAME": DEVICE_IFACE}
        else:
            hosts = ["127.0.0.1"] * args.peers
            launchers = [subprocess.Popen[Any]] * args.peers
            where = "loopback"
            env = {k: v for k, v in os.environ.items() if k != "P2PTRAIN_SECRET"}
        env["OMP_NUM_THREADS"] = "1"
        common = ["--world", str(args.peers), "--numel", str(numel), "--repeat", str(args.repeat),
                  "--bucket-numel", str(bucket // 4)]
        cluster = "bench-" + secrets.token_hex(4)
        t_p2p = _slowest(_launch(
            [py + ["p2p", "--rank", str(i), "--cluster", cluster, "--host", hosts[i], "--codec", args.codec] + common
             for i in range(args.peers)], launchers, 600, env))
        master = f"{hosts[0]}:{_free_port('127.0.0.1') if not args.testbed else 29517}"
        t_gloo = _slowest(_launch(
            [py + ["gloo", "--rank", str(i), "--master", master] + common for i in range(args.peers)], launchers, 600, env))
    out = {
        "peers": args.peers,
        "size_bytes": numel * 4,
        "codec": args.codec,
        "p2ptrain_s": round(t_p2p, 4),
        "gloo_s": round(t_gloo, 4),
        "ratio": round(t_p2p / t_gloo, 3),
        "repeat": args.repeat,
        **({"bucket_bytes": bucket, "buckets": -(-numel * 4 // bucket)} if bucket else {}),
        **({"job_model": model} if model else {}),
        "where": where,
        "p2ptrain_encrypted": bool(args.testbed),  # CURVE between devices; gloo sends plaintext
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"all-reduce {numel * 4 / 2**20:.0f} MiB over {args.peers} peers ({where}): p2ptrain[{args.codec}] "
              f"{t_p2p * 1e3:.1f} ms, gloo fp32 {t_gloo * 1e3:.1f} ms, ratio {out['ratio']} (smaller is better)"
              + (f"; in {out['buckets']} concurrent buckets of {bucket / 2**20:g} MiB" if bucket else ""))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(_worker_main(sys.argv[1:]))
