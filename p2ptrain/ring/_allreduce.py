"""One ring all-reduce as an object: a reduce-scatter phase, then an all-gather phase.

The bandwidth-optimal ring (each member sends ``2 (N-1) / N`` of the data), streamed:
every segment is cut into pieces (:mod:`p2ptrain.ring._segments`) and a piece goes to
the successor as soon as it has been reduced, so all N links carry data at once and a
step's transfer overlaps the next step's additions.

Lossy codecs (int8, topk, fp16, bf16) are applied here, not by the transport: each hop
encodes once with an error-feedback state per ``(key, code, step, piece)`` that the
caller keeps across calls, so the compression error is carried to the next call rather
than lost. In the all-gather phase the owner of a segment encodes it once, keeps the
decoded value itself, and every hop forwards those exact bytes: every replica ends
bit-identical even with a lossy codec.

Messages are tagged :class:`Tag` ``(seq, code, step, piece)``; the :class:`Code` values
are shared by every collective of :class:`~p2ptrain.ring.Collectives` and are part of
the wire format.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import torch

from p2ptrain._errors import ProtocolError
from p2ptrain.kernels import Codec, ErrorFeedback, read_tensor
from p2ptrain.ring._segments import RingLayout, all_gather_segment, owned_segment, reduce_scatter_segment
from p2ptrain.ring._tasks import cancel_quietly
from p2ptrain.transport import INLINE_BYTES as PLAIN_INLINE_BYTES
from p2ptrain.transport import Message

__all__ = ["Channel", "Code", "RingAllReduce", "Tag"]

T = TypeVar("T")

#: Codec work (encode, decode and add) on pieces below this runs on the event loop: a
#: thread hand-off (~50 us here) costs more than that on 256 KiB, but a 4 MiB piece would
#: hold the loop for ~6 ms (int8 encode), which a host's control loop must not see.
#: Plain adds and copies (PLAIN_INLINE_BYTES, the transport's landing limit) stay on the
#: loop up to 2 MiB.
INLINE_BYTES = 256 << 10


class Code(enum.IntEnum):
    """What a collective message carries; the numbers are on the wire, never reuse one."""

    REDUCE_SCATTER = 0
    ALL_GATHER = 1
    BROADCAST = 2
    GATHER = 3  # all_gather of whole tensors (and the barrier, which is one)
    BARRIER = 4  # reserved: the barrier runs as a GATHER today
    CHAIN = 5  # sum_along: step 0 the partial sum on its way out, step 1 the total on its way back


class Tag(NamedTuple):
    """The key of one collective message within a view epoch (and a collectives name)."""

    seq: int  # the call's number within the epoch: every member calls in the same order
    code: Code
    step: int  # ring step within the phase
    piece: int  # piece index within the segment (0 for whole-tensor collectives)

    def wire(self) -> list[int]:
        """The tag as msgpack carries it: a list of plain ints."""
        return [int(v) for v in self]


class Channel(Protocol):
    """Tagged messages between ring members of one collectives instance."""

    async def send(self, peer: str, epoch: int, tag: Tag, tensors: Sequence[torch.Tensor],
                   meta: dict[str, Any] | None = None) -> None:
        """Send to ``peer``; raises :class:`PeerFailedError` when the view changes first."""

    async def take(self, epoch: int, tag: Tag, sender: str | None = None) -> Message:
        """Wait for the message ``tag`` (from ``sender``, when known); raises :class:`PeerFailedError` on a view change."""

    def expect(self, epoch: int, tag: Tag, sender: str, into: torch.Tensor, *, add: bool) -> None:
        """Have the plain tensor of message ``tag`` from ``sender`` land in ``into`` (added or copied)."""

    def forget(self, epoch: int, tag: Tag) -> None:
        """Disarm :meth:`expect` for ``tag``."""

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` off the event loop, in order with the landings (tensor work)."""


def _bytes_tensor(buf: Any) -> torch.Tensor:
    """A flat uint8 tensor over an encoded buffer (aliasing it; codecs never reuse a held buffer)."""
    if isinstance(buf, torch.Tensor):
        return buf.contiguous().view(torch.uint8).reshape(-1)
    out: torch.Tensor = read_tensor(memoryview(buf).cast("B"), torch.uint8)
    return out


def _plain(codec: Codec) -> bool:
    # Raw tensors travel as themselves, with no codec metadata (the wire form of "none").
    return bool(codec.lossless and codec.name == "none")


