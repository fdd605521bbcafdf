"""The zoo's registry: every workload a job can name, and :func:`build` to make one by name.

Zoo entries:

- ``tinygpt``: a character-level GPT (token + position embedding, pre-norm blocks of
  causal self-attention and MLP, final LayerNorm + linear head) trained on the
  ``pydoc_data.topics`` text that ships with every CPython.
- ``mlp``: a small MLP regressing a fixed random "teacher" network; tiny and fast.

Both models are ``nn.Sequential`` (hidden states flow layer to layer), so the pipeline
strategy can cut them between any two layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from p2ptrain._errors import JobError
from p2ptrain.zoo._mlp import mlp
from p2ptrain.zoo._tinygpt import tinygpt
from p2ptrain.zoo._workload import Workload

__all__ = ["ZOO", "build"]

ZOO: Mapping[str, Callable[..., Workload]] = {"mlp": mlp, "tinygpt": tinygpt}


def build(name: str, seed: int = 0, /, **kwargs: int | float | str) -> Workload:
    """Build zoo model ``name`` with ``seed`` and keyword overrides.

    Keyword names and types are checked against the factory's signature first, so a
    job from the network with a typo or a wrong type gets a message, not a TypeError.

    Raises:
        JobError: unknown name, unknown keyword, wrong type or out-of-range value.
    """
    factory = ZOO.get(name)
    if factory is None:
        raise JobError(f"unknown zoo model {name!r}; the zoo has {', '.join(sorted(ZOO))}")
    params = {
        p.name: p.default for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    for key, value in kwargs.items():
        if key not in params:
            raise JobError(
                f"model_kwargs[{key!r}] is not a parameter of zoo model {name!r}; "
                f"it takes {', '.join(params)}"
            )
        want = type(params[key])
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise JobError(
                f"model_kwargs[{key!r}]={value!r} is a {type(value).__name__}; "
                f"zoo model {name!r} wants a {want.__name__} (default {params[key]!r})"
            )
    return factory(seed, **kwargs)
