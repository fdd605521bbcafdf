"""--peer HOST:PORT parsing."""

from __future__ import annotations

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.discovery import StaticPeer


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("192.168.1.20:5555", "192.168.1.20", 5555),
        (" 10.0.0.1:1 ", "10.0.0.1", 1),
        ("[::1]:65535", "::1", 65535),
        ("[fe80::2%eth0]:5555", "fe80::2%eth0", 5555),
        ("[2001:DB8::1]:80", "2001:db8::1", 80),
        ("nuc.local:5555", "nuc.local", 5555),
        ("nuc.local.:5555", "nuc.local", 5555),
        ("localhost:7000", "localhost", 7000),
        ("jetson_2:7000", "jetson_2", 7000),
    ],
)
def test_parse_accepts(text: str, host: str, port: int) -> None:
    peer = StaticPeer.parse(text)
    assert peer == StaticPeer(host, port)
    assert StaticPeer.parse(str(peer)) == peer


def test_default_port() -> None:
    assert StaticPeer.parse("nuc", default_port=5555) == StaticPeer("nuc", 5555)
    assert StaticPeer.parse("[::1]", default_port=9) == StaticPeer("::1", 9)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("10.0.0.1", "no port"),
        ("10.0.0.1:", "no port"),
        ("10.0.0.1:0", "1-65535"),
        ("10.0.0.1:65536", "1-65535"),
        ("10.0.0.1:12a", "1-65535"),
        ("10.0.0.1:+5", "1-65535"),
        ("::1:5555", r"\[::1:5555\]:PORT"),
        ("a:b:c", "several"),
        ("[::1:5555", "without closing"),
        ("[::1]5555", "after"),
        ("[nuc]:5555", "not an IPv6"),
        ("tcp://10.0.0.1:5555", "scheme"),
        ("300.1.1.1:5555", "neither"),
        ("-bad-:5555", "neither"),
        ("a b:5555", "neither"),
        ("x" * 64 + ":5555", "neither"),
    ],
)
def test_parse_rejects(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        StaticPeer.parse(text)
