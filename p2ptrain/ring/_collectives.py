"""Ring collectives over the agreed view: all-reduce, all-gather, broadcast, barrier, chain sums.

:class:`Collectives` is the front: it numbers the calls within a view epoch, keeps the
codecs and the error-feedback states that live across calls, and tags messages so two
instances (or two rings sharing an epoch number) never take each other's. The ring
all-reduce itself is one :class:`~p2ptrain.ring._allreduce.RingAllReduce` per call; the
small ring passes (all-gather of whole tensors, broadcast) and the chain sum of small
tensors (:meth:`Collectives.sum_along`) live here.

Messages are tagged ``[digest, seq, code, step, piece]`` (:class:`Tag` after the view
digest) within the view epoch; every member calls the collectives in the same order (as
in torch.distributed). A view change wakes all waiters with :class:`PeerFailedError` —
a dead peer is an error within the failure-detection time, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from p2ptrain._errors import ConfigError, PeerFailedError, ProtocolError, TransportError
from p2ptrain.kernels import Codec, ErrorFeedback, get_codec
from p2ptrain.ring._allreduce import PLAIN_INLINE_BYTES, Code, RingAllReduce, Tag
from p2ptrain.ring._membership import MemberState
from p2ptrain.ring._segments import broadcast_hops, reduce_scatter_segment
from p2ptrain.ring._tasks import cancel_quietly
from p2ptrain.ring._view import View

if TYPE_CHECKING:
    from p2ptrain.ring._node import Node
    from p2ptrain.transport import Message

__all__ = ["Collectives", "send_or_fail"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_KIND = "coll"
# 4 MiB pieces (the transport still cuts them into 1 MiB frames, the fast size for zmq
# on loopback per DESIGN.md). Measured here, 64 MiB over 4 processes: 1 MiB pieces
# 0.47 s, 4 MiB 0.35 s, 8-16 MiB no better: per-message Python costs fall while the
# pipeline still fills quickly. Every member must use the same value.
DEFAULT_PIECE_BYTES = 4 << 20


async def send_or_fail(node: Node, peer: str, kind: str, **kwargs: Any) -> None:
    """``node.endpoint.send`` raced against view changes.

    A send to a dead peer can wait for the wire forever; when the view changes so that the
    send is moot (a member failed, the peer left, this node paused) the send is cancelled
    and :class:`PeerFailedError` raised.

    Raises:
        PeerFailedError: the view changed first, or the transport failed.
    """
    epoch = kwargs.get("epoch")
    sending = asyncio.ensure_future(node.endpoint.send(peer, kind, **kwargs))
    try:
        while not sending.done():
            changed = node.changed()
            try:
                await asyncio.wait([sending, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not changed.done():
                    changed.cancel()
            if sending.done():
                break
            # An orderly change (a leave after its last message, a join) leaves this send's
            # view draining; it goes on while its peer is alive.
            still_useful = epoch == node.view.epoch or (isinstance(epoch, int) and node.draining(epoch))
            if node.state is MemberState.PAUSED or not still_useful or peer not in node.view:
                raise PeerFailedError(f"view changed while sending to {peer}; now {node.view.epoch}: "
                                      f"{', '.join(node.view.members)}")
    finally:
        if not sending.done():  # moot, or this coroutine was cancelled (its collective ended): the send ends too
            cancel_quietly(sending)
    try:
        sending.result()
    except TransportError as exc:
        raise PeerFailedError(f"sending to {peer} failed: {exc}") from exc


def _one_like(msg: Message, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The one tensor ``msg`` carries, of ``tensor``'s shape and dtype.

    Raises:
        ProtocolError: it carries another number of tensors, or another shape or dtype.
    """
    got = msg.tensors[0] if len(msg.tensors) == 1 else None
    if got is None or got.shape != tensor.shape or got.dtype != tensor.dtype:
        raise ProtocolError(f"{what} from {msg.sender} does not match {tuple(tensor.shape)} {tensor.dtype}")
    return got


class _NodeChannel:
    """Collective messages over a node: ``[digest, *tag]`` of kind ``coll`` (a :class:`Channel`).

    One channel per collective call: the digest of the view the call started in holds for
    all its messages, so a view change mid-call (an orderly leave, a join) cannot split
    one call's messages over two tags.
    """

    def __init__(self, node: Node, digest: str) -> None:
        self._node = node
        self._digest = digest

    async def send(self, peer: str, epoch: int, tag: Tag, tensors: Sequence[torch.Tensor],
                   meta: dict[str, Any] | None = None) -> None:
        await send_or_fail(self._node, peer, _KIND, epoch=epoch, tag=[self._digest, *tag.wire()], meta=meta or {},
                           tensors=list(tensors))

    async def take(self, epoch: int, tag: Tag, sender: str | None = None) -> Message:
        # The view digest in the tag keeps two rings that share an epoch number apart.
        return await self._node.take(_KIND, [self._digest, *tag.wire()], epoch=epoch, sender=sender)

    def expect(self, epoch: int, tag: Tag, sender: str, into: torch.Tensor, *, add: bool) -> None:
        self._node.endpoint.expect(_KIND, epoch=epoch, tag=[self._digest, *tag.wire()], sender=sender, into=into, add=add)

    def forget(self, epoch: int, tag: Tag) -> None:
        self._node.endpoint.forget(_KIND, epoch=epoch, tag=[self._digest, *tag.wire()])

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._node.endpoint.offload(fn, *args)