def encode_piece(codec: Codec, x: torch.Tensor, feedback: ErrorFeedback | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """``x`` as message ``(meta, tensors)``: codec metadata under ``"c"``, buffers as uint8."""
    if _plain(codec):
        return {}, [x]
    enc = codec.encode(x, feedback=feedback)
    return {"c": enc.meta}, [_bytes_tensor(b) for b in enc.buffers]


def decode_piece(codec: Codec, msg: Message, like: torch.Tensor) -> torch.Tensor:
    """The tensor a received piece carries, validated against ``like``'s shape and dtype.

    Raises:
        ProtocolError: the piece does not match, lacks codec metadata, or its buffer
            sizes are not what the codec expects.
    """
    if _plain(codec):
        if len(msg.tensors) != 1 or msg.tensors[0].shape != like.shape or msg.tensors[0].dtype != like.dtype:
            raise ProtocolError(f"collective piece from {msg.sender} does not match: expected {tuple(like.shape)} {like.dtype}")
        raw: torch.Tensor = msg.tensors[0]
        return raw
    meta = msg.meta.get("c") if isinstance(msg.meta, dict) else None
    if not isinstance(meta, dict):
        raise ProtocolError(f"collective piece from {msg.sender} lacks codec metadata")
    bufs = [t.numpy() for t in msg.tensors]
    want = codec.expected_nbytes(meta, tuple(like.shape), like.dtype)
    if [b.nbytes for b in bufs] != want:
        raise ProtocolError(f"collective piece from {msg.sender}: buffer sizes {[b.nbytes for b in bufs]} != {want}")
    decoded: torch.Tensor = codec.decode(meta, bufs, tuple(like.shape), like.dtype)
    return decoded


def _accumulate(codec: Codec, msg: Message, part: torch.Tensor) -> None:
    part += decode_piece(codec, msg, part)


def _overwrite(codec: Codec, msg: Message, part: torch.Tensor) -> None:
    part.copy_(decode_piece(codec, msg, part))


def _encode_and_keep(codec: Codec, part: torch.Tensor, fb: ErrorFeedback | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Encode ``part``, then set it to what the receivers will decode."""
    meta, ts = encode_piece(codec, part, fb)
    part.copy_(codec.decode(meta["c"], [t.numpy() for t in ts], tuple(part.shape), part.dtype))
    return meta, ts


class RingAllReduce:
    """One all-reduce of one flat tensor over a ring: build it, then await :meth:`run` once.

    Every member of the ring must build one with the same ``seq``, ``op``, codec,
    ``piece_bytes`` and tensor size, in the same call order.

    Args:
        channel: tagged send/take between the members.
        flat: the contiguous 1-D tensor to reduce in place.
        rank: this member's position in the ring.
        members: ring size (>= 2; a ring of one has nothing to reduce).
        successor: the node id of the member at ``rank + 1``.
        epoch: the view epoch every message belongs to.
        seq: this call's number within the epoch.
        op: ``"sum"`` or ``"mean"`` (validated by the caller).
        codec: the wire codec.
        feedback: error-feedback states by key, kept by the caller across calls.
        key: names the tensor across calls (e.g. a gradient bucket).
        piece_bytes: streaming granularity.
        predecessor: the node id of the member at ``rank - 1``. With it and the plain
            codec, every piece is received straight into its region of ``flat`` (added
            in the reduce-scatter, copied in the all-gather: see
            :meth:`Channel.expect`); without it, pieces are added or copied on arrival.
    """

    def __init__(self, channel: Channel, flat: torch.Tensor, *, rank: int, members: int, successor: str, epoch: int,
                 seq: int, op: str, codec: Codec, feedback: dict[Hashable, ErrorFeedback], key: Hashable,
                 piece_bytes: int, predecessor: str | None = None) -> None:
        self._channel = channel
        self._flat = flat
        self._rank = rank
        self._n = members
        self._succ = successor
        self._epoch = epoch
        self._seq = seq
        self._op = op
        self._codec = codec
        self._feedback = feedback
        self._key = key
        self._layout = RingLayout(flat.numel(), members, flat.element_size(), piece_bytes)
        self._pred = predecessor
        # The region each armed piece lands in, by tag (see _arm).
        self._landing: dict[Tag, torch.Tensor] = {}
        # Sends run as tasks so this coroutine keeps reducing while earlier pieces are on
        # the wire; a region is only rewritten after its outgoing send has finished.
        self._sending: dict[tuple[int, int], asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Reduce-scatter, then all-gather; returns when every outgoing piece has been sent.

        Raises:
            PeerFailedError: the view changed (a member died or left) during the run.
            ProtocolError: a peer sent a piece that does not fit.
        """
        try:
            self._arm()
            await self._reduce_scatter()
            await self._all_gather()
            await asyncio.gather(*self._sending.values())
        finally:
            for t in self._sending.values():
                cancel_quietly(t)
            for tag in self._landing:  # those that landed are disarmed already
                self._channel.forget(self._epoch, tag)

    def _arm(self) -> None:
        """Expect every incoming piece in its region: added (reduce-scatter) or copied (all-gather).

        Safe to arm all at once: in the reduce-scatter a region is received into before it
        is forwarded, never while it is on the wire; the all-gather piece of a region can
        only exist once the segment's owner has this member's contribution to it, so the
        bytes this member sent from that region have left (they were read by its successor).
        """
        if self._pred is None or not _plain(self._codec):
            return
        n, r, seq, flat = self._n, self._rank, self._seq, self._flat
        for s in range(n - 1):
            for code, sid, add in ((Code.REDUCE_SCATTER, reduce_scatter_segment(r, s, n), True),
                                   (Code.ALL_GATHER, all_gather_segment(r, s, n), False)):
                for j, (a, b) in enumerate(self._layout.pieces(sid)):
                    tag = Tag(seq, code, s, j)
                    self._landing[tag] = flat[a:b]
                    self._channel.expect(self._epoch, tag, self._pred, self._landing[tag], add=add)

    def _landed(self, msg: Message, tag: Tag) -> bool:
        """True when ``msg``'s payload was received into its region already."""
        if msg.landed is None:
            return False
        if msg.landed is not self._landing.get(tag):
            raise ProtocolError(f"collective piece {tuple(tag)} from {msg.sender} landed somewhere else")
        return True

    async def _reduce_scatter(self) -> None:
        """Streamed: piece ``j`` received at step ``s`` is forwarded at step ``s + 1``.

        Ends by finishing the owned segment (``/ n`` for a mean) and starting the
        all-gather with it.
        """
        n, r, flat = self._n, self._rank, self._flat
        for j, (a, b) in enumerate(self._layout.pieces(r)):
            meta, ts = await self._pack(flat[a:b], (self._key, Code.REDUCE_SCATTER, 0, j))
            self._send(r, j, Tag(self._seq, Code.REDUCE_SCATTER, 0, j), meta, ts)
        for s in range(n - 1):
            sid = reduce_scatter_segment(r, s, n)
            for j, (a, b) in enumerate(self._layout.pieces(sid)):
                tag = Tag(self._seq, Code.REDUCE_SCATTER, s, j)
                msg = await self._channel.take(self._epoch, tag, self._pred)
                part = flat[a:b]
                if not self._landed(msg, tag):  # it came before this call armed its landing
                    await self._work(part, _accumulate, self._codec, msg, part)
                if s + 1 < n - 1:
                    meta, ts = await self._pack(part, (self._key, Code.REDUCE_SCATTER, s + 1, j))
                    self._send(sid, j, Tag(self._seq, Code.REDUCE_SCATTER, s + 1, j), meta, ts)
                else:
                    assert sid == owned_segment(r, n)
                    await self._finish_owned(sid, j, part)

    async def _finish_owned(self, sid: int, j: int, part: torch.Tensor) -> None:
        """Complete piece ``j`` of the owned segment and send it into the all-gather."""
        if self._op == "mean":
            await self._work(part, torch.Tensor.div_, part, self._n)
        if _plain(self._codec):
            meta, ts = encode_piece(self._codec, part, None)
        else:
            # Keep what the others will decode, not the exact value: replicas stay identical.
            meta, ts = await self._work(part, _encode_and_keep, self._codec, part, self._fb((self._key, Code.ALL_GATHER, j)))
        self._send(sid, j, Tag(self._seq, Code.ALL_GATHER, 0, j), meta, ts)

    async def _all_gather(self) -> None:
        """Forward the exact bytes received, so replicas stay bit-identical."""
        n, r, flat = self._n, self._rank, self._flat
        for s in range(n - 1):
            sid = all_gather_segment(r, s, n)
            for j, (a, b) in enumerate(self._layout.pieces(sid)):
                tag = Tag(self._seq, Code.ALL_GATHER, s, j)
                msg = await self._channel.take(self._epoch, tag, self._pred)
                await self._settled(sid, j)
                part = flat[a:b]
                if self._landed(msg, tag):
                    fwd: Sequence[torch.Tensor] = [part]
                else:
                    await self._work(part, _overwrite, self._codec, msg, part)
                    fwd = msg.tensors
                if s + 1 < n - 1:
                    self._send(sid, j, Tag(self._seq, Code.ALL_GATHER, s + 1, j), msg.meta, fwd)

    # --- plumbing --------------------------------------------------------------------------

    def _fb(self, fb_key: Hashable) -> ErrorFeedback | None:
        if self._codec.lossless:
            return None
        fb = self._feedback.get(fb_key)
        if fb is None:
            fb = self._feedback[fb_key] = ErrorFeedback()
        return fb

    async def _pack(self, x: torch.Tensor, fb_key: Hashable) -> tuple[dict[str, Any], list[torch.Tensor]]:
        if _plain(self._codec):
            return encode_piece(self._codec, x, None)
        return await self._work(x, encode_piece, self._codec, x, self._fb(fb_key))

    async def _work(self, part: torch.Tensor, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, tensor work on ``part``: off the event loop unless ``part`` is small."""
        nbytes = part.numel() * part.element_size()
        small = nbytes <= PLAIN_INLINE_BYTES if _plain(self._codec) else nbytes < INLINE_BYTES
        if small:
            return fn(*args)
        return await self._channel.offload(fn, *args)

    def _send(self, sid: int, j: int, tag: Tag, meta: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        self._sending[(sid, j)] = asyncio.ensure_future(self._channel.send(self._succ, self._epoch, tag, tensors, meta))

    async def _settled(self, sid: int, j: int) -> None:
        t = self._sending.pop((sid, j), None)
        if t is not None:
            try:
                await t
            except BaseException:
                cancel_quietly(t)  # popped: run()'s clean-up no longer sees it
                raise
