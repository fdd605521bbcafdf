"""Write a tiny GPT-2 (or LLaMA) model directory and a text file to fine-tune it on, with no download.

Run:  .venv/bin/python examples/tiny_hf.py /tmp/models [--arch gpt2|llama]

It writes ``/tmp/models/tiny-<arch>/`` (``config.json``, ``model.safetensors``, the
tokenizer's files, as ``save_pretrained`` does) and ``/tmp/models/data.jsonl``: a stand-in
for a real model directory and real data, to try ``p2ptrain train hf:...`` on a laptop
(docs/your-model.md). Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LINES = [
    "the robot arm reached the red block and closed its gripper",
    "the jetson on the shelf trained the model with the laptops",
    "a leaderless ring over zeromq trains one model together",
    "robots, jetsons and laptops pool their compute on the lan",
]


def write(root: Path, arch: str = "gpt2") -> Path:
    """Write the model directory and ``data.jsonl`` under ``root``; returns the model directory."""
    import torch

    try:
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise SystemExit(f"this example needs the hf extra ({exc.name} is missing): pip install 'p2ptrain[hf]'") from None

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    v, eos = len(tokenizer), tokenizer.eos_token_id
    if arch == "gpt2":
        config: object = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=v, n_positions=128,
                                                 bos_token_id=eos, eos_token_id=eos)
    else:
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                          max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)  # a script of its own: the global RNG is ours to seed
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = root / f"tiny-{arch}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (root / "data.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES * 200))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="where to write the model directory and data.jsonl")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    a = p.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    print(write(a.root, a.arch))


if __name__ == "__main__":
    main()
