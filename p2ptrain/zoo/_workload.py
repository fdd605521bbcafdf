"""What a job trains: :class:`Workload`, and the helpers that build one the same on every member.

A workload bundles a model, its dataset and how to compute a loss. Every member of
the ring builds it locally from the job's seed (code and weights never travel), so
building is deterministic: parameters come from a ``torch.Generator`` seeded from
the job seed (:func:`generator`), and the model is first laid out on the ``meta``
device (:func:`materialize`) so that construction draws nothing from (and leaves
untouched) torch's global RNG. The zoo's factories (:mod:`p2ptrain.zoo._tinygpt`,
:mod:`p2ptrain.zoo._mlp`) are built from these.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.discovery import available_memory
from p2ptrain.zoo._datasets import stack_collate

__all__ = ["Optimizer", "Workload", "check_kwarg", "default_optimizer", "generator", "materialize"]

Optimizer = torch.optim.Optimizer


def default_optimizer(params: Iterable[nn.Parameter], lr: float) -> Optimizer:
    """AdamW with weight decay on matrices only (the zoo's ``make_optimizer``).

    Grouping is by tensor rank, not by name, so a pipeline stage holding any subset
    of the layers builds the same optimizer for its part.

    Fused (one kernel per group) where this torch has the kernel for the parameters'
    device, else torch's default. On CPU the default loops over the tensors in Python,
    a dozen small ops each: the fused step ran 3-5 times faster here (tinygpt 2.5 ->
    0.6 ms, 14 M parameters 65-95 -> 22 ms), and a compute thread that runs fewer Python
    ops holds the GIL less (a host's event loop in the same process waits for it).
    """
    trainable = [p for p in params if p.requires_grad]
    groups = [
        # Decaying LayerNorm gains and biases pulls them to 0 for no benefit
        # (the nanoGPT / GPT-3 practice); matrices get the usual 0.1.
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    # beta2 0.99 rather than 0.999: small batches of few tokens give noisy second
    # moments that a shorter memory tracks better (nanoGPT's char-level setting).
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch (CPU before 2.4)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def _split_pair(batch: Any) -> tuple[Any, Any]:
    inputs, targets = batch
    return inputs, targets


def _criterion_loss(
    split: Callable[[Any], tuple[Any, Any]],
    criterion: Callable[[Any, Any], torch.Tensor],
    model: nn.Module,
    batch: Any,
) -> torch.Tensor:
    inputs, targets = split(batch)
    return criterion(model(inputs), targets)


@dataclass
class Workload:
    """A model, its data and its loss: everything one training step needs.

    Contract for data-parallel transparency: the loss is the MEAN over the samples of
    the batch (all samples weigh the same), so the gradient over a global batch equals
    the mean of the gradients over its equal-sized shards.

    Give either ``loss_fn`` or ``criterion`` (then ``loss_fn`` is
    ``criterion(model(inputs), targets)`` with ``inputs, targets = split(batch)``).
    The pipeline strategy needs ``criterion``: the last stage applies it to the
    model's output.

    Attributes:
        model: the model; ``nn.Sequential`` for the pipeline strategy.
        dataset: indexable samples, ``len(dataset)`` of them.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch.
        criterion: ``criterion(outputs, targets) -> scalar`` mean loss.
        split: ``split(batch) -> (inputs, targets)``; default unpacks a pair.
        collate: ``collate(list_of_samples) -> batch``; default stacks tensors.
        make_optimizer: ``make_optimizer(params, lr) -> torch.optim.Optimizer``.
        description: one line for logs and the demo.
        data_digest: short hash of the data; members with different data (another
            Python's pydoc text, say) differ here. Empty when unknown.
        info: extra facts (e.g. tinygpt's ``vocab`` to decode samples).

    Raises:
        JobError: the fields do not describe a workload.
    """

    model: nn.Module
    dataset: Sequence[Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    criterion: Callable[[Any, Any], torch.Tensor] | None = None
    split: Callable[[Any], tuple[Any, Any]] = _split_pair
    collate: Callable[[Sequence[Any]], Any] = stack_collate
    make_optimizer: Callable[[Iterable[nn.Parameter], float], Optimizer] = default_optimizer
    description: str = ""
    data_digest: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise JobError(f"Workload.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.loss_fn is None:
            if self.criterion is None:
                raise JobError("a Workload needs loss_fn(model, batch) or criterion(outputs, targets)")
            self.loss_fn = functools.partial(_criterion_loss, self.split, self.criterion)

    def loss(self, batch: Any, model: nn.Module | None = None) -> torch.Tensor:
        """Mean loss of ``model`` (default: this workload's model) on ``batch``."""
        assert self.loss_fn is not None  # set by __post_init__
        return self.loss_fn(self.model if model is None else model, batch)

    def batch(self, indices: Iterable[int] | torch.Tensor) -> Any:
        """Collate the samples at ``indices`` into a batch."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return self.collate([self.dataset[i] for i in indices])

    def layers(self) -> list[nn.Module]:
        """The model's layers in order (for cutting it into pipeline stages).

        Raises:
            JobError: the model is not an ``nn.Sequential``.
        """
        if not isinstance(self.model, nn.Sequential):
            raise JobError(
                f"the model is a {type(self.model).__name__}, not an nn.Sequential; "
                "express it as a sequence of layers to use the pipeline strategy"
            )
        return list(self.model)


# ---------------------------------------------------------------------------------
# Deterministic construction


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for the named ``stream`` of ``seed``: the same on every member."""
    # Hash (stream, seed) so that seeds 0 and 1 do not give correlated streams and
    # the model's stream never coincides with the data's.
    digest = hashlib.blake2b(f"p2ptrain/{stream}/{seed}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def materialize(make: Callable[[], nn.Module], init: Callable[[nn.Module], None]) -> nn.Module:
    """Build ``make()`` on the meta device, allocate it on CPU and fill it with ``init``.

    The meta device makes construction free and RNG-neutral (torch's default
    initialisers run on shapes only); ``init`` must then write every parameter.
    """
    with torch.device("meta"):
        model = make()
    check_fits(model)
    # Allocate each parameter by hand rather than with Module.to_empty: the latter
    # runs empty_like through torch's Python decompositions, whose first use imports
    # sympy (~1 s). NaN fill: a parameter ``init`` forgets shows up, never garbage.
    # (Tied parameters would come apart here; no zoo model ties any.)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            fresh = torch.full(p.shape, math.nan, dtype=p.dtype)
            mod.register_parameter(name, nn.Parameter(fresh, requires_grad=p.requires_grad))
    if any(True for _ in model.buffers()):
        raise AssertionError("zoo models hold parameters only; a buffer would stay on meta")
    with torch.no_grad():
        init(model)
    # A sum is NaN when any element is (init writes finite values): one read of each
    # parameter, where isnan(p).any() wrote a mask and read it again (0.04 s of a 57 MB
    # model's 0.11 s build on a core, four times that on a quarter-core member).
    missed = [n for n, p in model.named_parameters() if torch.isnan(p.sum())]
    if missed:
        raise AssertionError(f"initialiser left parameters unset: {missed}")
    return model


def check_fits(model: nn.Module, available: int | None = None) -> None:
    """Refuse a model whose parameters alone would not fit in this device's free memory.

    Keywords inside their ranges can still add up to billions of parameters
    (tinygpt with ``n_embd=4096, n_layer=64``: 13 G), and building that got the process
    killed by the system's out-of-memory killer without a word, on a robot perhaps with
    its own processes. ``model`` is laid out on the meta device: nothing is allocated yet.

    Raises:
        JobError: the parameters need more than 80% of the memory available.
    """
    free = available_memory() if available is None else available
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    if free is not None and need > 0.8 * free:
        count = sum(p.numel() for p in model.parameters())
        raise JobError(f"the model holds {count / 1e6:,.1f} M parameters ({need / 2**30:.1f} GiB) and this device has "
                       f"{free / 2**30:.1f} GiB of memory available: building it would exhaust the memory (training "
                       "needs about 4 times that: weights, gradients and the optimizer's two moments); choose a smaller model")


def check_kwarg(model: str, name: str, value: int, lo: int, hi: int) -> None:
    """Check that zoo ``model``'s keyword ``name`` lies in ``lo..hi``.

    Raises:
        JobError: it does not; the message names the range.
    """
    if not lo <= value <= hi:
        raise JobError(f"model_kwargs['{name}']={value} is out of range for '{model}'; use {lo}..{hi}")
