"""Cutting a workload's transformer into one member's tensor-parallel share, and putting it back whole.

:func:`shard_model` replaces, in the workload's ``nn.Sequential`` (embedding, blocks,
head), the embedding by a :class:`~p2ptrain.train._tp_layers.TokenScatter` and every
block by a :class:`~p2ptrain.train._tp_layers.ShardedBlock` holding this member's
heads and MLP columns: new parameters whose values are slices of the full ones, so
every member starts from the model the single-process reference starts from. The
norms, the row-parallel biases, the embedding and the head stay the model's own
(replicated) parameters. The full weights that were cut are released (a member holds
its share only); :meth:`Surgery.install` puts each one back from every member's piece
and :meth:`Surgery.reattach` the original layers, so the model's ``state_dict()`` is
the whole trained model under its own names.

Blocks it knows (pre-norm, causal, no dropout), recognised by their parts:

- the zoo's ``tinygpt`` ``Block`` (fused ``qkv`` and ``proj`` Linears, GELU MLP);
- Hugging Face GPT-2 (``c_attn`` / ``c_proj`` / ``c_fc`` Conv1D layers);
- Hugging Face LLaMA-style (``q/k/v/o_proj``, grouped-query attention, rotary
  positions, SwiGLU ``gate/up/down_proj``).

Before cutting, each block is rebuilt as a one-member share and run beside the original
on a few tokens; a block that computes something else (an unknown variant) is refused
rather than trained wrong. LoRA adapters are refused (the tensor strategy trains every
weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.train._tp_layers import ShardedAttention, ShardedBlock, ShardedMLP, ShardedProj, TokenScatter, TPContext
from p2ptrain.train._tp_shard import Range, TPPlan, make_plan

__all__ = ["Shard", "Surgery", "block_dims", "shard_model"]


@dataclass
class Shard:
    """One full parameter cut over the members.

    Attributes:
        module, attr: where the full parameter lives in the model (``module.attr``).
        dim: the dimension it is cut along.
        ranges: for each member (ring order), the ``[start, stop)`` ranges it holds,
            concatenated in that order along ``dim``.
        shape: the full shape.
        local: this member's piece (a trained parameter).
    """

    module: nn.Module
    attr: str
    dim: int
    ranges: list[list[Range]]
    shape: torch.Size
    local: nn.Parameter

    def piece_shape(self, rank: int) -> torch.Size:
        """The shape of member ``rank``'s piece."""
        dims = list(self.shape)
        dims[self.dim] = sum(e - s for s, e in self.ranges[rank])
        return torch.Size(dims)

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Member ``rank``'s piece of ``full`` (the parameter, or a tensor of its shape: an optimizer moment)."""
        own = [full.detach().narrow(self.dim, s, e - s) for s, e in self.ranges[rank]]
        return torch.cat(own, self.dim) if len(own) > 1 else own[0].clone()

    def assemble(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every member's piece (ring order): the parameter, or an optimizer moment.

        Raises:
            JobError: a piece has the wrong shape or dtype.
        """
        what = f"{type(self.module).__name__}.{self.attr}"
        if len(pieces) != len(self.ranges):
            raise JobError(f"{len(pieces)} pieces of {what} for {len(self.ranges)} members")
        for r, t in enumerate(pieces):
            if t.shape != self.piece_shape(r) or t.dtype != self.local.dtype:
                raise JobError(f"member {r}'s piece of {what} is {tuple(t.shape)} {t.dtype}, "
                               f"expected {tuple(self.piece_shape(r))} {self.local.dtype}")
        full = torch.empty(self.shape, dtype=self.local.dtype)
        for r, t in enumerate(pieces):
            at = 0
            for s, e in self.ranges[r]:
                full.narrow(self.dim, s, e - s).copy_(t.narrow(self.dim, at, e - s))
                at += e - s
        return full


@dataclass
class Surgery:
    """What :func:`shard_model` changed in ``model``, to undo it."""

    model: nn.Sequential
    replaced: dict[int, nn.Module] = field(default_factory=dict)
    shards: list[Shard] = field(default_factory=list)
    plans: list[TPPlan] = field(default_factory=list)

    def install(self, shard: Shard, pieces: Sequence[torch.Tensor]) -> None:
        """Put ``shard``'s full parameter back from every member's piece (ring order).

        Raises:
            JobError: a piece has the wrong shape or dtype (nothing is installed).
        """
        setattr(shard.module, shard.attr, nn.Parameter(shard.assemble(pieces)))

    def reattach(self) -> None:
        """Put the original layers back into the model (after every :meth:`install`)."""
        for i, layer in self.replaced.items():
            self.model[i] = layer
        self.replaced.clear()


# --- recognising blocks ----------------------------------------------------------------------


@dataclass
class _Proj:
    module: nn.Module
    conv1d: bool  # Hugging Face Conv1D: weight (in, out)


@dataclass
class _Parts:
    norm1: nn.Module
    norm2: nn.Module
    inputs: list[_Proj]  # [qkv] fused, or [q, k, v]
    out: _Proj
    n_head: int
    n_kv: int
    head_dim: int
    scale: float
    rotary: nn.Module | None
    up: _Proj
    gate: _Proj | None
    act: Callable[[torch.Tensor], torch.Tensor]
    down: _Proj


def _proj(m: Any, what: str) -> _Proj:
    if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor):
        return _Proj(m, True)
    if isinstance(m, nn.Linear):
        return _Proj(m, False)
    raise JobError(f"the tensor strategy splits Linear and Conv1D projections; {what} is a {type(m).__name__}"
                   + (" (LoRA adapters: train them with the data or pipeline strategy)" if "lora" in repr(type(m)).lower()
                      else ""))


def _parts(layer: Any) -> _Parts | None:
    """The parts of a block this module knows, or None."""
    block: Any = getattr(layer, "block", None)
    if all(hasattr(layer, a) for a in ("ln1", "attn", "ln2", "mlp")) and hasattr(layer.attn, "qkv"):  # tinygpt
        a, m = layer.attn, layer.mlp
        n_head = int(a.n_head)
        hd = a.qkv.weight.shape[1] // n_head
        return _Parts(layer.ln1, layer.ln2, [_proj(a.qkv, "attn.qkv")], _proj(a.proj, "attn.proj"), n_head, n_head, hd,
                      1.0 / math.sqrt(hd), None, _proj(m.fc, "mlp.fc"), None, F.gelu, _proj(m.proj, "mlp.proj"))
    if block is not None and all(hasattr(block, x) for x in ("ln_1", "attn", "ln_2", "mlp")):  # GPT-2
        a, m = block.attn, block.mlp
        if getattr(a, "is_cross_attention", False):
            return None
        return _Parts(block.ln_1, block.ln_2, [_proj(a.c_attn, "attn.c_attn")], _proj(a.c_proj, "attn.c_proj"),
                      int(a.num_heads), int(a.num_heads), int(a.head_dim), float(a.scaling), None,
                      _proj(m.c_fc, "mlp.c_fc"), None, m.act, _proj(m.c_proj, "mlp.c_proj"))
    if block is not None and all(hasattr(block, x) for x in ("input_layernorm", "self_attn", "post_attention_layernorm")):
        a, m = block.self_attn, block.mlp  # LLaMA-style
        cfg = a.config
        n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        return _Parts(block.input_layernorm, block.post_attention_layernorm,
                      [_proj(a.q_proj, "q_proj"), _proj(a.k_proj, "k_proj"), _proj(a.v_proj, "v_proj")],
                      _proj(a.o_proj, "o_proj"), n_head, n_kv, int(a.head_dim), float(a.scaling),
                      getattr(layer, "rotary", None), _proj(m.up_proj, "up_proj"), _proj(m.gate_proj, "gate_proj"),
                      m.act_fn, _proj(m.down_proj, "down_proj"))
    return None


def block_dims(layer: nn.Module) -> tuple[int, int, int] | None:
    """``(query heads, key/value heads, MLP columns)`` of a block this module knows, or None."""
    p = _parts(layer)
    return None if p is None else (p.n_head, p.n_kv, _width(p.up))


def _width(p: _Proj) -> int:
    w: Any = p.module.weight
    return int(w.shape[1] if p.conv1d else w.shape[0])


# --- cutting ---------------------------------------------------------------------------------


def _cut(p: _Proj, attr: str, dim: int, ranges: list[list[Range]], rank: int, out: list[Shard]) -> nn.Parameter:
    full: torch.Tensor = getattr(p.module, attr)
    shard = Shard(p.module, attr, dim, ranges, full.shape, nn.Parameter(torch.empty(0)))
    shard.local = nn.Parameter(shard.take(full, rank))
    out.append(shard)
    return shard.local


def _column(p: _Proj, ranges: list[list[Range]], rank: int, out: list[Shard]) -> ShardedProj:
    """Output features ``ranges`` of ``p`` (column-parallel)."""
    w = _cut(p, "weight", 1 if p.conv1d else 0, ranges, rank, out)
    b = _cut(p, "bias", 0, ranges, rank, out) if getattr(p.module, "bias", None) is not None else None
    return ShardedProj(w, b, conv1d=p.conv1d)


def _row(p: _Proj, ranges: list[list[Range]], rank: int, out: list[Shard]) -> tuple[ShardedProj, nn.Parameter | None]:
    """Input features ``ranges`` of ``p`` (row-parallel), and its (replicated) bias."""
    w = _cut(p, "weight", 0 if p.conv1d else 1, ranges, rank, out)
    bias: Any = getattr(p.module, "bias", None)
    return ShardedProj(w, None, conv1d=p.conv1d), bias


def _build(parts: _Parts, plan: TPPlan, tp: TPContext, out: list[Shard]) -> ShardedBlock:
    """This member's share of one block; the cut parameters are appended to ``out``."""
    r, hd, n = tp.rank, parts.head_dim, parts.n_head
    a, b = plan.heads[r]
    ka, kb = plan.kv_heads[r]
    if len(parts.inputs) == 1:  # fused q|k|v (multi-head: n_kv == n_head)
        if parts.n_kv != n:
            raise JobError(f"a fused Q/K/V projection with {parts.n_kv} key/value heads for {n} query heads")
        fused = [[(s * hd, e * hd), ((n + s) * hd, (n + e) * hd), ((2 * n + s) * hd, (2 * n + e) * hd)]
                 for s, e in plan.heads]
        inputs = [_column(parts.inputs[0], fused, r, out)]
        splits = [[(b - a) * hd] * 3]
    else:
        q, k, v = parts.inputs
        inputs = [_column(q, [[(s * hd, e * hd)] for s, e in plan.heads], r, out)]
        if plan.kv_split:
            kv = [[(s * hd, e * hd)] for s, e in plan.kv_heads]
            inputs += [_column(k, kv, r, out), _column(v, kv, r, out)]
        else:  # replicated key/value projections: the rows of the heads this member needs
            for p in (k, v):
                m: Any = p.module
                inputs.append(ShardedProj(m.weight, m.bias, conv1d=p.conv1d, rows=(ka * hd, kb * hd)))
        splits = [[(b - a) * hd], [(kb - ka) * hd], [(kb - ka) * hd]]
    out_proj, out_bias = _row(parts.out, [[(s * hd, e * hd)] for s, e in plan.heads], r, out)
    index = [h // plan.group - ka for h in range(a, b)]
    attn = ShardedAttention(tp, inputs, splits, out_proj, out_bias, head_dim=hd, scale=parts.scale,
                            kv_index=None if index == list(range(b - a)) else index, rotary=parts.rotary)
    cols = [[c] for c in plan.columns]
    up = _column(parts.up, cols, r, out)
    gate = _column(parts.gate, cols, r, out) if parts.gate is not None else None
    down, down_bias = _row(parts.down, cols, r, out)
    return ShardedBlock(parts.norm1, attn, parts.norm2, ShardedMLP(tp, up, gate, parts.act, down, down_bias))


class _Solo:
    """The collectives of a group of one (every one is the identity)."""

    def all_gather(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return x

    def reduce_scatter(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _check(layer: nn.Module, parts: _Parts, i: int) -> None:
    """Refuse a block whose one-member share does not compute what the block computes."""
    solo = TPContext(_Solo(), 0, [1.0])
    whole = _build(parts, make_plan(parts.n_head, parts.n_kv, _width(parts.up), [1.0]), solo, [])
    weight = getattr(parts.norm1, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise JobError(f"layer {i}: cannot tell the hidden width of its first norm ({type(parts.norm1).__name__})")
    x = torch.randn(2, 5, int(weight.shape[0]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
        want = want[0] if isinstance(want, tuple) else want
        solo.begin(2, 5)
        got = whole(x.reshape(10, -1)).reshape(2, 5, -1)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise JobError(f"layer {i} ({type(layer).__name__}) does not compute what its tensor-parallel split computes; "
                       "the tensor strategy knows tinygpt, GPT-2 and LLaMA-style blocks (use data or pipeline)")


def shard_model(model: nn.Module, tp: TPContext) -> Surgery:
    """Replace ``model``'s embedding and blocks by this member's tensor-parallel share (in place).

    Args:
        model: an ``nn.Sequential`` of an embedding, transformer blocks and a head.
        tp: this member's context (rank and shares of the group).

    Raises:
        JobError: the model has another shape, a block this module does not know, or
            LoRA adapters.
        ConfigError: fewer heads or MLP columns than members.
    """
    if not isinstance(model, nn.Sequential) or len(model) < 3:
        raise JobError("the tensor strategy splits transformer blocks: the model must be an nn.Sequential of an "
                       f"embedding, blocks and a head (got {type(model).__name__})")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise JobError(f"the tensor strategy trains every weight, but {frozen[0]} is frozen (LoRA?); use the data or "
                       "pipeline strategy for adapters")
    surgery = Surgery(model)
    found = []
    for i in range(1, len(model) - 1):
        parts = _parts(model[i])
        if parts is None:
            raise JobError(f"layer {i} ({type(model[i]).__name__}) is not a transformer block the tensor strategy "
                           "knows (tinygpt, GPT-2, LLaMA-style)")
        _check(model[i], parts, i)
        found.append(parts)
    for i, parts in enumerate(found, start=1):
        plan = make_plan(parts.n_head, parts.n_kv, _width(parts.up), tp.shares)
        mine: list[Shard] = []
        block = _build(parts, plan, tp, mine)
        for s in mine:  # the member holds its share only from now on
            setattr(s.module, s.attr, nn.Parameter(torch.empty(0, dtype=s.local.dtype)))
        surgery.shards += mine
        surgery.plans.append(plan)
        surgery.replaced[i] = model[i]
        model[i] = block
    surgery.replaced[0] = model[0]
    model[0] = TokenScatter(model[0], tp)
    return surgery
