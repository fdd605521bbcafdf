"""Hugging Face causal LMs from local directories: :func:`hf_causal_lm`, :func:`hf_workload`, :func:`save_hf`.

A job names one as ``"hf:<path>"``: every member loads the directory at that path
from its own disk (``save_pretrained`` layout: ``config.json``, safetensors weights,
the tokenizer's files). Nothing is downloaded, no remote code runs
(``trust_remote_code`` stays off) and pickled weights are refused
(``use_safetensors=True``). Members compare a digest of the loaded weights and the
tokenized data before they train, so a member holding another directory at the same
path is turned away.

What is changed on load, so that every member computes the same thing:

- dropout is switched off (its masks come from a global RNG the members do not share,
  and a sharded batch cannot draw the masks one device draws);
- weights are float32;
- with full fine-tuning, an LM head tied to the token embedding gets its own copy
  (``tie_word_embeddings`` becomes false): a pipeline puts the embedding and the head
  on different members, and one tensor cannot live in two stages;
- with ``lora_rank > 0`` the model is wrapped by peft's LoRA on the attention
  projections; only the adapters train, initialised from the job seed.

``transformers`` and ``peft`` are imported on first use (the ``hf`` extra), through
:func:`importlib.import_module` so that importing p2ptrain stays light.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import math
import os
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.zoo._datasets import CharWindows
from p2ptrain.zoo._hf_layers import check_cut, cut_causal_lm, family
from p2ptrain.zoo._registry import check_kwargs
from p2ptrain.zoo._workload import Workload, check_fits, check_kwarg, generator

__all__ = ["HF_PREFIX", "MAX_DATA_BYTES", "allowed_dirs", "check_allowed", "hf_causal_lm", "hf_workload", "save_hf"]

HF_PREFIX = "hf:"
# Tokenizing runs on every member before the first step; 64 MiB of text is ~16M GPT-2
# tokens, a few seconds to tokenize, far more than an edge fine-tune goes through.
MAX_DATA_BYTES = 64 << 20
# Modules LoRA adapts: the attention projections (the LoRA paper adapts W_q and W_v).
# GPT-2 fuses q/k/v into one Conv1D, c_attn; "attn.c_proj" leaves the MLP's c_proj alone.
_LORA_TARGETS = {"gpt2": ["attn.c_attn", "attn.c_proj"], "llama": ["q_proj", "v_proj"]}
# One load at a time in a process: transformers' loading is not thread-safe (several
# in-process members loading at once saw a tied lm_head reported missing), and
# fork_rng saves and restores the one global RNG. Members in separate processes (the
# usual case) do not wait on each other.
_LOAD_LOCK = threading.Lock()


def _module(name: str) -> Any:
    """Import an optional dependency (the ``hf`` extra) by name, typed Any."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise JobError(
            f"Hugging Face models need {name}, which this node lacks: pip install 'p2ptrain[hf]'"
        ) from exc


# ---------------------------------------------------------------------------------
# Which directories a job from the network may name


def allowed_dirs(allowed: Collection[str]) -> list[str]:
    """The directories among ``allowed`` (``--allow-entry`` values), resolved.

    An entry counts as a directory when it holds a ``/`` (``/srv/models``,
    ``./models``; a module name never does) and names an existing directory.
    """
    return [os.path.realpath(a) for a in allowed if "/" in a and os.path.isdir(a)]


def check_allowed(what: str, path: str, allowed: Collection[str] | None) -> None:
    """Check that ``path`` lies in a directory ``allowed`` names (``None``: anything goes).

    Symbolic links are resolved first, so a link inside an allowed directory that
    points outside it is refused.

    Raises:
        JobError: it does not; the message names the fix.
    """
    if allowed is None:
        return
    real = os.path.realpath(path)
    for d in allowed_dirs(allowed):
        if os.path.commonpath([real, d]) == d:
            return
    raise JobError(
        f"{what} {path!r} is not inside a directory this node allows; start the node with "
        f"--allow-entry DIR naming a directory that holds it (e.g. --allow-entry {os.path.dirname(real) or '/'})"
    )


