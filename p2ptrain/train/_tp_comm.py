"""The tensor-parallel group's collectives over the ring, for layers running on the compute thread.

Tensor parallelism exchanges activations inside every block, forward and backward: four
collectives per block and pass, each on the critical path (nothing to overlap them with),
so latency matters more than in a gradient all-reduce. :class:`RingComm` therefore sends
each member's piece *directly* to every member that needs it (one hop) rather than around
the ring (``N - 1`` hops): an all-gather sends this member's tokens to every other
member; a reduce-scatter sends every other member the rows of the partial sum that
member owns. Each member sends ``(N - 1) / N`` of the data either way, as in a ring.

Sums are taken in ring order whatever order the pieces arrive in, so a result does not
depend on timing, and an all-reduce is bit-identical on every member.

Messages: kind ``train.tp``, tag ``[job, call number, sender]`` within the job's view
epoch (every member calls the collectives in the same order). A received piece is
checked (one tensor, the expected shape and dtype) before use. A view change wakes a
waiting exchange with :class:`~p2ptrain.PeerFailedError`; :meth:`RingComm.abort` (from
the event loop) wakes the compute thread when the step is abandoned, so a stopped job
never leaves a thread waiting for a peer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from p2ptrain._errors import PeerFailedError, ProtocolError
from p2ptrain.ring import Node, View, send_or_fail
from p2ptrain.train._tp_shard import ranges

__all__ = ["KIND", "RingComm"]

KIND = "train.tp"
T = TypeVar("T")


class RingComm:
    """One member's tensor-parallel collectives over ``view`` (a :class:`~p2ptrain.train._tp_layers.Comm`).

    Args:
        node: the member's node.
        view: the job's view (pinned: any later view fails every call).
        loop: the node's event loop; the collectives are called from another thread.
        job: the job id, in every tag.

    Attributes:
        sent_bytes: tensor bytes this member sent so far.
        wait_s: seconds the compute thread spent waiting in the collectives so far.
    """

    def __init__(self, node: Node, view: View, loop: asyncio.AbstractEventLoop, *, job: str) -> None:
        self.node, self.view, self.loop, self.job = node, view, loop, job
        self.me = node.node_id
        self.rank, self.world = view.rank(self.me), len(view)
        self.sent_bytes = 0
        self.wait_s = 0.0
        self._seq = 0
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._stopped = ""

    # --- the Comm protocol (compute thread) ---------------------------------------------------

    def all_gather(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every member's rows (``counts[r]`` for member ``r``), stacked in ring order."""
        if self.world == 1:
            return x
        mine = x.detach().to("cpu").contiguous()
        want = {m: (counts[r], *mine.shape[1:]) for r, m in enumerate(self.view.members) if m != self.me}
        got = self._call(self._exchange({m: mine for m in want}, want, mine.dtype))
        parts = [mine if m == self.me else got[m] for m in self.view.members]
        return torch.cat(parts).to(x.device)

    def reduce_scatter(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """The ring-order sum of every member's rows that this member owns."""
        if self.world == 1:
            return x
        full = x.detach().to("cpu").contiguous()
        rows = ranges(counts)
        out = {m: full[s:e] for m, (s, e) in zip(self.view.members, rows) if m != self.me}
        s, e = rows[self.rank]
        want = {m: (e - s, *full.shape[1:]) for m in out}
        got = self._call(self._exchange(out, want, full.dtype))
        acc = torch.zeros_like(full[s:e])
        for m in self.view.members:
            acc += full[s:e] if m == self.me else got[m]
        return acc.to(x.device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The ring-order sum of every member's ``x``: bit-identical on every member."""
        if self.world == 1:
            return x
        mine = x.detach().to("cpu").contiguous()
        want = {m: tuple(mine.shape) for m in self.view.members if m != self.me}
        got = self._call(self._exchange({m: mine for m in want}, want, mine.dtype))
        acc = torch.zeros_like(mine)
        for m in self.view.members:
            acc += mine if m == self.me else got[m]
        return acc.to(x.device)

    # --- stopping -------------------------------------------------------------------------------

    def abort(self, reason: str = "the step was stopped") -> None:
        """Fail every call in flight and every later one (any thread; the compute thread stops waiting)."""
        with self._lock:
            self._stopped = self._stopped or reason
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()

    # --- plumbing -------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it here (compute thread)."""
        with self._lock:
            if self._stopped:
                coro.close()
                raise PeerFailedError(f"tensor-parallel group of job {self.job or '-'} stopped: {self._stopped}")
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._pending.add(fut)
        t0 = time.perf_counter()
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise PeerFailedError(f"tensor-parallel group of job {self.job or '-'} stopped: {self._stopped}") from None
        finally:
            self.wait_s += time.perf_counter() - t0
            with self._lock:
                self._pending.discard(fut)

    async def _exchange(self, out: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]],
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Send ``out[m]`` to each ``m`` and take one tensor of shape ``want[m]`` from each ``m`` (loop)."""
        if self.node.view.epoch != self.view.epoch:
            raise PeerFailedError(f"the ring moved from view {self.view.epoch} to {self.node.view.epoch} during the job")
        self._seq += 1
        seq, epoch = self._seq, self.view.epoch
        sends = [send_or_fail(self.node, m, KIND, epoch=epoch, tag=[self.job, seq, self.me], tensors=[t])
                 for m, t in out.items()]
        self.sent_bytes += sum(t.numel() * t.element_size() for t in out.values())
        peers = list(want)
        tasks = [asyncio.ensure_future(c) for c in [*sends, *(self._take(m, seq) for m in peers)]]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        got: dict[str, torch.Tensor] = {}
        for m, msg in zip(peers, done[len(sends):]):
            ts = msg.tensors
            if len(ts) != 1 or tuple(ts[0].shape) != tuple(want[m]) or ts[0].dtype != dtype:
                shape = [tuple(t.shape) for t in ts]
                raise ProtocolError(f"{m} sent {shape} for tensor-parallel call {seq}, expected one {want[m]} {dtype}")
            got[m] = ts[0]
        return got

    async def _take(self, peer: str, seq: int) -> Any:
        """``peer``'s message of call ``seq``; a view change while waiting is a :class:`PeerFailedError`."""
        taking = asyncio.ensure_future(self.node.take(KIND, [self.job, seq, peer], epoch=self.view.epoch))
        try:
            while not taking.done():
                changed = self.node.changed()
                waits: list[asyncio.Future[Any]] = [taking, changed]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not changed.done():
                        changed.cancel()
                if not taking.done() and self.node.view.epoch != self.view.epoch:
                    raise PeerFailedError(f"the ring moved from view {self.view.epoch} to {self.node.view.epoch} "
                                          f"while waiting for {peer}")
            return taking.result()
        finally:
            if not taking.done():
                taking.cancel()
