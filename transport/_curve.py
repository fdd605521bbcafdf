"""CURVE keys from a cluster secret, and the default admission policies.

Every node of a cluster derives the same CurveZMQ keypair from the shared secret, so a
node proves it knows the secret by completing the CURVE handshake (RFC 26) with that key,
and a listener admits exactly the clients whose public key is the cluster's. The
fingerprint (a hash of the public key) may be published, e.g. in mDNS, to tell clusters
apart; it reveals nothing about the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

from p2ptrain._errors import ConfigError

__all__ = ["Admit", "CurveKeys", "admit_any", "admit_cluster_key", "admit_loopback"]

#: ``admit(ip, client_public_key_z85 or None) -> bool``; called for every new connection.
Admit = Callable[[str, "bytes | None"], bool]

# HKDF (RFC 5869) labels: the salt names the project, the info the key's purpose and
# version, so a future second key from the same secret never collides with this one.
_SALT = b"p2ptrain cluster secret v1"
_INFO = b"p2ptrain curve25519 secret key"


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


@dataclass(frozen=True)
class CurveKeys:
    """A CurveZMQ keypair, both halves Z85-encoded (40 bytes each).

    Attributes:
        public: the public key; safe to share.
        secret: the secret key; never logged or shown (``repr`` hides it).
    """

    public: bytes
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("public", "secret"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 40:
                length = len(value) if isinstance(value, bytes) else "?"
                raise ConfigError(f"CurveKeys.{name} must be 40 bytes of Z85, got {type(value).__name__} of length {length}")
        if not zmq.has("curve"):
            raise ConfigError("this libzmq was built without CURVE; install pyzmq wheels (they bundle libsodium)")
        if zmq.curve_public(self.secret) != self.public:
            raise ConfigError("CurveKeys.public does not belong to CurveKeys.secret")

    @classmethod
    def generate(cls) -> CurveKeys:
        """A fresh random keypair (for a node-specific identity)."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, cluster_secret: bytes | str) -> CurveKeys:
        """The cluster keypair every holder of ``cluster_secret`` derives alike.

        The secret is stretched with HKDF-SHA256 (RFC 5869) into 32 bytes, used as the
        Curve25519 secret key (libsodium clamps it).

        Raises:
            ConfigError: empty secret.
        """
        raw = cluster_secret.encode("utf-8") if isinstance(cluster_secret, str) else bytes(cluster_secret)
        if not raw:
            raise ConfigError("the cluster secret is empty; pass at least 16 random characters")
        secret = z85.encode(_hkdf_sha256(raw, _SALT, _INFO))
        return cls(zmq.curve_public(secret), secret)

    def fingerprint(self) -> str:
        """16 hex characters identifying the public key; safe to publish."""
        return hashlib.sha256(b"p2ptrain fingerprint v1" + self.public).hexdigest()[:16]


def admit_any(ip: str, client_key: bytes | None) -> bool:
    """Insecure policy: every address gets in. An endpoint given this skips ZAP entirely."""
    return True


def admit_loopback(ip: str, client_key: bytes | None) -> bool:
    """Policy without CURVE: only loopback addresses (127.0.0.0/8, ::1) get in."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def admit_cluster_key(keys: CurveKeys) -> Admit:
    """Policy with CURVE: only clients holding ``keys`` (the cluster keypair) get in."""

    def admit(ip: str, client_key: bytes | None) -> bool:
        return client_key is not None and hmac.compare_digest(client_key, keys.public)

    return admit
