"""Tiny decoder LLMs and tokenizers for the NV-Embed tests (built locally, nothing downloaded).

Two tokenizer styles cover the two ways real decoders split text:

- ``sentencepiece``: Mistral/Llama-2 style BPE with a metaspace pre-tokenizer (a space becomes ``▁`` and
  starts the next token) and a ``<s>`` BOS token added in front of every text.
- ``byte_level``: Qwen2/Llama-3 style byte-level BPE behind a split regex (a space is glued to the word
  after it), no BOS token.

Both are trained on a few sentences that use the NV-Embed query template, so the vocabulary has merges
around ``Instruct:``/``Query:`` as a real tokenizer would.
"""

from __future__ import annotations

import copy
from pathlib import Path

TASKS = [
    "Given a question, retrieve passages that answer the question",
    "Retrieve semantically similar text",
    "Given a claim, find documents that refute the claim",
]
TEXTS = [
    "what is the capital of france",
    "How do plants grow in the dark?",
    "the river runs fast through the small city",
    "A computer program reads data over a network.",
    "(see also) music, sound and color",
    "2024 was a year; 42 is a number",
]
# Qwen2's pre-tokenizer split pattern: a space or one punctuation mark joins the word after it.
BYTE_LEVEL_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def training_corpus() -> list[str]:
    lines = [f"Instruct: {task}\nQuery: {text}" for task in TASKS for text in TEXTS]
    return lines + TEXTS + TASKS


def build_tokenizer(style: str = "sentencepiece", vocab_size: int = 2000):
    """A fast tokenizer (``PreTrainedTokenizerFast``) with pad/eos tokens and offset mappings."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = list(string.printable) + ["▁"]
        specials = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
        tok.train_from_iterator(training_corpus(), trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        # Mistral ships without a pad token; padding with EOS is the usual choice and is masked anyway.
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(BYTE_LEVEL_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = ["<|endoftext|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(training_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    raise ValueError(f"unknown tokenizer style {style!r}")


FAMILY_TOKENIZER = {"mistral": "sentencepiece", "llama": "sentencepiece", "gemma": "sentencepiece",
                    "qwen2": "byte_level", "qwen3": "byte_level", "gemma2": "sentencepiece",
                    "gemma3_text": "sentencepiece"}


def tiny_config(family: str, vocab_size: int):
    """A 2-layer, 32-wide config of ``family`` (a transformers ``model_type``)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, head_dim=8,
    )
    extra = {
        "mistral": dict(sliding_window=4096),
        "qwen2": dict(use_sliding_window=False),
        "qwen3": dict(use_sliding_window=False),
        "gemma2": dict(sliding_window=64, attn_logit_softcapping=None, final_logit_softcapping=None),
        "gemma3_text": dict(sliding_window=64),
    }.get(family, {})
    return AutoConfig.for_model(family, **common, **extra)


def build_tiny_decoder(family: str, vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised base decoder (``AutoModel``) of ``family``, in eval mode."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = copy.deepcopy(tiny_config(family, vocab_size))
    return AutoModel.from_config(config, attn_implementation=attn_implementation).eval()


def save_tiny_decoder(folder: Path, family: str = "mistral", seed: int = 0) -> Path:
    """A tiny decoder and its tokenizer saved as a transformers folder (still causal, as on the Hub)."""
    tokenizer = build_tokenizer(FAMILY_TOKENIZER[family])
    model = build_tiny_decoder(family, len(tokenizer), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
