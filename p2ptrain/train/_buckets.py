"""Gradient buckets that go on the wire while the backward pass is still running.

Parameters are grouped into buckets of about ``bucket_bytes``, last parameter first
(backward produces gradients roughly in reverse order of definition, so the first
bucket fills earliest). A post-accumulate-grad hook counts each parameter's
accumulations; once every parameter of a bucket has been accumulated ``expected``
times in a step (1 for data parallelism, the micro-batch count for a pipeline stage),
the bucket is packed into its flat buffer and handed to ``launch`` — from the compute
thread, in the order autograd finishes them, which is the same on every replica of
the same layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GradBuckets", "make_buckets"]


def make_buckets(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets of about ``bucket_bytes``, last parameter first."""
    buckets: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in reversed(range(len(params))):
        cur.append(i)
        size += params[i].numel() * params[i].element_size()
        if size >= bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    return buckets


class GradBuckets:
    """Flat per-bucket gradient buffers of ``params``, filled and launched by backward hooks.

    Args:
        params: the parameters whose gradients are reduced (hooked and packed).
        bucket_bytes: about this many gradient bytes per bucket.
        targets: where :meth:`unpack` writes the reduced gradients, parameter by
            parameter (default ``params``): a GPU member packs from its device copy and
            unpacks into its host copy (:mod:`p2ptrain._device`). The flat buffers are
            always host tensors: they go on the wire.
    """

    def __init__(self, params: Sequence[torch.Tensor], bucket_bytes: int,
                 targets: Sequence[torch.Tensor] | None = None) -> None:
        self.params = params
        self.targets = params if targets is None else targets
        if len(self.targets) != len(params):
            raise ValueError(f"{len(self.targets)} targets for {len(params)} parameters")
        self.buckets = make_buckets(params, bucket_bytes)
        self.bucket_of = {i: b for b, idxs in enumerate(self.buckets) for i in idxs}
        self.flat = [torch.zeros(sum(params[i].numel() for i in idxs)) for idxs in self.buckets]
        self._handles: list[Any] = []
        self._launched: set[int] = set()
        self._launch: Callable[[int], None] = lambda b: None

    def pack(self, b: int) -> torch.Tensor:
        """Copy bucket ``b``'s gradients (zeros where a parameter has none) into its flat buffer."""
        flat, off = self.flat[b], 0
        for i in self.buckets[b]:
            p = self.params[i]
            n = p.numel()
            if p.grad is None:
                flat[off : off + n].zero_()
            else:
                flat[off : off + n].copy_(p.grad.reshape(-1))
            off += n
        return flat

    def unpack(self) -> None:
        """Copy every flat buffer back into the parameters' gradients."""
        for b, idxs in enumerate(self.buckets):
            flat, off = self.flat[b], 0
            for i in idxs:
                p = self.targets[i]
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[off : off + n].view_as(p))
                off += n

    def attach(self, expected: int, launch: Callable[[int], None]) -> None:
        """Hook the parameters for one step: ``launch(b)`` once bucket ``b`` is final and packed."""
        self._launch, self._launched = launch, set()
        pending = {b: len(idxs) * expected for b, idxs in enumerate(self.buckets)}

        def hook_for(i: int) -> Callable[[torch.Tensor], None]:
            def hook(_: torch.Tensor) -> None:
                b = self.bucket_of[i]
                pending[b] -= 1
                if pending[b] == 0:
                    self._fire(b)

            return hook

        self._handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(self.params)]

    def detach(self) -> None:
        """Remove the hooks without launching anything (the step failed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def finish(self) -> None:
        """Remove the hooks and launch, in a fixed order, the buckets that got no gradient."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for b in range(len(self.buckets)):
            if b not in self._launched:
                self._fire(b)

    def _fire(self, b: int) -> None:
        self._launched.add(b)
        self.pack(b)
        self._launch(b)
