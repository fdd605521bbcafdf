"""``parse_size``: the sizes people type on the command line, and clear refusals."""

from __future__ import annotations

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain._units import parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1000000", 1_000_000),
        ("0", 0),
        ("64MiB", 64 * 2**20),
        ("64mib", 64 * 2**20),
        ("1GiB", 2**30),
        ("1.5KiB", 1536),
        ("512kB", 512_000),
        ("2GB", 2 * 10**9),
        ("10 B", 10),
        (" 3TiB ", 3 * 2**40),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "cannot read"),
        ("-1", "cannot read"),
        ("64 Mio", "unknown size unit"),
        ("64XB", "unknown size unit"),
        ("0.3KiB", "not a whole number"),
        ("1e6", "cannot read"),
        ("MiB", "cannot read"),
        ("1,000", "cannot read"),
        ("9" * 40, "cannot read"),
    ],
)
def test_bad_sizes_say_how_to_fix(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_size(text)
    assert "64MiB" in str(info.value)  # the message shows the accepted form


def test_non_string_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_size(64)  # type: ignore[arg-type]
