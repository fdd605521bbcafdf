"""``p2ptrain train MODEL``: join the ring, offer it one job, train it here too, write the trained model.

This process joins the cluster as a member (with a fresh node id unless ``--node-id``
is given: a submitter is a transient member), waits for the ring (``--peers N``
members, this one included; without it, whatever the ring holds once it has been
quiet for a moment), offers the job and trains its share, showing the plan and the
demo's live progress. When the job ends it writes to ``--out``:

- ``model.safetensors``  the whole trained model, ``safetensors.torch.save_file`` of
  the model's ``state_dict()`` (no pickle); for pipeline jobs the stages' layers are
  gathered here over the ring (:mod:`p2ptrain.train._gather`);
- ``p2ptrain-job.json``  the job spec (``job``, as on the wire) and how the run went;
- ``metrics.jsonl``      one line per step, as the demo writes.

``MODEL`` goes into the job spec as given: a zoo name, ``module:function`` (this
member imports it from the current directory, like ``python -m``; the other members
need ``p2ptrain join --allow-entry MODULE`` and the module on their path), or any other
form the job spec accepts. ``--data PATH`` becomes the model keyword argument
``data`` (only when given; the model's factory reads it, and every member needs the
data at that path), ``--model-arg K=V`` any other keyword argument (V is read as an
int, else a float, else a string).

Ctrl-C or SIGTERM stops the job on every member at the next step (a second Ctrl-C quits at once).
A data or sequence job then writes the model as it stands at that step (every member
holds all of it), a tensor job too (its group puts the split weights together as it
stops, one step later), and a pipeline job (the stop travels in the steps' loss sums: every
stage ends at one step, at most two on, and sends its layers here as after the last step).
The exit code is then 130.

``--submit-only`` offers the job without training on this member: it takes part in the
measurements, the plan leaves it out (``JobSpec.submitter_trains=False``; pipeline
strategy), it follows the progress through the per-step loss sum and receives the
trained model at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError, JobError, JobStopped, LeftOutError, MembershipError, QuorumLostError
from p2ptrain.cli._join import own_address
from p2ptrain.cli._runs import claimed, pipeline_flags
from p2ptrain.cli._signals import ECHO_S, interrupt_after
from p2ptrain.dashboard import add_arguments as add_watch_arguments
from p2ptrain.dashboard import check_arguments as check_watch_arguments
from p2ptrain.dashboard import start_watching
from p2ptrain.ring import SECRET_ENV, read_secret

__all__ = ["add_arguments", "main"]

# Quiet time after which the ring is taken as found when --peers is not given: mDNS
# finds loopback and LAN peers within ~1-2 s and a view change is agreed in a
# heartbeat or two, so 3 s without a change means nobody else is about to join.
SETTLE_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="zoo model (tinygpt, mlp), module:function (importable from here) or "
                        "hf:<dir> (a local Hugging Face causal LM; see docs/your-model.md)")
    parser.add_argument("--data", metavar="PATH", help="passed to the model as the keyword argument data=PATH (every member needs it)")
    parser.add_argument("--strategy", default="data", choices=["data", "pipeline", "sequence", "tensor", "auto"],
                        help="data: full replica per member (default); pipeline: planned stages (and groups); "
                             "sequence: a slice of every sequence per member; tensor: a share of every block per member; "
                             "auto: the planner's plan, or sequence or tensor parallelism where it predicts them better")
    parser.add_argument("--steps", type=int, metavar="N", default=200, help="training steps (default 200)")
    parser.add_argument("--global-batch", type=int, metavar="N", default=None,
                        help="samples per step over the ring (default: 8 per member)")
    parser.add_argument("--lr", type=float, metavar="X", default=3e-3, help="learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and the sample order (default 0)")
    parser.add_argument("--codec", default="none", help="gradient codec: none, fp16, bf16, int8[:B], topk[:F] (default none)")
    parser.add_argument("--micro-batches", type=int, metavar="N", default=0,
                        help="pipeline micro-batches per step (default 0: the planner chooses)")
    parser.add_argument("--schedule", default=None, choices=["1f1b", "gpipe"], help="pipeline schedule (default 1f1b)")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for the model (repeatable; V read as int, else float, else string)")
    parser.add_argument("--submit-only", action="store_true",
                        help="offer the job and take the trained model back, but train nothing here (pipeline, auto)")
    parser.add_argument("--lora", action="store_true", help="hf: models: fine-tune LoRA adapters only (rank --lora-rank)")
    parser.add_argument("--lora-rank", type=int, metavar="R", default=None, help="LoRA rank with --lora (default 8)")
    parser.add_argument("--out", metavar="DIR", help="where the trained model goes (default runs/train-<time>)")
    parser.add_argument("--peers", type=int, metavar="N", default=None,
                        help="wait until the ring has N members, this one included (default: whoever is there after a short wait)")
    parser.add_argument("--wait", type=float, metavar="S", default=120.0, help="seconds to wait for --peers (default 120)")
    parser.add_argument("--cluster", default="default", help="cluster name (default: default)")
    parser.add_argument("--secret-file", metavar="F", help=f"file holding the cluster secret (mode 600); or set ${SECRET_ENV}")
    parser.add_argument("--interface", metavar="ADDR", action="append", help="bind to and announce on this address or NIC (repeatable)")
    parser.add_argument("--peer", metavar="HOST:PORT", action="append", default=[], help="static peer (repeatable)")
    parser.add_argument("--insecure", action="store_true", help="without a secret, admit peers from any address (trusted networks only)")
    parser.add_argument("--node-id", help="this member's node id (default: a fresh one)")
    parser.add_argument("--objective", default="time", choices=["time", "energy"],
                        help="what the planner optimises (pipeline, auto): time (fastest plan) or energy (fewest J/sample; default time)")
    parser.add_argument("--max-slowdown", type=float, default=0.0, metavar="X",
                        help="with --objective energy: no plan slower than X times the fastest (e.g. 1.2; default: no bound)")
    parser.add_argument("--max-j-per-sample", type=float, default=0.0, metavar="J",
                        help="with --objective time: no plan predicted above J joules per sample (e.g. 0.05; default: no bound)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="where this member trains: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps (default auto)")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="this member's checkpoints (every member needs one for checkpointing jobs)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="write checkpoints every N steps (default 0: never)")
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint the members hold")
    add_watch_arguments(parser)


def _spec(args: argparse.Namespace, members: int) -> Any:
    """The job for a ring of ``members`` (the default global batch is 8 per member)."""
    from p2ptrain.train import JobSpec, parse_model_args

    kwargs = parse_model_args(args.model_arg)
    if args.data is not None:
        if "data" in kwargs:
            raise ConfigError("give the data either as --data PATH or as --model-arg data=PATH, not both")
        kwargs["data"] = args.data
    if args.lora_rank is not None and not args.lora:
        raise ConfigError("--lora-rank sets the rank of --lora's adapters; add --lora (or leave --lora-rank out)")
    if args.lora:
        if not args.model.startswith("hf:"):
            raise ConfigError("--lora applies to hf:<dir> models (a zoo or module:function model adds its own adapters)")
        rank = 8 if args.lora_rank is None else args.lora_rank
        if "lora_rank" in kwargs or rank < 1:
            raise ConfigError("give --lora-rank R >= 1 (and not also --model-arg lora_rank=...)")
        kwargs["lora_rank"] = rank
    micro, schedule = pipeline_flags(args)

    def spec(strategy: str, micro: int = micro) -> Any:
        return JobSpec(model=args.model, strategy=strategy, global_batch=8 * members if args.global_batch is None else args.global_batch,
                       steps=args.steps, seed=args.seed, lr=args.lr, codec=args.codec, schedule=schedule,
                       micro_batches=micro, model_kwargs=kwargs,
                       checkpoint_every=args.checkpoint_every, resume=args.resume, submitter_trains=not args.submit_only,
                       objective=args.objective, max_slowdown=args.max_slowdown, max_j_per_sample=args.max_j_per_sample)

    if args.strategy == "auto" and args.resume and args.checkpoint_dir:  # name the strategy its checkpoints hold
        from p2ptrain.train import resume_point

        for concrete in ("pipeline", "data", "sequence"):
            with contextlib.suppress(JobError):
                if (found := resume_point(spec(concrete, micro if concrete == "pipeline" else micro or 1),
                                          args.checkpoint_dir)) is not None:
                    raise ConfigError(f"--resume: the checkpoints in {args.checkpoint_dir} (latest: step {found[1]}) were "
                                      f"written by the {concrete} strategy that auto chose; resume with --strategy {concrete}")
    return spec(args.strategy)


def resumed_spec(spec: Any, checkpoint_dir: str, batch_given: bool) -> Any:
    """``--resume``: the job with its checkpoint's global batch, unless ``--global-batch`` was given.

    The default global batch follows the member count, so a job resumed on fewer or more
    members named another lineage, found none of its checkpoints and started at step 0.
    """
    from p2ptrain.train import lineage_difference, resume_point

    found = resume_point(spec, checkpoint_dir)
    if found is None:
        near = lineage_difference(spec, checkpoint_dir)
        why = ""
        if near is not None and near[1]:  # the same model trained with other settings: name them
            why = (f"; its latest {spec.model} checkpoint (step {near[0]}) was trained with "
                   + ", ".join(f"{k} {there!r} (here {here!r})" for k, (there, here) in near[1].items())
                   + ": give the same values to resume it")
        print(f"--resume: no checkpoint of this job in {checkpoint_dir} (the other members look in theirs){why}", flush=True)
        return spec
    resumed, step = found
    if resumed.global_batch == spec.global_batch:
        return spec
    if batch_given:
        print(f"--resume: the checkpoints in {checkpoint_dir} (latest: step {step}) trained {resumed.global_batch} "
              f"samples a step, not {spec.global_batch}: this job starts at step 0 (use --global-batch "
              f"{resumed.global_batch} to resume it)", flush=True)
        return spec
    print(f"--resume: the checkpoint at step {step} trained {resumed.global_batch} samples a step; keeping that "
          f"global batch (the default here would be {spec.global_batch})", flush=True)
    return resumed


def join_command(args: argparse.Namespace) -> str:
    """The ``p2ptrain join`` the other members need for this job: a walkthrough's hint named ``--cluster``
    only, and a ``module:function`` or ``hf:`` job was then refused by every member started so."""
    words = ["p2ptrain join", f"--cluster {args.cluster}"] + ([f"--secret-file {args.secret_file}"] if args.secret_file else [])
    if args.model.startswith("hf:"):
        words.append(f"--allow-entry {os.path.dirname(os.path.abspath(args.model[3:])) or '/'}")
    elif ":" in args.model:
        words.append(f"--allow-entry {args.model.partition(':')[0]}")
    return " ".join(words + (["--checkpoint-dir DIR"] if args.checkpoint_dir else []))


async def _wait_for_ring(node: Any, peers: int | None, wait: float, join: str = "p2ptrain join") -> None:
    """Until the view holds ``peers`` members; without ``peers``, until it has not changed for :data:`SETTLE_S` (``wait`` at most)."""
    if peers is not None:
        if peers > 1:
            print(f"waiting for {peers - 1} more member(s) to join cluster {node.cluster!r}…", flush=True)
            try:
                await node.wait_for_peers(peers - 1, timeout=wait)
            except TimeoutError as exc:
                if node.stats.get("foreign_key"):  # the likeliest cause first: the others were heard, with another key
                    raise MembershipError(f"the ring has {len(node.view)} of the {peers} members asked for after {wait:.0f}s: "
                                          "members of this cluster announced another key (see the warning above): give every "
                                          f"member the same --secret-file (or {SECRET_ENV}); {exc}") from None
                paused = [h.removesuffix(" (paused)") for h in node.membership.heard() if h.endswith(" (paused)")]
                if paused:  # a member killed mid-job leaves a lone peer paused, not gone: say why and for how long
                    raise MembershipError(
                        f"the ring has {len(node.view)} of the {peers} members asked for after {wait:.0f}s: {', '.join(paused)} "
                        "paused when a member of its ring stopped without leaving (killed, or off the network) and took "
                        "its majority with it; it forms a ring without that member after its --quorum-expiry (30 s by "
                        f"default), and this run can join then: wait longer with --wait; {exc}") from None
                raise MembershipError(f"the ring has {len(node.view)} of the {peers} members asked for after {wait:.0f}s "
                                      f"(start `{join}` on the others): {exc}") from None
        return
    print(f"looking for the members of cluster {node.cluster!r}…", flush=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:  # a ring that keeps changing is taken as it is after --wait
        try:
            await asyncio.wait_for(node.changed(), min(SETTLE_S, max(0.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            return


def _save(state: dict[str, Any], path: Path) -> None:
    """``save_file`` of ``state``, atomically; tensors that share storage (tied weights) are written apart."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    flat = {}
    for name, t in state.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        flat[name] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata={"format": "pt", "producer": "p2ptrain"})
    os.replace(tmp, path)


