"""Which layers a member's speed probes run: the whole model, or a window of it.

A model whose whole pass would outlast ``SPEED_PROBE_S / LONG_ROUNDS`` on a member (by
that member's own layer profile) is probed on a window of its layers instead
(:func:`probe_window`): the layers from the second on, as many as fit one round's pass
budget (one at least), fed the hidden states the layers before them make. A 15 M-parameter
model's whole pass takes seconds on a quarter core; probing it whole cost 53-55 s of a
job's start on hetero4, and the together pass 15-18 s even with cached figures. The window's
figures are scaled back to the whole model by the layers' shares of the profile (per
sample) and by their count (the fixed part, which the cost model spreads evenly over the
layers). Models whose passes still outlast ``SPEED_PROBE_S`` stop after ``LONG_ROUNDS``, as
all members agree after the first round.

The window is a function of the member's own layer profile and the micro-batch, so a
member computes the same one from fresh figures and from cached ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["WINDOW_MIN_WORK", "WINDOW_OVER_S", "WINDOW_PASS_S", "Window", "probe_window", "window_input"]

# A whole pass estimated longer than this is probed on a window of layers: the speed
# probes' SPEED_PROBE_S (0.6 s) over their LONG_ROUNDS (3) (p2ptrain.plan._probe).
WINDOW_OVER_S = 0.2
# The window grows while its pass stays within one round's budget for its longer size
# (SPEED_PROBE_S / SPEED_ROUNDS / 2 = 60 ms), one layer at least ...
WINDOW_PASS_S = 0.06
# ... and past it until it holds parameters and at least this share of the profiled work.
WINDOW_MIN_WORK = 0.05


class Window(NamedTuple):
    """The layers ``first..last`` a member's probes run, and how their figures scale to the whole model.

    Attributes:
        first, last: the window's first and last layer (inclusive).
        work: the window's share of the per-sample work (by the member's layer profile).
        span: the window's share of the layers (the fixed part's scale).
    """

    first: int
    last: int
    work: float = 1.0
    span: float = 1.0

    def whole(self, per_sample_s: float, fixed_s: float) -> tuple[float, float]:
        """The whole model's ``(per_sample_s, fixed_s)`` from the window's."""
        return per_sample_s / self.work, fixed_s / self.span

    def part(self, per_sample_s: float, fixed_s: float) -> tuple[float, float]:
        """The window's ``(per_sample_s, fixed_s)`` from the whole model's."""
        return per_sample_s * self.work, fixed_s * self.span


def probe_window(costs: Sequence[Any], mb: int, *, over_s: float = WINDOW_OVER_S,
                 pass_s: float = WINDOW_PASS_S) -> Window:
    """The layers a member probes: all of them, unless a pass of ``mb`` samples would outlast ``over_s``.

    Then the window starts at the second layer (the first takes the raw inputs, token ids
    that carry no gradient) and grows while a pass of ``mb`` samples stays within
    ``pass_s``, and past it until it holds a layer with parameters and at least
    ``WINDOW_MIN_WORK`` of the profiled work (an activation alone is mostly a pass's
    overhead, and scaling it up by its tiny share would misprice the device). It never
    takes the last layer (the model's head); when no window short of it qualifies, or the
    model has fewer than three layers, the model is probed whole. Costs are the member's
    own layer profile (``fwd_s``, ``bwd_s``, ``param_bytes`` per layer).
    """
    per = [c.fwd_s + c.bwd_s for c in costs]
    total, n = math.fsum(per), len(per)
    whole = Window(0, n - 1)
    if n < 3 or not total > 0 or mb * total <= over_s:
        return whole

    def enough(last: int) -> bool:
        return (any(c.param_bytes > 0 for c in costs[1 : last + 1])
                and math.fsum(per[1 : last + 1]) >= WINDOW_MIN_WORK * total)

    last = 1
    while last + 1 <= n - 2 and (mb * math.fsum(per[1 : last + 2]) <= pass_s or not enough(last)):
        last += 1
    if not enough(last):
        return whole
    return Window(1, last, math.fsum(per[1 : last + 1]) / total, last / n)


def window_input(on: list[Any], x: Any, window: Window) -> Any:
    """What the window's first layer takes for inputs ``x``: the layers before it, without a graph."""
    if window.first == 0:
        return x
    with torch.no_grad():
        h = x
        for m in on[: window.first]:
            h = m(h)
    return h.detach().requires_grad_(h.is_floating_point())  # a middle stage computes its input's gradient too
