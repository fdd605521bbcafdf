"""The zoo's registry: every workload a job can name, and :func:`build` to make one by name.

Zoo entries:

- ``tinygpt``: a character-level GPT (token + position embedding, pre-norm blocks of
  causal self-attention and MLP, final LayerNorm + linear head) trained on the
  ``pydoc_data.topics`` text that ships with every CPython.
- ``mlp``: a small MLP regressing a fixed random "teacher" network; tiny and fast.

A job names a Hugging Face model directory as ``"hf:<path>"`` instead
(:mod:`p2ptrain.zoo._hf`); it is not in the registry, which holds names only.

Both zoo models are ``nn.Sequential`` (hidden states flow layer to layer), so the pipeline
strategy can cut them between any two layers.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from p2ptrain._errors import JobError
from p2ptrain.zoo._mlp import mlp
from p2ptrain.zoo._tinygpt import tinygpt
from p2ptrain.zoo._workload import Workload

__all__ = ["ZOO", "allowed_entries", "build", "check_entry_keywords", "check_kwargs", "did_you_mean"]

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
        raise JobError(f"unknown zoo model {name!r}{did_you_mean(name, ZOO)}; the zoo has {', '.join(sorted(ZOO))}")
    check_kwargs(f"zoo model {name!r}", factory, kwargs)
    return factory(seed, **kwargs)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'tinygpt'?)"`` for the closest of ``choices`` (case ignored), or ``""``."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.75)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def check_kwargs(label: str, factory: Callable[..., Workload], kwargs: Mapping[str, object]) -> None:
    """Check ``kwargs`` against ``factory``'s keyword-only parameters: names, and types of their defaults.

    Args:
        label: the model, for messages (``"zoo model 'mlp'"``).
        factory: the function the keywords are for.
        kwargs: the job's model_kwargs.

    Raises:
        JobError: an unknown keyword or a value of the wrong type (an int passes for a float).
    """
    params = {
        p.name: p.default for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY
    }
    for key, value in kwargs.items():
        if key not in params:
            raise JobError(
                f"model_kwargs[{key!r}] is not a parameter of {label}{did_you_mean(key, params)}; "
                f"it takes {', '.join(params)}"
            )
        want = type(params[key])
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise JobError(
                f"model_kwargs[{key!r}]={value!r} is a {type(value).__name__}; "
                f"{label} wants {'an' if want.__name__[0] in 'aeiou' else 'a'} {want.__name__} (default {params[key]!r})"
            )


def check_entry_keywords(label: str, factory: Callable[..., object], kwargs: Mapping[str, object]) -> None:
    """Check ``kwargs`` against the names an entry point's function takes besides ``seed``.

    A function that takes ``**kwargs`` (or whose signature cannot be read) takes anything.
    Its values are the function's own business: it is called with them next.

    Raises:
        JobError: a keyword the function does not take, with the ones it does.
    """
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "seed"]
    for key in kwargs:
        if key not in names:
            takes = f"it takes {', '.join(names)}" if names else "it takes no keywords"
            raise JobError(f"model_kwargs[{key!r}] is not a parameter of {label}{did_you_mean(key, names)}; {takes}")


def allowed_entries(model: str, model_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """What a member must allow (``--allow-entry``) to build ``model`` when every member is ours
    (a demo's, a bench's): its module, or the folders holding its ``hf:`` directory and data
    file (zoo names need nothing)."""
    if model.startswith("hf:"):
        data = (model_kwargs or {}).get("data")
        dirs = [os.path.dirname(os.path.abspath(model[3:]))]
        if isinstance(data, str) and data:
            dirs.append(os.path.dirname(os.path.abspath(data)))
        return list(dict.fromkeys(dirs))
    return [model.split(":")[0]] if ":" in model else []
