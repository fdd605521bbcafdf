"""Transparency to the precision one process itself has: the reference run in float32 and in float64.

AdamW turns float32 rounding into visible differences after tens of steps: one process
training an mlp job for 60 steps at lr 1e-2 ends up to 3e-5 away from the same run in
float64, and a ring (whose sums run in another order) lands as far from the first as the
first is from the exact run. A fixed ``atol=1e-6`` then passes or fails with the plan's
order of sums. So the absolute tolerance of each tensor is four times float32's own error
on it (never below 1e-6): a lost or repeated step moves weights by about the learning
rate, far above that.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from p2ptrain.train import JobSpec, train_single
from p2ptrain.train._job import resolve

__all__ = ["Reference"]


class Reference:
    """The single-process run of ``spec`` in float32 (what the ring is compared with) and float64 (the exact run)."""

    def __init__(self, spec: JobSpec) -> None:
        self.model, _ = train_single(spec)
        exact = resolve(spec)
        exact.model.double()
        exact.dataset.x, exact.dataset.y = exact.dataset.x.double(), exact.dataset.y.double()  # type: ignore[attr-defined]
        self.exact, _ = train_single(spec, workload=exact)

    def units(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(float32 unit, float64 unit) of a Sequential model, layer by layer."""
        return zip(self.model, self.exact)  # type: ignore[arg-type]

    @staticmethod
    def assert_close(got: nn.Module, want: nn.Module, exact: nn.Module) -> None:
        for g, w, e in zip(got.parameters(), want.parameters(), exact.parameters()):
            floor = (w.detach().double() - e.detach()).abs().max().item()
            torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-4, atol=max(1e-6, 4 * floor))