def hf_workload(path: str, seed: int, kwargs: Mapping[str, Any], *, allowed: Collection[str] | None = None) -> Workload:
    """Check and build job model ``"hf:<path>"`` with ``kwargs`` (:func:`hf_causal_lm`'s).

    Args:
        path: the model directory.
        seed: the job seed.
        kwargs: the job's model_kwargs.
        allowed: ``--allow-entry`` values: the model directory and the data file must
            lie in directories among them; ``None`` allows any path (local use).

    Raises:
        JobError: a bad keyword, a path not allowed, or the model cannot be built.
    """
    check_kwargs(f"model '{HF_PREFIX}{path}'", hf_causal_lm, kwargs)
    check_allowed("Hugging Face model directory", path, allowed)
    data = kwargs.get("data", "")
    if data:
        check_allowed("data file", str(data), allowed)
    return hf_causal_lm(path, seed, **kwargs)


# ---------------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bars on a node's log."""
    hub = transformers.utils.logging
    was = hub.is_progress_bar_enabled()
    hub.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hub.enable_progress_bar()


def _no_dropout(config: Any) -> None:
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


# Files one of which a saved tokenizer writes (fast, BPE, SentencePiece, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _check_dir(path: str) -> None:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise JobError(
            f"Hugging Face model directory {path!r} does not exist here or holds no config.json; "
            "every member needs the same save_pretrained directory at that path"
        )
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(".bin") for n in names):
        raise JobError(
            f"Hugging Face model directory {path!r} holds its weights as .bin files (pickle, which p2ptrain never "
            "loads); convert them once where you trust them: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(DIR, safe_serialization=True)"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        # transformers then makes an empty tokenizer: every document became no tokens, and a
        # walkthrough's job trained 20 steps on end-of-text tokens alone and exited 0.
        raise JobError(
            f"Hugging Face model directory {path!r} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
            "save the model's tokenizer there too: tokenizer.save_pretrained(DIR)"
        )


def _load(path: str) -> tuple[Any, Any]:
    """The model (float32, dropout off) and tokenizer at ``path``, from local files only."""
    _check_dir(path)
    transformers = _module("transformers")
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        with _LOAD_LOCK, _quiet(transformers), torch.random.fork_rng(devices=[]):
            config = transformers.AutoConfig.from_pretrained(path, **common)
            _no_dropout(config)
            _check_fits(transformers, config)  # before any weight is allocated
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=config, use_safetensors=True, dtype=torch.float32, attn_implementation="sdpa",
                output_loading_info=True, **common)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    except JobError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ...: the submitter needs the reason
        raise JobError(f"cannot load the Hugging Face model at {path!r}: {type(exc).__name__}: {exc}") from exc
    if info.get("missing_keys"):
        # Missing weights would be drawn at random, differently on every member.
        raise JobError(f"the weights at {path!r} lack {sorted(info['missing_keys'])[:5]}; save the whole model")
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model, tokenizer


