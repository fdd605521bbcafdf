"""``p2ptrain bench codecs``: speed, wire size and error of each codec, beside plain torch.

One Gaussian fp32 tensor of ``--size`` bytes is encoded and decoded by each codec. Speeds
are GB/s of fp32 INPUT bytes (so codecs compare on the same work), best of ``--repeat``
runs after one warm-up. ``decode_gbps`` reads read-only ``bytes`` copies of the encoded
buffers (what a plain ``zmq`` receive yields) into a preallocated fp32 tensor, as a
receiver decoding into its gradient buffer does; ``decode_writable_gbps`` does the same
from writable buffers (``recv_into`` a preallocated buffer), which codecs read in place.
``none`` encodes without copying, so its encode speed only measures the call overhead. Each lossy codec's encoder is also compared with
the way one would write it in plain torch (``baseline``), measured in the same run.

Example::

    p2ptrain bench codecs --size 64MiB --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from p2ptrain._errors import CodecError, ConfigError
from p2ptrain._units import parse_size
from p2ptrain.bench._checks import at_least, fits_in_memory
from p2ptrain.kernels import Codec, Int8Codec, TopKCodec, get_codec

__all__ = ["add_arguments", "main", "run"]

DEFAULT_CODECS = ("none", "fp16", "bf16", "int8", "topk")


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is under one fp32 value (4 bytes)")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``p2ptrain bench codecs``."""
    parser.add_argument(
        "--size", type=_size_arg, default=parse_size("64MiB"), metavar="SIZE",
        help="fp32 bytes per tensor, e.g. 64MiB, 1GiB, 1000000 (default 64MiB)",
    )
    parser.add_argument(
        "--codec", action="append", metavar="SPEC", dest="codecs",
        help="codec spec to measure, repeatable (default: none, fp16, bf16, int8, topk)",
    )
    parser.add_argument(
        "--repeat", type=_positive_int, default=5, metavar="N", help="timed runs per measurement; the best counts (default 5)"
    )
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _best_seconds(fns: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Fastest of ``repeat`` timed calls of each function, after one warm-up each.

    The functions take turns, so a codec and its baseline see the same machine load
    (this box is shared). Each call's result is dropped before the next call, so codecs
    may reuse their output memory as in steady state.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _baseline(codec: Codec, x: torch.Tensor) -> tuple[str, Callable[[], Any]] | None:
    """The plain-torch way to do the codec's encoding, as a skilled engineer would write it."""
    if codec.name == "bf16":
        bf16 = torch.empty_like(x, dtype=torch.bfloat16)
        return "torch copy_ into a preallocated bfloat16 tensor", lambda: bf16.copy_(x)
    if codec.name == "fp16":
        # The same job: fp16 saturates at +-65504 instead of overflowing to inf.
        fp16 = torch.empty_like(x, dtype=torch.float16)
        clamped = torch.empty_like(x)

        def saturating_cast() -> Any:
            return fp16.copy_(torch.clamp(x, -65504.0, 65504.0, out=clamped))

        return "torch clamp(+-65504, out=) then copy_, both preallocated", saturating_cast
    if isinstance(codec, Int8Codec):
        block = codec.block
        n_full = x.numel() // block * block
        rows = x[:n_full].view(-1, block)

        def int8() -> Any:
            scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127.0)
            return torch.round(rows / scale).to(torch.int8), scale

        return "torch abs().amax, round(x / scale).to(int8)", int8
    if isinstance(codec, TopKCodec):
        k = codec.k_for(x.numel())

        def topk() -> Any:
            idx = torch.topk(x.abs(), k, sorted=False).indices
            return idx.to(torch.int32), x[idx]

        return "torch.topk(x.abs(), k) and gather", topk
    return None


