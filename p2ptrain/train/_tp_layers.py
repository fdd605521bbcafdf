"""Tensor-parallel layers: a block's attention heads and MLP columns split over the members.

Megatron-LM's split (Shoeybi et al., 2019): the Q/K/V projections and the MLP's first
projection(s) are *column-parallel* (a member holds the output rows of its heads /
columns), the attention output projection and the MLP's last projection are
*row-parallel* (a member holds the matching input columns and produces a partial sum of
the whole output). Between them nothing is exchanged: a member's heads (or columns) are
computed end to end on the member.

Around that split sit the collectives, as conjugate pairs of autograd functions:

- tensor parallelism alone (``sequence_parallel=False``): before the column-parallel
  layer ``f`` (identity forward, all-reduce of the input gradient backward), after the
  row-parallel layer ``g`` (all-reduce forward, identity backward); every member holds
  every token's activations outside the split layers;
- with sequence parallelism (the default; Korthikanti et al., 2022, and Galaxy, Ye et
  al.): the activations outside the split layers (LayerNorm, residual, dropout) are cut
  by tokens, each member holding its share of the batch's ``B * T`` tokens. Before the
  column-parallel layer the tokens are *all-gathered* (backward: reduce-scatter of the
  gradient), after the row-parallel layer the partial sums are *reduce-scattered* to
  the token owners (backward: all-gather). Same bytes on the wire as ``f``/``g``, and
  no activation outside the split layers is held twice.

Tokens are the rows of the ``(B * T, C)`` hidden states, cut into contiguous ranges
(:class:`TPContext`). The collectives are a :class:`Comm`: the ring's in training
(:mod:`p2ptrain.train._tp_comm`), threads in a process in the unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain.train._tp_shard import split_counts

__all__ = ["Comm", "ShardedAttention", "ShardedBlock", "ShardedMLP", "ShardedProj", "TPContext", "TokenScatter"]


class Comm(Protocol):
    """The collectives of one member's tensor-parallel group (called on the compute thread, in the same order everywhere)."""

    def all_gather(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every member's ``x`` (``counts[r]`` rows for member ``r``), stacked by rows in ring order."""
        ...

    def reduce_scatter(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """The sum over members of their ``x``'s rows that belong to this member (``counts`` per member)."""
        ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over members of their ``x`` (same shape everywhere)."""
        ...


class TPContext:
    """What every sharded layer of one member shares: the group, its shares, the current batch's token split.

    Args:
        comm: the group's collectives.
        rank: this member's position in ring order.
        shares: each member's relative share (of heads, columns and tokens), ring order.
        sequence_parallel: cut the activations between split layers by tokens.
    """

    def __init__(self, comm: Comm, rank: int, shares: Sequence[float], *, sequence_parallel: bool = True) -> None:
        self.comm, self.rank, self.shares = comm, rank, list(shares)
        self.sequence_parallel = sequence_parallel
        self.shape = (0, 0)  # (B, T) of the current batch
        self.counts: list[int] = []  # tokens per member of the current batch

    def begin(self, b: int, t: int) -> None:
        """A new batch of ``b`` sequences of ``t`` tokens: split its tokens over the members."""
        self.shape = (b, t)
        self.counts = split_counts(b * t, self.shares, "tokens of the batch")

    def tokens(self) -> tuple[int, int]:
        """This member's token rows ``[start, stop)`` of the current batch."""
        start = sum(self.counts[: self.rank])
        return start, start + self.counts[self.rank]

    def __deepcopy__(self, memo: dict[int, Any]) -> TPContext:
        return self  # a device copy of the layers shares the group, never a copy of it


class _Gather(torch.autograd.Function):
    """All-gather tokens forward; reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp, ctx.counts = tp, list(tp.counts)
        return tp.comm.all_gather(x, ctx.counts)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.tp.comm.reduce_scatter(g.contiguous(), ctx.counts), None


class _Scatter(torch.autograd.Function):
    """Reduce-scatter partial sums to the token owners forward; all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp, ctx.counts = tp, list(tp.counts)
        return tp.comm.reduce_scatter(x.contiguous(), ctx.counts)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.tp.comm.all_gather(g.contiguous(), ctx.counts), None


class _Copy(torch.autograd.Function):
    """Megatron's ``f``: identity forward; all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.tp.comm.all_reduce(g.contiguous()), None


class _Reduce(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        return tp.comm.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def enter(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Into the split layers: every token's input (all-gather, or ``f``)."""
    out: torch.Tensor = (_Gather if tp.sequence_parallel else _Copy).apply(x, tp)
    return out


def leave(z: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Out of the split layers: the summed output, of this member's tokens (reduce-scatter, or ``g``)."""
    out: torch.Tensor = (_Scatter if tp.sequence_parallel else _Reduce).apply(z, tp)
    return out


class ShardedProj(nn.Module):
    """``x W^T + b`` with one member's part of a projection's weight.

    Args:
        weight: in ``nn.Linear`` layout ``(out, in)``, or Hugging Face ``Conv1D`` layout
            ``(in, out)`` with ``conv1d``.
        bias: of the output features, or None.
        conv1d: ``weight`` is ``(in, out)``.
        rows: use only output features ``[start, stop)`` of ``weight`` and ``bias`` (a
            replicated projection of which a member needs a part).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, conv1d: bool = False,
                 rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.weight, self.bias, self.conv1d, self.rows = weight, bias, conv1d, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w: torch.Tensor = self.weight
        b: torch.Tensor | None = self.bias
        if self.rows is not None:
            a, e = self.rows
            w = w[:, a:e] if self.conv1d else w[a:e]
            b = b[a:e] if b is not None else None
        if self.conv1d:
            return torch.addmm(b, x, w) if b is not None else x @ w
        return F.linear(x, w, b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ShardedAttention(nn.Module):
    """Causal self-attention over this member's heads: column-parallel Q/K/V, row-parallel output.

    Args:
        tp: the member's context.
        inputs: the column-parallel projections; their outputs, cut by ``splits``, are
            q, k and v (``(N, heads * head_dim)`` each).
        splits: for each projection, the widths its output is cut into.
        out: the row-parallel output projection (no bias: it is added after the sum).
        out_bias: the output projection's bias (replicated), or None.
        head_dim: features per head.
        scale: the attention logits' scale.
        kv_index: for each local query head, its local key/value head (None: the same index).
        rotary: LLaMA-style rotary embedding ``rotary(x, position_ids) -> (cos, sin)``, or None.
    """

    def __init__(self, tp: TPContext, inputs: Sequence[ShardedProj], splits: Sequence[Sequence[int]], out: ShardedProj,
                 out_bias: nn.Parameter | None, *, head_dim: int, scale: float, kv_index: Sequence[int] | None = None,
                 rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.tp, self.inputs, self.splits = tp, nn.ModuleList(inputs), [list(s) for s in splits]
        self.out, self.out_bias, self.head_dim, self.scale = out, out_bias, head_dim, scale
        self.kv_index = list(kv_index) if kv_index is not None else None
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = enter(x, self.tp)
        b, t = self.tp.shape
        pieces: list[torch.Tensor] = []
        for proj, widths in zip(self.inputs, self.splits):
            pieces += proj(xs).split(widths, dim=-1)
        q, k, v = (p.reshape(b, t, -1, self.head_dim).transpose(1, 2) for p in pieces)
        if self.rotary is not None:
            cos, sin = self.rotary(xs, torch.arange(t, device=xs.device)[None])
            cos, sin = cos[:, None], sin[:, None]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.kv_index is not None:
            idx = torch.tensor(self.kv_index, device=k.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        z = leave(self.out(y.transpose(1, 2).reshape(b * t, -1)), self.tp)
        return z + self.out_bias if self.out_bias is not None else z


class ShardedMLP(nn.Module):
    """The MLP over this member's hidden columns: ``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))``.

    Args:
        tp: the member's context.
        up: column-parallel first projection.
        gate: column-parallel gate projection (LLaMA), or None.
        act: the activation.
        down: row-parallel last projection (no bias: it is added after the sum).
        down_bias: its bias (replicated), or None.
    """

    def __init__(self, tp: TPContext, up: ShardedProj, gate: ShardedProj | None, act: Callable[[torch.Tensor], torch.Tensor],
                 down: ShardedProj, down_bias: nn.Parameter | None) -> None:
        super().__init__()
        self.tp, self.up, self.gate, self.act, self.down, self.down_bias = tp, up, gate, act, down, down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = enter(x, self.tp)
        h = self.act(self.gate(xs)) * self.up(xs) if self.gate is not None else self.act(self.up(xs))
        z = leave(self.down(h), self.tp)
        return z + self.down_bias if self.down_bias is not None else z


class ShardedBlock(nn.Module):
    """A pre-norm transformer block on this member's tokens: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    The norms are the model's own modules (replicated, trained in place).
    """

    def __init__(self, norm1: nn.Module, attn: ShardedAttention, norm2: nn.Module, mlp: ShardedMLP) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TokenScatter(nn.Module):
    """The model's embedding, then this member's tokens of it: ``(B, T)`` ids to ``(n, C)`` rows.

    The embedding runs on the whole batch on every member (a table lookup); slicing
    leaves its gradient with this member's tokens only, and the replicated parameters'
    gradients are summed over the members.
    """

    def __init__(self, embed: nn.Module, tp: TPContext) -> None:
        super().__init__()
        self.embed, self.tp = embed, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t = x.shape[0], x.shape[1]
        self.tp.begin(b, t)
        flat = x.reshape(b * t, x.shape[-1])
        if not self.tp.sequence_parallel:
            return flat
        start, stop = self.tp.tokens()
        return flat[start:stop]
