"""``get_codec`` parses specs from the network: strictly, boundedly, never evaluating."""

from __future__ import annotations

import pytest

from p2ptrain._errors import CodecError
from p2ptrain.kernels import Bf16Codec, Fp16Codec, Int8Codec, NoneCodec, TopKCodec, codec_names, get_codec


def test_names() -> None:
    assert codec_names() == ["none", "fp16", "bf16", "int8", "topk"]


@pytest.mark.parametrize(
    "spec,cls,canonical",
    [
        ("none", NoneCodec, "none"),
        ("fp16", Fp16Codec, "fp16"),
        ("bf16", Bf16Codec, "bf16"),
        ("int8", Int8Codec, "int8:256"),
        ("int8:128", Int8Codec, "int8:128"),
        ("int8:1", Int8Codec, "int8:1"),
        ("int8:1048576", Int8Codec, "int8:1048576"),
        ("topk", TopKCodec, "topk:0.01"),
        ("topk:0.5", TopKCodec, "topk:0.5"),
        ("topk:1", TopKCodec, "topk:1.0"),
        ("topk:1e-3", TopKCodec, "topk:0.001"),
        ("topk:.25", TopKCodec, "topk:0.25"),
        ("topk:1e-05", TopKCodec, "topk:1e-05"),
    ],
)
def test_valid_specs_and_canonical_round_trip(spec: str, cls: type, canonical: str) -> None:
    codec = get_codec(spec)
    assert type(codec) is cls
    assert codec.spec == canonical
    assert get_codec(codec.spec) == codec


def test_unknown_codec_names_the_choices() -> None:
    with pytest.raises(CodecError) as info:
        get_codec("int9")
    assert str(info.value) == "unknown codec 'int9'; choose one of none, fp16, bf16, int8[:BLOCK], topk[:FRACTION]"


BAD_SPECS = [
    "", ":", "INT8", " int8", "int8 ", "fp16:1", "none:", "bf16:x",
    "int8:", "int8:0", "int8:-1", "int8:+4", "int8:007", "int8:1048577", "int8:99999999999", "int8:1.5",
    "int8:0x10", "int8:1e3", "int8:٣", "int8:256:1",
    "topk:", "topk:0", "topk:0.0", "topk:-0.1", "topk:1.5", "topk:nan", "topk:inf", "topk:1e999",
    "topk:1e-400", "topk:0.1.2", "topk:__import__('os')", "topk:1_0", "topk:0.5 ",
    "x" * 65, "int8:" + "1" * 100,
]


def test_bad_specs_are_refused() -> None:
    for spec in BAD_SPECS:
        with pytest.raises(CodecError):
            get_codec(spec)
            pytest.fail(f"accepted {spec!r}")


@pytest.mark.parametrize("spec", [None, 8, b"int8", ["int8"], {"int8": 1}])
def test_non_string_specs_are_refused(spec: object) -> None:
    with pytest.raises(CodecError, match="string"):
        get_codec(spec)


@pytest.mark.parametrize("bad", [0, -1, 1 << 21, 2.0, True, "256"])
def test_int8_constructor_checks_block(bad: object) -> None:
    with pytest.raises(CodecError):
        Int8Codec(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), float("inf"), True, "0.1"])
def test_topk_constructor_checks_fraction(bad: object) -> None:
    with pytest.raises(CodecError):
        TopKCodec(bad)  # type: ignore[arg-type]
