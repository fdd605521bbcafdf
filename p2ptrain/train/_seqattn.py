"""Sequence parallelism, the model side: the layers run on this member's slice of the tokens.

Every member holds the whole model and takes a contiguous slice of every sequence of the
step's batch (:func:`p2ptrain.train._sequence.token_slices`). Everything but attention
works position by position, so it runs on the slice as it is, given the slice's global
positions (a learned position table is read from the slice's offset, rotary angles are
computed for the global positions). Attention needs the keys and values of the whole
sequence: each attention layer **all-gathers K and V** from the members, and a query at
global position ``p`` attends to the keys at positions ``<= p`` (a causal mask shifted by
the slice's offset, over the keys up to the slice's end only: the later members' keys are
masked anyway, so they are not multiplied). In backward, the K/V gradients every member
computed for the whole sequence are summed (an all-reduce) and each member keeps those of
its own slice, which flow on into its own layers.

Why the all-gather rather than ring self-attention (Li et al. 2021, "Sequence
Parallelism: Long Sequence Training from System Perspective", arXiv 2105.13120) or
DeepSpeed-Ulysses' all-to-all over heads (Jacobs et al. 2023, arXiv 2309.14509): it is the
form Llama 3's context parallelism uses (Dubey et al. 2024, arXiv 2407.21783, 3.3.2). It
computes attention exactly as one device does (one softmax over the same scores, no
online-softmax rescaling), so the transparency tests hold to float rounding; it takes
uneven slices and any head count as they come (Ulysses needs the heads to split over
the members, which grouped-query LLaMA models with one K/V head do not); and it costs one
collective per layer rather than ``n - 1`` dependent ring steps, which is what counts
over a LAN's latency. K/V is small next to the activations and weights at the sequence
lengths edge devices train on; ring attention's advantage, never holding the whole
sequence's K/V, pays off at lengths far beyond those.

The zoo keeps its layer classes private, so they are recognised by name (the zoo's
``TokenEmbedding``, ``Block``, ``LMHead`` of tinygpt; ``Embed``, ``Decoder``, ``Head`` of
the Hugging Face cut); the transparency tests pin what each is taken to compute. A
Hugging Face block is called as it is: its attention dispatches, through transformers'
attention-function registry, to :func:`_hf_attention` for the duration of the forward
(the model's ``_attn_implementation`` is switched and switched back), which gets the
member's :class:`SeqGroup` through the block's keyword arguments.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain._errors import JobError, ProtocolError
from p2ptrain.ring import Collectives

__all__ = ["SeqGroup", "SequenceLayers", "causal_window", "layers_problem", "seq_attention"]

_HOST = torch.device("cpu")
# The name under which _hf_attention sits in transformers' registry, and the keyword
# that carries the member's SeqGroup from the block call down to it.
_ATTN_NAME = "p2ptrain_sequence"
_GROUP_KWARG = "p2ptrain_seq_group"


class SeqGroup:
    """One step's slice of the sequence on this member, and the K/V exchange with the others.

    Args:
        coll: collectives pinned to the job's view, with a name of their own (the K/V
            traffic never shares sequence numbers with the gradient buckets).
        loop: the node's event loop; the compute thread submits the collectives to it.
        slices: every member's ``(offset, length)``, ring order.
        rank: this member's index in ``slices``.
    """

    def __init__(self, coll: Collectives, loop: asyncio.AbstractEventLoop, slices: list[tuple[int, int]],
                 rank: int) -> None:
        self.coll, self.loop, self.slices = coll, loop, slices
        self.offset, self.length = slices[rank]
        self.total = sum(n for _, n in slices)
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[Any] | None = None
        self._cancelled = False

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a collective on the loop and wait for it (compute thread)."""
        with self._lock:
            if self._cancelled:
                coro.close()
                raise JobError("the step was stopped while this member waited for the other members' keys and values")
            fut = self._pending = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise JobError("the step was stopped while this member waited for the other members' keys and values") from None
        finally:
            self._pending = None

    def cancel(self) -> None:
        """Release the compute thread from the collective it waits on, and refuse any further one (any thread)."""
        with self._lock:
            self._cancelled = True
            fut = self._pending
        if fut is not None:
            fut.cancel()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every member's ``local`` (``(..., length_r, D)``), joined along the sequence axis (compute thread).

        Raises:
            ProtocolError: a member sent a tensor that is not its slice's K/V.
            PeerFailedError: the view changed meanwhile.
        """
        parts = self._call(self.coll.all_gather(local.detach().to(_HOST).contiguous()))
        if len(parts) != len(self.slices):
            raise ProtocolError(f"K/V all-gather returned {len(parts)} parts for {len(self.slices)} members")
        for part, (_, n) in zip(parts, self.slices):
            # From the network: exactly the shape and dtype this member's slice would have.
            want = (*local.shape[:-2], n, local.shape[-1])
            if tuple(part.shape) != want or part.dtype != local.dtype:
                raise ProtocolError(f"a member sent K/V of shape {tuple(part.shape)} {part.dtype}; expected {want} {local.dtype}")
        return torch.cat(parts, dim=-2).to(local.device)

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` summed over the members (compute thread); bit-identical on every member."""
        total = grad.detach().to(_HOST, copy=True).contiguous()
        self._call(self.coll.all_reduce(total, op="sum"))
        return total.to(grad.device)


