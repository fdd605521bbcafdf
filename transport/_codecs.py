"""How the wire finds a codec (``p2ptrain.kernels.get_codec``) and views codec buffers as bytes.

The transport resolves every codec spec here, its own and each one a peer names, so the
registry in ``p2ptrain.kernels`` is the single source of truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from p2ptrain._errors import CodecError
from p2ptrain.kernels import Codec, get_codec

__all__ = ["as_byte_array", "resolve_codec"]


def as_byte_array(buf: Any) -> np.ndarray:
    """A flat ``uint8`` numpy view of ``buf`` (no copy where ``buf`` is contiguous).

    Accepts torch tensors (CPU), numpy arrays and any object with the buffer protocol.
    The array keeps ``buf`` alive.
    """
    if isinstance(buf, torch.Tensor):
        t = buf.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        return t.numpy()
    if isinstance(buf, np.ndarray):
        return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        return np.frombuffer(mv.tobytes(), dtype=np.uint8)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return np.frombuffer(mv, dtype=np.uint8)


def resolve_codec(spec: str | Codec) -> Codec:
    """A fresh codec for ``spec`` (a Codec instance is returned as is).

    Raises:
        CodecError: unknown or malformed spec.
    """
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise CodecError(f"codec must be a spec string like 'int8:256' or a Codec, got {type(spec).__name__}")
    return get_codec(spec)
