"""Codec names and the strict parser of codec specs (``"int8:128"``, ``"topk:0.01"``).

Specs arrive in envelopes from the network: parsing only looks names up and matches
parameters against fixed patterns with bounded length; nothing is ever evaluated.
"""

from __future__ import annotations

from p2ptrain._errors import CodecError
from p2ptrain.kernels._cast import Bf16Codec, Fp16Codec, NoneCodec
from p2ptrain.kernels._codec import Codec
from p2ptrain.kernels._int8 import Int8Codec
from p2ptrain.kernels._topk import TopKCodec

__all__ = ["MAX_SPEC_LEN", "codec_names", "get_codec"]

_CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp16Codec, Bf16Codec, Int8Codec, TopKCodec)}
_USAGE = "none, fp16, bf16, int8[:BLOCK], topk[:FRACTION]"

#: Longest spec accepted; real ones are under 30 characters.
MAX_SPEC_LEN = 64


def codec_names() -> list[str]:
    """The registered codec names, in order of increasing compression."""
    return list(_CODECS)


def get_codec(spec: object) -> Codec:
    """A new codec for ``spec``: a name, or ``name:param`` for int8 (block) and topk (fraction).

    Each call returns a fresh instance (codecs keep scratch memory and are not threadsafe);
    keep one per stream rather than calling this per message.

    Raises:
        CodecError: not a string, too long, unknown name or bad parameter; the message
            names the valid choices.
    """
    if not isinstance(spec, str):
        raise CodecError(f"codec spec must be a string like 'int8:256', got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_LEN:
        raise CodecError(f"codec spec {spec[:20]!r}... is {len(spec)} characters long; at most {MAX_SPEC_LEN} allowed")
    name, sep, param = spec.partition(":")
    cls = _CODECS.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; choose one of {_USAGE}")
    return cls.from_param(param if sep else None)