def _write_out(out: Path, spec: Any, result: Any, members: list[str], workload: Any, ran: Any = None) -> Path:
    """Write the trained model and the job's record to ``out``; returns the model's path.

    ``ran``: an auto job's :class:`~p2ptrain.plan.StrategyChoice`; the record says what ran
    (a resume names that strategy).

    An ``hf:`` model is written as a Hugging Face directory (``config.json``, the weights
    as ``model.safetensors``, LoRA merged in, and the tokenizer), so
    ``AutoModelForCausalLM.from_pretrained(out)`` loads it; any other as
    ``model.safetensors`` with the names of ``workload.model.state_dict()``.
    """
    if result.state_dict is None:
        raise JobError("the job ended without the whole trained model on this member (it left before the end)")
    model = out / "model.safetensors"
    if spec.model.startswith("hf:"):
        from p2ptrain.zoo import save_hf

        save_hf(workload, out)  # the submitter's workload holds the gathered, trained weights
    else:
        _save(result.state_dict, model)
    losses = [None if math.isnan(x) else x for x in result.losses]
    record = {"job": spec.to_wire(), "steps": result.steps, "first_step": result.first_step, "members": members,
              "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
              "digest": result.digest, "model": model.name}
    if ran is not None:
        record["ran"] = {"strategy": ran.strategy, "shares": list(ran.shares)}
    tmp = out / "p2ptrain-job.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "p2ptrain-job.json")
    return model


