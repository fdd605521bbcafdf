"""The safetensors format written into, and read out of, one flat ``uint8`` tensor.

Why not the safetensors package's ``save``/``load``: they give and take ``bytes``. On the
way out a state went tensors -> bytes -> a writable copy to send; on the way in, the
received buffer -> bytes -> tensors: two whole copies each way, each holding the GIL for
tens of milliseconds (measured here: 84 MB packed in 0.15 s, unpacked in 0.10 s, with the
event loop's ticks held up to 46 ms; four times that on a quarter-core member, whose
heartbeats and host loop wait for them). Here each tensor is copied once, by torch
(which releases the GIL), straight into the message or out of it.

The bytes are standard safetensors (https://huggingface.co/docs/safetensors): a u64
little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with spaces, then the
data, which the tensors tile exactly. The package reads what this writes and the other way
round (tested both ways). Reading validates everything before it copies anything; it runs
no code (JSON only).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping

import torch

__all__ = ["BlobError", "read_blob", "write_blob"]

#: A header this long is refused unread (a 15 M-parameter model's takes ~20 KB).
MAX_HEADER_BYTES = 16 << 20
_MAX_NDIM = 64
_MAX_DIM = 1 << 62

#: Elements of a zero-size tensor's other dimensions, at most (torch's element count is an int64).
_MAX_ELEMENTS = 1 << 48

_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPES = {name: dtype for dtype, name in _NAMES.items()}
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


class BlobError(ValueError):
    """A blob that is not valid safetensors, or a tensor that cannot be written as one."""


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def write_blob(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> torch.Tensor:
    """``tensors`` (CPU) and ``metadata`` as one safetensors blob in a new flat ``uint8`` tensor.

    Tensors are laid out by falling element size, then name, so each starts aligned for
    its dtype (the header is padded to 8 bytes, as the package does).

    Raises:
        BlobError: a tensor of a dtype safetensors does not carry, or metadata that is not str -> str.
    """
    if sys.byteorder != "little":  # safetensors data is little-endian; torch writes native order
        raise BlobError("safetensors blobs are little-endian; this host is not")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, object] = {}
    spans: list[tuple[int, int]] = []
    end = 0
    for name, t in items:
        if t.dtype not in _NAMES:
            raise BlobError(f"tensor {name!r} is {t.dtype}; safetensors blobs carry {sorted(_DTYPES)}")
        begin, end = end, end + t.numel() * t.element_size()
        spans.append((begin, end))
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [begin, end]}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise BlobError("safetensors metadata maps strings to strings")
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    out = torch.empty(base + end, dtype=torch.uint8)
    out[:8] = _u8(len(head).to_bytes(8, "little"))
    out[8:base] = _u8(head)
    for (_, t), (begin, stop) in zip(items, spans):
        if stop > begin:
            out[base + begin : base + stop].view(t.dtype).copy_(t.detach().reshape(-1))
    return out


def _ints(value: object, n: int | None, what: str) -> list[int]:
    if not isinstance(value, list) or (n is not None and len(value) != n) or len(value) > _MAX_NDIM or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_DIM for v in value):
        raise BlobError(f"{what} must be a list of {n or 'at most 64'} non-negative ints, got {str(value)[:60]}")
    return value


def read_blob(blob: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors blob held in a flat ``uint8`` tensor.

    Every tensor is a fresh copy (``blob`` may be reused once this returns).

    Raises:
        BlobError: truncated, a header too long or not a JSON map, an entry of the wrong
            form (unknown dtype, a shape that does not match its bytes), tensors that leave
            holes in the data, overlap or run past it.
    """
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise BlobError(f"a blob is a flat uint8 tensor, got {tuple(blob.shape)} {blob.dtype}")
    size = blob.numel()
    if size < 8:
        raise BlobError(f"{size} bytes: shorter than the header length")
    n = int.from_bytes(blob[:8].numpy().tobytes(), "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise BlobError(f"header of {n} bytes: longer than the blob ({size} bytes) or {MAX_HEADER_BYTES}")
    try:
        header = json.loads(blob[8 : 8 + n].numpy().tobytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; nesting can recurse
        raise BlobError(f"header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise BlobError("header is not a JSON map")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BlobError("__metadata__ must map strings to strings")
    entries = []
    for name, e in header.items():
        if not isinstance(e, dict) or e.keys() != _ENTRY_KEYS:
            raise BlobError(f"entry {name[:80]!r} must be a map of {sorted(_ENTRY_KEYS)}")
        dtype = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise BlobError(f"entry {name[:80]!r}: unknown dtype {str(e['dtype'])[:20]!r}")
        shape = _ints(e["shape"], None, f"entry {name[:80]!r}: shape")
        begin, end = _ints(e["data_offsets"], 2, f"entry {name[:80]!r}: data_offsets")
        if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
            raise BlobError(f"entry {name[:80]!r}: shape {str(shape)[:60]} is too large")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise BlobError(f"entry {name[:80]!r}: {end - begin} bytes for shape {shape} of {e['dtype']}")
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda x: (x[0], x[1]))
    at = 0
    for begin, end, name, _, _ in entries:
        if begin != at:
            raise BlobError(f"entry {name[:80]!r} starts at byte {begin}, not {at}: the data has a hole or an overlap")
        at = end
    if at != size - 8 - n:
        raise BlobError(f"the tensors cover {at} bytes of {size - 8 - n} bytes of data")
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    try:
        for begin, end, name, dtype, shape in entries:
            raw = blob[base + begin : base + end].clone()  # a copy of its own, aligned: torch copies without the GIL
            if dtype == torch.bool:
                out[name] = raw.ne(0).reshape(shape)  # torch assumes bools are 0 or 1
            else:
                out[name] = raw.view(dtype).reshape(shape)
    except (RuntimeError, MemoryError) as exc:  # whatever torch refuses is a bad blob, never a crash
        raise BlobError(f"entry {name[:80]!r} cannot be read: {str(exc)[:80]}") from None
    return out, {str(k): v for k, v in meta.items()}
