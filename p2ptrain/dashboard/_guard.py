"""What keeps the dashboard's HTTP side safe: addresses, the token, request limits.

Plain functions and classes, no sockets:

- :func:`parse_address` reads ``[ADDR:]PORT`` (``8080``, ``0.0.0.0:8080``, ``[::1]:0``);
- :func:`dashboard_token` derives the page's token from the cluster secret
  (HMAC-SHA256, so the token never reveals the secret and a token of one cluster is no
  use on another);
- :class:`RateLimiter` is a token bucket per client address, bounded in memory;
- :func:`host_allowed` refuses Host names other than IP literals and ``localhost`` on a
  loopback page: a web site the user visits cannot rebind its own name to 127.0.0.1 and
  read the page (DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable

from p2ptrain._errors import ConfigError

__all__ = ["RateLimiter", "dashboard_token", "host_allowed", "is_loopback", "parse_address"]

#: What the token is derived from, with the secret as the HMAC key (fixed: the CLI and
#: the page's users compute the same token on every member of a cluster).
TOKEN_CONTEXT = b"p2ptrain-dashboard"


def parse_address(text: str) -> tuple[str, int]:
    """``[ADDR:]PORT`` as ``(host, port)``; a bare port binds 127.0.0.1.

    Raises:
        ConfigError: not of that form, a host that is not an IP address or ``localhost``,
            or a port outside 0-65535 (the message shows the forms that work).
    """
    raw = str(text).strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    fix = "give [ADDR:]PORT, e.g. 8080, 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080 (port 0: a free one)"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"dashboard address {raw!r}: bad port {port_text!r}; {fix}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"dashboard address {raw!r}: {host!r} is not an IP address; {fix}") from None
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def dashboard_token(secret: bytes) -> str:
    """The page's token for a cluster: hex HMAC-SHA256 of ``"p2ptrain-dashboard"`` keyed by the secret."""
    return hmac.new(secret, TOKEN_CONTEXT, hashlib.sha256).hexdigest()


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the real one."""
    return given is not None and len(given) <= 128 and hmac.compare_digest(given.encode(), token.encode())


def host_allowed(host_header: str | None) -> bool:
    """True when the ``Host`` header names an IP literal or ``localhost`` (any port)."""
    if not host_header or len(host_header) > 300:
        return False
    host = host_header.strip()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        name = host[1:end] if end > 0 else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second, bursts of ``burst``.

    At most ``max_clients`` addresses are remembered; past that, the buckets that refilled
    are forgotten first (they hold no debt), and a flood of new addresses only resets
    the table. Loop thread only.
    """

    def __init__(self, rate: float = 20.0, burst: float = 60.0, *, max_clients: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError(f"rate limit needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def allow(self, client: str) -> bool:
        """Take one token for ``client``; False when its bucket is empty."""
        now = self.clock()
        tokens, then = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > self.max_clients:
            self._forget(now)
        return True

    def _forget(self, now: float) -> None:
        full = [c for c, (t, then) in self._buckets.items() if t + (now - then) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) > self.max_clients:
            self._buckets.clear()
