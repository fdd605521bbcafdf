"""The codec interface: how a tensor becomes envelope metadata plus raw buffers.

A codec never sees a socket. ``encode`` returns an :class:`Encoded` (small msgpack-able
``meta`` and a list of contiguous byte buffers); ``decode`` turns them back into a tensor.
Before ``decode`` touches a buffer from the network, the transport calls
``expected_nbytes`` with the envelope's dtype/shape/meta and drops the message when the
frame lengths disagree, so a decoder only ever runs on well-formed input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from p2ptrain._errors import CodecError

__all__ = ["Codec", "Encoded", "Buffer", "DTYPES", "dtype_from_name", "dtype_name"]

#: Anything the transport can send as one frame without a copy.
Buffer = Any  # bytes | bytearray | memoryview | numpy array; kept loose for zero-copy paths

#: dtypes allowed on the wire, by name. Anything else is refused on both ends.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of ``dtype``.

    Raises:
        CodecError: the dtype cannot travel on the wire.
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel on the wire; use one of {sorted(DTYPES)}") from None


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype for a wire name.

    Raises:
        CodecError: unknown name (never evaluated, only looked up).
    """
    if not isinstance(name, str) or name not in DTYPES:
        raise CodecError(f"unknown wire dtype {name!r}")
    return DTYPES[name]


@dataclass
class Encoded:
    """A tensor in wire form.

    Attributes:
        meta: small msgpack-able dict (ints, floats, strings, lists) the decoder needs.
        buffers: contiguous buffers, each sent as raw frames. They may alias the
            encoder's scratch memory; send them before the next ``encode`` call.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    buffers: list[Buffer] = field(default_factory=list)


class Codec(ABC):
    """One way of putting a tensor on the wire.

    Subclasses are cheap to construct; a codec may keep reusable scratch buffers,
    so one instance is not shared between threads.
    """

    #: Registry name, e.g. ``"int8"``; ``spec`` adds parameters (``"int8:128"``).
    name: ClassVar[str]
    #: True when ``decode(encode(t))`` equals ``t`` bit for bit.
    lossless: ClassVar[bool]

    @property
    def spec(self) -> str:
        """The string that ``get_codec`` turns back into an equal codec."""
        return self.name

    @abstractmethod
    def encode(self, tensor: torch.Tensor, *, feedback: Any | None = None) -> Encoded:
        """Encode ``tensor`` (any float dtype; contiguous or not).

        Args:
            tensor: the values to send.
            feedback: an error-feedback state owned by the caller, for lossy codecs that
                support it; the residual of this message is folded into it.
        """

    @abstractmethod
    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        """Byte length of each buffer a well-formed message must carry.

        Raises:
            CodecError: ``meta`` is malformed (wrong keys, types or out-of-range values).
        """

    @abstractmethod
    def decode(
        self,
        meta: dict[str, Any],
        buffers: Sequence[Buffer],
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rebuild the tensor; writes into ``out`` when given (same shape and dtype)."""