class Collectives:
    """Collective operations over a node's current view.

    Args:
        node: a started :class:`~p2ptrain.Node`.
        piece_bytes: streaming granularity of all-reduce (same on every member).
        view: pin the collectives to this view (a training job passes the view it
            started in): once the node's view moves on, every call raises
            :class:`PeerFailedError` instead of waiting on members that are not in the
            job. Default: whatever view the node holds at each call.
        name: keeps this instance's messages apart from other instances' over the same
            members (e.g. a stage group's ring that spans the whole view).

    Raises:
        ConfigError: ``piece_bytes`` is below 4096.
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
        # Error-feedback residuals live across calls, keyed by (key, code, step, piece).
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

    def _head(self, view: View) -> str:
        return f"{view.digest}/{self._name}" if self._name else view.digest

    def _channel(self, view: View) -> _NodeChannel:
        return _NodeChannel(self.node, self._head(view))

    def abandon(self, why: str) -> int:
        """End every wait of this instance's calls in its view, now and to come, with ``PeerFailedError(why)``.

        For a caller that knows the work cannot finish (the ring changed under a training step):
        a member waiting on a live neighbour, itself waiting on a leaver or refused a call in the
        old view, would otherwise wait out the old view's drain. Returns how many waits ended.
        """
        view = self._pinned or self.node.view
        return self.node.abandon(self._head(view), view.epoch, why)

    # --- all-reduce ------------------------------------------------------------------------

    async def all_reduce(self, tensor: torch.Tensor, *, op: str = "mean", codec: str = "none",
                         key: Hashable = "default") -> torch.Tensor:
        """Reduce ``tensor`` in place across the view; every member gets the same result.

        Args:
            tensor: a contiguous float tensor, same shape on every member.
            op: ``"sum"`` or ``"mean"``.
            codec: codec spec for the wire (``"none"``, ``"fp16"``, ``"int8:256"``, ...).
            key: names the tensor across calls (e.g. a gradient bucket), so lossy codecs
                keep one error-feedback residual per position.

        Returns:
            ``tensor``, reduced; bit-identical on every member, whatever the codec.

        Raises:
            ConfigError: ``op`` is not ``"sum"`` or ``"mean"``, or ``tensor`` is not contiguous.
            PeerFailedError: the view changed during the operation.
        """
        if op not in ("sum", "mean"):
            raise ConfigError(f"op must be 'sum' or 'mean', got {op!r}")
        if not tensor.is_contiguous():
            raise ConfigError("all_reduce needs a contiguous tensor (call .contiguous() first)")
        c = self._codec(codec)
        view = self._view()
        epoch, seq = self._next_seq()
        if len(view) == 1:
            return tensor
        me = self.node.node_id
        run = RingAllReduce(
            self._channel(view), tensor.view(-1), rank=view.rank(me), members=len(view), successor=view.successor(me),
            epoch=epoch, seq=seq, op=op, codec=c, feedback=self._feedback, key=key, piece_bytes=self.piece_bytes,
            predecessor=view.predecessor(me),
        )
        await run.run()
        return tensor

    # --- all-gather, broadcast, barrier ----------------------------------------------------

    async def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's ``tensor`` (any shapes), in ring order, on every member.

        Raises:
            PeerFailedError: the view changed during the operation.
            ProtocolError: a peer sent something other than one tensor.
        """
        view = self._view()
        epoch, seq = self._next_seq()
        ch = self._channel(view)
        n = len(view)
        me = self.node.node_id
        r, succ = view.rank(me), view.successor(me)
        out: list[torch.Tensor | None] = [None] * n
        out[r] = tensor
        cur_meta: dict[str, Any] = {"o": r}
        cur = [tensor.contiguous()]
        for s in range(n - 1):
            await ch.send(succ, epoch, Tag(seq, Code.GATHER, s, 0), cur, cur_meta)
            msg = await ch.take(epoch, Tag(seq, Code.GATHER, s, 0), view.predecessor(me))
            # Every member starts by sending its own tensor, as in the reduce-scatter.
            origin = reduce_scatter_segment(r, s, n)
            if len(msg.tensors) != 1:
                raise ProtocolError(f"all_gather piece from {msg.sender} carries {len(msg.tensors)} tensors")
            out[origin] = msg.tensors[0]
            cur, cur_meta = msg.tensors, {"o": origin}
        return [t for t in out if t is not None]

    async def broadcast(self, tensor: torch.Tensor, root: str) -> torch.Tensor:
        """Copy ``root``'s ``tensor`` into every member's ``tensor`` (in place), along the ring.

        A large piece may still be landing in ``tensor`` when a cancelled or failed call
        returns: do not read it after one.

        Raises:
            PeerFailedError: the view changed during the operation.
            ProtocolError: the received tensor's shape or dtype differs from ``tensor``'s.
        """
        view = self._view()
        epoch, seq = self._next_seq()
        ch = self._channel(view)
        n = len(view)
        if n == 1:
            return tensor
        me = self.node.node_id
        succ = view.successor(me)
        hops = broadcast_hops(view.rank(me), view.rank(root), n)
        if hops > 0:
            tag = Tag(seq, Code.BROADCAST, hops - 1, 0)
            # A whole training state travels this way (recovery's alignment): land it in
            # ``tensor`` as it is read, off the loop for large ones, instead of a copy here.
            # A data copy, whatever the caller's grad mode (the landing runs in another
            # thread, where grad mode is the default): into the detached tensor.
            dest = tensor.detach()
            armed = dest.is_contiguous() and dest.device.type == "cpu"
            if armed:
                ch.expect(epoch, tag, view.predecessor(me), dest, add=False)
            try:
                msg = await ch.take(epoch, tag, view.predecessor(me))
            finally:
                if armed:
                    ch.forget(epoch, tag)  # a no-op once it landed
            if msg.landed is not dest:  # it came before this call armed the landing, or not plain
                value = _one_like(msg, tensor, "broadcast")
                if value.numel() * value.element_size() > PLAIN_INLINE_BYTES:
                    await ch.offload(dest.copy_, value)
                else:
                    dest.copy_(value)
        if hops < n - 1:
            await ch.send(succ, epoch, Tag(seq, Code.BROADCAST, hops, 0), [tensor.contiguous()])
        return tensor

    async def sum_along(self, tensor: torch.Tensor, path: Sequence[str]) -> torch.Tensor:
        """Sum a small ``tensor`` in place over the view along ``path`` and back; the same bits on every member.

        The partial sum travels ``path[0] -> path[1] -> ...`` (each member adds its own
        tensor), and the total travels back. The members at the two ends send and
        receive one message each, the others two: where the ring all-reduce of a small
        tensor costs every member ``2 (n - 1)`` messages, a member that is busy with
        other work (a pipeline's trainer, beside members the plan left out) goes at an
        end and pays two. The sum's order is ``path``'s, so every member holds the same
        bits.

        Args:
            tensor: a contiguous tensor, same shape and dtype on every member.
            path: every member of the view once, in the same order on every member.

        Raises:
            ConfigError: ``path`` is not the view's members, or ``tensor`` is not contiguous.
            PeerFailedError: the view changed during the operation.
            ProtocolError: a neighbour sent a tensor of another shape or dtype.
        """
        view = self._view()
        if sorted(path) != sorted(view.members):
            raise ConfigError(f"sum_along's path {list(path)} is not the view's members {list(view.members)}")
        if not tensor.is_contiguous():
            raise ConfigError("sum_along needs a contiguous tensor (call .contiguous() first)")
        epoch, seq = self._next_seq()
        n = len(view)
        if n == 1:
            return tensor
        ch = self._channel(view)
        i = list(path).index(self.node.node_id)

        async def take(step: int) -> torch.Tensor:  # step 0 from the member before on the path, 1 from the one after
            sender = path[i - 1] if step == 0 else path[i + 1]
            return _one_like(await ch.take(epoch, Tag(seq, Code.CHAIN, step, 0), sender), tensor, "chain sum piece")

        if i > 0:
            tensor.add_(await take(0))  # (partial + mine) == (mine + partial), bit for bit
        if i < n - 1:
            await ch.send(path[i + 1], epoch, Tag(seq, Code.CHAIN, 0, 0), [tensor])
            tensor.copy_(await take(1))
        if i > 0:
            await ch.send(path[i - 1], epoch, Tag(seq, Code.CHAIN, 1, 0), [tensor])
        return tensor

    async def barrier(self) -> None:
        """Return once every member of the view has entered the barrier.

        Raises:
            PeerFailedError: the view changed before everyone arrived.
        """
        await self.all_gather(torch.zeros(1))
