"""Outsiders cannot stall a training ring: each attack runs while a real job trains, and the job ends unharmed.

The intruder is an endpoint of the same cluster that is not a member of the ring (like
a process holding the secret but never admitted, or any process on loopback when no
secret is set). It floods (a) fake job offers and invitations stamped with the current
and the next view's epochs, and (b) filler messages with distinct tags that would fill
the mailbox. Every message is refused and counted, the refusals are logged a bounded
number of times, and the job finishes with the parameters of one process.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from p2ptrain.train import JobService, JobSpec, train_single

from _ring import fake_ring

SPEC = JobSpec(model="mlp", global_batch=24, steps=60, seed=7, lr=1e-2, digest_every=10)
FLOOD = 1500  # messages per kind: bounded in count; the whole flood takes about a second


@pytest.mark.parametrize("attack", ["offers", "filler"])
async def test_a_flood_from_an_outsider_does_not_harm_a_running_job(attack: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2ptrain.ring")
    async with fake_ring(3) as (net, nodes):
        intruder = net.endpoint("x9", "c")
        await intruder.start()
        try:
            for n in nodes:
                intruder.add_peer(n.node_id, n.address)
            services = [JobService(n) for n in nodes]
            started = asyncio.Event()
            services[0].on_step = lambda m: started.set()
            serving = [asyncio.ensure_future(s.serve(once=True)) for s in services[1:]]
            submitted = asyncio.ensure_future(services[0].submit(SPEC))
            await asyncio.wait_for(started.wait(), 30)
            sent = 0
            for i in range(FLOOD):
                target = nodes[i % 3]
                epoch = target.view.epoch + (i % 2)
                if attack == "offers":
                    kind, meta = ("job.offer", "job.admit")[i % 2], {"id": f"fake{i}", "job": SPEC.to_wire()}
                    ok = intruder.try_send(target.node_id, kind, epoch=epoch, meta=meta)
                else:
                    ok = intruder.try_send(target.node_id, "coll", epoch=epoch, tag=["filler", i], meta={})
                sent += ok  # a full queue refuses at the sender (back-pressure): not sent
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let the ring breathe between bursts, as a real flood would
            results = await asyncio.wait_for(asyncio.gather(submitted, *serving), 60)
        finally:
            await intruder.close()
        await asyncio.sleep(0.2)  # the last messages in flight
        dropped = sum(n.stats.get("dropped_not_member", 0) for n in nodes)
        assert sent > 200 and dropped >= sent, f"only {dropped} of {sent} intruder messages were refused"
        assert all(len(n.mailbox) < 50 for n in nodes)
    assert all(r.steps == SPEC.steps for r in results) and len({r.digest for r in results}) == 1
    ref, _ = train_single(SPEC)
    for got, want in zip(services[0].last_trainer.w.model.parameters(), ref.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused ")]
    assert refusals, "refusals must be logged (at a bounded rate)"
    assert len(refusals) <= 3 * 3, f"{len(refusals)} refusal log lines: not rate-limited"