class _GatherKV(torch.autograd.Function):
    """All-gather of stacked K/V forward; sum of the whole sequence's K/V gradients, own slice kept, backward."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: SeqGroup) -> torch.Tensor:
        ctx.group = group
        return group.gather(local)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group: SeqGroup = ctx.group
        total = group.reduce(grad)
        return total[..., group.offset : group.offset + group.length, :], None


def causal_window(offset: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """The boolean ``(length, offset + length)`` mask: query ``i`` (global ``offset + i``) sees keys ``<= offset + i``."""
    keys = torch.arange(offset + length, device=device)
    return keys[None, :] <= (offset + torch.arange(length, device=device))[:, None]


def seq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SeqGroup,
                  scale: float | None = None) -> torch.Tensor:
    """Causal attention of this slice's queries over the whole sequence's keys.

    Args:
        q: ``(B, H, t, D)`` queries of this member's slice.
        k, v: ``(B, Hkv, t, D)`` its keys and values (``H`` a multiple of ``Hkv``: grouped-query).
        group: this member's slice and the other members.
        scale: the softmax scale (default ``1 / sqrt(D)``).

    Returns:
        ``(B, H, t, D)``.
    """
    kv = _GatherKV.apply(torch.stack((k, v)), group)
    end = group.offset + group.length  # keys past the slice's end are masked for all its queries
    mask = causal_window(group.offset, group.length, q.device)
    out: torch.Tensor = F.scaled_dot_product_attention(q, kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask,
                                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out


# ---------------------------------------------------------------------------------
# The zoo's tinygpt


def _tiny_embed(layer: Any, ids: torch.Tensor, group: SeqGroup) -> torch.Tensor:
    end = group.offset + ids.shape[1]
    if end > layer.block_size:
        raise JobError(f"sequence of {end} tokens is longer than block_size={layer.block_size}")
    x: torch.Tensor = F.embedding(ids, layer.tok) + layer.pos[group.offset : end]
    return x


def _tiny_block(layer: Any, x: torch.Tensor, group: SeqGroup) -> torch.Tensor:
    attn = layer.attn
    h = layer.ln1(x)
    b, t, c = h.shape
    heads = (b, t, attn.n_head, c // attn.n_head)
    q, k, v = (z.view(heads).transpose(1, 2) for z in attn.qkv(h).split(c, dim=2))
    y = seq_attention(q, k, v, group)
    x = x + attn.proj(y.transpose(1, 2).reshape(b, t, c))
    out: torch.Tensor = x + layer.mlp(layer.ln2(x))
    return out


# ---------------------------------------------------------------------------------
# Hugging Face causal LMs (the zoo's cut: Embed, Decoder per block, Head)


def _hf_embed(layer: Any, ids: torch.Tensor, group: SeqGroup) -> torch.Tensor:
    x: torch.Tensor = layer.tok(ids)
    if layer.pos is not None:
        x = x + layer.pos(torch.arange(group.offset, group.offset + ids.shape[1], device=ids.device))
    if layer.drop is not None:
        x = layer.drop(x)
    return x


def _hf_decoder(layer: Any, x: torch.Tensor, group: SeqGroup) -> torch.Tensor:
    kwargs: dict[str, Any] = {"attention_mask": None, _GROUP_KWARG: group}
    if layer.rotary is not None:
        positions = torch.arange(group.offset, group.offset + x.shape[1], device=x.device)[None]
        kwargs["position_ids"] = positions
        kwargs["position_embeddings"] = layer.rotary(x, positions)
    out = layer.block(x, **kwargs)
    y: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return y


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ``(B, t, H, D)`` as its sdpa function does."""
    group = kwargs.get(_GROUP_KWARG)
    if not isinstance(group, SeqGroup):
        raise JobError("the p2ptrain sequence-parallel attention ran outside a sequence-parallel forward")
    if dropout:
        raise JobError("sequence parallelism needs attention dropout off (p2ptrain loads models with it off)")
    out = seq_attention(query, key, value, group, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _pointwise(layer: Any, x: torch.Tensor, group: SeqGroup) -> torch.Tensor:
    out: torch.Tensor = layer(x)
    return out


Handler = Callable[[Any, torch.Tensor, SeqGroup], torch.Tensor]
_HANDLERS: dict[str, Handler] = {
    "TokenEmbedding": _tiny_embed, "Block": _tiny_block, "LMHead": _pointwise,
    "Embed": _hf_embed, "Decoder": _hf_decoder, "Head": _pointwise,
}


def _handler(layer: nn.Module) -> Handler | None:
    kind = type(layer)
    return _HANDLERS.get(kind.__name__) if kind.__module__.startswith("p2ptrain.zoo.") else None


def layers_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot run sequence-parallel, or None when it can."""
    if not isinstance(model, nn.Sequential):
        return f"the model is a {type(model).__name__}, not the zoo's nn.Sequential of transformer layers"
    unknown = sorted({type(m).__name__ for m in model if _handler(m) is None})
    if unknown:
        return (f"its layers {', '.join(unknown)} are not ones sequence parallelism knows (tinygpt's and the "
                "Hugging Face GPT-2/LLaMA cut's); train this model with the data or pipeline strategy")
    return None


class SequenceLayers:
    """Runs ``model``'s layers on one member's slice of the tokens.

    Args:
        model: the zoo's ``nn.Sequential`` (tinygpt, or a Hugging Face causal LM's cut).

    Raises:
        JobError: the model holds layers this module does not know.
    """

    def __init__(self, model: nn.Module) -> None:
        problem = layers_problem(model)
        if problem is not None:
            raise JobError(f"sequence parallelism cannot split this model: {problem}")
        assert isinstance(model, nn.Sequential)  # layers_problem checked it
        self.steps = [(m, _handler(m)) for m in model]
        # The Hugging Face configs whose attention dispatch is switched during a forward.
        configs = {id(c): c for m in model.modules()
                   if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
        self.configs = list(configs.values())
        if self.configs:
            transformers = importlib.import_module("transformers")
            transformers.AttentionInterface.register(_ATTN_NAME, _hf_attention)

    @contextlib.contextmanager
    def _dispatch(self) -> Iterator[None]:
        before = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = _ATTN_NAME
        try:
            yield
        finally:
            for c, was in zip(self.configs, before):
                c._attn_implementation = was

    def __call__(self, ids: torch.Tensor, group: SeqGroup) -> torch.Tensor:
        """Logits ``(B, t, V)`` of the slice ``ids`` (``(B, t)``) at ``group``'s offset (compute thread)."""
        x = ids
        with self._dispatch():
            for layer, run in self.steps:
                assert run is not None  # checked in __init__
                x = run(layer, x, group)
        return x