async def _train(args: argparse.Namespace, secret: bytes | None, out: Path) -> int:
    import p2ptrain
    from p2ptrain._device import accelerator_name, pick_device
    from p2ptrain.cli._join import settle
    from p2ptrain.cli._progress import _Metrics, _Progress, _steps_run
    from p2ptrain.cli._split import print_split
    from p2ptrain.ring import Node
    from p2ptrain.train import JobService

    device = pick_device(args.device)  # an unusable --device fails before this member joins
    metrics = _Metrics(out / "metrics.jsonl")
    stopped: JobStopped | None = None  # Ctrl-C stopped the job (everywhere) before its last step
    lost: Exception | None = None  # or this member lost the ring (it paused, the others went on), or another stopped it
    asked = False  # this member's Ctrl-C asked for the stop
    try:
        async with Node(cluster=args.cluster, secret=secret, interfaces=args.interface, peers=args.peer,
                        node_id=args.node_id, ephemeral=args.node_id is None, insecure=args.insecure) as node:
            print(f"p2ptrain train: joined cluster {args.cluster!r} as {node.node_id} at {own_address(node)}, "
                  f"training on {accelerator_name(device)}", flush=True)
            # Before the ring forms: a running job's invitation finds it, and is declined once this one is offered.
            service = JobService(node, checkpoint_dir=args.checkpoint_dir, device=device)
            t0 = time.perf_counter()
            settling = asyncio.create_task(settle())  # the one-time torch work while the ring forms
            await _wait_for_ring(node, args.peers, args.wait, join_command(args))
            view = node.view
            if len(view) == 1 and args.peers is None:  # a mistyped --cluster or secret would train alone unseen
                why = (" (a node announced another key: a different secret?)" if node.stats.get("foreign_key") else "")
                print(f"no other member of cluster {args.cluster!r} answered{why}: training alone on this device; "
                      f"start `{join_command(args)}` on the others, or wait for them with --peers N",
                      flush=True)
            spec = _spec(args, len(view))
            if args.resume:
                spec = resumed_spec(spec, args.checkpoint_dir, args.global_batch is not None)
            print(f"ring of {len(view)} member(s) (view {view.epoch}, {time.perf_counter() - t0:.1f}s): "
                  f"{', '.join(view.members)}")
            print(f"job: {spec.model} ({spec.strategy}), {spec.steps} steps of {spec.global_batch} samples, codec {spec.codec}")
            def members_of() -> list[str]:  # the job's members now (a recovery or a join changes them)
                trainer = service.last_trainer
                return list((getattr(trainer, "view", None) or node.view).members)

            progress = _Progress(spec.steps, spec.global_batch, sys.stdout, metrics, me=node.node_id,
                                 pipeline=spec.strategy in ("pipeline", "auto"), members_of=members_of,
                                 ring_of=lambda: list(node.view.members))
            metrics.write("run", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), p2ptrain=p2ptrain.__version__,
                          cluster=args.cluster, **spec.to_wire_fields(), members=list(view.members))
            if spec.strategy not in ("pipeline", "auto"):
                print_split(node, spec)
                progress.expected = list(node.view.members)
            else:
                print("profiling the layers on every member and agreeing on a plan…", flush=True)
            await settling
            t1 = time.perf_counter()
            service.on_step, service.on_plan, service.on_choice = progress, progress.plan, progress.choice
            watch = await start_watching(node, service, args, secret, say=lambda line: print(line, flush=True))
            loop, quiet_until = asyncio.get_running_loop(), 0.0

            def interrupt(how: str) -> None:  # the first Ctrl-C (or SIGTERM) stops the job everywhere; a second quits at once
                nonlocal asked, quiet_until
                if asked and time.monotonic() < quiet_until:  # an echo of the first (p2ptrain.cli._signals)
                    return
                if asked:
                    _restore_signals(loop)
                    raise KeyboardInterrupt
                asked, quiet_until = True, time.monotonic() + ECHO_S
                if not service.stop(f"stopped by its submitter ({how})"):
                    _restore_signals(loop)
                    raise KeyboardInterrupt
                print(f"\nstopping the job on every member at the next step ({how}; Ctrl-C again to quit now)…", flush=True)

            with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
                loop.add_signal_handler(signal.SIGINT, interrupt, "Ctrl-C")
                # What systemd, docker stop and timeout send: the same orderly stop, the model written.
                loop.add_signal_handler(signal.SIGTERM, interrupt, "SIGTERM")
            try:
                result = await service.submit(spec)
            except JobStopped as exc:
                stopped, result = exc, _result_so_far(service, spec, exc.step, progress.losses)
                if not asked:  # stopped on another member (it paused, failed...): an error, said with its reason
                    lost = exc
            except (QuorumLostError, LeftOutError) as exc:  # a replica held here is still the model so far
                # A pipeline's stages are spread: said below as for a stop ("none is written"),
                # not a bare error (a walkthrough).
                at = getattr(service.last_trainer, "next_step", 0)
                lost, result = exc, _result_so_far(service, spec, at, progress.losses)
                stopped = JobStopped(str(exc), at)
            finally:
                _restore_signals(loop, quiet_until)
                await watch.close()
            dt = time.perf_counter() - t1
            members = members_of()
            workload = service.last_trainer.w if service.last_trainer is not None else None
    finally:
        metrics.close()
    ran = service.last_choice  # an auto job: what it ran
    if stopped is not None and result is None:
        if lost is not None:
            print(f"p2ptrain train: error: {lost}")
        metrics_at = f"metrics: {out / 'metrics.jsonl'}" if (out / "metrics.jsonl").exists() else "no step was recorded"
        strategy = ran.strategy if ran is not None else spec.strategy  # auto: what it ran (a walkthrough)
        keep = ("the tensor strategy keeps no checkpoints: the data, pipeline and sequence strategies do"
                if strategy == "tensor" else
                f"its checkpoints resume with --resume --strategy {strategy}" if spec.checkpoint_every else
                "keep checkpoints with --checkpoint-dir and --checkpoint-every")
        held = _holders(service.last_trainer) if strategy == "pipeline" else ""
        where = (f"the model is on the plan's stages ({held}), not whole on this member" if held else
                 "the model is spread over the members")
        print(f"stopped at step {stopped.step}: {where} (the {strategy} strategy), so none is written; {metrics_at} ({keep})")
        return 130 if lost is None else 2
    model = await asyncio.get_running_loop().run_in_executor(None, _write_out, out, spec, result, members, workload, ran)
    loss = f"; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
    done = "done" if stopped is None else f"stopped at step {stopped.step} of {spec.steps}, every member with it"
    if lost is not None and stopped is not None:
        done = f"p2ptrain train: error: {lost}\nstopped at step {stopped.step} of {spec.steps}; this member holds the whole model"
    ran_steps = _steps_run(result, spec.resume)
    print(f"{done}: {ran_steps} in {dt:.1f}s, planning included ({progress.rate():.0f} samples/s while training){loss}")
    print(f"model: {model} (job: {out / 'p2ptrain-job.json'}; metrics: {out / 'metrics.jsonl'})")
    return 0 if stopped is None else 2 if lost is not None else 130


