"""The envelope and framing rules, without sockets: round trips and every rejection reason."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from p2ptrain._errors import CodecError, ConfigError, ProtocolError
from p2ptrain.kernels import ErrorFeedback
from p2ptrain.transport import PROTOCOL_VERSION, Limits, decode_envelope, decode_message, encode_message
from p2ptrain.transport._envelope import validate_meta

CLUSTER = "c"
SMALL = Limits(frame_bytes=1000)


def frames_of(**kw: Any) -> list[bytes]:
    kw.setdefault("sender", "a")
    kw.setdefault("cluster", CLUSTER)
    kw.setdefault("kind", "k")
    return [bytes(memoryview(f)) for f in encode_message(limits=kw.pop("limits", SMALL), **kw)]


def raw_envelope(**over: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"v": PROTOCOL_VERSION, "c": CLUSTER, "s": "a", "e": 0, "k": "k", "t": 0, "m": {}, "f": 1000,
                           "x": [{"d": "float32", "s": [4], "c": "none", "m": {}, "n": [16]}]}
    env.update(over)
    return env


def with_tensor(**over: Any) -> list[bytes]:
    head = {"d": "float32", "s": [4], "c": "none", "m": {}, "n": [16]}
    head.update(over)
    return [msgpack.packb(raw_envelope(x=[head])), bytes(16)]


def reason(frames: list[Any], limits: Limits = SMALL, sender: str | None = "a") -> str:
    with pytest.raises(ProtocolError) as info:
        decode_message(frames, limits, CLUSTER, sender=sender)
    return info.value.reason  # type: ignore[attr-defined]


TENSORS = [
    torch.randn(3, 700),  # 8400 bytes: 9 frames of <= 1000
    torch.arange(10),
    torch.tensor(3.5, dtype=torch.bfloat16),  # 0-dim
    torch.zeros(0, 4),  # empty: no frames
    torch.randn(10, 10).t(),  # non-contiguous
    torch.tensor([True, False, True]),
    torch.randint(-128, 127, (33,), dtype=torch.int8),
    torch.randn(5, dtype=torch.float64),
]


def test_round_trip_is_bit_exact_for_every_wire_dtype() -> None:
    frames = frames_of(tensors=TENSORS, tag=[3, "x", [1, None]], epoch=7, meta={"a": [1, 2.5, {"b": b"\x00"}], "n": None})
    msg = decode_message(frames, SMALL, CLUSTER, sender="a")
    assert (msg.sender, msg.kind, msg.epoch, msg.tag) == ("a", "k", 7, [3, "x", [1, None]])
    assert msg.meta == {"a": [1, 2.5, {"b": b"\x00"}], "n": None}
    for sent, got in zip(TENSORS, msg.tensors, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)
    assert msg.nbytes == sum(t.numel() * t.element_size() for t in TENSORS)


def test_big_buffers_are_split_into_frames_of_at_most_frame_bytes() -> None:
    frames = frames_of(tensors=[torch.zeros(2501, dtype=torch.float32)])  # 10004 bytes
    assert [len(f) for f in frames[1:]] == [1000] * 10 + [4]


def test_frames_share_memory_with_the_tensor() -> None:
    t = torch.zeros(1000)
    frames = encode_message(sender="a", cluster=CLUSTER, kind="k", tensors=[t], limits=SMALL)
    t[0] = 1.0
    assert np.frombuffer(frames[1], dtype=np.float32)[0] == 1.0  # zero-copy view


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8:64", "topk:0.5"])
def test_lossy_codecs_travel_and_apply_to_floats_only(codec: str) -> None:
    x = torch.randn(2000)
    ids = torch.arange(5)
    fb = [ErrorFeedback(), None]
    msg = decode_message(frames_of(tensors=[x, ids], codec=codec, feedback=fb), SMALL, CLUSTER)
    assert torch.equal(msg.tensors[1], ids)  # ints go through "none"
    assert msg.tensors[0].shape == x.shape and msg.tensors[0].dtype == x.dtype
    if codec in ("fp16", "bf16"):
        assert torch.equal(msg.tensors[0], x.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[codec])).float())


def test_one_feedback_for_many_tensors_is_refused() -> None:
    with pytest.raises(ProtocolError, match="one per tensor"):
        frames_of(tensors=[torch.zeros(2), torch.zeros(2)], codec="fp16", feedback=ErrorFeedback())


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"kind": ""}, "bad_kind"),
        ({"kind": 3}, "bad_kind"),
        ({"epoch": -1}, "bad_epoch"),
        ({"tag": {"a": 1}}, "bad_tag"),
        ({"tag": [[[[[1]]]]]}, "bad_tag"),
        ({"meta": {1: 2}}, "bad_meta"),
        ({"meta": {"x": object()}}, "bad_meta"),
        ({"meta": {"x": np.float32(1)}}, "bad_meta"),
        ({"meta": {"x": "y" * 70_000}}, "bad_meta"),
        # Within the limit in characters, over it in UTF-8 bytes (what the receiver counts):
        # once sent, then dropped by every receiver as bad msgpack.
        ({"meta": {"x": "é" * 10_000}}, "bad_meta"),
        ({"meta": {"k" * 20_000: 1}}, "bad_meta"),  # keys were never measured at all
        ({"tensors": [torch.zeros(1)] * 65}, "too_many_tensors"),
        ({"tensors": [np.zeros(3)]}, "bad_argument"),
        ({"tensors": [torch.zeros([1] * 9)]}, "bad_shape"),
    ],
)
def test_encode_refuses_what_a_peer_would_drop(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        frames_of(**kw)
    assert info.value.reason == why  # type: ignore[attr-defined]


def test_encode_refuses_oversized_envelopes_and_tensors() -> None:
    with pytest.raises(ProtocolError, match="move data into tensors"):
        frames_of(meta={f"k{i}": "v" * 250 for i in range(300)}, limits=Limits(max_meta_entries=300))
    with pytest.raises(ProtocolError, match="over 100 bytes"):
        frames_of(tensors=[torch.zeros(26)], limits=Limits(max_tensor_bytes=100))


def test_unknown_codec_is_a_codec_error_on_send() -> None:
    with pytest.raises(CodecError):
        frames_of(tensors=[torch.zeros(2)], codec="zip")


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([], "truncated"),
        ([b"\xc1"], "bad_msgpack"),  # 0xc1 is never used in msgpack
        ([msgpack.packb(raw_envelope()) + b"\x00"], "bad_msgpack"),  # trailing bytes
        ([msgpack.packb([1, 2, 3])], "bad_envelope"),
        ([msgpack.packb(raw_envelope(v=2)), bytes(16)], "wrong_version"),
        ([msgpack.packb(raw_envelope(v=True)), bytes(16)], "wrong_version"),
        ([msgpack.packb(raw_envelope(c="other")), bytes(16)], "wrong_cluster"),
        ([msgpack.packb({**raw_envelope(), "z": 1}), bytes(16)], "bad_envelope"),
        ([msgpack.packb(raw_envelope(s="")), bytes(16)], "bad_envelope"),
        ([msgpack.packb(raw_envelope(k=7)), bytes(16)], "bad_kind"),
        ([msgpack.packb(raw_envelope(k="k" * 65)), bytes(16)], "bad_kind"),
        ([msgpack.packb(raw_envelope(e=2**63)), bytes(16)], "bad_epoch"),
        ([msgpack.packb(raw_envelope(e=1.5)), bytes(16)], "bad_epoch"),
        ([msgpack.packb(raw_envelope(t={"a": 1})), bytes(16)], "bad_tag"),
        ([msgpack.packb(raw_envelope(m=[1])), bytes(16)], "bad_meta"),
        ([msgpack.packb(raw_envelope(f=0)), bytes(16)], "bad_frame_size"),
        ([msgpack.packb(raw_envelope(f=-1)), bytes(16)], "bad_frame_size"),
        ([msgpack.packb(raw_envelope(f=2000, x=[{"d": "uint8", "s": [1500], "c": "none", "m": {}, "n": [1500]}])), bytes(1500)],
         "bad_frame_size"),
        ([msgpack.packb(raw_envelope(x={})), bytes(16)], "too_many_tensors"),
        ([msgpack.packb(raw_envelope(x=[{"d": "float32"}])), bytes(16)], "bad_envelope"),
        (with_tensor(d="complex64"), "unknown_dtype"),
        (with_tensor(d="__import__('os')"), "unknown_dtype"),
        (with_tensor(s=[-4]), "bad_shape"),
        (with_tensor(s=[True]), "bad_shape"),
        (with_tensor(s=[1] * 9), "bad_shape"),
        (with_tensor(s=[2**40, 2**40]), "too_large"),
        (with_tensor(n=[-1]), "bad_lengths"),
        (with_tensor(n=[1] * 9), "bad_lengths"),
        (with_tensor(c="zip"), "unknown_codec"),
        (with_tensor(c=None), "unknown_codec"),
        (with_tensor(m=[]), "bad_codec_meta"),
        (with_tensor(m={"block": 1}), "bad_codec_meta"),
        (with_tensor(n=[15]), "length_mismatch"),
        (with_tensor(n=[16, 0]), "length_mismatch"),
        (with_tensor()[:1], "truncated"),
        (with_tensor()[:1] + [bytes(15)], "frame_length"),
        (with_tensor()[:1] + [bytes(17)], "frame_length"),
        (with_tensor() + [b""], "extra_frames"),
        (with_tensor()[:1] + [bytes(8), bytes(8)], "frame_length"),
    ],
)
def test_every_malformed_message_is_rejected_with_its_reason(frames: list[bytes], why: str) -> None:
    assert reason(frames) == why


def test_ext_types_and_non_string_keys_are_bad_msgpack() -> None:
    assert reason([msgpack.packb(msgpack.ExtType(1, b"x"))]) == "bad_msgpack"
    assert reason([msgpack.packb({1: 2})]) == "bad_msgpack"
    ts = msgpack.Timestamp(1, 0)
    assert reason([msgpack.packb(raw_envelope(m={"t": ts}), datetime=False)]) == "bad_msgpack"


def test_envelope_size_and_nesting_limits() -> None:
    big = msgpack.packb(raw_envelope(m={"x": "y" * 70_000}))
    assert reason([big]) == "envelope_too_large"
    deep: Any = 1
    for _ in range(12):
        deep = [deep]
    assert reason([msgpack.packb(raw_envelope(m={"d": deep})), bytes(16)]) == "bad_meta"
    wide = msgpack.packb(raw_envelope(m={f"k{i}": i for i in range(300)}))
    assert reason([wide]) == "bad_msgpack"  # map longer than max_meta_entries, refused by the unpacker


def test_a_peer_with_bigger_frames_can_still_send_small_messages() -> None:
    frames = [msgpack.packb(raw_envelope(f=1 << 20)), bytes(16)]
    assert decode_message(frames, SMALL, CLUSTER).tensors[0].shape == (4,)


def test_sender_must_match_the_connection() -> None:
    assert reason(frames_of(tensors=[torch.zeros(4)]), sender="mallory") == "sender_mismatch"


def test_message_total_is_bounded() -> None:
    lim = Limits(frame_bytes=1000, max_message_bytes=100)
    frames = [msgpack.packb(raw_envelope(x=[{"d": "float32", "s": [20], "c": "none", "m": {}, "n": [80]}] * 2))]
    assert reason(frames, lim) == "too_large"


def test_decode_envelope_accepts_memoryview_and_reports_frame_lengths() -> None:
    frame = memoryview(bytearray(frames_of(tensors=[torch.zeros(600)])[0]))
    env = decode_envelope(frame, SMALL, CLUSTER)
    assert env.frame_lengths() == [1000, 1000, 400]
    assert env.nbytes == 2400


def test_limits_validate_themselves() -> None:
    with pytest.raises(ConfigError, match="frame_bytes"):
        Limits(frame_bytes=0)
    with pytest.raises(ConfigError, match="255"):
        Limits(max_id_bytes=300)


def test_the_fast_meta_check_never_passes_what_the_full_walk_refuses() -> None:
    # validate_meta first tries _meta_fits (no error paths built: every heartbeat is checked
    # on both ends), and only walks the value when that says no. The two must agree on every
    # value of exact builtin types; on subclasses the quick check may only say no.
    import collections
    import enum

    from p2ptrain.transport._envelope import _meta_fits, _walk_meta

    limits = Limits()

    class Colour(enum.IntEnum):
        RED = 1

    def nest(depth: int, leaf: Any) -> Any:
        for _ in range(depth):
            leaf = {"d": leaf}
        return leaf

    d = limits.max_meta_depth
    exact = [None, True, 1.5, float("nan"), -(1 << 63), (1 << 64) - 1, -(1 << 63) - 1, 1 << 64, "", "s" * limits.max_str_bytes,
             "s" * (limits.max_str_bytes + 1), b"x" * (limits.max_str_bytes + 1), "é" * (limits.max_str_bytes // 2),
             "é" * (limits.max_str_bytes // 2 + 1), {"k" * limits.max_str_bytes: 1}, {"k" * (limits.max_str_bytes + 1): 1},
             [], (1, "a"), {}, {1: 2}, {"k": object()},
             {"k": [1, {"j": None}]}, list(range(limits.max_meta_entries)), list(range(limits.max_meta_entries + 1)),
             nest(d, 1), nest(d + 1, 1), nest(d, {}), nest(d, []), nest(d, [1]), nest(d - 1, [1]),
             {"b": {"e": 4, "m": ["vm-1"], "i": 1796309713517950337, "z": False}, "a": "tcp://127.0.0.1:1", "g": {}}]
    subclassed = [collections.OrderedDict(a=1), Colour.RED, {"k": Colour.RED}, np.float32(1.0)]

    def walk_ok(meta: Any) -> bool:
        try:
            _walk_meta(meta, limits, "bad_meta", 0, "meta")
        except ProtocolError:
            return False
        return True

    for meta in exact:
        assert _meta_fits(meta, limits) == walk_ok(meta), repr(meta)[:80]
    for meta in subclassed:
        assert not _meta_fits(meta, limits) or walk_ok(meta), repr(meta)[:80]
        try:
            validate_meta(meta, limits)
        except ProtocolError:
            assert not walk_ok(meta)
        else:
            assert walk_ok(meta)
