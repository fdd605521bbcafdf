"""TXT schema: round trips, and strict rejection of whatever else the network sends."""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain._errors import ConfigError, ProtocolError
from p2ptrain.discovery import PROTOCOL_VERSION, SERVICE_TYPE, PeerRecord, Resources
from p2ptrain.discovery._records import (
    MAX_TXT_BYTES,
    encode_txt,
    instance_label,
    parse_seq,
    parse_txt,
    service_name,
)

from _disc_helpers import RES, make_record


def raw_txt(entries: dict[str, str] | list[bytes]) -> bytes:
    """TXT rdata as it travels: length-prefixed entries (RFC 6763 §6.1)."""
    items = entries if isinstance(entries, list) else [f"{k}={v}".encode() for k, v in entries.items()]
    return b"".join(bytes([len(e)]) + e for e in items)


def wire_roundtrip(record: PeerRecord) -> PeerRecord:
    encoded = encode_txt(record.to_txt())
    raw = raw_txt([k + b"=" + v for k, v in encoded.items()])
    return PeerRecord.from_txt(parse_txt(raw), addresses=record.addresses)


_ALNUM = string.ascii_letters + string.digits
node_ids = st.builds(operator.add, st.sampled_from(_ALNUM), st.text(_ALNUM + "._-", max_size=62))
clusters = st.builds(operator.add, st.sampled_from(_ALNUM), st.text(_ALNUM + "._-", max_size=62))
resources = st.builds(
    Resources,
    cores=st.integers(1, 4096),
    memory_bytes=st.integers(0, 1 << 50),
    accelerator=st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=16),
    gflops=st.floats(0, 1e7, allow_nan=False, allow_infinity=False),
    battery=st.none() | st.floats(0, 1, allow_nan=False),
)
records = st.builds(
    PeerRecord,
    node_id=node_ids,
    cluster=clusters,
    port=st.integers(1, 65535),
    incarnation=st.integers(0, (1 << 63) - 1),
    key_fingerprint=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=128),
    resources=resources,
    addresses=st.lists(st.ip_addresses().map(str), max_size=4).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(records)
def test_txt_roundtrip_is_exact(record: PeerRecord) -> None:
    assert wire_roundtrip(record) == record


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parse_txt_never_crashes_on_random_bytes(raw: bytes) -> None:
    try:
        txt = parse_txt(raw)
    except ProtocolError:
        return
    with contextlib.suppress(ProtocolError):
        PeerRecord.from_txt(txt, addresses=["10.0.0.1"])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "cl", "id", "port", "inc", "fp", "cores", "mem", "acc", "gf", "bat"]),
        st.text(max_size=30),
    )
)
def test_from_txt_accepts_only_valid_fields(txt: dict[str, str]) -> None:
    try:
        record = PeerRecord.from_txt(txt, addresses=["10.0.0.1"])
    except ProtocolError:
        return
    assert PeerRecord.from_txt(record.to_txt(), addresses=record.addresses) == record


def test_valid_record_decodes() -> None:
    rec = make_record("lab", "jetson-1", port=5555, addresses=("10.0.0.2", "10.0.0.1"))
    assert rec.addresses == ("10.0.0.1", "10.0.0.2")  # normalized order
    txt = rec.to_txt()
    assert txt["v"] == str(PROTOCOL_VERSION) and txt["cl"] == "lab" and txt["id"] == "jetson-1"
    assert "bat" not in txt
    assert sum(1 + len(k) + 1 + len(v) for k, v in txt.items()) < 200


