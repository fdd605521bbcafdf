"""Safetensors blobs in tensors (``p2ptrain.train._blob``): the package's format both ways,
bit-exact round trips, copies that do not alias the message, and every malformed blob refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from p2ptrain.train._blob import BlobError, read_blob, write_blob

TENSORS = {
    "w": torch.randn(3, 5),
    "b16": torch.randn(7, dtype=torch.bfloat16),
    "h": torch.randn(2, 3, dtype=torch.float16),
    "d": torch.randn(4, dtype=torch.float64),
    "step": torch.tensor(12.0),  # 0-dim, as Adam keeps it
    "i": torch.arange(5),
    "i8": torch.tensor([-3, 0, 127], dtype=torch.int8),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
    "t": torch.randn(4, 6).t(),  # not contiguous
}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_is_bit_exact_and_owns_its_memory() -> None:
    blob = write_blob(TENSORS, {"step": "9"})
    got, meta = read_blob(blob)
    _same(got, TENSORS)
    assert meta == {"step": "9"}
    blob.zero_()  # a receive buffer reused: what was read must not change
    _same(got, TENSORS)


def test_the_safetensors_package_reads_it_and_it_reads_the_package() -> None:
    contiguous = {k: v.contiguous() for k, v in TENSORS.items()}
    ours = write_blob(TENSORS, {"units": "0,1"})
    _same(st_load(ours.numpy().tobytes()), contiguous)
    theirs = st_save(contiguous, metadata={"units": "0,1"})
    got, meta = read_blob(torch.frombuffer(bytearray(theirs), dtype=torch.uint8))
    _same(got, contiguous)
    assert meta == {"units": "0,1"}


def test_each_tensor_starts_aligned_for_its_dtype() -> None:
    blob = write_blob({"a": torch.zeros(3, dtype=torch.int8), "b": torch.zeros(2, dtype=torch.float64),
                       "c": torch.zeros(1, dtype=torch.float16)})
    n = int.from_bytes(blob[:8].numpy().tobytes(), "little")
    assert n % 8 == 0
    header = json.loads(blob[8 : 8 + n].numpy().tobytes())
    for entry in header.values():
        size = {"F64": 8, "F16": 2, "I8": 1}[entry["dtype"]]
        assert entry["data_offsets"][0] % size == 0


def _blob(header: dict[str, object], data: bytes) -> torch.Tensor:
    head = json.dumps(header).encode()
    return torch.frombuffer(bytearray(len(head).to_bytes(8, "little") + head + data), dtype=torch.uint8)


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}


@pytest.mark.parametrize("blob, match", [
    (torch.zeros(5, dtype=torch.uint8), "shorter than the header length"),
    (torch.frombuffer(bytearray((1 << 40).to_bytes(8, "little") + b"{}"), dtype=torch.uint8), "longer than the blob"),
    (_blob({}, b"")[:9], "longer than the blob"),
    (torch.frombuffer(bytearray((3).to_bytes(8, "little") + b"{x}"), dtype=torch.uint8), "not JSON"),
    (_blob([], b""), "not a JSON map"),  # type: ignore[arg-type]
    (_blob({"a": _entry(dtype="F8")}, bytes(8)), "unknown dtype"),
    (_blob({"a": _entry(shape=[3])}, bytes(8)), "8 bytes for shape"),
    (_blob({"a": _entry(shape=[-2])}, bytes(8)), "non-negative ints"),
    (_blob({"a": _entry(shape=[True, 2])}, bytes(8)), "non-negative ints"),
    (_blob({"a": _entry(offsets=[0])}, bytes(8)), "data_offsets"),
    (_blob({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "must be a map of"),
    (_blob({"a": _entry(offsets=[4, 12])}, bytes(12)), "hole or an overlap"),
    (_blob({"a": _entry(), "b": _entry()}, bytes(8)), "hole or an overlap"),
    (_blob({"a": _entry()}, bytes(12)), "cover 8 bytes of 12"),
    (_blob({"a": _entry(offsets=[0, 8])}, bytes(4)), "cover 8 bytes of 4"),
    (_blob({"__metadata__": {"step": 3}}, b""), "strings to strings"),
    (torch.frombuffer(bytearray((200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000),
                      dtype=torch.uint8), "not JSON"),  # nesting that would overflow the parser's stack
    (_blob({"a": _entry(shape=[1 << 62, 1 << 62, 0], offsets=[0, 0])}, b""), "too large"),
    (_blob({"a": _entry(shape=[0, 1 << 62, 1 << 62], offsets=[0, 0])}, b""), "too large"),
    (torch.zeros(2, 8, dtype=torch.uint8), "flat uint8"),
])
def test_a_malformed_blob_is_refused_before_anything_is_copied(blob: torch.Tensor, match: str) -> None:
    with pytest.raises(BlobError, match=match):
        read_blob(blob)


def test_the_other_safetensors_dtypes_round_trip() -> None:
    more = {"u16": torch.arange(4).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
            "u64": torch.arange(2).to(torch.uint64), "e4m3": torch.randn(5).to(torch.float8_e4m3fn),
            "e5m2": torch.randn(5).to(torch.float8_e5m2)}
    got, _ = read_blob(write_blob(more))
    for k, t in more.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k


def test_bools_read_back_as_bools_whatever_the_byte() -> None:
    got, _ = read_blob(_blob({"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x00\x07\x01"))
    assert got["m"].tolist() == [False, True, True]


def test_a_dtype_safetensors_lacks_is_refused_on_write() -> None:
    with pytest.raises(BlobError, match="complex64"):
        write_blob({"z": torch.zeros(2, dtype=torch.complex64)})
