"""A tiny Qwen2-VL built from a config, with a processor constructed locally (no download).

For tests and CPU smoke runs of VLM2Vec recipes: two decoder layers of width 32, one vision block,
8-pixel patches merged 2x2 (a 64x64 image becomes 16 image tokens), and a byte-level BPE
vocabulary of a few hundred tokens trained on the given texts plus Qwen2-VL's special tokens.

    python -m embedtrain.models.tiny_vlm runs/tiny-qwen2-vl      # writes the model folder
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
DEFAULT_TEXTS = [
    "a photo of a cat", "a small dog on the grass", "a red car in the city", "a blue sky over the sea",
    "find the image that matches the caption", "represent the given image", "instruct query",
    "grinning face", "smiling face with heart eyes", "flag", "red apple", "green tree", "musical note",
]


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) + DEFAULT_TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="right")


def build_processor(tokenizer, patch_size: int = 8, merge_size: int = 2, image_side: int = 64,
                    chat_template: Optional[str] = None):
    """Qwen2-VL's processor around ``tokenizer``; images are resized to at most ``image_side`` squared pixels."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": (patch_size * merge_size) ** 2, "longest_edge": image_side * image_side}
    common = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, size=size)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**common), chat_template=chat_template)


def build_tiny_qwen2_vl(folder: str | Path, texts: Iterable[str] = (), seed: int = 0, hidden_size: int = 32,
                        layers: int = 2, dropout: float = 0.0) -> Path:
    """Write a tiny random Qwen2-VL (``Qwen2VLForConditionalGeneration``) and its processor to ``folder``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts)
    processor = build_processor(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 2
    head_dim = hidden_size // heads
    quarter = head_dim // 4
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=512,
            attention_dropout=dropout,
            # multimodal rotary sections (time, height, width) must add up to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=hidden_size, hidden_size=hidden_size, num_heads=heads, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    out = build_tiny_qwen2_vl(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen2-vl")
    print(f"tiny Qwen2-VL written to {out}")
