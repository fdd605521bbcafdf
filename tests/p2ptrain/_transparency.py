"""Transparency to the precision one process itself has: the reference run in float32 and in float64.

AdamW turns float32 rounding into visible differences after tens of steps: one process
training an mlp job for 60 steps at lr 1e-2 ends up to 3e-5 away from the same run in
float64, and a ring (whose sums run in another order) lands as far from the first as the
first is from the exact run. A fixed ``atol=1e-6`` then passes or fails with the plan's
order of sums. So each tensor of the ring must be at most three times as far (L2 norm)
from the float64 run as one float32 process is: a lost or repeated step moves weights by
about the learning rate, far above that.
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
    """``got`` is at most 3x as far from ``exact`` (float64) as ``want`` (float32, one process) is, in L2 norm.

    A norm, not the largest element: a single weight lands wherever rounding takes it (a
    ring 7.3e-6 off where one process was 9.7e-7 off, in a tensor whose norms agreed).
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}{said}"
    own = (want.double() - exact.double()).norm().item()
    ring = (got.double() - exact.double()).norm().item()
    bound = 3 * own + 1e-6 * max(1, want.numel()) ** 0.5
    assert ring <= bound, (f"{name}: {ring:.3e} from the float64 run, one float32 process {own:.3e} "
                           f"(bound {bound:.3e}){said}")
