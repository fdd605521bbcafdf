"""The codec interface: how a tensor becomes envelope metadata plus raw buffers.

A codec never sees a socket. ``encode`` returns an :class:`Encoded` (small msgpack-able
``meta`` and a list of contiguous byte buffers); ``decode`` turns them back into a tensor.
Before ``decode`` touches a buffer from the network, the transport calls
``expected_nbytes`` with the envelope's dtype/shape/meta and drops the message when the
frame lengths disagree, so a decoder only ever runs on well-formed input. ``decode``
repeats that check itself, so a caller that forgets it still gets a :class:`CodecError`,
never an ``IndexError`` or a huge allocation.

The envelope's ``shape`` and ``dtype`` are always those of the ORIGINAL tensor (what
``decode`` returns), whatever the codec puts on the wire.

The validation helpers here (:func:`check_shape`, :func:`check_dtype`,
:func:`check_meta`, :func:`tensor_nbytes`) are shared by every codec and by the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from p2ptrain._errors import CodecError

__all__ = [
    "DTYPES",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Buffer",
    "Codec",
    "Encoded",
    "ceil_div",
    "check_dtype",
    "check_meta",
    "check_shape",
    "dtype_from_name",
    "dtype_name",
    "itemsize",
    "prepare_input",
    "tensor_nbytes",
]

#: Anything the transport can send as one frame without a copy. Codecs here always
#: return 1-D unsigned-byte memoryviews (format ``"B"``), so ``len(buf)`` is the byte count;
#: ``decode`` accepts any C-contiguous buffer (bytes, bytearray, memoryview, numpy array,
#: zmq.Frame).
Buffer = Any

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
_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}

#: Most dimensions a wire shape may have (torch itself allows more; no model needs them).
MAX_NDIM = 32
#: Most elements a wire shape may describe. A sanity bound that keeps size arithmetic
#: small; it is NOT a memory limit: the transport must cap ``tensor_nbytes`` at what this
#: node can afford, because a sparse codec (topk) decodes a few bytes into ``numel`` values.
MAX_NUMEL = 1 << 40


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of ``dtype``.

    Raises:
        CodecError: the dtype cannot travel on the wire.
    """
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):
        raise CodecError(f"dtype {dtype} cannot travel on the wire; use one of {sorted(DTYPES)}") from None


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype for a wire name.

    Raises:
        CodecError: unknown name (never evaluated, only looked up).
    """
    if not isinstance(name, str) or name not in DTYPES:
        raise CodecError(f"unknown wire dtype {_short(name)}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_dtype(dtype: object, *, floating: bool = False) -> torch.dtype:
    """``dtype`` itself, once it is known to be a wire dtype (a float one if ``floating``).

    Raises:
        CodecError: not a torch dtype, not a wire dtype, or not floating when required.
    """
    if not isinstance(dtype, torch.dtype) or dtype not in _NAMES:
        raise CodecError(f"dtype {_short(dtype)} cannot travel on the wire; use one of {sorted(DTYPES)}")
    if floating and dtype not in _FLOATS:
        raise CodecError(f"this codec needs a float tensor (float32, float16, bfloat16, float64), got {_NAMES[dtype]}")
    return dtype


def check_shape(shape: object) -> int:
    """Number of elements of a wire shape, after checking it.

    A shape is a list or tuple (``torch.Size`` included) of at most :data:`MAX_NDIM`
    non-negative ints (bools refused) whose product is at most :data:`MAX_NUMEL`.

    Raises:
        CodecError: any of the above fails.
    """
    if not isinstance(shape, (list, tuple)):
        raise CodecError(f"shape must be a list of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    numel = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool):
            raise CodecError(f"shape {_short(shape)} holds {_short(d)}, not an int")
        if d < 0 or d > MAX_NUMEL:
            raise CodecError(f"shape {_short(shape)} holds {d}; dimensions must be in [0, {MAX_NUMEL}]")
        numel *= d  # stays small: each factor <= MAX_NUMEL and we stop once past it
        if numel > MAX_NUMEL:
            raise CodecError(f"shape {_short(shape)} has more than {MAX_NUMEL} elements")
    return numel


def check_meta(meta: object, fields: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """``meta`` itself, once it is a dict with exactly the keys of ``fields``, typed as given.

    Bools never pass for ``int`` fields.

    Raises:
        CodecError: not a dict, a missing or extra key, or a value of the wrong type.
    """
    fields = fields or {}
    if not isinstance(meta, dict):
        raise CodecError(f"codec meta must be a dict, got {type(meta).__name__}")
    if set(meta) != set(fields):
        extra = sorted(map(_short, set(meta) - set(fields)))
        missing = sorted(set(fields) - set(meta))
        raise CodecError(f"codec meta keys do not match: unexpected {extra}, missing {missing}")
    for key, kind in fields.items():
        value = meta[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise CodecError(f"codec meta {key!r} has the wrong type {type(value).__name__}")
    return meta


def tensor_nbytes(shape: object, dtype: object) -> int:
    """Bytes a tensor of ``shape`` and ``dtype`` takes once decoded.

    The transport compares this with its own limit before calling ``decode``: sparse
    codecs make it much larger than the frames that carry it.

    Raises:
        CodecError: bad shape or dtype.
    """
    return check_shape(shape) * _ITEMSIZE[check_dtype(dtype)]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a (checked) wire dtype."""
    return _ITEMSIZE[dtype]