def _term_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _restore_signals(loop: asyncio.AbstractEventLoop, quiet_until: float = 0.0) -> None:
    """Back to the handlers outside a job: Ctrl-C and SIGTERM both interrupt (:func:`main`), once
    the echoes of a stop signal are over (``quiet_until``, p2ptrain.cli._signals)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # off the main thread: none were set
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupt_after(quiet_until))


def _result_so_far(service: Any, spec: Any, step: int, losses: dict[int, float]) -> Any:
    """The model this member holds after a stop before ``step``, when it holds all of it; else None.

    A replica strategy holds it all along; a tensor group puts it together when it stops; a
    pipeline's stages end at one step and send their layers to the submitter, as at the last step.

    ``losses``: the steps' losses the progress saw (the job record kept none after a Ctrl-C).
    """
    from p2ptrain.train import TrainResult

    trainer = service.last_trainer
    ran = service.last_choice.strategy if service.last_choice is not None else spec.strategy
    if trainer is None or not (ran in ("data", "sequence") or (ran == "tensor" and getattr(trainer, "whole", False))
                               or (ran == "pipeline" and _holds_every_layer(trainer))):
        return None
    return TrainResult(steps=step, first_step=trainer.first_step, state_dict=trainer.w.model.state_dict(),
                       losses=[losses.get(s, math.nan) for s in range(trainer.first_step, step)])


def _holds_every_layer(trainer: Any) -> bool:
    """A pipeline member whose stage is the whole model, still in the job (a walkthrough's plan of one
    stage on the submitter wrote nothing at a Ctrl-C: "the model is spread over the members")."""
    if getattr(trainer, "gathered", None) is not None:  # a stop ends every member at one step, the model sent here
        return True
    return getattr(trainer, "left_at", None) is None and len(getattr(trainer, "units", ())) == len(trainer.layers)


def _holders(trainer: Any) -> str:
    """Who holds which layers of a pipeline job's model, from its plan ("" when unknown)."""
    layout = getattr(trainer, "layout", None) or ()
    return ", ".join(f"{'+'.join(m for m, _ in st.members)} layers {st.first_layer}-{st.last_layer}" for st in layout)


