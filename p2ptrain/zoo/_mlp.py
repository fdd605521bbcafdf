"""``mlp``: a small MLP regressing a fixed random "teacher" network; tiny and fast.

An ``nn.Sequential`` of linear and tanh layers, so the pipeline strategy can cut it
between any two layers.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain.zoo._datasets import TensorPairs
from p2ptrain.zoo._workload import Workload, check_kwarg, generator, materialize

__all__ = ["mlp"]


def _init_mlp(model: nn.Module, gen: torch.Generator) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            # PyTorch's default bound 1/sqrt(fan_in), drawn from our generator.
            bound = 1.0 / math.sqrt(mod.in_features)
            mod.weight.uniform_(-bound, bound, generator=gen)
            mod.bias.uniform_(-bound, bound, generator=gen)


def mlp(
    seed: int = 0,
    *,
    n_in: int = 16,
    hidden: int = 64,
    n_out: int = 4,
    depth: int = 2,
    n_samples: int = 4096,
    data_seed: int = 1234,
) -> Workload:
    """A tanh MLP regressing a fixed random teacher network (mean squared error).

    The teacher and inputs come from ``data_seed`` alone, so jobs with different
    ``seed`` train different students on the same data.

    Args:
        seed: seeds the student's parameters.
        n_in: input features.
        hidden: width of the hidden layers.
        n_out: regression targets.
        depth: hidden layers.
        n_samples: dataset size.
        data_seed: seeds the teacher and the inputs.

    Raises:
        JobError: sizes out of range.
    """
    check_kwarg("mlp", "n_in", n_in, 1, 4096)
    check_kwarg("mlp", "hidden", hidden, 1, 8192)
    check_kwarg("mlp", "n_out", n_out, 1, 4096)
    check_kwarg("mlp", "depth", depth, 1, 64)
    check_kwarg("mlp", "n_samples", n_samples, 1, 1 << 20)
    data_gen = generator(data_seed, "mlp-data")
    x = torch.randn(n_samples, n_in, generator=data_gen)
    w1 = torch.randn(n_in, 32, generator=data_gen) / math.sqrt(n_in)
    w2 = torch.randn(32, n_out, generator=data_gen) / math.sqrt(32)
    # The teacher in float64, rounded to float32: in float32 the matmuls' rounding depended on the
    # kernel path, and three members building at once in one process once got a different y on
    # one of them ("members hold different training data", 2 runs in about 40); other CPUs may too.
    y = (torch.tanh(x.double() @ w1.double()) @ w2.double()).float()

    def make() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(hidden, n_out))

    gen = generator(seed, "init")
    model = materialize(make, lambda m: _init_mlp(m, gen))
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return Workload(
        model=model,
        dataset=TensorPairs(x, y),
        criterion=F.mse_loss,  # reduction="mean" over samples x outputs: a mean over samples
        description=f"mlp {n_in}->{hidden}x{depth}->{n_out} regressing a random teacher, {n_samples} samples",
        data_digest=digest,
    )
