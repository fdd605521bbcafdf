"""Codecs that send every element: ``none`` (raw bytes) and the ``fp16``/``bf16`` casts.

All three carry an empty ``meta`` and one buffer: the elements in wire dtype, in C order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from p2ptrain.kernels._buffers import CHUNK, OutputArena, WireReader, byte_view, read_tensor, typed_view
from p2ptrain.kernels._codec import Buffer, Codec, Encoded, check_dtype, check_meta, check_shape, itemsize, prepare_input
from p2ptrain.kernels._feedback import ErrorFeedback

__all__ = ["Bf16Codec", "Fp16Codec", "NoneCodec"]

#: Largest finite float16. The fp16 codec saturates here instead of overflowing to inf,
#: like hivemind's Float16Compression: with error feedback the excess is sent later.
FP16_MAX = 65504.0


class NoneCodec(Codec):
    """Raw bytes in the tensor's own dtype, for every wire dtype (bool and ints included).

    ``encode`` is zero-copy for a contiguous tensor: the buffer aliases the tensor, so do
    not modify it until the buffer is sent. ``decode`` without ``out`` returns a tensor
    that ALIASES a writable buffer (zero-copy) and copies a read-only one (``bytes``,
    zmq frames); with ``out`` it copies into ``out``. Bool tensors are always copied and
    normalised (any non-zero byte becomes True), since torch assumes bools are 0 or 1.

    With an :class:`ErrorFeedback` that still holds a residual (the stream switched from a
    lossy codec), the residual is paid out in this message.
    """

    name: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True

    def __init__(self) -> None:
        self._arena = OutputArena()

    def encode(self, tensor: torch.Tensor, *, feedback: ErrorFeedback | None = None) -> Encoded:
        x = prepare_input(tensor)
        if feedback is not None and feedback.residual is not None:
            r = feedback.correct(x)
            block = self._arena.take(r.numel() * x.element_size())
            wire = typed_view(block, x.dtype)
            wire.copy_(r)
            if r.dtype == x.dtype:
                feedback.reset()  # paid out exactly; later messages take the zero-copy path
            else:
                r.sub_(wire)
            return Encoded({}, [block.data])
        return Encoded({}, [byte_view(x if x.is_contiguous() else x.contiguous())])

    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        check_meta(meta)
        return [check_shape(shape) * itemsize(check_dtype(dtype))]

    def decode(
        self,
        meta: dict[str, Any],
        buffers: Sequence[Buffer],
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        (buf,) = self._checked_buffers(meta, buffers, shape, dtype)
        self._check_out(out, shape, dtype)
        shape = tuple(shape)
        if dtype == torch.bool:
            value = read_tensor(buf, torch.uint8).ne(0).view(shape)
        elif out is not None and out.is_contiguous():
            if buf.nbytes:
                np.copyto(out.reshape(-1).view(torch.uint8).numpy(), np.frombuffer(buf, dtype=np.uint8))
            return out
        else:
            value = read_tensor(buf, dtype).view(shape)
        if out is None:
            return value
        out.copy_(value)
        return out


class _CastCodec(Codec):
    """Every element cast to a 16-bit float; decode casts back to the original dtype."""

    lossless: ClassVar[bool] = False
    wire: ClassVar[torch.dtype]
    saturate: ClassVar[float | None] = None

    def __init__(self) -> None:
        self._arena = OutputArena()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _buf(self, dtype: torch.dtype) -> torch.Tensor:
        """A CHUNK-element scratch tensor of ``dtype``, kept for the codec's lifetime."""
        t = self._scratch.get(dtype)
        if t is None:
            t = self._scratch[dtype] = torch.empty(CHUNK, dtype=dtype)
        return t

    def encode(self, tensor: torch.Tensor, *, feedback: ErrorFeedback | None = None) -> Encoded:
        x = prepare_input(tensor, floating=True)
        n = x.numel()
        block = self._arena.take(2 * n)
        wire = typed_view(block, self.wire)
        if feedback is not None:
            src = feedback.correct(x)
            resid: torch.Tensor | None = src
        else:
            src = x.reshape(-1)  # a view when contiguous, else one copy
            resid = None
        clamp = self.saturate is not None and src.dtype != self.wire
        # Decoded values are wire values cast to x.dtype; the residual must subtract
        # exactly those (a bf16 wire value may round again when x is fp16).
        recast = resid is not None and x.dtype not in (torch.float32, torch.float64) and x.dtype != self.wire
        if not clamp and resid is None:
            wire.copy_(src)  # one pass; chunks only pay when several passes share them
            return Encoded({}, [block.data])
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            w = wire[s:e]
            if clamp:
                tmp = self._buf(src.dtype)[: e - s]
                torch.clamp(src[s:e], -FP16_MAX, FP16_MAX, out=tmp)
                w.copy_(tmp)
            else:
                w.copy_(src[s:e])
            if resid is not None:
                resid[s:e].sub_(w.to(x.dtype) if recast else w)
        return Encoded({}, [block.data])

    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        check_meta(meta)
        check_dtype(dtype, floating=True)
        return [check_shape(shape) * 2]

    def decode(
        self,
        meta: dict[str, Any],
        buffers: Sequence[Buffer],
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        (buf,) = self._checked_buffers(meta, buffers, shape, dtype)
        self._check_out(out, shape, dtype)
        n = buf.nbytes // 2
        direct = out is not None and out.is_contiguous()
        dest = out.view(-1) if direct else torch.empty(n, dtype=dtype)  # type: ignore[union-attr]
        reader = WireReader(buf, self.wire, self._buf(torch.uint8))
        step = n if reader.aliases else CHUNK // 2  # the bounce scratch holds CHUNK bytes
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            dest[s:e].copy_(reader.chunk(s, e))
        if out is None:
            return dest.view(tuple(shape))
        if not direct:
            out.copy_(dest.view(tuple(shape)))
        return out


class Fp16Codec(_CastCodec):
    """IEEE half precision: 2 bytes per element, relative error <= 2**-11 per element.

    Values beyond +-65504 (inf included) saturate to +-65504; NaN stays NaN; magnitudes
    below 6.1e-5 lose precision (fp16 subnormals), below 6e-8 they flush to 0. For
    gradients with a large dynamic range prefer ``bf16`` or use error feedback.
    """

    name: ClassVar[str] = "fp16"
    wire: ClassVar[torch.dtype] = torch.float16
    saturate: ClassVar[float | None] = FP16_MAX


class Bf16Codec(_CastCodec):
    """bfloat16: 2 bytes per element, fp32's exponent range, relative error <= 2**-8.

    Round to nearest even, as torch casts; inf and NaN pass through.
    """

    name: ClassVar[str] = "bf16"
    wire: ClassVar[torch.dtype] = torch.bfloat16