BASE = make_record("lab", "a").to_txt()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"v": "2"}, "protocol version"),
        ({"v": "x"}, "v="),
        ({"port": "0"}, "port"),
        ({"port": "65536"}, "port"),
        ({"port": "-1"}, "port"),
        ({"inc": "99999999999999999999"}, "inc"),
        ({"cl": ""}, "cluster"),
        ({"id": "has space"}, "node id"),
        ({"id": ".leading-dot"}, "node id"),
        ({"id": "x" * 64}, "node id"),
        ({"id": "trailing-newline\n"}, "node id"),
        ({"fp": "with space"}, "key_fingerprint"),
        ({"cores": "0"}, "cores"),
        ({"mem": "1e9"}, "mem"),
        ({"acc": "CUDA"}, "accelerator"),
        ({"gf": "nan"}, "gf"),
        ({"gf": "inf"}, "gf"),
        ({"gf": "1e400"}, "gflops"),
        ({"bat": "1.5"}, "battery"),
    ],
)
def test_bad_field_is_rejected(change: dict[str, str], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        PeerRecord.from_txt(BASE | change, addresses=["10.0.0.1"])


@pytest.mark.parametrize("key", ["v", "cl", "id", "port", "inc", "fp", "cores", "mem", "acc", "gf"])
def test_missing_key_is_rejected(key: str) -> None:
    txt = dict(BASE)
    del txt[key]
    with pytest.raises(ProtocolError, match=repr(key)):
        PeerRecord.from_txt(txt, addresses=["10.0.0.1"])


def test_bad_addresses_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="IP address"):
        PeerRecord.from_txt(BASE, addresses=["not-an-ip"])
    with pytest.raises(ProtocolError, match="more than 16"):
        PeerRecord.from_txt(BASE, addresses=[f"10.0.0.{i}" for i in range(17)])


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x05ab", "past the end"),
        (raw_txt([b"flag"]), "key=value"),
        (raw_txt([b"=v"]), "key=value"),
        (raw_txt([b"waytoolongkey=1"]), "key=value"),
        (raw_txt([b"k\xff=1"]), "ASCII"),
        (raw_txt([b"k=\xff"]), "UTF-8"),
        (raw_txt([f"k{i}=1".encode() for i in range(33)]), "entries"),
        (b"\xff" + b"a" * 255 + b"\xff" * 1100, "exceeds"),
    ],
)
def test_parse_txt_rejects(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_txt(raw)


def test_parse_txt_rfc_rules() -> None:
    # keys are case-insensitive and the first occurrence wins (RFC 6763 §6.4)
    assert parse_txt(raw_txt([b"Key=1", b"key=2", b"x="])) == {"key": "1", "x": ""}
    assert parse_txt(b"") == {} and parse_txt(b"\x00") == {}
    assert len(raw_txt([b"a=" + b"x" * 250] * 5)) <= MAX_TXT_BYTES


def test_encode_txt_limits() -> None:
    with pytest.raises(ConfigError, match="255"):
        encode_txt({"k": "x" * 254})
    with pytest.raises(ConfigError, match="key"):
        encode_txt({"Bad": "1"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", ""),
        ("node_id", "a b"),
        ("cluster", "-x"),
        ("port", 0),
        ("incarnation", -1),
        ("port", True),
    ],
)
def test_record_validates_locally_with_config_error(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.split("_")[0].replace("node", "node id")):
        dataclasses.replace(make_record("lab", "a"), **{field: value})


def test_instance_names_are_unique_and_valid() -> None:
    labels = {instance_label("lab", "a"), instance_label("lab", "A"), instance_label("other", "a")}
    assert len({label.lower() for label in labels}) == 3  # DNS compares case-insensitively
    longest = instance_label("c" * 63, "n" * 63)
    assert len(longest.encode()) <= 63 and "." not in instance_label("lab", "nuc.local")
    # long ids that share a 52-char prefix still get distinct labels
    assert instance_label("lab", "p" * 60 + "a") != instance_label("lab", "p" * 60 + "b")
    assert service_name("lab", "a").endswith("." + SERVICE_TYPE)


@given(node_ids, clusters)
@settings(max_examples=100, deadline=None)
def test_instance_label_is_a_valid_dns_sd_name(node_id: str, cluster: str) -> None:
    from zeroconf import ServiceInfo

    label = instance_label(cluster, node_id)
    assert len(label.encode()) <= 63
    ServiceInfo(SERVICE_TYPE, service_name(cluster, node_id))  # zeroconf validates the name


def test_resources_from_txt_rejects_non_strings() -> None:
    with pytest.raises(ProtocolError, match="not a string"):
        Resources.from_txt(RES.to_txt() | {"cores": 4})  # type: ignore[dict-item]
    with pytest.raises(ProtocolError, match="mapping"):
        Resources.from_txt([("cores", "1")])  # type: ignore[arg-type]


def test_seq() -> None:
    assert parse_seq({"seq": "7"}) == 7
    for bad in ({}, {"seq": "-1"}, {"seq": "x"}, {"seq": str(1 << 63)}):
        with pytest.raises(ProtocolError, match="seq"):
            parse_seq(bad)


def test_secrets_have_no_field() -> None:
    assert set(make_record("lab", "a", resources=dataclasses.replace(RES, battery=0.5)).to_txt()) == {
        "v",
        "cl",
        "id",
        "port",
        "inc",
        "fp",
        "cores",
        "mem",
        "acc",
        "gf",
        "bat",
    }