def prepare_input(tensor: object, *, floating: bool = False) -> torch.Tensor:
    """``tensor`` detached and on the CPU, once its dtype is a wire dtype (float if asked).

    Raises:
        CodecError: not a tensor, or a dtype this codec cannot carry.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"codecs encode torch tensors, got {type(tensor).__name__}")
    check_dtype(tensor.dtype, floating=floating)
    tensor = tensor.detach()
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages echo untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Encoded:
    """A tensor in wire form.

    Attributes:
        meta: small msgpack-able dict (ints, floats, strings, lists) the decoder needs.
        buffers: contiguous buffers, each sent as one raw frame. The codecs here return
            1-D ``"B"`` memoryviews. They stay valid and unchanged for as long as anyone
            holds them: a codec reuses its output memory only once every buffer of its
            previous message has been released (drop the ``Encoded`` after sending so it
            can). ``none`` aliases the input tensor instead: do not modify the tensor
            until its buffers are sent.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Total bytes of ``buffers`` (what goes on the wire, envelope aside)."""
        return sum(memoryview(b).nbytes for b in self.buffers)


class Codec(ABC):
    """One way of putting a tensor on the wire.

    Subclasses are cheap to construct; a codec may keep reusable scratch buffers,
    so one instance is not shared between threads. Two codecs are equal when their
    ``spec`` strings are.
    """

    #: Registry name, e.g. ``"int8"``; ``spec`` adds parameters (``"int8:128"``).
    name: ClassVar[str]
    #: True when ``decode(encode(t))`` equals ``t`` bit for bit.
    lossless: ClassVar[bool]

    @property
    def spec(self) -> str:
        """The string that ``get_codec`` turns back into an equal codec."""
        return self.name

    @classmethod
    def from_param(cls, param: str | None) -> Codec:
        """The codec for the spec ``name`` (``param`` None) or ``name:param``.

        ``param`` is untrusted text from an envelope: parse it strictly, never evaluate it.
        This default accepts no parameter; codecs that take one override it.

        Raises:
            CodecError: a parameter was given (or, in overrides, is malformed).
        """
        if param is not None:
            raise CodecError(f"codec {cls.name!r} takes no parameter, got {cls.name + ':' + param[:20]!r}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r}>"

    @abstractmethod
    def encode(self, tensor: torch.Tensor, *, feedback: Any | None = None) -> Encoded:
        """Encode ``tensor`` (contiguous or not; lossy codecs need a float dtype).

        Args:
            tensor: the values to send (CPU; other devices are copied to CPU first). Its
                shape and dtype travel in the envelope; ``decode`` restores both.
            feedback: an :class:`~p2ptrain.kernels.ErrorFeedback` owned by the caller,
                one per tensor stream; the residual of this message is folded into it.

        Raises:
            CodecError: the tensor's dtype does not suit this codec, or ``feedback``
                belongs to a tensor of another size.
        """

    @abstractmethod
    def expected_nbytes(self, meta: dict[str, Any], shape: Sequence[int], dtype: torch.dtype) -> list[int]:
        """Byte length of each buffer a well-formed message must carry.

        Allocates nothing that depends on the arguments.

        Raises:
            CodecError: ``meta`` is malformed (wrong keys, types or out-of-range values),
                or ``shape``/``dtype`` cannot be carried by this codec.
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
        """Rebuild the tensor; writes into ``out`` when given (same shape and dtype).

        Args:
            meta: the envelope's codec metadata.
            buffers: one C-contiguous buffer per frame (bytes, bytearray, memoryview,
                numpy array, zmq.Frame). Writable buffers are read in place, read-only
                ones through a small bounce buffer (about half the speed for casts).
            shape: the original tensor's shape (from the envelope).
            dtype: the original tensor's dtype (from the envelope).
            out: optional CPU tensor of ``shape`` and ``dtype`` to write into, e.g. a
                gradient buffer; it must not require grad.

        Returns:
            ``out`` when given, else a new tensor of ``shape`` and ``dtype`` (``none``
            may return a view of a writable buffer; see :class:`NoneCodec`).

        Raises:
            CodecError: the message is malformed (checked before anything is allocated),
                or ``out`` has the wrong shape or dtype.
        """

    # --- helpers for subclasses ------------------------------------------------------------

    def _checked_buffers(
        self, meta: dict[str, Any], buffers: Sequence[Buffer], shape: Sequence[int], dtype: torch.dtype
    ) -> list[memoryview]:
        """The buffers as 1-D byte memoryviews, once their count and lengths match ``expected_nbytes``."""
        want = self.expected_nbytes(meta, shape, dtype)
        if not isinstance(buffers, (list, tuple)) or len(buffers) != len(want):
            got = len(buffers) if isinstance(buffers, (list, tuple)) else type(buffers).__name__
            raise CodecError(f"codec {self.spec!r} needs {len(want)} buffers, got {got}")
        views = []
        for i, (buf, n) in enumerate(zip(buffers, want)):
            try:
                mv = memoryview(buf)
                if mv.format != "B" or mv.ndim != 1:
                    mv = mv.cast("B")  # refuses non-contiguous memory
            except (TypeError, ValueError) as exc:
                raise CodecError(f"buffer {i} is not contiguous bytes: {exc}") from None
            if mv.nbytes != n:
                raise CodecError(f"buffer {i} holds {mv.nbytes} bytes; codec {self.spec!r} expects {n}")
            views.append(mv)
        return views

    @staticmethod
    def _check_out(out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype) -> None:
        if out is None:
            return
        if not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != tuple(shape):
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise CodecError(f"out must be a tensor of shape {tuple(shape)} and dtype {dtype}, got {got}")
        if out.device.type != "cpu":
            raise CodecError(f"out must be a CPU tensor, got one on {out.device}")
        if out.requires_grad:
            raise CodecError("out must not require grad; pass out.detach() (decode writes in place)")


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints, without floats."""
    return -(-a // b)

