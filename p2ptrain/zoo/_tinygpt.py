"""``tinygpt``: a character-level GPT on the pydoc topics text that ships with CPython.

Token + position embedding, pre-norm blocks of causal self-attention and MLP, final
LayerNorm + linear head, as an ``nn.Sequential`` (hidden states flow layer to layer)
so the pipeline strategy can cut it between any two layers.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.zoo._datasets import CharWindows
from p2ptrain.zoo._workload import Workload, check_kwarg, generator, materialize

__all__ = ["Block", "CausalSelfAttention", "FeedForward", "LMHead", "TokenEmbedding", "tinygpt"]


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
        # Annotated: nn.Module.__call__ is typed to return Any.
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, c))
        return out


class FeedForward(nn.Module):
    """Position-wise MLP, 4x wide with GELU (the GPT-2 shape)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(F.gelu(self.fc(x)))
        return out


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
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


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
        logits: torch.Tensor = self.out(self.ln(x))
        return logits


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


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[torch.Tensor, str, str]:
    """The pydoc text's character ids (int64, read only by the datasets), its sorted
    vocabulary and its digest (of the text's UTF-8); built once per process (a job's start
    waits for every member's workload: on a quarter core a sort of the 465k characters
    took 0.11 s).

    It runs on a worker thread of a host that may keep a control loop on the same
    process, so no step holds the GIL for long: the text is encoded and hashed a topic
    at a time, and the vocabulary is read off a count of the code points (torch: GIL
    released) rather than ``set()`` of the text (7 ms of C with the GIL held, which made a 100 Hz
    host task 7-16 ms late at every job's start).
    """
    digest = hashlib.sha256()
    parts = []
    for part in _pydoc_parts():
        digest.update(part.encode())
        parts.append(torch.frombuffer(bytearray(part.encode("utf-32-le")), dtype=torch.int32))
    codes = torch.cat(parts).to(torch.int64)
    points = torch.bincount(codes).nonzero().flatten()  # ascending: the order of sorted(set(text))
    vocab = "".join(map(chr, points.tolist()))
    # Every character's id through a table indexed by code point: one gather, no sort
    # and no per-character Python loop.
    table = torch.zeros(int(points[-1]) + 1, dtype=torch.int64)
    table[points] = torch.arange(len(points))
    return table[codes], vocab, digest.hexdigest()[:16]


def _pydoc_parts() -> list[str]:
    """The pydoc topics' texts (none empty), in the order of their sorted keys: the corpus is their concatenation."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions ship a trimmed stdlib
        raise JobError(
            "tinygpt trains on pydoc_data.topics, which this Python does not ship; "
            "install the full standard library (e.g. Debian's libpython3-stdlib)"
        ) from exc
    # Sorted keys: dict order is insertion order of a generated file; sorting makes
    # the text a function of the content alone.
    return [topics[k] for k in sorted(topics) if topics[k]]


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
    check_kwarg("tinygpt", "n_layer", n_layer, 1, 64)
    check_kwarg("tinygpt", "n_embd", n_embd, 8, 4096)
    check_kwarg("tinygpt", "n_head", n_head, 1, 64)
    check_kwarg("tinygpt", "block_size", block_size, 2, 4096)
    if n_embd % n_head:
        raise JobError(f"n_embd={n_embd} is not a multiple of n_head={n_head}; each head needs n_embd/n_head dims")
    ids, vocab, digest = _corpus()
    v = len(vocab)

    def make() -> nn.Module:
        blocks = [Block(n_embd, n_head) for _ in range(n_layer)]
        return nn.Sequential(TokenEmbedding(v, block_size, n_embd), *blocks, LMHead(n_embd, v))

    gen = generator(seed, "init")
    model = materialize(make, lambda m: _init_gpt(m, gen, n_layer))
    dataset = CharWindows(ids, block_size)
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
        data_digest=digest,
        info={"vocab": vocab, "n_params": n_params},
    )
