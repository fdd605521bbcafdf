"""Error feedback: nothing a lossy codec drops is lost, only delayed."""

from __future__ import annotations

import pytest
import torch

from p2ptrain._errors import CodecError
from p2ptrain.kernels import ErrorFeedback, get_codec

LOSSY = ["fp16", "bf16", "int8", "int8:7", "topk:0.01", "topk:0.2"]


@pytest.mark.parametrize("spec", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_sum_of_decoded_plus_residual_is_sum_of_inputs(spec: str, dtype: torch.dtype) -> None:
    codec = get_codec(spec)
    fb = ErrorFeedback()
    gen = torch.Generator().manual_seed(1)
    shape = (33, 31)  # 1023 values: int8 tails, topk k = 11 at 1%
    sent = torch.zeros(shape, dtype=torch.float64)
    received = torch.zeros(shape, dtype=torch.float64)
    for step in range(20):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step)).to(dtype)
        x = x.t().contiguous().t() if step % 2 else x  # non-contiguous every other step
        enc = codec.encode(x, feedback=fb)
        y = codec.decode(enc.meta, [bytes(b) for b in enc.buffers], shape, dtype)
        sent += x.double()
        received += y.double()
    assert fb.residual is not None
    residual = fb.residual.double().view(shape)
    scale = sent.abs().max().item()
    assert torch.allclose(received + residual, sent, rtol=0, atol=1e-5 * scale)
    # ... and the residual is not trivially everything: most of the signal got through.
    assert residual.norm() < sent.norm()


def test_topk_feedback_eventually_sends_everything() -> None:
    codec = get_codec("topk:0.1")
    fb = ErrorFeedback()
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(100)
    enc = codec.encode(x, feedback=fb)
    total += codec.decode(enc.meta, enc.buffers, x.shape, x.dtype)
    for _ in range(9):  # zero input: the codec drains the residual, 10 values per message
        enc = codec.encode(torch.zeros(100), feedback=fb)
        total += codec.decode(enc.meta, enc.buffers, x.shape, x.dtype)
    assert torch.equal(total, x)
    assert fb.residual is not None and not fb.residual.any()


def test_feedback_refuses_another_stream() -> None:
    fb = ErrorFeedback()
    codec = get_codec("int8")
    codec.encode(torch.randn(10), feedback=fb)
    with pytest.raises(CodecError, match="one ErrorFeedback per tensor"):
        codec.encode(torch.randn(11), feedback=fb)
    with pytest.raises(CodecError, match="one ErrorFeedback per tensor"):
        codec.encode(torch.randn(10, dtype=torch.float64), feedback=fb)
    with pytest.raises(CodecError, match="float"):
        fb.correct(torch.ones(10, dtype=torch.int32))
    fb.reset()
    assert fb.residual is None
    codec.encode(torch.randn(11), feedback=fb)


def test_none_pays_out_a_residual_left_by_a_lossy_codec() -> None:
    fb = ErrorFeedback()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    enc = get_codec("int8").encode(x, feedback=fb)
    first = get_codec("int8").decode(enc.meta, enc.buffers, x.shape, x.dtype)
    none = get_codec("none")
    enc = none.encode(x, feedback=fb)
    second = none.decode(enc.meta, enc.buffers, x.shape, x.dtype)
    assert torch.allclose(first + second, 2 * x, atol=1e-6)
    assert fb.residual is None  # paid out exactly: the zero-copy path is back
    enc = none.encode(x, feedback=fb)
    assert torch.equal(none.decode(enc.meta, enc.buffers, x.shape, x.dtype), x)


def test_feedback_without_residual_keeps_none_zero_copy() -> None:
    fb = ErrorFeedback()
    x = torch.arange(4, dtype=torch.float32)
    enc = get_codec("none").encode(x, feedback=fb)
    x[0] = 9.0
    assert memoryview(enc.buffers[0]).cast("f")[0] == 9.0
    assert fb.residual is None
