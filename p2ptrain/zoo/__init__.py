"""The model zoo: what a job trains, as a :class:`Workload`.

Layer: above ``ring`` only by convention (it imports nothing of it): torch models and
their data, built the same on every member from a name, a seed and keyword arguments.

Files:

- ``_datasets.py``  the indexable datasets (:class:`CharWindows`, :class:`TensorPairs`) and
                    :func:`stack_collate`
- ``_workload.py``  :class:`Workload`, :func:`default_optimizer`, deterministic construction
                    (seeded generators, meta-device build)
- ``_tinygpt.py``   :func:`tinygpt`: a character-level GPT on the pydoc topics text
- ``_mlp.py``       :func:`mlp`: a small MLP regressing a random teacher network
- ``_registry.py``  the registry :data:`ZOO` and :func:`build` (a model by name)
- ``_hf.py``        :func:`hf_causal_lm`: a Hugging Face causal LM from a local directory
                    (job model ``"hf:<path>"``, :func:`hf_workload`), LoRA, :func:`save_hf`
- ``_hf_layers.py`` cutting a GPT-2 / LLaMA-style model into layers that pass one tensor
"""

from __future__ import annotations

from p2ptrain.zoo._datasets import CharWindows, TensorPairs, stack_collate
from p2ptrain.zoo._hf import HF_PREFIX, check_hf, hf_causal_lm, hf_workload, save_hf
from p2ptrain.zoo._mlp import mlp
from p2ptrain.zoo._registry import ZOO, allowed_entries, build, check_entry_keywords, check_kwargs, did_you_mean
from p2ptrain.zoo._tinygpt import tinygpt
from p2ptrain.zoo._workload import Workload, default_optimizer

__all__ = [
    "CharWindows",
    "HF_PREFIX",
    "TensorPairs",
    "Workload",
    "ZOO",
    "allowed_entries",
    "build",
    "check_entry_keywords",
    "check_hf",
    "check_kwargs",
    "default_optimizer",
    "did_you_mean",
    "hf_causal_lm",
    "hf_workload",
    "mlp",
    "save_hf",
    "stack_collate",
    "tinygpt",
]
