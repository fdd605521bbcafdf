"""The peer record a node announces, and its strict TXT encoding.

A node announces one DNS-SD service instance of :data:`SERVICE_TYPE`. Its TXT record
(RFC 6763 §6) carries the :class:`PeerRecord` fields as short ``key=value`` strings:

======  =================================================
key     value
======  =================================================
v       protocol version (:data:`PROTOCOL_VERSION`)
cl      cluster name
id      node id
port    transport port (must equal the SRV port)
inc     incarnation: grows each time the node restarts
seq     announcement number within the incarnation (set by MdnsDiscovery)
fp      public-key fingerprint (never a secret)
cores   :class:`~p2ptrain.discovery.Resources` fields ...
mem
acc
gf
bat     (absent on devices without a battery)
======  =================================================

Everything read from the network goes through :func:`parse_txt` and
:meth:`PeerRecord.from_txt`, which bound every size and type and raise
:class:`~p2ptrain.ProtocolError` on anything else; the caller drops and counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping

from p2ptrain._errors import ConfigError, ProtocolError

from ._resources import Resources, _check_int, _parse_uint, _require

__all__ = ["PROTOCOL_VERSION", "SERVICE_TYPE", "PeerRecord"]

SERVICE_TYPE = "_p2ptrain._tcp.local."
"""The DNS-SD service type every p2ptrain node announces and browses."""

PROTOCOL_VERSION = 1
"""Version of the TXT schema below; a peer announcing another version is ignored."""

# Node ids: the same rule as p2ptrain's identity module (1-63 characters).
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# A fingerprint is printable ASCII without spaces (hex, base64, Z85 all fit).
FINGERPRINT_RE = re.compile(r"[\x21-\x7e]{0,128}")
MAX_INCARNATION = (1 << 63) - 1
MAX_ADDRESSES = 16

# Limits on a TXT record from the network. RFC 6763 §6.2 asks TXT records to stay under
# 1300 bytes so a response fits one Ethernet frame; ours is ~150 bytes. Keys are at most
# 9 characters (RFC 6763 §6.4); 32 entries leave room for later versions.
MAX_TXT_BYTES = 1300
MAX_TXT_ENTRIES = 32
_KEY_RE = re.compile(r"[a-z0-9]{1,9}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerRecord:
    """One node as it announces itself on mDNS.

    Attributes:
        node_id: Unique id of the node, ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``.
        cluster: Cluster name, ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``.
        port: The node's transport (ZeroMQ) port.
        incarnation: Grows with every restart of the node (e.g. ``time.time_ns() // 10**6``
            at start-up); the record with the higher one replaces an older one.
        key_fingerprint: Fingerprint of the node's public key, printable ASCII, at most
            128 characters; ``""`` when the cluster runs without keys. Never a secret.
        resources: What the device offers.
        addresses: IP addresses to reach the node. Empty when announcing means "the
            addresses of the interfaces discovery runs on"; records of peers carry theirs.
        protocol: TXT schema version, :data:`PROTOCOL_VERSION`.

    Raises:
        ConfigError: A field is invalid (the message names it and the rule).
    """

    node_id: str
    cluster: str
    port: int
    incarnation: int
    key_fingerprint: str
    resources: Resources
    addresses: tuple[str, ...] = ()
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        check_cluster(self.cluster)
        _check_int("port", self.port, 1, 65535)
        _check_int("incarnation", self.incarnation, 0, MAX_INCARNATION)
        _check_int("protocol", self.protocol, 1, 65535)
        if not isinstance(self.key_fingerprint, str) or not FINGERPRINT_RE.fullmatch(self.key_fingerprint):
            raise ConfigError(
                f"key_fingerprint {self.key_fingerprint!r:.60} must be at most 128 printable "
                "ASCII characters without spaces"
            )
        if not isinstance(self.resources, Resources):
            raise ConfigError(f"resources must be a Resources, not {type(self.resources).__name__}")
        if not isinstance(self.addresses, tuple):
            raise ConfigError("addresses must be a tuple of IP address strings")
        object.__setattr__(self, "addresses", normalize_addresses(self.addresses))

    def to_txt(self) -> dict[str, str]:
        """Encode as TXT key/value strings (the addresses travel as A/AAAA records instead)."""
        return {
            "v": str(self.protocol),
            "cl": self.cluster,
            "id": self.node_id,
            "port": str(self.port),
            "inc": str(self.incarnation),
            "fp": self.key_fingerprint,
            **self.resources.to_txt(),
        }

    @classmethod
    def from_txt(cls, txt: Mapping[str, str], *, addresses: Iterable[str] = ()) -> PeerRecord:
        """Decode the keys written by :meth:`to_txt`, strictly.

        Args:
            txt: Decoded TXT entries (e.g. from :func:`parse_txt`); unknown keys are ignored.
            addresses: The peer's addresses from its A/AAAA records.

        Returns:
            The record.

        Raises:
            ProtocolError: A key is missing or malformed, a value is out of range, or the
                version is not :data:`PROTOCOL_VERSION`.
        """
        try:
            protocol = _parse_uint(txt, "v")
            if protocol != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {protocol} is not {PROTOCOL_VERSION} (upgrade one side)"
                )
            return cls(
                node_id=_require(txt, "id"),
                cluster=_require(txt, "cl"),
                port=_parse_uint(txt, "port"),
                incarnation=_parse_uint(txt, "inc"),
                key_fingerprint=_require(txt, "fp"),
                resources=Resources.from_txt(txt),
                addresses=tuple(addresses),
                protocol=protocol,
            )
        except ConfigError as exc:
            raise ProtocolError(f"bad peer record: {exc}") from exc


def parse_seq(txt: Mapping[str, str]) -> int:
    """The ``seq`` entry: which announcement of its incarnation a record is.

    Every ``update()`` announces a higher one, so each update is a new DNS record (a
    change back to earlier values included) and an older record that a cache still holds
    (RFC 6762 §10.2 keeps records younger than 1 s) can be told apart and ignored.

    Raises:
        ProtocolError: Missing or not an unsigned integer below 2**63.
    """
    try:
        seq = _parse_uint(txt, "seq")
        _check_int("seq", seq, 0, MAX_INCARNATION)
    except ConfigError as exc:
        raise ProtocolError(f"bad peer record: {exc}") from exc
    return seq


def check_node_id(node_id: object) -> None:
    """Raise :class:`ConfigError` unless ``node_id`` is a valid node id."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise ConfigError(
            f"node id {node_id!r:.80} must be 1-63 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )


