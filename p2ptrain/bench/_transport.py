"""``p2ptrain bench transport``: one tensor between two processes over tcp loopback,
p2ptrain :class:`Endpoint` against the best plain-pyzmq loop, measured the same way.

Each transfer is acknowledged: the clock runs from the start of the send until the
receiver has the whole tensor decoded and its ack is back. Both sides alternate in every
repeat (which one goes first alternates too) so machine noise hits them alike; we report
the best and the median repeat of each.

The baseline is what a skilled engineer writes with pyzmq alone: DEALER -> ROUTER, the
tensor's bytes as 1 MiB frames in one multipart with ``copy=False``, received with
``recv_into`` into one preallocated buffer, a one-frame ack back. It ships the tensor's
raw fp32 bytes; p2ptrain ships them through ``--codec``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

__all__ = ["add_arguments", "main"]

_FRAME = 1 << 20  # the baseline's frame size: 1 MiB measured fastest here (DESIGN.md)
_CLUSTER = "bench"
_SECRET = "p2ptrain-bench-secret"
_START_TIMEOUT = 60.0  # seconds for a child to import torch and bind
_STEP_TIMEOUT = 60.0  # seconds for any one transfer before the bench gives up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``p2ptrain bench transport``."""
    parser.add_argument("--size", default="64MiB", help="tensor size in bytes, e.g. 64MiB (fp32 elements; default 64MiB)")
    parser.add_argument("--codec", default="none", help="p2ptrain codec spec: none, fp16, bf16, int8[:BLOCK], topk[:FRACTION]")
    parser.add_argument("--repeat", type=int, default=7, help="repeats of each side, alternating (default 7)")
    parser.add_argument("--transfers", type=int, default=0, help="acknowledged transfers per repeat (default: ~256 MiB worth, 3..64)")
    parser.add_argument("--curve", action="store_true", help="CURVE-encrypt both sides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# --- children (spawned: module-level functions) ------------------------------------------


def _raw_receiver(conn: Any, size: int, curve: bool) -> None:
    """Plain pyzmq: ROUTER, recv_into a preallocated buffer, ack each message."""
    import numpy as np
    import zmq

    from p2ptrain.transport import keep_heap_warm

    keep_heap_warm()  # both receivers alike: libzmq mallocs every frame on either side

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if curve:
        from p2ptrain.transport import CurveKeys

        keys = CurveKeys.from_secret(_SECRET)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt(zmq.LAST_ENDPOINT).decode())  # type: ignore[union-attr]
    buf = np.empty(size, dtype=np.uint8)  # preallocated once, reused for every message
    view = buf.data
    try:
        while True:
            ident = sock.recv()
            head = sock.recv()
            if head == b"bye":
                break
            for off in range(0, size, _FRAME):
                sock.recv_into(view[off : off + _FRAME])
            sock.send_multipart([ident, b"ok"])
    finally:
        sock.close(linger=0)
        ctx.term()


def _p2p_receiver(conn: Any, sender_address: str, curve: bool) -> None:
    """p2ptrain Endpoint: receive, decode, ack."""
    from p2ptrain.bench._member import member_process

    member_process()  # uvloop and a warm heap, as a member of p2ptrain join (the raw receiver keeps its heap warm too)
    asyncio.run(_p2p_serve(conn, sender_address, curve))


async def _p2p_serve(conn: Any, sender_address: str, curve: bool) -> None:
    from p2ptrain.transport import CurveKeys, Endpoint

    keys = CurveKeys.from_secret(_SECRET) if curve else None
    async with Endpoint("rx", _CLUSTER, curve=keys) as ep:
        ep.add_peer("tx", sender_address)
        conn.send(ep.address)
        while True:
            msg = await ep.recv(timeout=600)
            if msg.kind == "bye":
                break
            meta = {"sum": float(msg.tensors[0].double().sum())} if msg.kind == "check" else {}
            del msg
            await ep.send("tx", "ack", meta=meta, timeout=_STEP_TIMEOUT)


# --- the two measured loops --------------------------------------------------------------


