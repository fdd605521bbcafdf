"""How a job without a planner splits its work, printed before it trains (``train`` and ``demo``)."""

from __future__ import annotations

from typing import Any

__all__ = ["UNEVEN", "print_split"]

#: Announced speeds this far apart make an even data-parallel split worth a hint.
UNEVEN = 2.0


def print_split(node: Any, spec: Any) -> None:
    """The split of a job without a planner (every strategy but the pipeline's)."""
    world = len(node.view)
    if spec.strategy in ("sequence", "tensor"):
        what = ("a slice of every sequence's tokens (keys and values exchanged at every attention layer)"
                if spec.strategy == "sequence" else
                "a share of every block's attention heads and MLP columns, and a slice of the tokens between them")
        shares = ", ".join(f"{s:g}" for s in spec.shares) if spec.shares else "even"
        print(f"plan: {spec.strategy} parallel over {world} members, each computing {what}; shares: {shares}")
        for m in node.members():
            print(f"  {node.view.rank(m.node_id):<5}{m.node_id}")
        return
    import torch

    from p2ptrain.train import shard

    size, extra = divmod(spec.global_batch, world)
    each = f"{size}" if not extra else f"{size + 1} or {size}"
    print(f"plan: data parallel, full replica on each member, {each} of {spec.global_batch} samples per member per step")
    print(f"  {'rank':<5}{'node':<22}{'cores':>6}{'GFLOP/s':>10}  shard")
    for m in node.members():
        r = node.view.rank(m.node_id)
        rows = shard(torch.arange(spec.global_batch), r, world)  # what the trainer takes
        res = m.resources
        print(f"  {r:<5}{m.node_id:<22}{(res.cores if res else '?'):>6}{(f'{res.gflops:.1f}' if res else '?'):>10}  "
              f"samples {int(rows[0])}..{int(rows[-1])} of each global batch")
    speeds = [m.resources.gflops for m in node.members() if m.resources is not None and m.resources.gflops > 0]
    kinds = {m.node_id: m.resources.accelerator for m in node.members() if m.resources is not None}
    gpus = sorted(n for n, k in kinds.items() if k != "cpu")
    if gpus and len(gpus) < len(kinds):  # the GFLOP/s announced are each CPU's: a GPU's speed is not in them
        print(f"  {', '.join(f'{n} ({kinds[n]})' for n in gpus)} can compute on a GPU and "
              f"{', '.join(sorted(n for n in kinds if n not in gpus))} cannot, and every one takes the same share, "
              "so the CPU members set the pace: --strategy auto measures them and plans by speed (and may leave one out)")
    elif len(speeds) > 1 and max(speeds) >= UNEVEN * min(speeds):
        print(f"  the members' speeds differ {max(speeds) / min(speeds):.1f}x and every one takes the same share, so the "
              "slowest sets the pace: --strategy auto measures them and plans by speed (and may leave one out)")
