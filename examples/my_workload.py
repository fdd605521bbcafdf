"""Your own model on the ring: a Workload for a 2-link robot arm, trained by several peers.

Run:  .venv/bin/python examples/my_workload.py --members 3 --steps 200 [--strategy pipeline]

The workload learns the arm's forward kinematics (joint angles -> hand position) from
samples it makes itself. :func:`reacher` is the whole recipe (docs/your-model.md
walks through it): a model that is an ``nn.Sequential`` (so a pipeline can cut it),
an indexable dataset, a criterion that is a mean over samples, and a build that is
the same on every member for the same seed. ``@workload_entry`` lets a job name it.

This script starts ``--members`` nodes in one process (real sockets, mDNS on
127.0.0.1), submits ``<this module>:reacher`` from the first and prints one JSON line
with the first and last losses. On real devices, put this file on every member's
Python path and start each with ``p2ptrain join --allow-entry my_workload``; then a job
with ``model="my_workload:reacher"`` trains there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain import JobService, JobSpec, Node, Workload, workload_entry
from p2ptrain.zoo import TensorPairs

# The entry point a job names: "module:function" (this module's name when imported,
# "__main__" when run as a script; both are already imported, so every in-process
# member may resolve it).
ENTRY = f"{__name__}:reacher"
LINKS = (0.6, 0.4)  # link lengths in metres (a small desktop arm)


@workload_entry
def reacher(seed: int = 0, *, hidden: int = 64, n_samples: int = 4096) -> Workload:
    """Learn where a 2-link arm's hand is, from its two joint angles.

    Args:
        seed: the job seed; seeds the model's initial weights.
        hidden: width of the two hidden layers.
        n_samples: samples in the dataset (drawn from a fixed data seed).
    """
    # Data: the same on every member (a fixed generator, not torch's global RNG).
    data_gen = torch.Generator().manual_seed(1234)
    q = (torch.rand(n_samples, 2, generator=data_gen) * 2 - 1) * math.pi
    hand = torch.stack([
        LINKS[0] * torch.cos(q[:, 0]) + LINKS[1] * torch.cos(q[:, 0] + q[:, 1]),
        LINKS[0] * torch.sin(q[:, 0]) + LINKS[1] * torch.sin(q[:, 0] + q[:, 1]),
    ], dim=1)
    features = torch.cat([q.sin(), q.cos()], dim=1)  # angles wrap around: feed sin/cos

    # Model: an nn.Sequential, so the pipeline strategy can cut it between any two
    # layers. Every weight is then drawn from a generator seeded from the job seed, so
    # every member starts from the same weights. (Not torch.manual_seed on the global RNG:
    # members in one process build their workloads on threads at the same time, and a
    # shared RNG would hand them different numbers.)
    model = nn.Sequential(
        nn.Linear(4, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, 2),
    )
    init_gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):  # PyTorch's default bound, from our generator
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=init_gen)
                layer.bias.uniform_(-bound, bound, generator=init_gen)
    return Workload(
        model=model,
        dataset=TensorPairs(features, hand),  # sample i: (features[i], hand[i])
        criterion=F.mse_loss,  # a MEAN over the batch: equal shards average to the whole batch's loss
        description=f"2-link arm forward kinematics, MLP 4->{hidden}x2->2, {n_samples} samples",
        data_digest=f"reacher-{n_samples}",  # members whose data differs are told apart by this
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    members: int = 2  # in-process members; 2 cores run 2-3 well
    steps: int = 200  # the loss falls ~100x by then at lr 1e-2
    strategy: str = "data"  # "pipeline" cuts the 5 layers over the members
    global_batch: int = 32  # divides among 1, 2, 4, 8 members (and 4 micro-batches)
    lr: float = 1e-2  # AdamW on a small MLP: fast, stable
    seed: int = 0


async def train(cfg: Config) -> list[float]:
    """Start the members, submit the job from the first, return its per-step losses."""
    cluster = "ex-" + secrets.token_hex(3)
    nodes = [Node(cluster=cluster, interfaces=["127.0.0.1"], ephemeral=True) for _ in range(cfg.members)]
    for n in nodes:
        await n.start()
    try:
        await asyncio.gather(*(n.wait_for_peers(cfg.members - 1, timeout=30) for n in nodes))
        services = [JobService(n) for n in nodes]
        serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
        spec = JobSpec(model=ENTRY, strategy=cfg.strategy, global_batch=cfg.global_batch, steps=cfg.steps,
                       seed=cfg.seed, lr=cfg.lr, micro_batches=4 if cfg.strategy == "pipeline" else 1)
        result = await services[0].submit(spec)
        await asyncio.gather(*serving)
        return result.losses
    finally:
        for n in nodes:
            await n.close()


def run(cfg: Config) -> list[float]:
    """:func:`train` on a fresh event loop."""
    return asyncio.run(train(cfg))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=Config.members)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--strategy", choices=("data", "pipeline"), default=Config.strategy)
    a = p.parse_args()
    if not 1 <= a.members <= 8:  # 0 was an IndexError
        p.error(f"--members must be 1..8 (in one process), not {a.members}")
    losses = run(Config(members=a.members, steps=a.steps, strategy=a.strategy))
    print(json.dumps({"entry": ENTRY, "members": a.members, "strategy": a.strategy, "steps": len(losses),
                      "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5)}))
