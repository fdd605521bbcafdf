"""Untrusted input: ``expected_nbytes`` and ``decode`` refuse malformed messages with
CodecError, and nothing else, before allocating anything sized by them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ptrain._errors import CodecError
from p2ptrain.kernels import DTYPES, MAX_NDIM, MAX_NUMEL, check_meta, check_shape, get_codec, tensor_nbytes

SPECS = ["none", "fp16", "bf16", "int8", "int8:3", "topk", "topk:0.5"]


@pytest.mark.parametrize("spec", SPECS)
def test_malformed_meta_is_refused(spec: str) -> None:
    for meta in [None, [], "x", 1, {"k": 1}, {"": None}, {1: 2}, {"scale": 1.0}]:
        with pytest.raises(CodecError, match="meta"):
            get_codec(spec).expected_nbytes(meta, (4,), torch.float32)


BAD_SHAPES = [
    None, "4", 4, {4: 4}, (4.0,), (True,), ("4",), (-1,), (4, -1), (None,),
    (MAX_NUMEL + 1,), (1 << 30, 1 << 30), (1 << 21,) * 3, (1,) * (MAX_NDIM + 1), (2**64,),
]


@pytest.mark.parametrize("spec", SPECS)
def test_malformed_shape_is_refused(spec: str) -> None:
    for shape in BAD_SHAPES:
        with pytest.raises(CodecError, match="shape"):
            get_codec(spec).expected_nbytes({}, shape, torch.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_bad_dtype_is_refused(spec: str) -> None:
    for dtype in ["float32", None, torch.complex64, torch.uint16, float, 7]:
        with pytest.raises(CodecError, match="dtype"):
            get_codec(spec).expected_nbytes({}, (4,), dtype)
        with pytest.raises(CodecError, match="dtype"):
            get_codec(spec).encode(torch.zeros(4, dtype=torch.complex64))


@pytest.mark.parametrize("spec", [s for s in SPECS if s != "none"])
def test_lossy_codecs_need_float_dtypes(spec: str) -> None:
    codec = get_codec(spec)
    for dtype in [torch.int32, torch.bool, torch.uint8]:
        with pytest.raises(CodecError, match="float"):
            codec.expected_nbytes({}, (4,), dtype)
        with pytest.raises(CodecError, match="float"):
            codec.encode(torch.zeros(4, dtype=dtype))


def test_huge_shapes_are_sized_not_allocated() -> None:
    # Sizes near MAX_NUMEL are computed (so the transport can compare frame lengths)
    # without allocating anything.
    shape = (1 << 20, 1 << 20)
    assert get_codec("none").expected_nbytes({}, shape, torch.float64) == [8 << 40]
    assert get_codec("int8").expected_nbytes({}, shape, torch.float32) == [1 << 40, 4 << 32]
    assert get_codec("topk:0.5").expected_nbytes({}, shape, torch.float16) == [8 << 39, 2 << 39]
    assert tensor_nbytes(shape, torch.float32) == 4 << 40


@pytest.mark.parametrize("spec", SPECS)
def test_decode_checks_buffers_before_anything_else(spec: str) -> None:
    codec = get_codec(spec)
    x = torch.randn(300)
    enc = codec.encode(x)
    good = [bytes(b) for b in enc.buffers]
    with pytest.raises(CodecError, match="buffers"):
        codec.decode({}, good[:-1], (300,), torch.float32)
    with pytest.raises(CodecError, match="buffers"):
        codec.decode({}, good + [b""], (300,), torch.float32)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode({}, [g + b"\0" for g in good], (300,), torch.float32)
    with pytest.raises(CodecError, match="bytes"):  # frames sized for 300, envelope says 10**12
        codec.decode({}, good, (10**6, 10**6), torch.float32)
    with pytest.raises(CodecError):
        codec.decode({}, [object()] * len(good), (300,), torch.float32)
    with pytest.raises(CodecError, match="out"):
        codec.decode({}, good, (300,), torch.float32, out=torch.empty(301))
    with pytest.raises(CodecError, match="out"):
        codec.decode({}, good, (300,), torch.float32, out=torch.empty(300, dtype=torch.float64))


def test_topk_indices_out_of_range_are_refused() -> None:
    codec = get_codec("topk:0.5")
    values = torch.ones(2).numpy().tobytes()
    for idx in ([0, 4], [-1, 0], [2**31 - 1, 0]):
        with pytest.raises(CodecError, match="index out of range"):
            codec.decode({}, [torch.tensor(idx, dtype=torch.int32).numpy().tobytes(), values], (4,), torch.float32)


def test_check_helpers() -> None:
    assert check_shape(torch.Size([2, 3])) == 6
    assert check_shape([]) == 1
    assert check_meta({"a": 1}, {"a": int}) == {"a": 1}
    with pytest.raises(CodecError):
        check_meta({"a": True}, {"a": int})
    with pytest.raises(CodecError):
        check_meta({"a": 1, "b": 2}, {"a": int})


# --- fuzzing ----------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.text(max_size=8), st.binary(max_size=8),
)
_meta = st.one_of(
    st.just({}),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), _scalars, max_size=3),
    _scalars,
    st.lists(_scalars, max_size=3),
)
_dim = st.one_of(st.integers(min_value=0, max_value=40), st.integers(min_value=-(2**66), max_value=2**66), _scalars)
_shape = st.one_of(st.lists(_dim, max_size=4), st.tuples(_dim, _dim), _scalars)
_dtype = st.one_of(st.sampled_from(list(DTYPES.values())), st.sampled_from([torch.complex64, torch.uint16, "float32", None, 3]))
_buffers = st.one_of(
    st.lists(st.one_of(st.binary(max_size=300), st.builds(bytearray, st.binary(max_size=300))), max_size=3),
    _scalars,
)

# One test per property with the spec drawn too: hypothesis spends its budget where it
# finds variety, and the suite stays fast on the 2-core CI box.
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@_FUZZ
@given(spec=st.sampled_from(SPECS), meta=_meta, shape=_shape, dtype=_dtype, buffers=_buffers)
def test_fuzz_only_codec_errors(spec: str, meta: Any, shape: Any, dtype: Any, buffers: Any) -> None:
    codec = get_codec(spec)
    try:
        sizes = codec.expected_nbytes(meta, shape, dtype)
    except CodecError:
        sizes = None
    else:
        assert all(isinstance(n, int) and n >= 0 for n in sizes)
    try:
        y = codec.decode(meta, buffers, shape, dtype)
    except CodecError:
        return
    # Accepted: the message was well formed and the result has the envelope's form.
    assert sizes is not None and [len(b) for b in buffers] == sizes
    assert tuple(y.shape) == tuple(shape) and y.dtype == dtype


@_FUZZ
@given(spec=st.sampled_from(SPECS), shape=st.lists(st.integers(min_value=0, max_value=9), max_size=3), dtype=_dtype, data=st.data())
def test_fuzz_well_sized_random_bytes_decode(spec: str, shape: list[int], dtype: Any, data: st.DataObject) -> None:
    codec = get_codec(spec)
    try:
        sizes = codec.expected_nbytes({}, shape, dtype)
    except CodecError:
        return
    buffers = [data.draw(st.binary(min_size=n, max_size=n)) for n in sizes]
    try:
        y = codec.decode({}, buffers, shape, dtype)
    except CodecError as exc:
        assert "topk index out of range" in str(exc)  # the only content check there is
        return
    assert tuple(y.shape) == tuple(shape) and y.dtype == dtype
