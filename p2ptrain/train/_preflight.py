"""A job checked where it is written: before a ring forms, a peer is waited for or a member starts.

A member checks every job it is offered anyway (it has to build the model); this is the
submitter's own check of the same things, so that a wrong value, path or codec parameter
fails in a second where it was typed instead of after the wait for peers, the ring and
the plan.
"""

from __future__ import annotations

from p2ptrain._errors import JobError
from p2ptrain.kernels import get_codec
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.zoo import HF_PREFIX, check_hf

__all__ = ["check_here"]


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
        return
    workload = resolve(spec)
    # A model the strategy cannot split (an MLP for tensor or sequence parallelism) failed
    # in every member after the ring and the plan; the member count is not known here, so
    # only what one member would already refuse.
    if (why := refusal(spec, workload, 1)) is not None:
        raise JobError(why)
