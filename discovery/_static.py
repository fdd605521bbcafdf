"""Static peers: ``--peer HOST:PORT`` for networks where multicast does not pass.

Some LANs (guest Wi-Fi, routed VLANs, many corporate networks) drop multicast, so mDNS
finds nobody. A user then names peers by hand; :meth:`StaticPeer.parse` turns each
``--peer`` string into a typed value, or says exactly what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from p2ptrain._errors import ConfigError

__all__ = ["StaticPeer"]

# RFC 1123 §2.1 host names: labels of letters, digits and inner hyphens, at most 63
# characters each, 253 in all. Underscores are let through because real LANs use them
# (Windows/DHCP names) and resolvers accept them.
_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HINT = "expected HOST:PORT, e.g. 192.168.1.20:5555, [fe80::2%eth0]:5555 or nuc.local:5555"


@dataclasses.dataclass(frozen=True)
class StaticPeer:
    """A peer given by address instead of found by mDNS.

    Attributes:
        host: IPv4 or IPv6 address (no brackets; an IPv6 zone like ``%eth0`` is kept), or
            a host name (resolved when connecting, not here).
        port: TCP port, 1-65535.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None) -> StaticPeer:
        """Parse ``HOST:PORT``: ``1.2.3.4:5555``, ``[::1]:5555``, ``nuc.local:5555``.

        Args:
            text: The string as the user wrote it; surrounding whitespace is ignored.
            default_port: Port to use when ``text`` has none; without it a port is required.

        Returns:
            The peer.

        Raises:
            ConfigError: ``text`` is not a host and port; the message says why and shows
                the accepted forms.
        """
        if not isinstance(text, str):
            raise ConfigError(f"peer must be a string, not {type(text).__name__}")
        s = text.strip()
        if not s:
            raise ConfigError(f"empty peer; {_HINT}")
        if "://" in s:
            raise ConfigError(f"peer {text!r} has a URL scheme; drop it: {_HINT}")
        port_text: str | None
        if s.startswith("["):
            host, sep, rest = s[1:].partition("]")
            if not sep:
                raise ConfigError(f"peer {text!r} opens '[' without closing ']'; {_HINT}")
            if rest and not rest.startswith(":"):
                raise ConfigError(f"peer {text!r} has {rest!r} after ']'; {_HINT}")
            port_text = rest[1:] if rest else None
            if _ipv6(host) is None:
                raise ConfigError(f"peer {text!r}: {host!r} inside [] is not an IPv6 address")
        elif s.count(":") > 1:
            if _ipv6(s) is not None:
                raise ConfigError(f"peer {text!r} looks like a bare IPv6 address; write [{s}]:PORT")
            raise ConfigError(f"peer {text!r} has several ':'; {_HINT}")
        else:
            host, sep, port_text_raw = s.partition(":")
            port_text = port_text_raw if sep else None
            if not _is_ipv4(host) and not _is_hostname(host):
                hint = f" (a count of members is --peers {host})" if host.isdigit() and not sep else ""
                raise ConfigError(f"peer {text!r}: {host!r} is neither an IP address nor a host name{hint}")
            host = host.rstrip(".") if not _is_ipv4(host) else host
        port = _parse_port(text, port_text, default_port)
        if s.startswith("["):
            addr = _ipv6(host)
            assert addr is not None
            host = _format_ipv6(addr)
        return cls(host=host, port=port)

    def __str__(self) -> str:
        """``HOST:PORT``, bracketing IPv6 addresses, so that :meth:`parse` reads it back."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_port(text: str, port_text: str | None, default_port: int | None) -> int:
    if port_text is None or port_text == "":
        if default_port is None:
            raise ConfigError(f"peer {text!r} has no port; {_HINT}")
        port_text = str(default_port)
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"peer {text!r}: port {port_text!r} must be a number in 1-65535")
    return int(port_text)


def _ipv6(text: str) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def _format_ipv6(addr: ipaddress.IPv6Address) -> str:
    # str() keeps the zone ("fe80::1%eth0"), which link-local addresses need to connect.
    return str(addr)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False  # "1.2.3" or "300.1.1.1": a mistyped address, not a name
    return all(_LABEL_RE.fullmatch(label) for label in labels)
