"""Round trips of every codec: exactness of ``none``, error bounds of the lossy codecs,
odd shapes (0-dim, empty, non-contiguous, tails), ``out=``, read-only buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2ptrain.kernels import DTYPES, Codec, Encoded, get_codec

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(), (0,), (3, 0), (1,), (257,), (4, 300)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=_gen(seed)).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=_gen(seed), dtype=torch.int64).to(dtype)
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _roundtrip(codec: Codec, x: torch.Tensor, *, readonly: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    enc = codec.encode(x)
    assert isinstance(enc, Encoded)
    assert codec.expected_nbytes(enc.meta, tuple(x.shape), x.dtype) == [memoryview(b).nbytes for b in enc.buffers]
    bufs = [bytes(b) for b in enc.buffers] if readonly else enc.buffers
    y = codec.decode(enc.meta, bufs, tuple(x.shape), x.dtype, out=out)
    assert y.shape == x.shape and y.dtype == x.dtype
    return y


def _rel_l2(y: torch.Tensor, x: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(y.double() - x.double()) / torch.linalg.vector_norm(x.double())).item()


# --- none -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "readonly"])
def test_none_is_exact_for_every_wire_dtype(dtype: torch.dtype, readonly: bool) -> None:
    for shape in [(), (0,), (5,), (3, 4)]:
        x = _values(shape, dtype)
        y = _roundtrip(get_codec("none"), x, readonly=readonly)
        assert torch.equal(y.reshape(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8)), shape  # bit for bit


def test_none_encode_is_zero_copy_and_decode_aliases_writable_buffers() -> None:
    codec = get_codec("none")
    x = torch.arange(10, dtype=torch.float32)
    enc = codec.encode(x)
    (buf,) = enc.buffers
    assert buf.format == "B" and buf.nbytes == 40
    x[0] = 42.0  # the buffer aliases the tensor
    assert memoryview(buf).cast("f")[0] == 42.0
    frame = bytearray(bytes(buf))
    y = codec.decode({}, [frame], (10,), torch.float32)
    frame[0:4] = bytes(4)  # writable buffer: decode returned a view of it
    assert y[0] == 0.0
    z = codec.decode({}, [bytes(buf)], (10,), torch.float32)  # read-only: a copy
    assert z[0] == 42.0


def test_none_non_contiguous_input_and_out() -> None:
    x = torch.randn(6, 5, generator=_gen()).t()
    assert not x.is_contiguous()
    codec = get_codec("none")
    assert torch.equal(_roundtrip(codec, x), x)
    out = torch.empty(6, 5).t()
    assert _roundtrip(codec, x, out=out, readonly=True) is out
    assert torch.equal(out, x)
    out2 = torch.empty(5, 6)
    assert _roundtrip(codec, x, out=out2) is out2
    assert torch.equal(out2, x)


def test_none_bool_normalises_bytes() -> None:
    y = get_codec("none").decode({}, [bytes([0, 1, 2, 255])], (4,), torch.bool)
    assert y.tolist() == [False, True, True, True]


def test_encode_does_not_need_grad_free_tensors() -> None:
    x = torch.randn(10, requires_grad=True)
    for spec in ("none", "fp16", "int8", "topk"):
        get_codec(spec).encode(x)


# --- fp16 / bf16 ------------------------------------------------------------------------


@pytest.mark.parametrize("spec,bound", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cast_error_bound(spec: str, bound: float, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        x = _values(shape, dtype)
        y = _roundtrip(get_codec(spec), x)
        # Relative error per element (values away from fp16's subnormal range).
        assert torch.all((y.double() - x.double()).abs() <= bound * x.double().abs() + 1e-7), shape


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_cast_readonly_buffers_and_out(spec: str) -> None:
    codec = get_codec(spec)
    x = torch.randn(3 * 2**18 + 5, generator=_gen())  # several bounce chunks plus a tail
    a = _roundtrip(codec, x)
    b = _roundtrip(codec, x, readonly=True)
    out = torch.empty_like(x)
    c = _roundtrip(codec, x, readonly=True, out=out)
    assert c is out
    assert torch.equal(a, b) and torch.equal(a, c)


def test_fp16_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), 65504.0, 1.0])
    y = _roundtrip(get_codec("fp16"), x)
    assert y.tolist() == [65504.0, -65504.0, 65504.0, -65504.0, 65504.0, 1.0]
    assert torch.isnan(_roundtrip(get_codec("fp16"), torch.tensor([float("nan")]))).all()


# --- int8 -------------------------------------------------------------------------------


def test_int8_gaussian_error_under_one_percent_at_block_256() -> None:
    x = torch.randn(1 << 20, generator=_gen())
    codec = get_codec("int8")
    enc = codec.encode(x)
    assert enc.nbytes == x.numel() + 4 * x.numel() // 256
    y = codec.decode(enc.meta, enc.buffers, x.shape, x.dtype)
    assert _rel_l2(y, x) < 0.01


@pytest.mark.parametrize("block", [1, 7, 256, 1000])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_int8_per_element_bound_with_tails(block: int, dtype: torch.dtype) -> None:
    for shape in [(), (0,), (7,), (257,), (2, 3, 129)]:
        x = _values(shape, dtype) * 3
        y = _roundtrip(get_codec(f"int8:{block}"), x)
        xs, ys = x.reshape(-1).double(), y.reshape(-1).double()
        # The documented bound, block by block (tail included): |error| <= absmax / 254.
        blk = torch.arange(xs.numel()) // block
        absmax = torch.zeros(-(-xs.numel() // block), dtype=torch.float64).scatter_reduce_(0, blk, xs.abs(), "amax")
        bound = absmax[blk] / 254 * (1 + 1e-5)
        if dtype in (torch.float16, torch.bfloat16):
            bound = bound + 2 * 2.0**-8 * xs.abs()  # decoded values are rounded to the input dtype
        assert torch.all((xs - ys).abs() <= bound), shape


def test_int8_zero_blocks_and_tiny_values_stay_finite() -> None:
    x = torch.zeros(1000)
    x[600:610] = 1e-38  # subnormal-ish block: scale is clamped, no inf / NaN
    x[900] = 3.0
    y = _roundtrip(get_codec("int8:256"), x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:512], torch.zeros(512))
    assert y[900] == 3.0


def test_int8_non_finite_block_decodes_to_nan_others_intact() -> None:
    x = torch.ones(512)
    x[3] = float("inf")
    y = _roundtrip(get_codec("int8:256"), x)
    assert torch.isnan(y[:256]).all()
    assert torch.equal(y[256:], torch.ones(256))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_int8_decode_into_out_and_readonly(dtype: torch.dtype) -> None:
    codec = get_codec("int8:128")
    x = _values((3, 2**18 // 3 + 77), dtype)
    ref = _roundtrip(codec, x)
    out = torch.empty(x.shape[1], x.shape[0], dtype=dtype).t()  # non-contiguous out
    assert _roundtrip(codec, x, out=out, readonly=True) is out
    assert torch.equal(out, ref)
    out2 = torch.empty_like(x)
    assert _roundtrip(codec, x, out=out2) is out2
    assert torch.equal(out2, ref)


def test_int8_non_contiguous_input() -> None:
    x = torch.randn(300, 200, generator=_gen()).t()
    codec = get_codec("int8")
    assert torch.equal(_roundtrip(codec, x), _roundtrip(codec, x.contiguous()))


# --- topk -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 99, 1000, 5000, 300_001])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 1.0])
def test_topk_keeps_exactly_the_top_k(n: int, fraction: float) -> None:
    codec = get_codec(f"topk:{fraction}")
    x = torch.randn(n, generator=_gen(n))
    enc = codec.encode(x)
    k = codec.k_for(n)  # type: ignore[attr-defined]
    assert k == min(n, max(1, -(-int(fraction * 10**6) * n // 10**6)))
    idx = torch.frombuffer(bytearray(bytes(enc.buffers[0])), dtype=torch.int32).long()
    assert idx.numel() == k and idx.unique().numel() == k
    y = codec.decode(enc.meta, enc.buffers, x.shape, x.dtype)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx] = True
    assert torch.equal(y[kept], x[kept])  # kept values arrive exactly
    assert (y[~kept] == 0).all()
    if k < n:
        assert x[~kept].abs().max() <= x[kept].abs().min()


def test_topk_ties_and_sparse_input() -> None:
    x = torch.zeros(1 << 19)
    x[::1000] = 1.0  # fewer non-zeros than k: the rest of the top-k are zeros
    codec = get_codec("topk:0.01")
    y = _roundtrip(codec, x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_topk_dtypes_out_and_readonly(dtype: torch.dtype) -> None:
    codec = get_codec("topk:0.05")
    x = _values((40, 50), dtype)
    ref = _roundtrip(codec, x)
    assert (ref != 0).sum() == 100
    out = torch.full((50, 40), 7.0, dtype=dtype).t()
    assert _roundtrip(codec, x, out=out, readonly=True) is out
    assert torch.equal(out, ref)
    out2 = torch.full_like(x, 7.0)
    assert _roundtrip(codec, x, out=out2) is out2
    assert torch.equal(out2, ref)


def test_topk_empty_and_scalar() -> None:
    codec = get_codec("topk")
    assert _roundtrip(codec, torch.empty(0, 4)).shape == (0, 4)
    assert _roundtrip(codec, torch.tensor(2.5)).item() == 2.5


# --- output memory ----------------------------------------------------------------------


def _address(buf: object) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "topk"])
def test_held_buffers_never_change_and_dropped_ones_are_reused(spec: str) -> None:
    codec = get_codec(spec)
    x1 = torch.randn(10_000, generator=_gen(1))
    x2 = torch.randn(10_000, generator=_gen(2))
    first = codec.encode(x1)
    snapshot = [bytes(b) for b in first.buffers]
    second = codec.encode(x2)  # `first` is still held: must not be overwritten
    assert [bytes(b) for b in first.buffers] == snapshot
    assert [bytes(b) for b in second.buffers] != snapshot
    address = _address(second.buffers[0])
    del first, second
    third = codec.encode(x1)
    assert [bytes(b) for b in third.buffers] == snapshot
    if spec != "topk":  # topk's small outputs are fresh tensors; the others reuse memory
        assert _address(third.buffers[0]) == address


def test_codecs_compare_by_spec() -> None:
    assert get_codec("int8") == get_codec("int8:256")
    assert get_codec("int8:128") != get_codec("int8:256")
    assert len({get_codec("fp16"), get_codec("fp16"), get_codec("bf16")}) == 2
    assert "int8:256" in repr(get_codec("int8"))