def _measure(spec: str, x: torch.Tensor, repeat: int) -> dict[str, Any]:
    codec = get_codec(spec)
    nbytes = x.numel() * 4
    gb = nbytes / 1e9
    base = _baseline(codec, x)
    timed = [lambda: codec.encode(x)] + ([base[1]] if base is not None else [])
    enc_s, *base_s = _best_seconds(timed, repeat)
    enc = codec.encode(x)
    wire = enc.nbytes
    frames = [bytes(b) for b in enc.buffers]  # read-only, like a plain zmq receive
    writable = [bytearray(f) for f in frames]  # like recv_into a preallocated buffer
    meta = enc.meta
    del enc
    out = torch.empty_like(x)
    dec_s, dec_rw_s = _best_seconds(
        [
            lambda: codec.decode(meta, frames, x.shape, x.dtype, out=out),
            lambda: codec.decode(meta, writable, x.shape, x.dtype, out=out),
        ],
        repeat,
    )
    codec.decode(meta, frames, x.shape, x.dtype, out=out)
    err = (torch.linalg.vector_norm(out.double() - x.double()) / torch.linalg.vector_norm(x.double())).item()
    row: dict[str, Any] = {
        "name": codec.name,
        "spec": codec.spec,
        "encode_gbps": round(gb / enc_s, 3),
        "decode_gbps": round(gb / dec_s, 3),
        "decode_writable_gbps": round(gb / dec_rw_s, 3),
        "wire_ratio": round(wire / nbytes, 5),
        "zero_copy": codec.name == "none",  # encode only wraps the tensor's memory
        "rel_error": float(f"{err:.3g}"),
        "baseline": None,
        "baseline_encode_gbps": None,
        "encode_ratio": None,
    }
    if base is not None:
        row["baseline"] = base[0]
        row["baseline_encode_gbps"] = round(gb / base_s[0], 3)
        row["encode_ratio"] = round(base_s[0] / enc_s, 3)
    return row


def run(size_bytes: int, specs: list[str], repeat: int) -> dict[str, Any]:
    """Measure ``specs`` on one Gaussian fp32 tensor of ``size_bytes``; the JSON object.

    Raises:
        CodecError: a spec is not a codec.
    """
    codecs = [get_codec(s).spec for s in specs]  # fail on a bad spec before measuring
    at_least("--repeat", repeat, 1)
    fits_in_memory(f"--size {size_bytes}", size_bytes, 4)  # the tensor, an encoding, a decoding, a residual
    x = torch.randn(size_bytes // 4, generator=torch.Generator().manual_seed(0))
    rows = []
    for spec in codecs:
        if sys.stderr.isatty():
            print(f"measuring {spec} ...", file=sys.stderr, flush=True)
        rows.append(_measure(spec, x, repeat))
    return {
        "size_bytes": x.numel() * 4,
        "torch_threads": torch.get_num_threads(),
        "repeat": repeat,
        "gbps_of": "fp32 input bytes per second, best run",
        "decode_from": "read-only bytes (decode_writable_gbps: writable buffers) into a preallocated fp32 tensor",
        "codecs": rows,
    }


def _table(result: dict[str, Any]) -> str:
    head = f"{'codec':<12} {'encode GB/s':>11} {'decode GB/s':>11} {'wire':>8} {'rel err':>9} {'plain torch GB/s':>16} {'x':>6}"
    lines = [
        f"codecs on {result['size_bytes'] / 2**20:.1f} MiB of Gaussian fp32, {result['torch_threads']} torch threads, "
        f"best of {result['repeat']} (GB/s of fp32 input)",
        head,
        "-" * len(head),
    ]
    for r in result["codecs"]:
        base = "-" if r["baseline_encode_gbps"] is None else f"{r['baseline_encode_gbps']:.2f}"
        ratio = "-" if r["encode_ratio"] is None else f"{r['encode_ratio']:.1f}"
        lines.append(
            f"{r['spec']:<12} {r['encode_gbps']:>11.2f} {r['decode_gbps']:>11.2f} {r['wire_ratio']:>8.4f} "
            f"{r['rel_error']:>9.2e} {base:>16} {ratio:>6}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table, or one JSON object with ``--json``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args.size, args.codecs or list(DEFAULT_CODECS), args.repeat)
    except CodecError as exc:
        print(f"p2ptrain bench codecs: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0
