"""The layer profiler: what each layer of a model costs on this device.

The planner needs, per layer, the time of its forward and backward, the bytes of its
parameters, the bytes of the activation it hands to the next layer (what crosses the
network at a stage boundary) and the bytes autograd keeps for its backward (what a
stage holds per in-flight micro-batch). :func:`profile_layers` measures these by
running the layers once each on a sample micro-batch, the "profile" step of the
collaborative-edge-training framework (profile, plan, place, train).

Times are per sample: the measured time divided by the sample batch size. The planner
scales them linearly with the micro-batch size, which is close for batches near the
profiled one and optimistic for much smaller ones (fixed per-call costs); profile at
about the micro-batch size you expect to train with.

:func:`profile_layers_cached` keeps results in a small JSON cache keyed by
:func:`model_digest`, the input's shape and dtype, and a device tag, so a node that
rejoins does not profile again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from p2ptrain._errors import ConfigError

__all__ = [
    "ADAM_STATE_FACTOR",
    "LayerCost",
    "device_tag",
    "model_digest",
    "profile_layers",
    "profile_layers_cached",
]

log = logging.getLogger(__name__)

# Bytes held per parameter byte while training with Adam(W): the parameter itself, its
# gradient, and the two moment estimates (exp_avg, exp_avg_sq) of the same dtype.
ADAM_STATE_FACTOR = 4

_CACHE_VERSION = 1

# A layer's timed runs stop once they add up to this many seconds (at least one run): a
# run this long averages its own noise, and on a quarter-core member a transformer block's
# runs of a 15 M-parameter model took 0.2 s each, 1.5 s of a layer profile that every
# member of the ring waits for. Short layers still get every repeat.
ENOUGH_TIMED_S = 0.1


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs on the profiled device, for one sample.

    Attributes:
        fwd_s: forward seconds per sample.
        bwd_s: backward seconds per sample (gradients for the input and parameters).
        param_bytes: bytes of the layer's parameters (once; not the optimizer state).
        act_bytes: bytes per sample of the layer's output activation, which is what
            crosses the network when a stage ends after this layer (and, the same
            size, its gradient coming back).
        saved_bytes: bytes per sample that autograd keeps from the forward until the
            backward (the layer's input and internals, not its parameters); 0 when
            unknown, and the planner then uses ``act_bytes``.
    """

    fwd_s: float
    bwd_s: float
    param_bytes: int
    act_bytes: int
    saved_bytes: int = 0

    def __post_init__(self) -> None:
        if not (self.fwd_s >= 0 and self.bwd_s >= 0 and self.param_bytes >= 0 and self.act_bytes >= 0):
            raise ConfigError(f"a LayerCost needs non-negative times and sizes, got {self}")
        if self.saved_bytes < 0:
            raise ConfigError(f"a LayerCost needs saved_bytes >= 0, got {self}")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _param_bytes(layer: nn.Module) -> int:
    # parameters() deduplicates shared tensors within the layer.
    return sum(_nbytes(p) for p in layer.parameters())


def _sync(device: torch.device) -> None:
    # Kernels on an accelerator run asynchronously; time only what has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(layer: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Run ``layer(x)`` once, returning the output and the bytes autograd saved for backward.

    Tensors that share storage with a parameter are not activations and are left out;
    each storage counts once however many times it is saved.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    return out, total


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _measure(i: int, layer: nn.Module, x: Tensor, repeats: int, deadline: float) -> tuple[LayerCost, Tensor]:
    """Profile layer ``i`` on input ``x``; returns its cost and its (detached) output."""
    batch, device = x.shape[0], x.device
    if x.is_floating_point():
        x.requires_grad_(True)
    wrt = ([x] if x.requires_grad else []) + [p for p in layer.parameters() if p.requires_grad]
    out, saved = _saved_bytes(layer, x)
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"layer {i} ({type(layer).__name__}) returned a {type(out).__name__}; "
            "a pipeline layer must return one tensor"
        )
    grad_out = torch.ones_like(out)
    fwd: list[float] = []
    bwd: list[float] = []
    # Run 0 is the warm-up (first-call allocations, kernel choice); it is not kept.
    for run in range(repeats + 1):
        outs: list[Tensor] = []
        f_s = _timed(functools.partial(_append_call, outs, layer, x), device)
        y = outs[0]
        b_s = 0.0
        if wrt and y.requires_grad:
            b_s = _timed(functools.partial(torch.autograd.grad, y, wrt, grad_out, allow_unused=True), device)
        if run > 0:
            fwd.append(f_s)
            bwd.append(b_s)
            # Keep what we have (one run at least) past the deadline or once the runs are long enough.
            if time.perf_counter() > deadline or sum(fwd) + sum(bwd) >= ENOUGH_TIMED_S:
                break
    cost = LayerCost(
        fwd_s=statistics.median(fwd) / batch,
        bwd_s=statistics.median(bwd) / batch,
        param_bytes=_param_bytes(layer),
        act_bytes=_nbytes(out) // batch,
        saved_bytes=saved // batch,
    )
    return cost, out.detach()


