"""Ring collectives over the agreed view: all-reduce, all-gather, broadcast, barrier.

All-reduce is the bandwidth-optimal ring: reduce-scatter then all-gather, each node
sending ``2 (N-1) / N`` of the data. It streams: every segment is cut into pieces and a
piece is forwarded to the successor as soon as it has been reduced, so all N links
carry data at once and a step's transfer overlaps the next step's additions.

Lossy codecs (int8, topk, fp16, bf16) are applied here, not by the transport: the
collective encodes once per hop with an error-feedback state per (bucket, step, piece)
that lives across calls, so the compression error is carried to the next call rather
than lost. In the all-gather phase the owner of a segment encodes it once and every
hop forwards those exact bytes, and the owner keeps the decoded value too — so every
replica ends with bit-identical results even with a lossy codec.

Messages are tagged ``(op_seq, phase, step, piece)`` within the view epoch; every
member calls the collectives in the same order (as in torch.distributed). A view
change wakes all waiters with :class:`PeerFailedError` — a dead peer is an error within
the failure-detection time, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch

from p2ptrain._errors import ConfigError, PeerFailedError, ProtocolError, TransportError
from p2ptrain.ring._view import View
from p2ptrain.kernels import Codec, ErrorFeedback, get_codec
from p2ptrain.kernels import read_tensor

if TYPE_CHECKING:
    from p2ptrain.ring._node import Node

__all__ = ["Collectives", "send_or_fail"]

logger = logging.getLogger(__name__)

_KIND = "coll"
_RS, _AG, _BC, _GA, _BAR = 0, 1, 2, 3, 4
# 4 MiB pieces (the transport still cuts them into 1 MiB frames, the fast size for zmq
# on loopback per DESIGN.md). Measured here, 64 MiB over 4 processes: 1 MiB pieces
# 0.47 s, 4 MiB 0.35 s, 8-16 MiB no better: per-message Python costs fall while the
# pipeline still fills quickly. Every member must use the same value.
DEFAULT_PIECE_BYTES = 4 << 20


def _bytes_tensor(buf: Any) -> torch.Tensor:
    """A flat uint8 tensor over an encoded buffer (aliasing it; codecs never reuse a held buffer)."""
    if isinstance(buf, torch.Tensor):
        return buf.contiguous().view(torch.uint8).reshape(-1)
    return read_tensor(memoryview(buf).cast("B"), torch.uint8)


async def send_or_fail(node: Node, peer: str, kind: str, **kwargs: Any) -> None:
    """``node.endpoint.send`` raced against view changes.

    A send to a dead peer can wait for the wire forever; when the view changes (or this
    node pauses) first, the send is cancelled and :class:`PeerFailedError` raised.
    """
    changed = node.changed()
    sending = asyncio.ensure_future(node.endpoint.send(peer, kind, **kwargs))
    try:
        await asyncio.wait([sending, changed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not changed.done():
            changed.cancel()
    if not sending.done():
        sending.cancel()
        raise PeerFailedError(f"view changed while sending to {peer}; now {node.view.epoch}: {', '.join(node.view.members)}")
    try:
        sending.result()
    except TransportError as exc:
        raise PeerFailedError(f"sending to {peer} failed: {exc}") from exc


class Collectives:
    """Collective operations over a node's current view.

    Args:
        node: a started :class:`~p2ptrain.Node`.
        piece_bytes: streaming granularity of all-reduce.
        view: pin the collectives to this view (a training job passes the view it
            started in): once the node's view moves on, every call raises
            :class:`PeerFailedError` instead of waiting on members that are not in the
            job. Default: whatever view the node holds at each call.
        name: keeps this instance's messages apart from other instances' over the same
            members (e.g. a stage group's ring that spans the whole view).
    """

    def __init__(self, node: Node, *, piece_bytes: int = DEFAULT_PIECE_BYTES, view: View | None = None,
                 name: str = "") -> None:
        if piece_bytes < 4096:
            raise ConfigError(f"piece_bytes={piece_bytes} is too small; use at least 4096")
        self.node = node
        self._pinned = view
        self._name = name
        self.piece_bytes = piece_bytes
        self._seq = 0
        self._seq_epoch = -1
        self._feedback: dict[Hashable, ErrorFeedback] = {}
        self._codecs: dict[str, Codec] = {}

    # --- plumbing --------------------------------------------------------------------------

    def _view(self) -> View:
        v = self._pinned or self.node.view
        if self._pinned is not None and self.node.view.epoch != v.epoch:
            raise PeerFailedError(
                f"the ring changed from view {v.epoch} ({', '.join(v.members)}) to {self.node.view.epoch} "
                f"({', '.join(self.node.view.members)}) during the job"
            )
        return v

    def _next_seq(self) -> tuple[int, int]:
        e = self._view().epoch
        if e != self._seq_epoch:
            self._seq_epoch, self._seq = e, 0
        self._seq += 1
        return e, self._seq

    def _codec(self, spec: str) -> Codec:
        c = self._codecs.get(spec)
        if c is None:
            c = self._codecs[spec] = get_codec(spec)
        return c

    async def _send(self, peer: str, epoch: int, tag: list[Any], tensors: Sequence[torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        await send_or_fail(self.node, peer, _KIND, epoch=epoch, tag=[self._digest(), *tag], meta=meta or {}, tensors=list(tensors))

    async def _take(self, epoch: int, tag: list[Any]) -> Any:
        # The view digest in the tag keeps two rings that share an epoch number apart.
        return await self.node.take(_KIND, [self._digest(), *tag], epoch=epoch)

    def _digest(self) -> str:
        digest = (self._pinned or self.node.view).digest
        return f"{digest}/{self._name}" if self._name else digest

    def _pack(self, codec: Codec, x: torch.Tensor, fb_key: Hashable | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
        if codec.lossless and codec.name == "none":
            return {}, [x]
        fb = None
        if fb_key is not None and not codec.lossless:
            fb = self._feedback.get(fb_key)
            if fb is None:
                fb = self._feedback[fb_key] = ErrorFeedback()
        enc = codec.encode(x, feedback=fb)
        return {"c": enc.meta}, [_bytes_tensor(b) for b in enc.buffers]

    @staticmethod
    def _unpack(codec: Codec, msg: Any, like: torch.Tensor) -> torch.Tensor:
        if codec.lossless and codec.name == "none":
            if len(msg.tensors) != 1 or msg.tensors[0].shape != like.shape or msg.tensors[0].dtype != like.dtype:
                raise ProtocolError(f"collective piece from {msg.sender} does not match: expected {tuple(like.shape)} {like.dtype}")
            return msg.tensors[0]
        meta = msg.meta.get("c") if isinstance(msg.meta, dict) else None
        if not isinstance(meta, dict):
            raise ProtocolError(f"collective piece from {msg.sender} lacks codec metadata")
        bufs = [t.numpy() for t in msg.tensors]
        want = codec.expected_nbytes(meta, tuple(like.shape), like.dtype)
        if [b.nbytes for b in bufs] != want:
            raise ProtocolError(f"collective piece from {msg.sender}: buffer sizes {[b.nbytes for b in bufs]} != {want}")
        return codec.decode(meta, bufs, tuple(like.shape), like.dtype)

    def _pieces(self, numel: int, elem: int) -> list[tuple[int, int]]:
        per = max(1, self.piece_bytes // elem)
        return [(a, min(a + per, numel)) for a in range(0, numel, per)]

    # --- all-reduce ------------------------------------------------------------------------

    async def all_reduce(self, tensor: torch.Tensor, *, op: str = "mean", codec: str = "none", key: Hashable = "default") -> torch.Tensor:
        """Reduce ``tensor`` in place across the view; every member gets the same result.

        Args:
            tensor: a contiguous float tensor, same shape on every member.
            op: ``"sum"`` or ``"mean"``.
            codec: codec spec for the wire (``"none"``, ``"fp16"``, ``"int8:256"``, ...).
            key: names the tensor across calls (e.g. a gradient bucket), so lossy codecs
                keep one error-feedback residual per position.

        Returns:
            ``tensor``, reduced.

        Raises:
            PeerFailedError: the view changed during the operation.
        """
        if op not in ("sum", "mean"):
            raise ConfigError(f"op must be 'sum' or 'mean', got {op!r}")
        if not tensor.is_contiguous():
            raise ConfigError("all_reduce needs a contiguous tensor (call .contiguous() first)")
        c = self._codec(codec)
        view = self._view()
        epoch, seq = self._next_seq()
        n = len(view)
        if n == 1:
            return tensor
        me = self.node.node_id
        r, succ = view.rank(me), view.successor(me)
        flat = tensor.view(-1)
        bounds = [math.floor(i * flat.numel() / n) for i in range(n + 1)]
        seg = [(bounds[i], bounds[i + 1]) for i in range(n)]

        def pieces(s: int) -> list[tuple[int, int]]:
            a, b = seg[s]
            return [(a + x, a + y) for x, y in self._pieces(b - a, flat.element_size())]

        # Sends run as tasks so this coroutine keeps reducing while earlier pieces are on
        # the wire; a region is only rewritten after its outgoing send has finished.
        sending: dict[tuple[int, int], asyncio.Task[None]] = {}

        def send(sid: int, j: int, tag: list[int], ts: Sequence[torch.Tensor], meta: dict[str, Any] | None) -> None:
            sending[(sid, j)] = asyncio.ensure_future(self._send(succ, epoch, tag, ts, meta))

        async def settled(sid: int, j: int) -> None:
            t = sending.pop((sid, j), None)
            if t is not None:
                await t

        try:
            # Reduce-scatter, streamed: piece j received at step s is forwarded at step s+1.
            for j, (a, b) in enumerate(pieces(r)):
                meta, ts = self._pack(c, flat[a:b], (key, _RS, 0, j))
                send(r, j, [seq, _RS, 0, j], ts, meta)
            for s in range(n - 1):
                sid = (r - s - 1) % n
                for j, (a, b) in enumerate(pieces(sid)):
                    msg = await self._take(epoch, [seq, _RS, s, j])
                    part = flat[a:b]
                    part += self._unpack(c, msg, part)
                    if s + 1 < n - 1:
                        meta, ts = self._pack(c, part, (key, _RS, s + 1, j))
                        send(sid, j, [seq, _RS, s + 1, j], ts, meta)
                    else:
                        # This node owns segment (r+1) % n: finish it, and start the all-gather.
                        if op == "mean":
                            part /= n
                        meta, ts = self._pack(c, part, (key, _AG, j))
                        if not c.lossless:
                            part.copy_(self._unpack_local(c, meta, ts, part))
                        send(sid, j, [seq, _AG, 0, j], ts, meta)
            # All-gather: forward the exact bytes received, so replicas stay bit-identical.
            for s in range(n - 1):
                sid = (r - s) % n
                for j, (a, b) in enumerate(pieces(sid)):
                    msg = await self._take(epoch, [seq, _AG, s, j])
                    await settled(sid, j)
                    part = flat[a:b]
                    part.copy_(self._unpack(c, msg, part))
                    if s + 1 < n - 1:
                        send(sid, j, [seq, _AG, s + 1, j], msg.tensors, msg.meta)
            await asyncio.gather(*sending.values())
        finally:
            for t in sending.values():
                t.cancel()
        return tensor

    @staticmethod
    def _unpack_local(c: Codec, meta: dict[str, Any], ts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return c.decode(meta["c"], [t.numpy() for t in ts], tuple(like.shape), like.dtype)

    # --- all-gather, broadcast, barrier ----------------------------------------------------

    async def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's ``tensor`` (any shapes), in ring order, on every member."""
        view = self._view()
        epoch, seq = self._next_seq()
        n = len(view)
        me = self.node.node_id
        r, succ = view.rank(me), view.successor(me)
        out: list[torch.Tensor | None] = [None] * n
        out[r] = tensor
        cur_meta: dict[str, Any] = {"o": r}
        cur = [tensor.contiguous()]
        for s in range(n - 1):
            await self._send(succ, epoch, [seq, _GA, s, 0], cur, cur_meta)
            msg = await self._take(epoch, [seq, _GA, s, 0])
            origin = (r - s - 1) % n
            if len(msg.tensors) != 1:
                raise ProtocolError(f"all_gather piece from {msg.sender} carries {len(msg.tensors)} tensors")
            out[origin] = msg.tensors[0]
            cur, cur_meta = msg.tensors, {"o": origin}
        return [t for t in out if t is not None]

    async def broadcast(self, tensor: torch.Tensor, root: str) -> torch.Tensor:
        """Copy ``root``'s ``tensor`` into every member's ``tensor`` (in place), along the ring."""
        view = self._view()
        epoch, seq = self._next_seq()
        n = len(view)
        if n == 1:
            return tensor
        me = self.node.node_id
        succ = view.successor(me)
        hops = (view.rank(me) - view.rank(root)) % n
        if hops > 0:
            msg = await self._take(epoch, [seq, _BC, hops - 1, 0])
            got = msg.tensors[0] if len(msg.tensors) == 1 else None
            if got is None or got.shape != tensor.shape or got.dtype != tensor.dtype:
                raise ProtocolError(f"broadcast from {msg.sender} does not match {tuple(tensor.shape)} {tensor.dtype}")
            tensor.copy_(got)
        if hops < n - 1:
            await self._send(succ, epoch, [seq, _BC, hops, 0], [tensor.contiguous()])
        return tensor

    async def barrier(self) -> None:
        """Return once every member of the view has entered the barrier."""
        await self.all_gather(torch.zeros(1))
