"""A job checked where it is written: before a ring forms, a peer is waited for or a member starts.

A member checks every job it is offered anyway (it has to build the model); this is the
submitter's own check of the same things, so that a wrong value, path or codec parameter
fails in a second where it was typed instead of after the wait for peers, the ring and
the plan.
"""

from __future__ import annotations

import warnings

import torch

from p2ptrain._errors import JobError
from p2ptrain.kernels import get_codec
from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.zoo import HF_PREFIX, Workload, check_hf

__all__ = ["check_here", "trial_step"]


def check_here(spec: JobSpec) -> None:
    """Check ``spec`` on this machine as its members will.

    The codec's parameter is checked (the spec checks its syntax only); a zoo model or an
    entry point is built once here (its own checks of values and combinations run: a
    tinygpt whose ``n_embd`` is not a multiple of ``n_head``, a function that does not
    exist); an ``hf:`` model's directory, data file, keywords and dependencies are checked
    without loading its weights.

    Raises:
        JobError: the model cannot be built, or its files are not there.
        CodecError: a codec parameter out of range.
    """
    from p2ptrain.train._strategies import batch_refusal, refusal

    get_codec(spec.codec)
    if (why := batch_refusal(spec)) is not None:  # every member refuses it
        raise JobError(f"{why}; use a multiple of {spec.micro_batches}, or micro_batches=0 to let the planner choose")
    if spec.model.startswith(HF_PREFIX):
        check_hf(spec.model[len(HF_PREFIX) :], spec.model_kwargs)
        if spec.strategy == "tensor" and spec.model_kwargs.get("lora_rank"):  # every member refused it, after the ring
            raise JobError("the tensor strategy trains every weight of its shares and takes no LoRA adapters; train "
                           "with LoRA under the data or pipeline strategy, or the tensor strategy without --lora")
        return
    workload = resolve(spec)
    # A model the strategy cannot split (an MLP for tensor or sequence parallelism) failed
    # in every member after the ring and the plan; the member count is not known here, so
    # only what one member would already refuse.
    if (why := refusal(spec, workload, 1)) is not None:
        raise JobError(why)
    trial_step(spec, workload)


def trial_step(spec: JobSpec, workload: Workload) -> None:
    """The first global batch's sampling and one forward of its first two samples, on this copy.

    A walkthrough's model whose forward raised printed a traceback on every member after
    the ring formed (data strategy), a data set smaller than the batch failed likewise
    (pipeline), and a model whose output had the wrong shape trained to the end with one
    torch warning. This model is built for the check alone, so its forward (no gradient)
    changes nothing that trains.

    Raises:
        JobError: the batch does not fit the data, the forward or loss fails, the loss is
            not one number, or torch warns that outputs and targets differ in size.
    """
    sampler = GlobalSampler(len(workload.dataset), spec.global_batch, spec.seed)  # raises when they do not fit
    where = f"{spec.model}: one forward and loss on 2 samples of the first batch"
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        try:
            loss = workload.loss(workload.batch(sampler.indices(0)[:2]))
        except Exception as exc:  # a user's model may raise anything: said with its own words
            raise JobError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    sizes = [str(w.message) for w in seen if "target size" in str(w.message)]
    if sizes:  # e.g. mse_loss broadcasting an output of 4 values per sample against a target of 1
        raise JobError(f"{where}: {sizes[0].rstrip('.')}; the model's output must match its targets")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise JobError(f"{where}: the loss must be one number (the batch's mean), got {shape}")
