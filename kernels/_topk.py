"""Top-k sparsification: send the k largest-magnitude values and their positions.

Wire form: empty ``meta``; buffer 0 holds k indices into the flattened tensor (int32
when ``numel <= 2**31``, else int64), buffer 1 the k values in the tensor's own dtype
(so the kept values arrive exactly). ``k = ceil(fraction * numel)`` clamped to
``[1, numel]`` (0 for an empty tensor); both sides compute it from the spec, so a message
with any other k is malformed. Indices are unique but in no particular order.

Used without error feedback top-k simply drops the rest (relative L2 error about 0.95
on Gaussian data at 1%); with :class:`ErrorFeedback` the dropped mass is sent later,
which is how top-k SGD converges (Stich et al. 2018, "Sparsified SGD with Memory").
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from p2ptrain._errors import CodecError
from p2ptrain.kernels._buffers import CHUNK, byte_view, read_tensor
from p2ptrain.kernels._codec import Buffer, Codec, Encoded, check_dtype, check_meta, check_shape, itemsize, prepare_input
from p2ptrain.kernels._feedback import ErrorFeedback

__all__ = ["TopKCodec"]

log = logging.getLogger(__name__)

_FRACTION_RE = re.compile(r"(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,3})?")
# Exact selection with torch.topk runs at 0.14 GB/s here (64 MiB fp32, k = 1%). Above
# _SAMPLE_MIN values we first estimate the threshold from _SAMPLE random values, keep the
# candidates above a safely lower threshold (one in-cache pass), and run torch.topk on
# those only: ~1.4 GB/s, same result. The margin is 6 standard deviations of the
# sampled quantile; if it ever keeps fewer than k candidates we fall back to the full sort.
_SAMPLE = 1 << 16
_SAMPLE_MIN = 1 << 18
_SAMPLE_MAX_FRACTION = 0.25
_INT32_LIMIT = 1 << 31


class TopKCodec(Codec):
    """Keep the ``ceil(fraction * numel)`` largest-magnitude values.

    Args:
        fraction: share of values kept, in (0, 1] (default 0.01; wire about 2% of fp32).

    Raises:
        CodecError: ``fraction`` out of range or not a finite float.
    """

    name: ClassVar[str] = "topk"
    lossless: ClassVar[bool] = False
    DEFAULT_FRACTION: ClassVar[float] = 0.01

    def __init__(self, fraction: float = DEFAULT_FRACTION) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise CodecError(f"topk fraction must be a number in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        # Seeded: the same input always gives the same message (and the same speed).
        self._gen = torch.Generator().manual_seed(0x70F)
        self._abs: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @classmethod
    def from_param(cls, param: str | None) -> TopKCodec:
        """The codec for ``topk[:FRACTION]`` (FRACTION: decimal, e.g. ``0.01`` or ``1e-3``).

        Raises:
            CodecError: FRACTION malformed or outside (0, 1].
        """
        if param is None:
            return cls()
        if not _FRACTION_RE.fullmatch(param) or not 0.0 < float(param) <= 1.0:
            raise CodecError(f"bad topk fraction {param[:20]!r}; use topk:F with F in (0, 1], e.g. topk:0.01")
        return cls(float(param))

    @property
    def spec(self) -> str:
        return f"topk:{self.fraction!r}"

    def k_for(self, numel: int) -> int:
        """How many values a tensor of ``numel`` elements keeps."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    # --- encode ----------------------------------------------------------------------------

    def encode(self, tensor: torch.Tensor, *, feedback: ErrorFeedback | None = None) -> Encoded:
        x = prepare_input(tensor, floating=True)
        n = x.numel()
        src = feedback.correct(x) if feedback is not None else x.reshape(-1)
        idx = self._select(src, self.k_for(n))
        picked = src[idx]
        values = picked.to(x.dtype)  # what the receiver gets, exactly
        if feedback is not None:
            # The kept positions now owe only their rounding to x.dtype (zero for fp32).
            src.index_copy_(0, idx, picked - values.to(src.dtype))
        wire_idx = idx.to(torch.int32) if n <= _INT32_LIMIT else idx
        return Encoded({}, [byte_view(wire_idx), byte_view(values)])

    def _select(self, src: torch.Tensor, k: int) -> torch.Tensor:
        """int64 positions of ``k`` largest ``|src|`` (unique, unordered)."""
        n = src.numel()
        if k == n:
            return torch.arange(n)
        if n < _SAMPLE_MIN or k > _SAMPLE_MAX_FRACTION * n:
            return torch.topk(src.abs(), k, sorted=False).indices
        f = k / n
        keep = min(1.0, 1.25 * f + 6.0 * math.sqrt(f * (1.0 - f) / _SAMPLE) + 2.0 / _SAMPLE)
        sample = src[torch.randint(0, n, (_SAMPLE,), generator=self._gen)].abs_()
        threshold = torch.topk(sample, math.ceil(keep * _SAMPLE), sorted=False).values.min().item()
        cand = self._above(src, threshold)
        if cand.numel() < k:  # unlucky sample (or NaNs): exact but slow
            log.debug("topk sampling kept %d < k=%d candidates; sorting all %d values", cand.numel(), k, n)
            return torch.topk(src.abs(), k, sorted=False).indices
        return cand[torch.topk(src[cand].abs_(), k, sorted=False).indices]

    def _above(self, src: torch.Tensor, threshold: float) -> torch.Tensor:
        """Positions where ``|src| >= threshold``, ascending, chunk by chunk in cache."""
        if self._abs is None or self._abs.dtype != src.dtype:
            self._abs = torch.empty(CHUNK, dtype=src.dtype)
            self._mask = torch.empty(CHUNK, dtype=torch.bool)
        assert self._mask is not None
        parts = []
        for s in range(0, src.numel(), CHUNK):
            e = min(src.numel(), s + CHUNK)
            a = torch.abs(src[s:e], out=self._abs[: e - s])
            m = torch.ge(a, threshold, out=self._mask[: e - s])
            # numpy's nonzero: 80 us per chunk here, torch's nonzero 260 us, masked_select 680 us.
            parts.append(torch.from_numpy(np.flatnonzero(m.numpy())).add_(s))
        return torch.cat(parts)

    # --- decode ----------------------------------------------------------------------------

    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        check_meta(meta)
        check_dtype(dtype, floating=True)
        n = check_shape(shape)
        k = self.k_for(n)
        return [k * (4 if n <= _INT32_LIMIT else 8), k * itemsize(dtype)]

    def decode(
        self,
        meta: dict[str, Any],
        buffers: Sequence[Buffer],
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        idx_buf, val_buf = self._checked_buffers(meta, buffers, shape, dtype)
        self._check_out(out, shape, dtype)
        n = check_shape(shape)
        idx = read_tensor(idx_buf, torch.int32 if n <= _INT32_LIMIT else torch.int64)
        values = read_tensor(val_buf, dtype)
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            if lo.item() < 0 or hi.item() >= n:
                raise CodecError(f"topk index out of range [0, {n}): got {lo.item()}..{hi.item()}")
        direct = out is not None and out.is_contiguous()
        if direct:
            dest = out.view(-1)  # type: ignore[union-attr]
            dest.zero_()
        else:
            dest = torch.zeros(n, dtype=dtype)
        dest[idx] = values  # duplicate indices (never sent by encode) are harmless: one wins
        if out is None:
            return dest.view(tuple(shape))
        if not direct:
            out.copy_(dest.view(tuple(shape)))
        return out
