"""Build the tiny, randomly initialised Mistral-style decoder that the NV-Embed CPU recipes and tests use.

    python scripts/make_tiny_decoder.py            # writes data/tiny_decoders/mistral/

A 2-layer, 32-wide ``MistralModel`` with a 1,000-token sentencepiece-style BPE tokenizer (a space starts
the next token, ``<s>`` in front of every text, padding with ``</s>``, as Mistral's own tokenizer) trained
on WordNet definitions and emoji names from ``data/``. It is causal as saved, like a Hub checkpoint;
embedtrain makes it bidirectional when it loads it. The weights are random (seeded): the recipes that
use it check the plumbing of a two-stage run on a CPU, not embedding quality.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def corpus(rows: int = 4000) -> list[str]:
    texts = []
    with (REPO / "data/wordnet/train.jsonl").open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= rows:
                break
            row = json.loads(line)
            texts += [row["anchor"], row["positive"], row["negative"]]
    with (REPO / "data/emoji/metadata.jsonl").open(encoding="utf-8") as f:
        texts += [json.loads(line)["name"] for line in f]
    tasks = ["Given a definition, retrieve the words it defines", "Classify an emoji name into its group",
             "Find the subgroup an emoji name belongs to"]
    return texts + [f"Instruct: {t}\nQuery: {x}" for t in tasks for x in texts[:200]]


def build(out: Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable) + ["▁"])
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="</s>")
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MistralModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "data/tiny_decoders/mistral"))
    args = parser.parse_args()
    print(f"wrote {build(Path(args.output))}")
