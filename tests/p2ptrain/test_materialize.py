"""The zoo builds a model on the meta device and checks that its initialiser wrote every parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2ptrain.zoo._workload import materialize


def _two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


def test_an_initialiser_that_forgets_a_parameter_is_named() -> None:
    def half(model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name != "1.bias":
                p.normal_(0.0, 0.02)

    with pytest.raises(AssertionError, match=r"\['1.bias'\]"):
        materialize(_two_layers, half)


def test_one_unset_element_is_found_and_a_full_initialiser_passes() -> None:
    def all_but_one(model: nn.Module) -> None:
        for p in model.parameters():
            p.fill_(0.5)
        model[0].weight[3, 1] = float("nan")  # type: ignore[index]  # what a forgotten slice leaves

    with pytest.raises(AssertionError, match=r"\['0.weight'\]"):
        materialize(_two_layers, all_but_one)
    def every(model: nn.Module) -> None:
        for p in model.parameters():
            p.uniform_(-1.0, 1.0)

    model = materialize(_two_layers, every)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