def check_cluster(cluster: object) -> None:
    """Raise :class:`ConfigError` unless ``cluster`` is a valid cluster name."""
    if not isinstance(cluster, str) or not CLUSTER_RE.fullmatch(cluster):
        raise ConfigError(
            f"cluster name {cluster!r:.70} must be 1-63 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )


def normalize_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Validate, de-duplicate and sort IP address strings (IPv4 first).

    Sorting makes two announcements of the same addresses compare equal whatever order
    the DNS cache returned them in.

    Raises:
        ConfigError: An entry is not an IP address, or there are more than 16.
    """
    parsed: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for text in addresses:
        if not isinstance(text, str) or len(text) > 64:
            raise ConfigError(f"address {text!r:.70} is not an IP address string")
        try:
            addr = ipaddress.ip_address(text)
        except ValueError as exc:
            raise ConfigError(f"address {text!r} is not an IP address") from exc
        parsed[str(addr)] = addr
        if len(parsed) > MAX_ADDRESSES:
            raise ConfigError(f"more than {MAX_ADDRESSES} addresses")
    return tuple(sorted(parsed, key=lambda s: (parsed[s].version, int(parsed[s]), s)))


def instance_label(cluster: str, node_id: str) -> str:
    """The DNS-SD instance label of a node: a readable prefix of its id and a hash.

    ``<node id, dots as '-', at most 52 chars>-<10 hex digits of blake2s(cluster, id)>``,
    at most 63 bytes (RFC 6763 §7.2). The hash keeps the label unique when two clusters on
    one LAN reuse a node id (say both derive it from the hostname), when two ids differ
    only in case (DNS compares names case-insensitively, RFC 6762 §16), and when two long
    ids share a prefix. Dots are replaced so the label never splits into two DNS labels.
    Because the label is a function of the node id, a restarted node announces under the
    same name and its records flush the old ones (RFC 6762 §10.2): no duplicate entry.
    """
    digest = hashlib.blake2s(f"{cluster}\n{node_id}".encode(), digest_size=5).hexdigest()
    return f"{node_id.replace('.', '-')[:52]}-{digest}"


def service_name(cluster: str, node_id: str) -> str:
    """The fully qualified service instance name of a node."""
    return f"{instance_label(cluster, node_id)}.{SERVICE_TYPE}"


def encode_txt(txt: Mapping[str, str]) -> dict[bytes, bytes]:
    """TXT strings as the bytes zeroconf sends; checks the limits :func:`parse_txt` enforces.

    Raises:
        ConfigError: A key or an entry breaks the TXT limits.
    """
    out: dict[bytes, bytes] = {}
    total = 0
    for key, value in txt.items():
        if not _KEY_RE.fullmatch(key):
            raise ConfigError(f"TXT key {key!r} must be 1-9 characters of [a-z0-9]")
        k, v = key.encode("ascii"), value.encode("utf-8")
        if len(k) + 1 + len(v) > 255:  # one length byte per entry (RFC 6763 §6.1)
            raise ConfigError(f"TXT entry {key!r} is longer than 255 bytes")
        out[k] = v
        total += 1 + len(k) + 1 + len(v)
    if total > MAX_TXT_BYTES or len(out) > MAX_TXT_ENTRIES:
        raise ConfigError(f"TXT record of {total} bytes / {len(out)} entries exceeds the limits")
    return out


def parse_txt(raw: bytes) -> dict[str, str]:
    """Decode raw TXT rdata into key/value strings, strictly.

    Follows RFC 6763 §6: each entry is a length byte and ``key=value``; keys compare
    case-insensitively; only the first occurrence of a key counts (§6.4). Beyond the RFC,
    entries without ``=`` (boolean attributes) and non-UTF-8 values are rejected, since no
    p2ptrain key is boolean and every value is text.

    Args:
        raw: The TXT record's rdata.

    Returns:
        Lowercase keys to values.

    Raises:
        ProtocolError: The rdata is too large, truncated, or holds a bad entry.
    """
    if not isinstance(raw, bytes):
        raise ProtocolError(f"TXT rdata must be bytes, not {type(raw).__name__}")
    if len(raw) > MAX_TXT_BYTES:
        raise ProtocolError(f"TXT record of {len(raw)} bytes exceeds {MAX_TXT_BYTES}")
    out: dict[str, str] = {}
    pos, entries = 0, 0
    while pos < len(raw):
        length = raw[pos]
        entry = raw[pos + 1 : pos + 1 + length]
        if len(entry) != length:
            raise ProtocolError("TXT entry runs past the end of the record")
        pos += 1 + length
        if length == 0:
            continue  # an empty string is how an empty TXT record is written (RFC 6763 §6.1)
        entries += 1
        if entries > MAX_TXT_ENTRIES:
            raise ProtocolError(f"TXT record has more than {MAX_TXT_ENTRIES} entries")
        key_b, sep, value_b = entry.partition(b"=")
        try:
            key = key_b.decode("ascii").lower()
            value = value_b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("TXT entry is not ASCII key / UTF-8 value") from exc
        if not sep or not _KEY_RE.fullmatch(key):
            raise ProtocolError(f"TXT entry {entry[:20]!r} is not key=value with a 1-9 char key")
        out.setdefault(key, value)
    return out
