"""Error feedback: the residual a lossy codec owes its receiver, kept by the caller.

With error feedback (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error
Feedback Fixes SignSGD") a lossy codec sends ``c(x + r)`` and keeps
``r' = x + r - c(x + r)``. Nothing is lost, only delayed: over any number of messages,

    sum(decoded messages) + final residual == sum(inputs)      (up to float rounding)

which is what lets int8 or top-k gradients converge like uncompressed ones.
"""

from __future__ import annotations

import torch

from p2ptrain._errors import CodecError

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """The residual state of one tensor stream (one gradient bucket or shard).

    Create one per stream and pass it to every ``encode`` of that stream; the codec reads
    and updates it. The residual is float32 (float64 for float64 streams), whatever the
    tensor's dtype, so rounding errors of fp16/bf16 inputs are not rounded again.
    Not threadsafe; a stream is encoded by one thread.
    """

    def __init__(self) -> None:
        self._residual: torch.Tensor | None = None  # flat, contiguous

    @property
    def residual(self) -> torch.Tensor | None:
        """What has not been sent yet, flat (``None`` before the first lossy encode)."""
        return self._residual

    def reset(self) -> None:
        """Forget the residual (e.g. after a membership change made it meaningless)."""
        self._residual = None

    def correct(self, tensor: torch.Tensor) -> torch.Tensor:
        """Fold ``tensor`` into the residual and return it, to be compressed.

        For codec authors: the returned flat buffer IS the state and now holds
        ``tensor + residual``; the codec must subtract, in place, exactly what the receiver
        will decode, leaving the new residual.

        Raises:
            CodecError: ``tensor`` is not floating, or its size or precision differs from
                earlier messages of this stream.
        """
        if not tensor.is_floating_point():
            raise CodecError(f"error feedback needs a float tensor, got {tensor.dtype}")
        acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        r = self._residual
        if r is None:
            r = self._residual = torch.empty(tensor.numel(), dtype=acc)
            r.view(tensor.shape).copy_(tensor)  # copy_ follows any strides
            return r
        if r.numel() != tensor.numel() or r.dtype != acc:
            raise CodecError(
                f"this ErrorFeedback holds {r.numel()} {r.dtype} values but the tensor has "
                f"{tensor.numel()} {tensor.dtype}; keep one ErrorFeedback per tensor stream"
            )
        r.view(tensor.shape).add_(tensor)
        return r
