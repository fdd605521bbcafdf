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

__all__ = ["Reference", "assert_tensor_close"]


class Reference:
    """The single-process run of ``spec`` in float32 (what the ring is compared with) and float64 (the exact run)."""

    def __init__(self, spec: JobSpec) -> None:
        self.model, _ = train_single(spec)
        exact = resolve(spec)
        exact.model.double()
        for name, value in vars(exact.dataset).items():  # float inputs and targets; token ids stay integers
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(exact.dataset, name, value.double())
        self.exact, _ = train_single(spec, workload=exact)

    def units(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(float32 unit, float64 unit) of a Sequential model, layer by layer."""
        return zip(self.model, self.exact)  # type: ignore[arg-type]

    @staticmethod
    def assert_close(got: nn.Module, want: nn.Module, exact: nn.Module) -> None:
        for g, w, e in zip(got.parameters(), want.parameters(), exact.parameters()):
            assert_tensor_close(g.detach(), w.detach(), e.detach())

    def assert_state_close(self, got: dict[str, torch.Tensor], said: str = "") -> None:
        """A whole state dict (as ``train`` writes it) against the reference's, tensor by tensor; ``said`` ends a failure's message."""
        want, exact = self.model.state_dict(), self.exact.state_dict()
        assert sorted(got) == sorted(want)
        for name in want:
            assert_tensor_close(got[name], want[name], exact[name], name, said)


def assert_tensor_close(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, name: str = "", said: str = "") -> None:
    """``got`` equals ``want`` (float32) to rtol 1e-4 and an atol of four times ``want``'s distance from ``exact``."""
    floor = (want.double() - exact.double()).abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-6, 4 * floor),
                               msg=lambda m: f"{name}: {m} (float32's own error here: {floor:.2e}){said}")
