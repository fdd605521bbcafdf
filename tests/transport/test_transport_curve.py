"""CURVE keys, the ZAP decision, and admission on live sockets."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
import zmq
import zmq.asyncio
from zmq.utils import z85

from p2ptrain._errors import ConfigError, TransportError
from p2ptrain.transport import CurveKeys, Endpoint, admit_any, admit_cluster_key, admit_loopback
from p2ptrain.transport._curve import _hkdf_sha256
from p2ptrain.transport._zap import needs_zap, zap_reply

from conftest import RawPeer, until

T = 10.0


def test_cluster_keys_are_deterministic_and_distinct() -> None:
    a, b = CurveKeys.from_secret("correct horse"), CurveKeys.from_secret(b"correct horse")
    assert a == b and len(a.public) == 40
    assert CurveKeys.from_secret("other") != a
    assert zmq.curve_public(a.secret) == a.public
    assert len(a.fingerprint()) == 16 and a.fingerprint() != CurveKeys.from_secret("other").fingerprint()
    assert a.secret.decode() not in repr(a)
    assert CurveKeys.generate() != CurveKeys.generate()


def test_bad_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        CurveKeys.from_secret("")
    with pytest.raises(ConfigError, match="40 bytes"):
        CurveKeys(b"short", b"short")
    k1, k2 = CurveKeys.generate(), CurveKeys.generate()
    with pytest.raises(ConfigError, match="does not belong"):
        CurveKeys(k1.public, k2.secret)


def test_policies() -> None:
    assert admit_loopback("127.0.0.1", None) and admit_loopback("127.8.9.1", None) and admit_loopback("::1", None)
    assert admit_loopback("::ffff:127.0.0.1", None)
    assert not admit_loopback("10.0.0.5", None) and not admit_loopback("garbage", None)
    keys = CurveKeys.from_secret("s")
    admit = admit_cluster_key(keys)
    assert admit("10.0.0.5", keys.public)
    assert not admit("127.0.0.1", CurveKeys.from_secret("t").public) and not admit("127.0.0.1", None)


def _request(mechanism: bytes, *cred: bytes, ip: bytes = b"127.0.0.1") -> list[bytes]:
    return [b"1.0", b"id1", b"p2ptrain", ip, b"node-x", mechanism, *cred]


def test_zap_reply_decisions() -> None:
    keys = CurveKeys.from_secret("s")
    raw_key = z85.decode(keys.public)
    reply, refused = zap_reply(_request(b"CURVE", raw_key), admit_cluster_key(keys))
    assert reply[2] == b"200" and refused is None and reply[1] == b"id1"
    reply, refused = zap_reply(_request(b"CURVE", z85.decode(CurveKeys.generate().public)), admit_cluster_key(keys))
    assert reply[2] == b"400" and refused is not None and refused[:2] == ("127.0.0.1", "node-x")
    assert zap_reply(_request(b"NULL", ip=b"10.1.1.1"), admit_loopback)[0][2] == b"400"
    assert zap_reply(_request(b"NULL"), admit_loopback)[0][2] == b"200"
    assert zap_reply(_request(b"PLAIN", b"u", b"p"), lambda ip, k: True)[0][2] == b"400"
    assert zap_reply([b"2.0", b"id", b"d", b"a", b"i", b"NULL"], lambda ip, k: True)[0][2] == b"500"
    assert zap_reply([b"1.0"], lambda ip, k: True)[0][2] == b"500"

    def broken(ip: str, key: bytes | None) -> bool:
        raise RuntimeError("policy bug")

    assert zap_reply(_request(b"NULL"), broken)[0][2] == b"400"


async def test_curve_round_trip_is_bit_exact() -> None:
    keys = CurveKeys.from_secret("cluster secret")
    async with Endpoint("a", "t", curve=keys) as a, Endpoint("b", "t", curve=keys) as b:
        assert a.public_key == keys.public
        a.add_peer("b", b.address)
        t = torch.randn(3 << 18)  # 3 MiB: several encrypted frames
        await a.send("b", "x", tensors=[t], timeout=T)
        msg = await b.recv(timeout=T)
        assert torch.equal(msg.tensors[0], t)
        assert b.drops() == {}


async def test_a_client_with_a_wrong_key_is_refused_and_counted() -> None:
    keys = CurveKeys.from_secret("right")
    wrong = CurveKeys.from_secret("wrong")
    async with Endpoint("srv", "t", curve=keys) as srv, Endpoint("intruder", "t", curve=wrong) as bad, \
            Endpoint("friend", "t", curve=keys) as friend:
        bad.add_peer("srv", srv.address, server_key=keys.public)  # knows the public key, not the secret
        friend.add_peer("srv", srv.address)
        assert bad.try_send("srv", "x")  # queued locally; the handshake is what fails
        await until(lambda: srv.drops().get("refused", 0) >= 1)
        assert srv.drops("127.0.0.1")["refused"] >= 1
        await friend.send("srv", "hello", timeout=T)
        msg = await srv.recv(timeout=T)
        assert msg.sender == "friend"  # the intruder's message never arrives
        with pytest.raises(TimeoutError):
            await srv.recv(timeout=0.2)
        with pytest.raises(TransportError, match="timed out"):
            await bad.send("srv", "big", tensors=[torch.zeros(1 << 18)], timeout=0.2)


async def test_a_client_with_a_wrong_server_key_fails_the_handshake(zctx: zmq.asyncio.Context) -> None:
    keys = CurveKeys.from_secret("right")
    async with Endpoint("srv", "t", curve=keys) as srv:
        wrong = CurveKeys.generate()
        RawPeer(zctx, "x", srv.address, curve=wrong, server_key=wrong.public)  # cannot open the server's box
        await until(lambda: srv.drops().get("handshake_failed", 0) >= 1)
        plain = RawPeer(zctx, "y", srv.address)  # no CURVE at all: mechanism mismatch
        # The greeting fails on connect; a send is not needed and could wait forever: once the
        # failed handshake drops the connection a DEALER has no pipe to queue on (it hung CI once).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(plain.send([b"anything"]), 1.0)
        await until(lambda: srv.drops().get("handshake_failed", 0) >= 2)
        with pytest.raises(TimeoutError):
            await srv.recv(timeout=0.1)


async def test_admit_callback_decides_plain_connections() -> None:
    seen: list[tuple[str, bytes | None]] = []

    def deny(ip: str, key: bytes | None) -> bool:
        seen.append((ip, key))
        return False

    async with Endpoint("srv", "t", admit=deny) as srv, Endpoint("c", "t") as c:
        c.add_peer("srv", srv.address)
        assert c.try_send("srv", "x")
        await until(lambda: srv.drops().get("refused", 0) >= 1)
        assert seen[0] == ("127.0.0.1", None)
        with pytest.raises(TimeoutError):
            await srv.recv(timeout=0.1)


def test_zap_runs_only_where_admission_is_not_implied() -> None:
    keys = CurveKeys.from_secret("s")
    assert needs_zap(keys, None, "127.0.0.1")  # CURVE: the key must be checked
    assert needs_zap(None, lambda ip, k: True, "127.0.0.1")  # a custom policy is always asked
    assert needs_zap(None, None, "0.0.0.0")  # plain on a LAN address: loopback-only policy
    assert not needs_zap(None, None, "127.0.0.1")  # the kernel admits only local peers here
    assert not needs_zap(None, admit_any, "0.0.0.0")  # insecure by choice: nothing to ask
    assert admit_any("10.0.0.1", None)


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "okm"),
    [
        # RFC 5869 appendix A.1 (basic test case with SHA-256)
        (
            bytes([0x0B] * 22),
            bytes(range(0x00, 0x0D)),
            bytes(range(0xF0, 0xFA)),
            42,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        # RFC 5869 appendix A.3 (zero-length salt and info)
        (
            bytes([0x0B] * 22),
            b"",
            b"",
            42,
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
)
def test_key_derivation_matches_rfc5869_vectors(ikm: bytes, salt: bytes, info: bytes, length: int, okm: str) -> None:
    assert _hkdf_sha256(ikm, salt, info, length).hex() == okm