def _setting(v: object) -> object:
    """A module attribute as a comparable setting: plain values and sequences of them as
    they are, a tensor by its shape and type, anything else (a function, a config object)
    by its identity, so only the same object matches."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_setting(i) for i in v)
    if isinstance(v, (set, frozenset)):  # e.g. the names of a module's non-persistent buffers
        return ("set", tuple(sorted(repr(i) for i in v)))
    if isinstance(v, Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    return ("object", id(v))


def _twin_key(layer: nn.Module, x: Tensor) -> tuple[object, ...]:
    """What a layer's cost depends on: every submodule's class and settings (its attributes:
    ``n_head``, a dropout rate, a convolution's stride, the function it applies), its
    parameters' and buffers' shapes and types, and the input's shape and type. Layers with
    equal keys cost the same (to the profile's noise). A module's registries (parameters,
    buffers, submodules, hooks) are dictionaries and are compared by what they hold."""
    subs = tuple(
        (type(m), tuple(sorted((k, _setting(v)) for k, v in vars(m).items() if not isinstance(v, dict))))
        for m in layer.modules()
    )
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad, p.device) for n, p in layer.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers())
    return subs, params, buffers, tuple(x.shape), x.dtype, x.requires_grad, x.device


def profile_layers(
    layers: Sequence[nn.Module],
    sample_input: Tensor,
    *,
    repeats: int = 3,
    budget_s: float = 10.0,
) -> list[LayerCost]:
    """Measure each layer's forward and backward on ``sample_input``, chained layer to layer.

    Layer ``i`` runs on the output of layer ``i - 1`` (the first on ``sample_input``,
    whose dim 0 is the batch). Each layer gets one warm-up forward+backward, then
    ``repeats`` timed ones (fewer once they add up to :data:`ENOUGH_TIMED_S`); the
    median is kept. A layer that is a twin of one measured before it
    (:func:`_twin_key`: the same classes and settings, parameter and buffer shapes,
    and input; a transformer's blocks) takes that layer's figures, and runs one
    forward without a graph for the next layer's input: profiling a deep stack of
    blocks costs about one block's measuring. Backwards use
    ``torch.autograd.grad`` with a ones gradient, so no ``.grad`` is written. The
    layers keep their train/eval mode, parameters, gradients and buffers (e.g.
    BatchNorm's running statistics are restored), and torch's CPU RNG state (dropout)
    is restored afterwards.

    Args:
        layers: the model's layers in order, each mapping one tensor to one tensor.
        sample_input: a (micro-)batch of inputs for the first layer, on the device to
            profile.
        repeats: timed runs per layer (>= 1).
        budget_s: soft bound on the total time; past it each remaining layer gets a
            single timed run (still one warm-up).

    Returns:
        One :class:`LayerCost` per layer, times and activation bytes per sample.

    Raises:
        ConfigError: no layers, a bad argument, or a layer that does not return a
            single tensor.
    """
    if not layers:
        raise ConfigError("profile_layers needs at least one layer")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if sample_input.dim() == 0 or sample_input.shape[0] < 1:
        raise ConfigError(f"sample_input needs a batch dimension of at least 1, got shape {tuple(sample_input.shape)}")
    deadline = time.perf_counter() + budget_s
    buffers = [b.detach().clone() for layer in layers for b in layer.buffers()]
    rng_devices = [sample_input.device] if sample_input.device.type == "cuda" else []
    costs: list[LayerCost] = []
    x = sample_input.detach()
    measured: dict[tuple[object, ...], LayerCost] = {}
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            for i, layer in enumerate(layers):
                key = _twin_key(layer, x)
                if key in measured:
                    with torch.no_grad():
                        out = layer(x)
                    # A twin whose output differs in size is not one after all: measure it.
                    if isinstance(out, Tensor) and _nbytes(out) // x.shape[0] == measured[key].act_bytes:
                        x = out.detach()
                        costs.append(measured[key])
                        continue
                cost, x = _measure(i, layer, x, repeats, deadline)
                measured[key] = cost
                costs.append(cost)
    finally:
        # Training-mode forwards move BatchNorm's running statistics: put them back.
        with torch.no_grad():
            for buf, old in zip((b for layer in layers for b in layer.buffers()), buffers):
                buf.copy_(old)
    return costs


def model_digest(layers: Sequence[nn.Module]) -> str:
    """A short digest of the layers' architecture: classes, parameter and buffer shapes and dtypes.

    Equal for models that differ only in parameter values, so it keys a profile cache.
    """
    h = hashlib.sha256()
    for i, layer in enumerate(layers):
        h.update(f"{i}:{type(layer).__module__}.{type(layer).__qualname__}\n".encode())
        for kind, named in (("p", layer.named_parameters()), ("b", layer.named_buffers())):
            for name, t in named:
                h.update(f" {kind} {name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(f" {layer.extra_repr()}\n".encode())
    return h.hexdigest()[:16]


def device_tag(device: torch.device | str = "cpu") -> str:
    """A tag for "this kind of device, set up this way": times measured under one tag apply to it."""
    device = torch.device(device)
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.machine()}-{os.cpu_count()}cpu-{torch.get_num_threads()}threads"
    return f"{device.type}-{what}-torch{torch.__version__}".replace(" ", "_")


def _cache_key(layers: Sequence[nn.Module], sample_input: Tensor, tag: str) -> str:
    spec = f"{model_digest(layers)}|{tuple(sample_input.shape)}|{sample_input.dtype}|{tag}"
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def _load(path: Path, n_layers: int) -> list[LayerCost] | None:
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != _CACHE_VERSION or len(raw["layers"]) != n_layers:
            return None
        return [LayerCost(**entry) for entry in raw["layers"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # A torn or foreign file is not worth failing a join over: measure again.
        log.warning("ignoring unreadable profile cache %s: %s", path, exc)
        return None


def profile_layers_cached(
    layers: Sequence[nn.Module],
    sample_input: Tensor,
    *,
    cache_dir: str | os.PathLike[str],
    tag: str | None = None,
    repeats: int = 3,
    budget_s: float = 10.0,
) -> list[LayerCost]:
    """:func:`profile_layers`, remembered in ``cache_dir`` as one JSON file per key.

    The key is the layers' :func:`model_digest`, the sample input's shape and dtype,
    and ``tag`` (default :func:`device_tag` of the input's device). Files are written
    atomically (temporary file, then rename); an unreadable one is measured again.

    Raises:
        ConfigError: as :func:`profile_layers`.
    """
    tag = device_tag(sample_input.device) if tag is None else tag
    directory = Path(cache_dir)
    path = directory / f"profile-{_cache_key(layers, sample_input, tag)}.json"
    cached = _load(path, len(layers))
    if cached is not None:
        return cached
    costs = profile_layers(layers, sample_input, repeats=repeats, budget_s=budget_s)
    directory.mkdir(parents=True, exist_ok=True)
    body = {
        "version": _CACHE_VERSION,
        "digest": model_digest(layers),
        "input_shape": list(sample_input.shape),
        "input_dtype": str(sample_input.dtype),
        "tag": tag,
        "layers": [asdict(c) for c in costs],
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".profile-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return costs


def _append_call(outs: list[Tensor], layer: nn.Module, x: Tensor) -> None:
    outs.append(layer(x))