def _max_positions(config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1 << 20


def _untie(model: Any) -> None:
    """Give a head tied to the token embedding its own copy of the weight."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _add_lora(model: Any, kind: str, rank: int, alpha: int, seed: int) -> Any:
    """Wrap ``model`` in peft LoRA adapters (in place) with weights drawn from the job seed."""
    peft = _module("peft")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                             target_modules=_LORA_TARGETS[kind], fan_in_fan_out=kind == "gpt2")
    with _LOAD_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # peft's init draws from the global RNG
        # peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing.
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    gen = generator(seed, "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                # peft's default (kaiming_uniform_, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound, generator=gen)
            elif ".lora_B." in name:
                p.zero_()  # B = 0: the adapted model starts as the loaded one
    return wrapped


def _digest(model: Any, ids: torch.Tensor, extra: str) -> str:
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        raw: Any = t.detach().reshape(-1).contiguous().view(torch.uint8).numpy()  # numpy's stubs name no Buffer
        h.update(raw)
    raw = ids.numpy()
    h.update(raw)
    return h.hexdigest()


# ---------------------------------------------------------------------------------
# Data


def read_documents(path: str) -> list[str]:
    """The documents of a ``.txt`` file (the whole file) or ``.jsonl`` file (each line's ``"text"``).

    Raises:
        JobError: another suffix, a missing or oversized file, or a malformed line.
    """
    if not path.endswith((".txt", ".jsonl")):
        raise JobError(f"data file {path!r} must be .txt (one document) or .jsonl (a 'text' field per line)")
    try:
        size = os.path.getsize(path)
        if size > MAX_DATA_BYTES:
            raise JobError(f"data file {path!r} holds {size} bytes, more than {MAX_DATA_BYTES}; use a smaller file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read data file {path!r}: {type(exc).__name__}: {exc}") from exc
    if path.endswith(".txt"):
        return [text]
    docs = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise JobError(f"{path} line {n} is not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise JobError(f"{path} line {n} needs a string field 'text'")
        docs.append(row["text"])
    return docs


def tokenize(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """All documents' token ids, in order, each document followed by the EOS token (if any)."""
    enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in enc:
        ids += doc
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Mean over every (sample, position); every sample has seq_len positions, so this is
    # the mean over samples of their means: equal shards average to the whole batch's.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _split_window(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[:, :-1], batch[:, 1:]


# ---------------------------------------------------------------------------------
# The workload


def check_hf(path: str, kwargs: Mapping[str, Any]) -> None:
    """What :func:`hf_workload` checks before it loads any weights: the keywords and their
    ranges, the data file, the directory and transformers. A submitter runs it before the
    ring forms, so a wrong path fails where it was typed (cheap: no model is loaded).

    Raises:
        JobError: the first problem found.
    """
    check_kwargs(f"model '{HF_PREFIX}{path}'", hf_causal_lm, kwargs)
    docs = _checked_data(path, str(kwargs.get("data", "")), int(kwargs.get("lora_rank", 0)), int(kwargs.get("lora_alpha", 16)))
    if not any(doc.strip() for doc in docs):
        raise JobError(f"data file {kwargs['data']!r} holds no text to train on")
    _check_dir(path)
    transformers = _module("transformers")
    try:  # config.json only, no weights
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise JobError(f"cannot load the Hugging Face model at {path!r}: {type(exc).__name__}: {exc}") from exc
    _check_fits(transformers, config)
    check_kwarg(HF_PREFIX + path, "seq_len", int(kwargs.get("seq_len", 64)), 2, _max_positions(config))


def _check_fits(transformers: Any, config: Any) -> None:
    """Refuse a model whose parameters, laid out on the meta device from ``config``, would not
    fit in this device's free memory (:func:`check_fits`)."""
    try:
        with torch.device("meta"), _quiet(transformers), torch.random.fork_rng(devices=[]):
            shape = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture that cannot be laid out on meta: loading it will say what is wrong
        return
    check_fits(shape)


def _checked_data(path: str, data: str, lora_rank: int, lora_alpha: int) -> list[str]:
    """The data file's documents, once the data and LoRA keywords are checked."""
    if not data:
        raise JobError(f"model '{HF_PREFIX}{path}' needs model_kwargs['data'] (`--data PATH` on the command line): "
                       "a local .txt or .jsonl file to train on")
    check_kwarg(HF_PREFIX + path, "lora_rank", lora_rank, 0, 1024)
    check_kwarg(HF_PREFIX + path, "lora_alpha", lora_alpha, 1, 1 << 16)
    return read_documents(data)


def hf_causal_lm(
    path: str,
    seed: int = 0,
    *,
    data: str = "",
    seq_len: int = 64,
    lora_rank: int = 0,
    lora_alpha: int = 16,
) -> Workload:
    """A Hugging Face causal LM at ``path``, cut into layers, fine-tuned on a local text file.

    The data file's documents are tokenized with the directory's tokenizer and packed
    into one stream; a sample is ``seq_len + 1`` consecutive tokens (inputs the first
    ``seq_len``, targets the last ``seq_len``), and the loss is the cross-entropy
    averaged over every target token.

    Args:
        path: a ``save_pretrained`` directory (GPT-2 or LLaMA-style model, safetensors).
        seed: the job seed: the data order, and the LoRA adapters' initial weights.
        data: a ``.txt`` or ``.jsonl`` file (a ``"text"`` field per line), at most
            :data:`MAX_DATA_BYTES`.
        seq_len: tokens of context per sample; at most the model's positions.
        lora_rank: 0 trains every weight; r > 0 trains rank-r LoRA adapters on the
            attention projections only.
        lora_alpha: LoRA's scale numerator (the update is ``alpha / r * B A``).

    Returns:
        The workload; ``info`` holds ``hf_model`` (the Hugging Face model whose
        parameters the layers train), ``peft_model`` (or None), ``tokenizer``,
        ``family``, ``n_params`` and ``n_trainable``.

    Raises:
        JobError: no data, sizes out of range, a directory or file that cannot be
            read, an architecture the cut does not know, or too little data.
    """
    docs = _checked_data(path, data, lora_rank, lora_alpha)
    model, tokenizer = _load(path)
    kind = family(model)
    check_kwarg(HF_PREFIX + path, "seq_len", seq_len, 2, _max_positions(model.config))
    ids = tokenize(tokenizer, docs)
    if tokenizer.eos_token_id is not None and bool((ids == tokenizer.eos_token_id).all()):
        raise JobError(f"the tokenizer at {path!r} turns every document of {data!r} into no tokens "
                       "(only the end-of-text marks are left); is it the model's own tokenizer?")
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise JobError(f"the tokenizer at {path!r} yields id {int(ids.max())} but the model has {vocab} embeddings")
    if ids.numel() < seq_len + 1:
        raise JobError(f"data file {data!r} holds {ids.numel()} tokens, fewer than one sample of seq_len+1={seq_len + 1}")
    digest = _digest(model, ids, f"{kind}/{seq_len}/{lora_rank}/{lora_alpha}")
    peft_model = None
    if lora_rank:
        peft_model = _add_lora(model, kind, lora_rank, lora_alpha, seed)
    else:
        _untie(model)
    layers = nn.Sequential(*cut_causal_lm(model))
    check_cut(layers, model, vocab, min(8, seq_len))
    layers.train()  # from_pretrained leaves the model in eval mode; a zoo model starts in train mode
    dataset = CharWindows(ids, seq_len)
    n_params = sum(p.numel() for p in layers.parameters())
    n_trainable = sum(p.numel() for p in layers.parameters() if p.requires_grad)
    lora = f", LoRA rank {lora_rank}" if lora_rank else ""
    return Workload(
        model=layers,
        dataset=dataset,
        criterion=_token_loss,
        split=_split_window,
        description=(
            f"{kind} from {path} ({n_params / 1e6:.2f}M params, {n_trainable / 1e6:.3f}M trained{lora}) "
            f"on {len(dataset)} samples of {seq_len} tokens from {data}"
        ),
        data_digest=digest,
        info={"hf_model": model, "peft_model": peft_model, "tokenizer": tokenizer, "family": kind,
              "n_params": n_params, "n_trainable": n_trainable},
    )


def save_hf(workload: Workload, out_dir: str | os.PathLike[str]) -> None:
    """Write the workload's Hugging Face model (LoRA merged in) and tokenizer with ``save_pretrained``.

    The layers hold the model's own parameters, so after training (or after
    ``workload.model.load_state_dict(trained)``) this saves the trained model; the
    directory loads with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        JobError: the workload is not a Hugging Face one.
    """
    model, peft_model = workload.info.get("hf_model"), workload.info.get("peft_model")
    if model is None:
        raise JobError("save_hf needs a workload built by hf_causal_lm (its info has no 'hf_model')")
    if peft_model is not None:
        # Merge into a copy: the workload keeps its adapters (training may go on).
        model = copy.deepcopy(peft_model).merge_and_unload()
    transformers = _module("transformers")
    with _LOAD_LOCK, _quiet(transformers):
        model.save_pretrained(out_dir)
        workload.info["tokenizer"].save_pretrained(out_dir)
