"""Blockwise absmax int8: one float32 scale per block of ``block`` values.

Wire form: empty ``meta``; buffer 0 holds ``numel`` int8 codes in C order, buffer 1
holds ``ceil(numel / block)`` float32 scales (little-endian, like every buffer here).
The last block may be short (the tail); it is quantized as if padded with zeros.

Per block with absolute maximum ``a``: ``scale = a / 127``,
``code = round(x / scale)`` in [-127, 127], decoded ``code * scale``. So each element's
error is at most ``a / 254`` (half a step) plus float32 rounding; on Gaussian data at
block 256 the relative L2 error is about 0.6%. Scales are float32 rather than fp16: it
costs 2 bytes per block (0.8% of the wire at block 256) and keeps tiny gradients
(fp16 flushes below 6e-8) and huge ones exact in scale. An all-zero block decodes to
zeros (its scale is clamped to 2**-126, never 0, so no 0/0); a block holding inf or NaN
decodes to NaN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from p2ptrain._errors import CodecError
from p2ptrain.kernels._buffers import CHUNK, OutputArena, WireReader, read_tensor, typed_view
from p2ptrain.kernels._codec import (
    Buffer,
    Codec,
    Encoded,
    ceil_div,
    check_dtype,
    check_meta,
    check_shape,
    prepare_input,
)
from p2ptrain.kernels._feedback import ErrorFeedback

__all__ = ["Int8Codec"]

# Clamping absmax to 127 * 2**-126 keeps scale >= 2**-126 (the smallest normal float32),
# so 1/scale <= 2**126 stays finite and denormal-flushing CPUs do not read it as 0.
_MIN_ABSMAX = 127.0 * 2.0**-126
_BLOCK_RE = re.compile(r"[1-9][0-9]{0,7}")


class Int8Codec(Codec):
    """Blockwise absmax int8 quantization (about 1/4 of fp32 on the wire).

    Args:
        block: values per scale, 1 to 2**20 (default 256: 1.6% scale overhead, <1% error).

    Raises:
        CodecError: ``block`` out of range.
    """

    name: ClassVar[str] = "int8"
    lossless: ClassVar[bool] = False
    DEFAULT_BLOCK: ClassVar[int] = 256
    MAX_BLOCK: ClassVar[int] = 1 << 20

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= self.MAX_BLOCK:
            raise CodecError(f"int8 block size must be an int in [1, {self.MAX_BLOCK}], got {block!r}")
        self.block = block
        self._rows = max(1, CHUNK // block)  # blocks per chunk of work
        self._arena = OutputArena()
        self._scratch: dict[str, torch.Tensor] = {}

    @classmethod
    def from_param(cls, param: str | None) -> Int8Codec:
        """The codec for ``int8[:BLOCK]`` (BLOCK: plain decimal, no sign or leading zero).

        Raises:
            CodecError: BLOCK malformed or out of range.
        """
        if param is None:
            return cls()
        if not _BLOCK_RE.fullmatch(param):
            raise CodecError(f"bad int8 block size {param[:20]!r}; use int8:N with N in [1, {cls.MAX_BLOCK}], e.g. int8:256")
        return cls(int(param))

    @property
    def spec(self) -> str:
        return f"int8:{self.block}"

    def _buf(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Scratch ``key`` of ``n`` elements, allocated once per codec."""
        t = self._scratch.get(key)
        if t is None or t.numel() < n or t.dtype != dtype:
            t = self._scratch[key] = torch.empty(n, dtype=dtype)
        return t[:n]

    # --- encode ----------------------------------------------------------------------------

    def encode(self, tensor: torch.Tensor, *, feedback: ErrorFeedback | None = None) -> Encoded:
        x = prepare_input(tensor, floating=True)
        n, b = x.numel(), self.block
        nblocks, full = ceil_div(n, b), n // b
        mem = self._arena.take(4 * nblocks + n)  # scales first: keeps them 4-byte aligned
        scales = typed_view(mem[: 4 * nblocks], torch.float32)
        codes = typed_view(mem[4 * nblocks :], torch.int8)
        if feedback is not None:
            src = feedback.correct(x)
            resid: torch.Tensor | None = src
        else:
            src = x.reshape(-1)  # a view when contiguous, else one copy
            resid = None
        exact = x.dtype  # the dtype the receiver decodes to
        for r0 in range(0, full, self._rows):
            r1 = min(full, r0 + self._rows)
            rows = src[r0 * b : r1 * b].view(-1, b)
            res = resid[r0 * b : r1 * b].view(-1, b) if resid is not None else None
            if rows.dtype != torch.float32:
                rows = self._buf("conv", rows.numel(), torch.float32).view(-1, b).copy_(rows)
            self._quantize(rows, codes[r0 * b : r1 * b].view(-1, b), scales[r0:r1], res, exact)
        if full < nblocks:  # the tail: pad with zeros to a whole block
            t0, rem = full * b, n - full * b
            pad = self._buf("pad", b, torch.float32).view(1, b)
            pad.zero_()
            pad[0, :rem].copy_(src[t0:])
            code_pad = self._buf("code_pad", b, torch.int8).view(1, b)
            rpad = None
            if resid is not None:
                rpad = torch.zeros(1, b, dtype=resid.dtype)
                rpad[0, :rem].copy_(resid[t0:])
            self._quantize(pad, code_pad, scales[full:], rpad, exact)
            codes[t0:].copy_(code_pad[0, :rem])
            if resid is not None and rpad is not None:
                resid[t0:].copy_(rpad[0, :rem])
        return Encoded({}, [mem[4 * nblocks :].data, mem[: 4 * nblocks].data])

    def _quantize(
        self,
        rows: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        resid: torch.Tensor | None,
        exact: torch.dtype,
    ) -> None:
        """Quantize float32 ``rows`` (k, block) into ``codes`` and ``scales``.

        When ``resid`` is given (it may be ``rows`` itself), subtract from it exactly what
        ``decode`` will produce in dtype ``exact``.
        """
        k = rows.shape[0]
        amax = self._buf("amax", self._rows, torch.float32)[:k]
        amin = self._buf("amin", self._rows, torch.float32)[:k]
        inv = self._buf("inv", self._rows, torch.float32)[:k]
        # amax and amin as two reductions: 12 GB/s here, where aminmax and abs().amax
        # run at 2-3 GB/s on this CPU build.
        torch.amax(rows, dim=1, out=amax)
        torch.amin(rows, dim=1, out=amin)
        torch.maximum(amax, amin.neg_(), out=amax)
        amax.clamp_min_(_MIN_ABSMAX)
        torch.div(amax, 127.0, out=scales)
        torch.reciprocal(scales, out=inv)
        work = self._buf("work", rows.numel(), torch.float32).view(k, -1)
        torch.mul(rows, inv[:, None], out=work)
        work.round_()  # |work| <= 127 * (1 + 3 ulp): rounds into [-127, 127], never 128
        codes.copy_(work)
        if resid is not None:
            work.mul_(scales[:, None])  # the same float32 op decode runs
            if exact in (torch.float16, torch.bfloat16):
                resid.sub_(work.to(exact))
            else:
                resid.sub_(work)

    # --- decode ----------------------------------------------------------------------------

    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        check_meta(meta)
        check_dtype(dtype, floating=True)
        n = check_shape(shape)
        return [n, 4 * ceil_div(n, self.block)]

    def decode(
        self,
        meta: dict[str, Any],
        buffers: Sequence[Buffer],
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        code_buf, scale_buf = self._checked_buffers(meta, buffers, shape, dtype)
        self._check_out(out, shape, dtype)
        n, b = code_buf.nbytes, self.block
        full = n // b
        scales = read_tensor(scale_buf, torch.float32)
        direct = out is not None and out.is_contiguous()
        dest = out.view(-1) if direct else torch.empty(n, dtype=dtype)  # type: ignore[union-attr]
        step = self._rows * b
        reader = WireReader(code_buf, torch.int8, self._buf("bounce", step, torch.uint8))
        for r0 in range(0, full, self._rows):
            r1 = min(full, r0 + self._rows)
            self._dequantize(reader.chunk(r0 * b, r1 * b).view(-1, b), scales[r0:r1, None], dest[r0 * b : r1 * b])
        if full * b < n:
            self._dequantize(reader.chunk(full * b, n), scales[full], dest[full * b :])
        if out is None:
            return dest.view(tuple(shape))
        if not direct:
            out.copy_(dest.view(tuple(shape)))
        return out

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dest: torch.Tensor) -> None:
        """``dest[:] = codes * scale`` in float32, then cast (the op ``_quantize`` mirrors)."""
        if dest.dtype == torch.float32:
            o = dest.view(codes.shape)
        else:
            o = self._buf("work", codes.numel(), torch.float32).view(codes.shape)
        o.copy_(codes)  # int8 -> float32 is exact; copy_ then mul_ beats a mixed-type mul 4x
        o.mul_(scale)
        if dest.dtype != torch.float32:
            dest.copy_(o.view(-1))
