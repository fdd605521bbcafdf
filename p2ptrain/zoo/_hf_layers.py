"""Cutting a Hugging Face causal LM into layers that pass one tensor along.

The pipeline strategy runs ``nn.Sequential(layers[a..b])`` on each member and moves
one activation tensor per micro-batch between members, so a model must be a sequence
of modules, each taking and returning a single tensor. A Hugging Face causal LM is
not: its decoder blocks take an attention mask and (LLaMA) rotary position
embeddings beside the hidden states. :func:`cut_causal_lm` wraps it:

- :class:`Embed`: token ids ``(B, T)`` to hidden states ``(B, T, C)`` (token plus
  learned position embedding for GPT-2; token embedding for LLaMA-style models);
- one :class:`Decoder` per block: builds the causal mask (and, LLaMA-style, the
  rotary cos/sin) from the sequence length itself, so nothing but the hidden states
  crosses a cut. Every sequence has the full length (the data is packed), so the
  mask is the plain causal one;
- :class:`Head`: final norm, then the LM head, to logits ``(B, T, V)``.

The wrappers hold references to the model's own submodules: their parameters ARE the
Hugging Face model's, so training them trains it and ``save_pretrained`` writes the
result. :func:`check_cut` runs both on a few tokens and refuses a model whose layers
do not compose to its forward (an architecture this cut does not know).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2ptrain._errors import JobError

__all__ = ["Decoder", "Embed", "Head", "check_cut", "cut_causal_lm", "family"]


def causal_mask(t: int, like: torch.Tensor) -> torch.Tensor:
    """The additive ``(1, 1, t, t)`` mask that lets position ``i`` see positions ``<= i``."""
    # Additive (0 / dtype min) rather than boolean: eager and sdpa attention both take it.
    full = torch.full((t, t), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return full.triu(1)[None, None]


class Embed(nn.Module):
    """Token ids ``(B, T)`` to hidden states: ``tok(ids) [+ pos(0..T-1)]``, then ``drop``.

    Args:
        tok: the token embedding (the model's own module).
        pos: the learned position embedding (GPT-2), or None (rotary models).
        drop: the embedding dropout, or None.
    """

    def __init__(self, tok: nn.Module, pos: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.tok, self.pos, self.drop = tok, pos, drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        if self.drop is not None:
            x = self.drop(x)
        if not x.requires_grad and torch.is_grad_enabled():
            # A frozen embedding (LoRA) gives a tensor with no graph; a pipeline stage
            # that holds only this layer still calls backward on its output.
            x.requires_grad_(True)
        return x


class Decoder(nn.Module):
    """One decoder block on hidden states ``(B, T, C)``, causal over the T positions.

    Args:
        block: the model's block (``GPT2Block``, ``LlamaDecoderLayer``, ...).
        rotary: the model's rotary embedding (LLaMA-style), or None. Computed here, per
            block, from the sequence length: cos/sin never cross a cut.
    """

    def __init__(self, block: nn.Module, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.block, self.rotary = block, rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        kwargs: dict[str, Any] = {"attention_mask": causal_mask(t, x)}
        if self.rotary is not None:
            positions = torch.arange(t, device=x.device)[None]
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = self.rotary(x, positions)
        out = self.block(x, **kwargs)
        # Some blocks return (hidden_states, attn_weights, ...), some the hidden states.
        y: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return y


class Head(nn.Module):
    """Hidden states to logits: ``head(norm(x))``."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def family(model: Any) -> str:
    """``"gpt2"`` or ``"llama"`` (LLaMA-style: token embedding, rotary blocks, final norm).

    Raises:
        JobError: the model has neither shape.
    """
    base = model.base_model
    if all(hasattr(base, a) for a in ("wte", "wpe", "h", "ln_f")):
        return "gpt2"
    if all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "llama"
    raise JobError(
        f"cannot cut a {type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}) into "
        "layers: p2ptrain cuts GPT-2 and LLaMA-style causal LMs (write a Workload for others, docs/your-model.md)"
    )


def cut_causal_lm(model: Any) -> list[nn.Module]:
    """The layers of Hugging Face causal LM ``model``: embedding, each block, head.

    Raises:
        JobError: the architecture is not one this cut knows.
    """
    base = model.base_model
    head = model.get_output_embeddings()
    if family(model) == "gpt2":
        blocks: list[nn.Module] = [Decoder(b) for b in base.h]
        return [Embed(base.wte, base.wpe, base.drop), *blocks, Head(base.ln_f, head)]
    rotary = base.rotary_emb  # buffers only; every block wrapper shares it
    return [Embed(base.embed_tokens), *(Decoder(b, rotary) for b in base.layers), Head(base.norm, head)]


def check_cut(layers: nn.Sequential, model: Any, vocab: int, t: int) -> None:
    """Check that ``layers`` compute ``model``'s logits on ``t`` tokens.

    Raises:
        JobError: they differ: the cut dropped something the model does (a scaled
            embedding, a soft-capped head, sliding-window attention, ...).
    """
    ids = (torch.arange(t, dtype=torch.int64) * 7 % vocab)[None]
    with torch.no_grad():
        got = layers(ids)
        want = model(input_ids=ids, use_cache=False).logits
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise JobError(
            f"the layers p2ptrain cut from this {type(model).__name__} do not reproduce its forward "
            f"(max difference {float((got - want).abs().max()) if got.shape == want.shape else 'shape'}); "
            "its architecture does something the GPT-2/LLaMA cut does not, so it cannot be trained as layers"
        )
