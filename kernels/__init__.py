"""p2ptrain.kernels: tensor numerics (installed as ``p2ptrain.kernels``).

Files:

- ``_codec.py``     the :class:`Codec` interface, :class:`Encoded`, wire dtypes and the
                    shape/dtype/meta validators shared with the transport
- ``_registry.py``  :func:`get_codec` (strict spec parser) and :func:`codec_names`
- ``_cast.py``      ``none`` (raw bytes), ``fp16`` and ``bf16`` casts
- ``_int8.py``      ``int8[:BLOCK]``: blockwise absmax int8 with float32 scales
- ``_topk.py``      ``topk[:FRACTION]``: largest-magnitude values plus int32/int64 indices
- ``_feedback.py``  :class:`ErrorFeedback`, the caller-owned residual of a lossy stream
- ``_buffers.py``   byte views, reusable output memory, readers for received buffers

Typical use::

    codec = get_codec("int8:256")
    fb = ErrorFeedback()                      # one per gradient bucket
    enc = codec.encode(grad, feedback=fb)     # enc.meta + enc.buffers go on the wire
    ...
    sizes = codec.expected_nbytes(meta, shape, dtype)   # receiver: validate first
    grad = codec.decode(meta, frames, shape, dtype, out=buf)
"""

from __future__ import annotations

from p2ptrain.kernels._buffers import read_tensor
from p2ptrain.kernels._cast import Bf16Codec, Fp16Codec, NoneCodec
from p2ptrain.kernels._codec import (
    DTYPES,
    MAX_NDIM,
    MAX_NUMEL,
    Codec,
    Encoded,
    check_dtype,
    check_meta,
    check_shape,
    dtype_from_name,
    dtype_name,
    tensor_nbytes,
)
from p2ptrain.kernels._feedback import ErrorFeedback
from p2ptrain.kernels._int8 import Int8Codec
from p2ptrain.kernels._registry import codec_names, get_codec
from p2ptrain.kernels._topk import TopKCodec

__all__ = [
    "DTYPES",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Bf16Codec",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "Fp16Codec",
    "Int8Codec",
    "NoneCodec",
    "TopKCodec",
    "check_dtype",
    "check_meta",
    "check_shape",
    "codec_names",
    "dtype_from_name",
    "dtype_name",
    "get_codec",
    "read_tensor",
    "tensor_nbytes",
]
