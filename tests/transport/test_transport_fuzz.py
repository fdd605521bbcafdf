"""Property tests: whatever frames arrive, the decoder raises nothing but ProtocolError and
never allocates beyond Limits."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ptrain._errors import ProtocolError
from p2ptrain.transport import PROTOCOL_VERSION, Limits, decode_message, encode_message

CLUSTER = "fuzz"
LIMITS = Limits(frame_bytes=512, max_tensor_bytes=1 << 20, max_message_bytes=1 << 21, max_envelope_bytes=4096)
SLACK = 64 * LIMITS.max_buffers  # per-buffer alignment padding inside a block
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=4)), max_leaves=12)
dtypes = st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
                          "complex64", "", "object"])
codecs = st.sampled_from(["none", "fp16", "bf16", "int8", "int8:16", "int8:0", "topk:0.5", "topk:2", "zip", ""])


class Recorder:
    """An allocator that records every block the decoder asks for."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, n: int) -> np.ndarray:
        assert n <= LIMITS.max_tensor_bytes + SLACK, f"block of {n} bytes beyond the tensor limit"
        self.sizes.append(n)
        assert sum(self.sizes) <= LIMITS.max_message_bytes + SLACK * LIMITS.max_tensors
        return np.empty(n, dtype=np.uint8)


def decode(frames: list[bytes]) -> None:
    rec = Recorder()
    try:
        msg = decode_message(frames, LIMITS, CLUSTER, sender="p", alloc=rec)
    except ProtocolError:
        return
    for t in msg.tensors:
        assert t.numel() * t.element_size() <= LIMITS.max_tensor_bytes


@FUZZ
@given(st.lists(st.binary(max_size=600), max_size=6))
def test_random_frames(frames: list[bytes]) -> None:
    decode(frames)


tensor_heads = st.fixed_dictionaries({
    "d": dtypes,
    "s": st.lists(st.integers(-2, 3000), max_size=4) | values,
    "c": codecs | values,
    "m": st.dictionaries(st.sampled_from(["block", "k", "n", "scale", "x"]), st.integers(-5, 5000) | values, max_size=3) | values,
    "n": st.lists(st.integers(-1, 5000), max_size=4) | values,
})
envelopes = st.fixed_dictionaries({
    "v": st.just(PROTOCOL_VERSION) | values,
    "c": st.just(CLUSTER) | values,
    "s": st.just("p") | values,
    "e": st.integers(0, 10) | values,
    "k": st.just("k") | values,
    "t": values,
    "m": st.dictionaries(st.text(max_size=5), values, max_size=4) | values,
    "f": st.sampled_from([1, 7, 512, 513]) | values,
    "x": st.lists(tensor_heads, max_size=3) | values,
})


@FUZZ
@given(envelopes, st.lists(st.binary(max_size=1200), max_size=8))
def test_structured_envelopes_with_random_frames(env: dict[str, Any], rest: list[bytes]) -> None:
    try:
        head = msgpack.packb(env)
    except (TypeError, ValueError, OverflowError):
        return
    decode([head, *rest])


@st.composite
def valid_messages(draw: st.DrawFn) -> list[bytes]:
    tensors = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.integers(0, 400))
        dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.uint8]))
        tensors.append(torch.zeros(n, dtype=dtype) if dtype == torch.bool else torch.arange(n).to(dtype))
    codec = draw(st.sampled_from(["none", "fp16", "int8:16", "topk:0.5"]))
    frames = encode_message(sender="p", cluster=CLUSTER, kind="k", tag=draw(st.integers(0, 9)), meta={"a": 1},
                            tensors=tensors, codec=codec, limits=LIMITS)
    return [bytes(memoryview(f)) for f in frames]


@FUZZ
@given(valid_messages(), st.data())
def test_mutated_valid_messages(frames: list[bytes], data: st.DataObject) -> None:
    decode(list(frames))  # the original decodes fine
    msg = decode_message(frames, LIMITS, CLUSTER, sender="p")
    assert msg.kind == "k"
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup", "insert", "swap"]))
        i = data.draw(st.integers(0, max(0, len(frames) - 1)))
        if not frames:
            frames = [b""]
        f = bytearray(frames[i])
        if op == "flip" and f:
            j = data.draw(st.integers(0, len(f) - 1))
            f[j] ^= data.draw(st.integers(1, 255))
            frames[i] = bytes(f)
        elif op == "truncate":
            frames[i] = bytes(f[: data.draw(st.integers(0, len(f)))])
        elif op == "extend":
            frames[i] = bytes(f) + data.draw(st.binary(min_size=1, max_size=8))
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "insert":
            frames.insert(i, data.draw(st.binary(max_size=600)))
        elif op == "swap" and len(frames) > 1:
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    decode(frames)
