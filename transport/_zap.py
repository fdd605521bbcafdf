"""A ZAP (ZeroMQ Authentication Protocol, RFC 27) responder bound on one endpoint's context.

libzmq asks ``inproc://zeromq.zap.01`` of the *listening socket's own context* whether to
accept each new connection, so each :class:`Endpoint` that needs admission runs its own
responder on its own context: several endpoints per process never share policy. The decision is
``admit(ip, client_public_key_z85 or None)``; a refusal makes libzmq close the
connection during the handshake, so a refused peer never gets a message delivered.

:func:`zap_reply` is the pure decision (tested without sockets); :class:`ZapResponder`
is the thin socket adapter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio
from zmq.utils import z85

from ._curve import Admit, CurveKeys, admit_any

__all__ = ["ZAP_ENDPOINT", "ZapResponder", "needs_zap", "zap_reply"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
_VERSION = b"1.0"

logger = logging.getLogger(__name__)

#: ``on_refuse(ip, claimed_identity, why)``
Refused = Callable[[str, str, str], None]


def needs_zap(curve: CurveKeys | None, admit: Admit | None, host: str) -> bool:
    """Whether connections must be put to ZAP.

    Not for the default plain endpoint bound to loopback: the kernel already admits only
    local peers there, which is exactly the default policy, and libzmq with ZAP active
    receives large messages measurably slower (here: 1700 instead of 490 page faults and
    +5 ms of I/O-thread time per 64 MiB message). Nor for :func:`admit_any`. Always with
    CURVE: without ZAP libzmq would accept any client key.
    """
    if curve is not None:
        return True
    if admit is admit_any:
        return False
    if admit is not None:
        return True
    return not ipaddress.ip_address(host).is_loopback


def zap_reply(request: Sequence[bytes], admit: Admit) -> tuple[list[bytes], tuple[str, str, str] | None]:
    """Decide one ZAP request (the frames after the ROUTER envelope).

    Args:
        request: ``[version, request_id, domain, address, identity, mechanism, *credentials]``.
        admit: the policy.

    Returns:
        The reply frames, and ``(ip, identity, why)`` when the peer is refused.
    """
    if len(request) < 6:
        return [_VERSION, b"", b"500", b"malformed ZAP request", b"", b""], ("?", "?", "malformed ZAP request")
    version, request_id, _domain, address, identity, mechanism, *credentials = request
    ip = address.decode("ascii", "replace")
    who = identity.decode("utf-8", "replace")
    if version != _VERSION:
        return [_VERSION, request_id, b"500", b"unsupported ZAP version", b"", b""], (ip, who, "unsupported ZAP version")
    key: bytes | None = None
    if mechanism == b"CURVE":
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return [_VERSION, request_id, b"400", b"bad CURVE credentials", b"", b""], (ip, who, "bad CURVE credentials")
        key = z85.encode(credentials[0])
    elif mechanism != b"NULL":
        refusal = (ip, who, f"mechanism {mechanism!r} not allowed")
        return [_VERSION, request_id, b"400", b"mechanism not allowed", b"", b""], refusal
    try:
        ok = bool(admit(ip, key))
    except Exception as exc:  # a broken policy refuses, never crashes the responder
        logger.exception("admission policy raised for %s; refusing", ip)
        return [_VERSION, request_id, b"400", b"policy error", b"", b""], (ip, who, f"policy raised {exc!r}")
    if not ok:
        why = "client key is not the cluster key" if key is not None else "address not admitted without a cluster secret"
        return [_VERSION, request_id, b"400", b"not admitted", b"", b""], (ip, who, why)
    return [_VERSION, request_id, b"200", b"OK", identity, b""], None


class ZapResponder:
    """Answers libzmq's admission questions for one context.

    Bind it (:meth:`start`) before any listening socket of the context accepts
    connections. Runs as a task on the loop that calls :meth:`start`.

    Args:
        ctx: the endpoint's context.
        admit: the policy.
        on_refuse: called on the loop thread for every refusal.
    """

    def __init__(self, ctx: zmq.asyncio.Context, admit: Admit, on_refuse: Refused) -> None:
        self._ctx = ctx
        self._admit = admit
        self._on_refuse = on_refuse
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.admitted = 0
        self.refused = 0

    def start(self) -> None:
        """Bind the ZAP endpoint and start answering (call on the loop thread)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(ZAP_ENDPOINT)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="p2ptrain-zap")

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            # ROUTER envelope: [routing id, b"", request...] (REQ-style delimiter)
            try:
                split = frames.index(b"")
            except ValueError:
                continue
            route, request = frames[: split + 1], frames[split + 1 :]
            reply, refusal = zap_reply(request, self._admit)
            if refusal is None:
                self.admitted += 1
            else:
                self.refused += 1
                self._on_refuse(*refusal)
            await sock.send_multipart(route + reply)

    async def close(self) -> None:
        """Stop answering and close the socket. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
