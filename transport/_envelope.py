"""The msgpack envelope: what frame 0 of every message says, and its strict validation.

A message is a ZeroMQ multipart: frame 0 is this envelope, then the raw bytes of each
tensor buffer, split into frames of at most ``f`` bytes (the envelope declares ``f``).

Envelope (a msgpack map with exactly these keys)::

    {"v": PROTOCOL_VERSION, "c": cluster, "s": sender, "e": epoch, "k": kind,
     "t": tag, "m": meta, "f": frame_bytes,
     "x": [{"d": dtype name, "s": shape, "c": codec spec, "m": codec meta,
            "n": [byte length of each buffer]}, ...]}

Pure functions, no sockets: the endpoint and the fake network both call them, so the
fakes exercise the same rules as the wire. Every rule broken raises a
:class:`ProtocolError` whose ``reason`` names the drop counter it feeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from p2ptrain._errors import CodecError, ConfigError, ProtocolError
from p2ptrain.kernels import Codec, dtype_from_name, dtype_name
from p2ptrain.kernels import get_codec as _registry

__all__ = [
    "PROTOCOL_VERSION",
    "Envelope",
    "Limits",
    "Message",
    "TensorHeader",
    "decode_envelope",
    "pack_envelope",
    "rejected",
    "validate_meta",
    "validate_tag",
]

#: Bumped whenever the envelope's keys or the framing change; peers on another version
#: are dropped and counted (``wrong_version``), never half-understood.
PROTOCOL_VERSION = 1

_KiB = 1 << 10
_MiB = 1 << 20
_GiB = 1 << 30

_ENVELOPE_KEYS = frozenset("vcsektmfx")
_TENSOR_KEYS = frozenset("dscmn")
_INT64_MAX = (1 << 63) - 1
# Tag rules match p2ptrain.ring._mailbox.freeze_tag (depth 4, 16 items per list).
_TAG_DEPTH = 4
_TAG_ITEMS = 16


@dataclass(frozen=True)
class Limits:
    """What a peer may send; anything beyond is dropped before memory is committed.

    Attributes:
        max_envelope_bytes: size of frame 0 (64 KiB holds ~1000 metadata entries).
        max_tensors: tensors per message.
        max_ndim: dimensions per tensor.
        max_tensor_bytes: bytes of one tensor, on the wire and decoded.
        max_message_bytes: bytes of all tensor buffers of one message.
        max_meta_entries: entries of any msgpack map or array in the envelope.
        max_meta_depth: nesting depth of ``meta`` values.
        max_str_bytes: length of any string or bytes value in the envelope.
        max_id_bytes: length of a node id or cluster name (ZeroMQ routing ids are at
            most 255 bytes).
        max_kind_bytes: length of a message kind.
        max_buffers: buffers per tensor (a codec's values, scales, indices ...).
        frame_bytes: largest raw frame this side sends or accepts. 1 MiB frames measured
            ~3.6 GB/s over tcp loopback against ~1.35 GB/s for one 64 MiB frame
            (DESIGN.md): cache-sized frames pay off ~2.5x.
    """

    max_envelope_bytes: int = 64 * _KiB
    max_tensors: int = 64
    max_ndim: int = 8
    max_tensor_bytes: int = 2 * _GiB
    max_message_bytes: int = 4 * _GiB
    max_meta_entries: int = 256
    max_meta_depth: int = 8
    max_str_bytes: int = 16 * _KiB
    max_id_bytes: int = 128
    max_kind_bytes: int = 64
    max_buffers: int = 8
    frame_bytes: int = 1 * _MiB

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_id_bytes > 255:
            raise ConfigError(f"Limits.max_id_bytes={self.max_id_bytes} exceeds ZeroMQ's 255-byte routing ids")
        if self.max_envelope_bytes > 16 * _MiB:
            raise ConfigError(f"Limits.max_envelope_bytes={self.max_envelope_bytes} is beyond 16 MiB; keep envelopes small")


@dataclass
class Message:
    """One delivered message.

    Attributes:
        sender: node id of the peer (checked against the transport's peer identity).
        kind: what the message is, e.g. ``"hb"`` or ``"grad"``.
        epoch: the membership view epoch the sender was in.
        tag: msgpack scalar or (nested, short) list of scalars, e.g. ``[step, chunk]``.
        meta: small msgpack map.
        tensors: decoded tensors, in the order sent.
        nbytes: bytes the tensors took on the wire.
        landed: the tensor this message's payload was received into (added or copied,
            see ``_landing``); then ``tensors`` is empty.
    """

    sender: str
    kind: str
    epoch: int = 0
    tag: Any = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0
    landed: torch.Tensor | None = None


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in the envelope, validated.

    Attributes:
        dtype: the decoded tensor's dtype.
        shape: the decoded tensor's shape.
        codec: a fresh codec instance for ``spec``, ready to decode.
        codec_meta: what the codec needs besides the buffers.
        nbytes: byte length of each buffer, checked against ``codec.expected_nbytes``.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: Codec
    codec_meta: dict[str, Any]
    nbytes: tuple[int, ...]


@dataclass(frozen=True)
class Envelope:
    """A validated frame 0."""

    cluster: str
    sender: str
    epoch: int
    kind: str
    tag: Any
    meta: dict[str, Any]
    frame_bytes: int
    tensors: tuple[TensorHeader, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensor buffers that must follow."""
        return sum(sum(h.nbytes) for h in self.tensors)

    def frame_count(self) -> int:
        """How many raw frames must follow (the length of :meth:`frame_lengths`, without building it)."""
        f = self.frame_bytes
        return sum(-(-n // f) for h in self.tensors for n in h.nbytes)

    def frame_lengths(self) -> list[int]:
        """The exact length of every raw frame that must follow, in order."""
        out: list[int] = []
        f = self.frame_bytes
        for h in self.tensors:
            for n in h.nbytes:
                full, rest = divmod(n, f)
                out.extend([f] * full)
                if rest:
                    out.append(rest)
        return out


class _Rejected(ProtocolError):
    """A :class:`ProtocolError` that names its drop counter in ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def rejected(reason: str, message: str) -> ProtocolError:
    """A :class:`ProtocolError` carrying ``reason`` (the drop counter's name)."""
    return _Rejected(reason, message)


def reason_of(exc: BaseException) -> str:
    """The drop counter for ``exc`` (``"invalid"`` for an unlabelled error)."""
    return getattr(exc, "reason", "invalid")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_str(value: object, what: str, max_bytes: int, reason: str) -> str:
    if not isinstance(value, str) or not value:
        raise rejected(reason, f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise rejected(reason, f"{what} {value[:40]!r}... is longer than {max_bytes} bytes")
    return value


def validate_tag(tag: Any, _depth: int = 0) -> None:
    """Check a tag: a msgpack scalar, or a list (depth <= 4, <= 16 items) of them.

    Raises:
        ProtocolError: reason ``bad_tag``.
    """
    if tag is None or isinstance(tag, (bool, int, float, str, bytes)):
        if isinstance(tag, (str, bytes)) and len(tag) > 256:
            raise rejected("bad_tag", f"tag string of {len(tag)} chars is longer than 256")
        return
    if isinstance(tag, (list, tuple)):
        if _depth >= _TAG_DEPTH or len(tag) > _TAG_ITEMS:
            raise rejected("bad_tag", f"tag nests deeper than {_TAG_DEPTH} or holds more than {_TAG_ITEMS} items")
        for t in tag:
            validate_tag(t, _depth + 1)
        return
    raise rejected("bad_tag", f"tag of type {type(tag).__name__} cannot travel; use int/str/bytes/float/None or a list")


_INT_MIN, _INT_END = -(1 << 63), 1 << 64  # msgpack's ints: int64 and uint64


def _too_long(text: str, max_bytes: int) -> bool:
    """True when ``text`` takes more than ``max_bytes`` in UTF-8 (what msgpack's receiver limits)."""
    n = len(text)
    return n > max_bytes or (4 * n > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes)


def _meta_fits(meta: Any, limits: Limits) -> bool:
    """True when ``meta`` passes :func:`validate_meta`'s rules, checked without building its error paths.

    Every heartbeat is checked twice (sent and received): the walk that names the bad path
    cost 17 us for one here, this one 5 us. It accepts only exact builtin types, so False
    may also mean a subclass, which the full walk then judges.
    """
    max_depth, max_entries, max_str = limits.max_meta_depth, limits.max_meta_entries, limits.max_str_bytes
    stack = [(meta, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        t = type(v)
        if t is str:
            if _too_long(v, max_str):
                return False
        elif t is bytes:
            if len(v) > max_str:
                return False
        elif t is int:
            if not _INT_MIN <= v < _INT_END:
                return False
        elif t is dict:
            if len(v) > max_entries or (v and depth >= max_depth):  # its values would nest too deep
                return False
            for k, x in v.items():
                if type(k) is not str or _too_long(k, max_str):
                    return False
                push((x, depth + 1))
        elif t is list or t is tuple:
            if len(v) > max_entries or (v and depth >= max_depth):
                return False
            for x in v:
                push((x, depth + 1))
        elif not (v is None or t is bool or t is float):
            return False
    return True


def validate_meta(meta: Any, limits: Limits, *, reason: str = "bad_meta", path: str = "meta") -> None:
    """Check a metadata map: str keys; None/bool/int/float/str/bytes, lists and maps as values.

    Raises:
        ProtocolError: with ``reason`` (``bad_meta`` by default), naming the bad path
            (from ``path``, what ``meta`` is called).
    """
    if not _meta_fits(meta, limits):
        _walk_meta(meta, limits, reason, 0, path)


def _walk_meta(meta: Any, limits: Limits, reason: str, _depth: int, _path: str) -> None:
    """:func:`validate_meta`'s rules, raising with the path of the first value that breaks one."""
    if _depth > limits.max_meta_depth:
        raise rejected(reason, f"{_path} nests deeper than {limits.max_meta_depth}")
    if isinstance(meta, dict):
        if len(meta) > limits.max_meta_entries:
            raise rejected(reason, f"{_path} has {len(meta)} entries, more than {limits.max_meta_entries}")
        for k, v in meta.items():
            if not isinstance(k, str):
                raise rejected(reason, f"{_path} key {k!r:.40} is not a string")
            if _too_long(k, limits.max_str_bytes):
                raise rejected(reason, f"{_path} key {k[:40]!r}... is longer than {limits.max_str_bytes} bytes")
            _walk_meta(v, limits, reason, _depth + 1, f"{_path}[{k[:40]!r}]")
    elif isinstance(meta, (list, tuple)):
        if len(meta) > limits.max_meta_entries:
            raise rejected(reason, f"{_path} has {len(meta)} items, more than {limits.max_meta_entries}")
        for i, v in enumerate(meta):
            _walk_meta(v, limits, reason, _depth + 1, f"{_path}[{i}]")
    elif meta is None or isinstance(meta, (bool, float)):
        pass
    elif isinstance(meta, int):
        if not _INT_MIN <= meta < _INT_END:
            raise rejected(reason, f"{_path} = {meta} does not fit msgpack's 64-bit ints")
    elif isinstance(meta, str):
        if _too_long(meta, limits.max_str_bytes):
            raise rejected(reason, f"{_path} is longer than {limits.max_str_bytes} bytes in UTF-8")
    elif isinstance(meta, bytes):
        if len(meta) > limits.max_str_bytes:
            raise rejected(reason, f"{_path} is {len(meta)} bytes, more than {limits.max_str_bytes}")
    else:
        raise rejected(reason, f"{_path} of type {type(meta).__name__} cannot travel; use int/float/str/bytes/list/dict")


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _unpack(frame: Any, limits: Limits) -> Any:
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_str_bytes,
            max_array_len=limits.max_meta_entries,
            max_map_len=limits.max_meta_entries,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, StackError, FormatError, UnicodeDecodeError ...
        raise rejected("bad_msgpack", f"envelope is not valid msgpack within limits ({type(exc).__name__}: {exc})") from exc


def _header(raw: Any, i: int, limits: Limits, get_codec: Callable[[str], Codec]) -> TensorHeader:
    if not isinstance(raw, dict) or raw.keys() != _TENSOR_KEYS:
        raise rejected("bad_envelope", f"tensor {i} header must be a map with keys {sorted(_TENSOR_KEYS)}")
    name = raw["d"]
    try:
        dtype = dtype_from_name(name)
    except CodecError as exc:
        raise rejected("unknown_dtype", f"tensor {i}: {exc}") from exc
    shape = raw["s"]
    if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(_is_int(d) and 0 <= d <= _INT64_MAX for d in shape):
        raise rejected("bad_shape", f"tensor {i}: shape {shape!r:.80} must be at most {limits.max_ndim} non-negative ints")
    itemsize = dtype.itemsize
    decoded = math.prod(shape) * itemsize
    if decoded > limits.max_tensor_bytes:
        raise rejected("too_large", f"tensor {i}: shape {shape} of {name} is {decoded} bytes, over {limits.max_tensor_bytes}")
    nbytes = raw["n"]
    if not isinstance(nbytes, list) or len(nbytes) > limits.max_buffers or not all(_is_int(n) and n >= 0 for n in nbytes):
        raise rejected("bad_lengths",
                       f"tensor {i}: buffer lengths {nbytes!r:.80} must be at most {limits.max_buffers} non-negative ints")
    if sum(nbytes) > limits.max_tensor_bytes:
        raise rejected("too_large", f"tensor {i}: buffers total {sum(nbytes)} bytes, over {limits.max_tensor_bytes}")
    spec = raw["c"]
    if not isinstance(spec, str) or not 0 < len(spec) <= 64:
        raise rejected("unknown_codec", f"tensor {i}: codec spec {spec!r:.80} is not a short string")
    try:
        codec = get_codec(spec)
    except Exception as exc:  # the registry raises CodecError; anything else is also "unknown"
        raise rejected("unknown_codec", f"tensor {i}: unknown codec {spec!r}: {exc}") from exc
    cmeta = raw["m"]
    if not isinstance(cmeta, dict):
        raise rejected("bad_codec_meta", f"tensor {i}: codec meta must be a map, got {type(cmeta).__name__}")
    if cmeta:  # the plain codec's is empty
        validate_meta(cmeta, limits, reason="bad_codec_meta", path=f"tensor {i} codec meta")
    try:
        expected = [int(n) for n in codec.expected_nbytes(cmeta, tuple(shape), dtype)]
    except Exception as exc:  # CodecError by contract; a buggy codec must not kill the reader either
        raise rejected("bad_codec_meta", f"tensor {i}: codec {spec!r} rejects its meta: {exc}") from exc
    if expected != nbytes:
        raise rejected("length_mismatch", f"tensor {i}: codec {spec!r} expects buffers of {expected} bytes "
                                          f"for shape {shape} {name}, envelope declares {nbytes}")
    return TensorHeader(dtype, tuple(shape), codec, cmeta, tuple(nbytes))


def decode_envelope(frame: Any, limits: Limits, cluster: str, *, get_codec: Callable[[str], Codec] | None = None) -> Envelope:
    """Parse and validate frame 0.

    Args:
        frame: the raw bytes (bytes, bytearray or memoryview).
        limits: this side's limits.
        cluster: this side's cluster id; another cluster's message is refused.
        get_codec: codec registry (``p2ptrain.kernels.get_codec`` by default).

    Returns:
        The validated envelope, with a fresh codec per tensor.

    Raises:
        ProtocolError: any rule broken; ``reason`` names the drop counter.
    """
    if get_codec is None:
        get_codec = _registry
    size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
    if size > limits.max_envelope_bytes:
        raise rejected("envelope_too_large", f"envelope of {size} bytes exceeds {limits.max_envelope_bytes}")
    raw = _unpack(frame, limits)
    if not isinstance(raw, dict):
        raise rejected("bad_envelope", f"envelope must be a msgpack map, got {type(raw).__name__}")
    if raw.get("v") != PROTOCOL_VERSION or isinstance(raw.get("v"), bool):
        raise rejected("wrong_version", f"protocol version {raw.get('v')!r:.40}, this side speaks {PROTOCOL_VERSION}")
    if raw.get("c") != cluster:
        raise rejected("wrong_cluster", f"cluster {raw.get('c')!r:.80} is not {cluster!r}")
    if raw.keys() != _ENVELOPE_KEYS:
        raise rejected("bad_envelope", f"envelope keys {sorted(map(str, raw))} are not {sorted(_ENVELOPE_KEYS)}")
    sender = _check_str(raw["s"], "sender", limits.max_id_bytes, "bad_envelope")
    kind = _check_str(raw["k"], "kind", limits.max_kind_bytes, "bad_kind")
    epoch = raw["e"]
    if not _is_int(epoch) or not 0 <= epoch <= _INT64_MAX:
        raise rejected("bad_epoch", f"epoch {epoch!r:.40} must be an int in [0, 2**63)")
    validate_tag(raw["t"])
    if not isinstance(raw["m"], dict):
        raise rejected("bad_meta", f"meta must be a map, got {type(raw['m']).__name__}")
    validate_meta(raw["m"], limits)
    f = raw["f"]
    if not _is_int(f) or not 1 <= f <= _INT64_MAX:
        raise rejected("bad_frame_size", f"frame size {f!r:.40} must be a positive int")
    xs = raw["x"]
    if not isinstance(xs, list) or len(xs) > limits.max_tensors:
        raise rejected("too_many_tensors", f"tensor list {type(xs).__name__} must hold at most {limits.max_tensors}")
    headers = tuple(_header(x, i, limits, get_codec) for i, x in enumerate(xs))
    # Only frames that really occur must fit this side's frame limit: a peer configured
    # with bigger frames can still send small messages here.
    largest = max((n for h in headers for n in h.nbytes), default=0)
    if min(f, largest) > limits.frame_bytes:
        raise rejected("bad_frame_size", f"frames of {min(f, largest)} bytes exceed this side's {limits.frame_bytes}")
    total = sum(sum(h.nbytes) for h in headers)
    if total > limits.max_message_bytes:
        raise rejected("too_large", f"message carries {total} bytes, over {limits.max_message_bytes}")
    return Envelope(cluster, sender, epoch, kind, raw["t"], raw["m"], f, headers)


def pack_envelope(
    *,
    sender: str,
    cluster: str,
    kind: str,
    epoch: int,
    tag: Any,
    meta: dict[str, Any],
    headers: Sequence[dict[str, Any]],
    limits: Limits,
) -> bytes:
    """Validate an outbound envelope with the receiver's rules and pack it.

    ``headers`` are the wire maps ``{"d", "s", "c", "m", "n"}`` of each tensor.

    Raises:
        ProtocolError: the message would be refused by a peer with the same limits.
    """
    _check_str(sender, "sender", limits.max_id_bytes, "bad_envelope")
    _check_str(cluster, "cluster", limits.max_id_bytes, "bad_envelope")
    _check_str(kind, "kind", limits.max_kind_bytes, "bad_kind")
    if not _is_int(epoch) or not 0 <= epoch <= _INT64_MAX:
        raise rejected("bad_epoch", f"epoch {epoch!r} must be an int in [0, 2**63)")
    validate_tag(tag)
    if not isinstance(meta, dict):
        raise rejected("bad_meta", f"meta must be a dict, got {type(meta).__name__}")
    validate_meta(meta, limits)
    if len(headers) > limits.max_tensors:
        raise rejected("too_many_tensors", f"{len(headers)} tensors in one message, the limit is {limits.max_tensors}")
    for h in headers:
        if h["m"]:  # the plain codec's is empty
            validate_meta(h["m"], limits, reason="bad_codec_meta", path=f"codec {h['c']!r} meta")
    env = {"v": PROTOCOL_VERSION, "c": cluster, "s": sender, "e": epoch, "k": kind, "t": tag, "m": meta,
           "f": limits.frame_bytes, "x": list(headers)}
    try:
        frame: bytes = msgpack.packb(env, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise rejected("bad_meta", f"envelope cannot be packed: {exc}") from exc
    if len(frame) > limits.max_envelope_bytes:
        raise rejected("envelope_too_large",
                       f"envelope packs to {len(frame)} bytes, over {limits.max_envelope_bytes}; move data into tensors")
    return frame


def wire_header(tensor: torch.Tensor, codec: Codec, meta: dict[str, Any], nbytes: Sequence[int]) -> dict[str, Any]:
    """The envelope map of one encoded tensor."""
    return {"d": dtype_name(tensor.dtype), "s": list(tensor.shape), "c": codec.spec, "m": meta, "n": list(nbytes)}
