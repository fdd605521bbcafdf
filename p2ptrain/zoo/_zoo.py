"""The model zoo: what a job trains, as a :class:`Workload`, built the same on every member.

A workload bundles a model, its dataset and how to compute a loss. Every member of
the ring builds it locally from the job's seed (code and weights never travel), so
building is deterministic: parameters come from a ``torch.Generator`` seeded from
the job seed, and the model is first laid out on the ``meta`` device so that
construction draws nothing from (and leaves untouched) torch's global RNG.

Zoo entries:

- ``tinygpt``: a character-level GPT (token + position embedding, pre-norm blocks of
  causal self-attention and MLP, final LayerNorm + linear head) trained on the
  ``pydoc_data.topics`` text that ships with every CPython.
- ``mlp``: a small MLP regressing a fixed random "teacher" network; tiny and fast.

Both models are ``nn.Sequential`` (hidden states flow layer to layer), so the pipeline
strategy can cut them between any two layers.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain.zoo._datasets import CharWindows, TensorPairs, stack_collate
from p2ptrain._errors import JobError

__all__ = ["ZOO", "Workload", "build", "default_optimizer", "mlp", "tinygpt"]

Optimizer = torch.optim.Optimizer


def default_optimizer(params: Iterable[nn.Parameter], lr: float) -> Optimizer:
    """AdamW with weight decay on matrices only (the zoo's ``make_optimizer``).

    Grouping is by tensor rank, not by name, so a pipeline stage holding any subset
    of the layers builds the same optimizer for its part.
    """
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        [
            # Decaying LayerNorm gains and biases pulls them to 0 for no benefit
            # (the nanoGPT / GPT-3 practice); matrices get the usual 0.1.
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        # beta2 0.99 rather than 0.999: small batches of few tokens give noisy second
        # moments that a shorter memory tracks better (nanoGPT's char-level setting).
        betas=(0.9, 0.99),
    )


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


def _generator(seed: int, stream: str) -> torch.Generator:
    # Hash (stream, seed) so that seeds 0 and 1 do not give correlated streams and
    # the model's stream never coincides with the data's.
    digest = hashlib.blake2b(f"p2ptrain/{stream}/{seed}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _materialize(make: Callable[[], nn.Module], init: Callable[[nn.Module], None]) -> nn.Module:
    """Build ``make()`` on the meta device, allocate it on CPU and fill it with ``init``.

    The meta device makes construction free and RNG-neutral (torch's default
    initialisers run on shapes only); ``init`` must then write every parameter.
    """
    with torch.device("meta"):
        model = make()
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
    missed = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    if missed:
        raise AssertionError(f"initialiser left parameters unset: {missed}")
    return model


def _check_kwarg(model: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise JobError(f"model_kwargs['{name}']={value} is out of range for '{model}'; use {lo}..{hi}")


# ---------------------------------------------------------------------------------
# tinygpt


class TokenEmbedding(nn.Module):
    """Token ids ``(B, T)`` to hidden states ``(B, T, C)``: token plus learned position.

    Holds the two tables as plain parameters rather than ``nn.Embedding``s: the
    latter's constructor draws ``normal_``, which on the meta device costs a one-off
    ~2 s import of torch's decompositions.
    """

    def __init__(self, vocab_size: int, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Parameter(torch.empty(vocab_size, n_embd))
        self.pos = nn.Parameter(torch.empty(block_size, n_embd))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}")
        return F.embedding(idx, self.tok) + self.pos[:t]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t`` only."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        heads = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        # is_causal lets torch pick a fused kernel and builds no (T, T) mask buffer,
        # so the module holds parameters only and any pipeline stage can own it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Position-wise MLP, 4x wide with GELU (the GPT-2 shape)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = FeedForward(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LMHead(nn.Module):
    """Hidden states ``(B, T, C)`` to next-token logits ``(B, T, V)``.

    Not weight-tied to the token embedding (unlike GPT-2): tying would put one
    tensor in the first and the last pipeline stage.
    """

    def __init__(self, n_embd: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.out = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def _init_gpt(model: nn.Module, gen: torch.Generator, n_layer: int) -> None:
    std = 0.02  # GPT-2's init; the LayerNorms keep activations O(1) from there
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            # GPT-2 scales the projections that write into the residual stream by
            # 1/sqrt(2 * n_layer): 2 * n_layer of them add up, so the stream's variance
            # at init does not grow with depth.
            resid = name.endswith(("attn.proj", "mlp.proj"))
            mod.weight.normal_(0.0, std / math.sqrt(2 * n_layer) if resid else std, generator=gen)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, TokenEmbedding):
            mod.tok.normal_(0.0, std, generator=gen)
            mod.pos.normal_(0.0, std, generator=gen)
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.fill_(1.0)
            mod.bias.fill_(0.0)


def _pydoc_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions ship a trimmed stdlib
        raise JobError(
            "tinygpt trains on pydoc_data.topics, which this Python does not ship; "
            "install the full standard library (e.g. Debian's libpython3-stdlib)"
        ) from exc
    # Sorted keys: dict order is insertion order of a generated file; sorting makes
    # the text a function of the content alone.
    return "".join(topics[k] for k in sorted(topics))


def _next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Mean over every (sample, position); all samples have the same length, so this
    # is also the mean over samples of the per-sample mean.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _split_window(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[:, :-1], batch[:, 1:]


def tinygpt(
    seed: int = 0,
    *,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    block_size: int = 64,
) -> Workload:
    """A character-level GPT on the pydoc topics text (~465k chars, ~100-char vocab).

    Defaults (0.22M parameters, 64 characters of context) take 60-90 ms per step at
    global_batch 32 on a 2-core CPU; the loss falls from ln(vocab) ~ 4.6 to ~2.5 in
    200 steps at lr 3e-3.

    Args:
        seed: seeds the parameters (the data does not depend on it).
        n_layer: transformer blocks.
        n_embd: hidden width; a multiple of ``n_head``.
        n_head: attention heads.
        block_size: characters of context per sample.

    Raises:
        JobError: sizes out of range, or no pydoc text on this Python.
    """
    _check_kwarg("tinygpt", "n_layer", n_layer, 1, 64)
    _check_kwarg("tinygpt", "n_embd", n_embd, 8, 4096)
    _check_kwarg("tinygpt", "n_head", n_head, 1, 64)
    _check_kwarg("tinygpt", "block_size", block_size, 2, 4096)
    if n_embd % n_head:
        raise JobError(f"n_embd={n_embd} is not a multiple of n_head={n_head}; each head needs n_embd/n_head dims")
    text = _pydoc_text()
    # Code points as int32 straight from the UTF-32 bytes, then one sort gives the
    # sorted vocabulary and every character's id (no per-character Python loop).
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    vocab_codes, ids = torch.unique(codes, sorted=True, return_inverse=True)
    vocab = "".join(map(chr, vocab_codes.tolist()))
    v = len(vocab)

    def make() -> nn.Module:
        blocks = [Block(n_embd, n_head) for _ in range(n_layer)]
        return nn.Sequential(TokenEmbedding(v, block_size, n_embd), *blocks, LMHead(n_embd, v))

    gen = _generator(seed, "init")
    model = _materialize(make, lambda m: _init_gpt(m, gen, n_layer))
    dataset = CharWindows(ids.to(torch.int64), block_size)
    n_params = sum(p.numel() for p in model.parameters())
    return Workload(
        model=model,
        dataset=dataset,
        criterion=_next_char_loss,
        split=_split_window,
        description=(
            f"tinygpt {n_layer}x{n_embd} ({n_head} heads, context {block_size}, vocab {v}, "
            f"{n_params / 1e6:.2f}M params) on {len(dataset)} windows of pydoc topics"
        ),
        data_digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        info={"vocab": vocab, "n_params": n_params},
    )


# ---------------------------------------------------------------------------------
# mlp


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
    _check_kwarg("mlp", "n_in", n_in, 1, 4096)
    _check_kwarg("mlp", "hidden", hidden, 1, 8192)
    _check_kwarg("mlp", "n_out", n_out, 1, 4096)
    _check_kwarg("mlp", "depth", depth, 1, 64)
    _check_kwarg("mlp", "n_samples", n_samples, 1, 1 << 20)
    data_gen = _generator(data_seed, "mlp-data")
    x = torch.randn(n_samples, n_in, generator=data_gen)
    w1 = torch.randn(n_in, 32, generator=data_gen) / math.sqrt(n_in)
    w2 = torch.randn(32, n_out, generator=data_gen) / math.sqrt(32)
    y = torch.tanh(x @ w1) @ w2

    def make() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(hidden, n_out))

    gen = _generator(seed, "init")
    model = _materialize(make, lambda m: _init_mlp(m, gen))
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return Workload(
        model=model,
        dataset=TensorPairs(x, y),
        criterion=F.mse_loss,  # reduction="mean" over samples x outputs: a mean over samples
        description=f"mlp {n_in}->{hidden}x{depth}->{n_out} regressing a random teacher, {n_samples} samples",
        data_digest=digest,
    )


# ---------------------------------------------------------------------------------
# registry

ZOO: Mapping[str, Callable[..., Workload]] = {"mlp": mlp, "tinygpt": tinygpt}


def build(name: str, seed: int = 0, /, **kwargs: int | float | str) -> Workload:
    """Build zoo model ``name`` with ``seed`` and keyword overrides.

    Keyword names and types are checked against the factory's signature first, so a
    job from the network with a typo or a wrong type gets a message, not a TypeError.

    Raises:
        JobError: unknown name, unknown keyword, wrong type or out-of-range value.
    """
    factory = ZOO.get(name)
    if factory is None:
        raise JobError(f"unknown zoo model {name!r}; the zoo has {', '.join(sorted(ZOO))}")
    params = {
        p.name: p.default for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    for key, value in kwargs.items():
        if key not in params:
            raise JobError(
                f"model_kwargs[{key!r}] is not a parameter of zoo model {name!r}; "
                f"it takes {', '.join(params)}"
            )
        want = type(params[key])
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise JobError(
                f"model_kwargs[{key!r}]={value!r} is a {type(value).__name__}; "
                f"zoo model {name!r} wants a {want.__name__} (default {params[key]!r})"
            )
    return factory(seed, **kwargs)