def _raw_run(sock: Any, chunks: list[Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        sock.send_multipart([b"go", *chunks], copy=False)
        sock.recv()
    return time.perf_counter() - t0


async def _p2p_run(ep: Any, tensor: Any, codec: str, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await ep.send("rx", "t", tensors=[tensor], codec=codec, timeout=_STEP_TIMEOUT)
        await ep.recv(timeout=_STEP_TIMEOUT)
    return time.perf_counter() - t0


def _parse_size(text: str) -> int:
    from p2ptrain._units import parse_size

    return parse_size(text)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import zmq

    from p2ptrain._errors import ConfigError
    from p2ptrain.kernels import get_codec
    from p2ptrain.transport import CurveKeys, Endpoint

    size = _parse_size(args.size)
    if size < 4 or size % 4:
        raise ConfigError(f"--size {args.size} must be a positive multiple of 4 bytes (fp32 elements)")
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat} must be at least 1")
    from p2ptrain.bench._checks import at_least, fits_in_memory

    at_least("--transfers", args.transfers, 0)  # 0: the default count
    fits_in_memory(f"--size {args.size}", size, 4)  # the tensor, its frames in flight, two receive buffers
    codec = get_codec(args.codec).spec
    n = args.transfers or max(3, min(64, (256 << 20) // size))
    tensor = torch.randn(size // 4, generator=torch.Generator().manual_seed(0))
    keys = CurveKeys.from_secret(_SECRET) if args.curve else None
    spawn = mp.get_context("spawn")

    async with Endpoint("tx", _CLUSTER, curve=keys) as ep:
        p2p_conn, p2p_child_conn = spawn.Pipe()
        raw_conn, raw_child_conn = spawn.Pipe()
        p2p = spawn.Process(target=_p2p_receiver, args=(p2p_child_conn, ep.address, args.curve), daemon=True)
        raw = spawn.Process(target=_raw_receiver, args=(raw_child_conn, size, args.curve), daemon=True)
        p2p.start()
        raw.start()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            loop = asyncio.get_running_loop()
            for conn in (p2p_conn, raw_conn):
                if not await loop.run_in_executor(None, conn.poll, _START_TIMEOUT):
                    raise RuntimeError("a bench receiver did not start in time")
            ep.add_peer("rx", p2p_conn.recv())
            if keys is not None:
                sock.curve_serverkey = keys.public
                sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
            sock.rcvtimeo = sock.sndtimeo = int(_STEP_TIMEOUT * 1000)
            sock.connect(raw_conn.recv())
            src = tensor.numpy().view(np.uint8)
            chunks = [src[off : off + _FRAME] for off in range(0, size, _FRAME)]

            # Warm-up (connections, pools, page tables) and a correctness check.
            await ep.send("rx", "check", tensors=[tensor], codec=codec, timeout=_STEP_TIMEOUT)
            ack = await ep.recv(timeout=_STEP_TIMEOUT)
            check_sum = ack.meta.get("sum")
            _raw_run(sock, chunks, 2)
            await _p2p_run(ep, tensor, codec, 2)

            p2p_s: list[float] = []
            raw_s: list[float] = []
            for r in range(args.repeat):
                order = ("p2p", "raw") if r % 2 == 0 else ("raw", "p2p")
                for side in order:
                    if side == "p2p":
                        p2p_s.append(await _p2p_run(ep, tensor, codec, n))
                    else:
                        raw_s.append(_raw_run(sock, chunks, n))
                print(f"repeat {r + 1}/{args.repeat}: p2ptrain {n * size / p2p_s[-1] / 1e9:.2f} GB/s, "
                      f"pyzmq {n * size / raw_s[-1] / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
            wire = ep.stats["rx"].sent_bytes / max(1, ep.stats["rx"].sent)
            sock.send_multipart([b"bye"])
            await ep.send("rx", "bye", timeout=_STEP_TIMEOUT)
        finally:
            sock.close(linger=0)
            ctx.term()
            for proc in (p2p, raw):
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)

    def gbps(seconds: float) -> float:
        return round(n * size / seconds / 1e9, 3)

    best_p2p, best_raw = gbps(min(p2p_s)), gbps(min(raw_s))
    med_p2p, med_raw = gbps(statistics.median(p2p_s)), gbps(statistics.median(raw_s))
    exact = float(tensor.double().sum())
    return {
        "size_bytes": size,
        "codec": codec,
        "p2ptrain_gbps": best_p2p,
        "pyzmq_raw_gbps": best_raw,
        "ratio": round(best_p2p / best_raw, 3),
        "p2ptrain_gbps_median": med_p2p,
        "pyzmq_raw_gbps_median": med_raw,
        "ratio_median": round(med_p2p / med_raw, 3),
        "unit": "GB/s (1e9 bytes of the fp32 tensor per second, acknowledged)",
        "repeats": args.repeat,
        "transfers_per_repeat": n,
        "wire_bytes_per_transfer": int(wire),
        "curve": bool(args.curve),
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        # bit-exact check of the warm-up transfer (lossless codec only)
        "checksum_ok": (check_sum == exact) if codec == "none" else None,
    }


def main(args: argparse.Namespace) -> int:
    """Run the bench; print one JSON object with ``--json``, a short summary otherwise."""
    result = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['size_bytes']} bytes, codec {result['codec']}{' (CURVE)' if result['curve'] else ''}: "
              f"p2ptrain {result['p2ptrain_gbps']} GB/s, plain pyzmq {result['pyzmq_raw_gbps']} GB/s, "
              f"ratio {result['ratio']} (median {result['ratio_median']})")
    return 0