def main(args: argparse.Namespace) -> int:
    # Checked before any network activity: a bad flag costs nothing.
    if args.peers is not None and args.peers < 1:
        raise ConfigError(f"--peers counts the members to wait for, this one included: use 1 or more, not {args.peers}")
    if args.global_batch is not None and args.global_batch < 1:
        raise ConfigError(f"--global-batch must be at least 1, not {args.global_batch} (leave it out for 8 per member)")
    if args.wait <= 0:
        raise ConfigError(f"--wait must be a positive number of seconds, not {args.wait}")
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        raise ConfigError("--checkpoint-every and --resume need --checkpoint-dir DIR")
    # Like `python -m`: a module:function of the current directory is importable here.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    spec = _spec(args, args.peers or 1)  # every field checked (JobError names a bad one)
    if args.resume:  # "done: steps 10..9" and the old model written again: said here instead
        from p2ptrain.train import resume_point

        found = resume_point(spec, args.checkpoint_dir)
        if found is not None and found[1] >= spec.steps:
            raise ConfigError(f"--resume: the checkpoint at step {found[1]} in {args.checkpoint_dir} already reaches "
                              f"--steps {spec.steps}; ask for more steps to train on (e.g. --steps {found[1] + spec.steps})")
    from p2ptrain.cli._join import importable
    from p2ptrain.train import check_here

    module = spec.model.partition(":")[0] if ":" in spec.model and not spec.model.startswith("hf:") else None
    if module is not None and not importable(module):
        hint = f"; a module is named without .py: {module[:-3]}:{spec.model.partition(':')[2]}" if module.endswith(".py") else ""
        raise ConfigError(f"cannot find module {module!r} for MODEL {spec.model!r} (looked in {os.getcwd()} and sys.path){hint}")
    # The codec's parameter, the model's values, files and function: here, not on a peer
    # after the wait for --peers and the ring.
    check_here(spec)
    from p2ptrain._device import pick_device

    pick_device(args.device)  # before the output folder exists
    secret = read_secret(secret_file=args.secret_file)
    check_watch_arguments(args, secret)
    with contextlib.suppress(ValueError):  # off the main thread (a library caller): its own signals
        signal.signal(signal.SIGTERM, _term_as_interrupt)  # as Ctrl-C: a SIGTERM never leaves a silent, half-written run
    # Claimed for this run (a second run on it is refused); left empty, it is removed again.
    with claimed(Path(args.out) if args.out else None, Path("runs")) as out:
        try:
            return asyncio.run(_train(args, secret, out))
        except KeyboardInterrupt:
            if not _trained(out):
                print("\ninterrupted before the job started training: nothing was trained or written", flush=True)
            elif not (out / "p2ptrain-job.json").exists():  # a second Ctrl-C quit before the model was written
                print(f"\nquit at once: no model was written (metrics: {out / 'metrics.jsonl'}; "
                      "keep checkpoints with --checkpoint-dir)", flush=True)
            return 130


def _trained(out: Path) -> bool:
    """Whether metrics.jsonl in ``out`` records a step (Ctrl-C after training began quits without a word more)."""
    try:
        return '"event": "step"' in (out / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return False
