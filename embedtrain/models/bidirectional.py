"""Decoder LLMs with bidirectional attention, for embeddings (NV-Embed, arXiv 2405.17428, section 3.1).

NV-Embed removes the causal mask of Mistral-7B during contrastive training, so every token sees the
whole text. :func:`make_bidirectional` does that for the ``AutoModel`` base models of the Mistral,
Llama, Qwen2, Qwen3 and Gemma families, for eager and SDPA attention.

How (transformers 5)
--------------------
One setting does it: ``config.is_causal = False``. In transformers 5 the decoders build their masks with
``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask``, and both return a
bidirectional padding mask (``create_bidirectional_mask`` / ``create_bidirectional_sliding_window_mask``)
when ``config.is_causal`` is False. That alone is not enough under SDPA: with no padding in the batch the
bidirectional mask is skipped (``None``, to reach the fast kernels) and the SDPA wrapper then falls back to
the attention module's ``is_causal``, True in every decoder; the text attends causally in unpadded
batches and bidirectionally in padded ones. transformers closes that gap itself: the base model's
``forward`` (decorated with ``merge_with_config_defaults``) reads ``config.is_causal`` and passes
``is_causal=False`` down to every attention call, which the SDPA and flash-attention wrappers prefer to
the module attribute. We also set each attention module's ``is_causal`` to False, so code that calls the
attention modules directly agrees.

The setting is part of ``config.json``, so a saved model reloads bidirectional with a plain
``AutoModel.from_pretrained`` of this transformers version. Other versions may not honour it, which is
what peer projects ran into (models that silently stayed causal under SDPA): :func:`assert_bidirectional`
checks the behaviour, not the flags, and every loader here runs it.

Families with sliding-window layers (Mistral with ``sliding_window`` set, Gemma 2/3, Qwen with
``use_sliding_window``) keep their window, now on both sides of each token; texts shorter than the
window (4096 tokens for Mistral-7B-v0.1) are unaffected.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from sentence_transformers.sentence_transformer.modules import Transformer

from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import load_failure
from embedtrain.models.instructions import prefix_token_lengths
from embedtrain.models.lora import is_peft_model, save_merged_transformer

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
"""``config.model_type`` values whose base models :func:`make_bidirectional` is tested on."""

# relative change of the first token's state that counts as "the later token was seen"; a causal
# model gives exactly 0, a bidirectional one a change of order 1e-2 or more
_SEEN = 1e-4
# relative change that still counts as "the padding was not seen" (kernels may reorder sums)
_UNSEEN = 1e-3


def _config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise EmbedtrainError(
            f"make_bidirectional: {type(model).__name__} has no transformers config; pass a transformers model"
        )
    return config


def make_bidirectional(model):
    """Switch a decoder (``AutoModel`` base model, possibly wrapped by peft) to bidirectional attention.

    Sets ``config.is_causal = False`` and every attention module's ``is_causal`` to False (see the module
    docstring). Padding stays masked. Returns ``model`` (changed in place); calling it twice is harmless.
    """
    config = _config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EmbedtrainError(
            f"make_bidirectional: model_type '{model_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config.is_causal = False
    attention_modules = 0
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False
            attention_modules += 1
    if attention_modules == 0:
        raise EmbedtrainError(
            f"make_bidirectional: found no attention module with an 'is_causal' flag in {type(model).__name__}; "
            "this transformers version builds its decoders differently from the one embedtrain was tested on"
        )
    return model


def _probe_ids(model, tokenizer_or_vocab_size) -> tuple[torch.Tensor, int]:
    """Token ids to build probe texts from (no special tokens), and the padding id."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer_or_vocab_size is None or isinstance(tokenizer_or_vocab_size, int):
        vocab = min(rows, tokenizer_or_vocab_size or rows)
        pad_id, special = 0, {0}
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab = min(rows, len(tokenizer))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        special = set(tokenizer.all_special_ids) | {pad_id}
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special])
    if allowed.numel() < 2:
        raise EmbedtrainError(f"probe: a vocabulary of {vocab} tokens is too small to probe attention")
    return allowed, pad_id


def _last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        hidden = out.hidden_states[-1]
    return hidden.float()


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


@torch.no_grad()
def _probe(model, tokenizer_or_vocab_size=None, seq_len: int = 8, pad: int = 3) -> tuple[list[str], list[str]]:
    """(layouts where the first token did not see the last one, layouts where padding was seen)."""
    allowed, pad_id = _probe_ids(model, tokenizer_or_vocab_size)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    pick = torch.randint(0, allowed.numel(), (seq_len,), generator=gen)
    base = allowed[pick]
    other = base.clone()
    other[-1] = allowed[(pick[-1] + 1) % allowed.numel()]
    pads = torch.full((pad,), pad_id, dtype=base.dtype)
    ones, zeros = torch.ones(seq_len, dtype=torch.long), torch.zeros(pad, dtype=torch.long)
    layouts = {
        # name: (rows, masks, index of the first real token)
        "no": ([base, other], [ones, ones], 0),
        "right": ([torch.cat([base, pads]), torch.cat([other, pads])], [torch.cat([ones, zeros])] * 2, 0),
        "left": ([torch.cat([pads, base]), torch.cat([pads, other])], [torch.cat([zeros, ones])] * 2, pad),
    }
    causal, leaky = [], []
    was_training = model.training
    model.eval()
    try:
        for name, (rows, masks, first) in layouts.items():
            hidden = _last_hidden(model, torch.stack(rows).to(device), torch.stack(masks).to(device))
            if _relative_change(hidden[0, first], hidden[1, first]) <= _SEEN:
                causal.append(name)
            if name != "no":
                # the same text with different padding ids: the real tokens must not notice
                swapped = [torch.where(m.bool(), r, torch.full_like(r, int(allowed[0]))) for r, m in zip(rows, masks)]
                again = _last_hidden(model, torch.stack(swapped).to(device), torch.stack(masks).to(device))
                real = masks[0].bool().to(device)
                if _relative_change(hidden[0, real], again[0, real]) > _UNSEEN:
                    leaky.append(name)
    finally:
        model.train(was_training)
    return causal, leaky


def probe_bidirectional(model, tokenizer_or_vocab_size: Union[object, int, None] = None) -> bool:
    """True when changing a later token changes an earlier token's state, under no, right and left padding.

    Runs the model on a few random 8-token texts (without special tokens) that differ only in their last
    token and compares the first token's final hidden state. A causal decoder gives exactly the same
    state. ``tokenizer_or_vocab_size`` supplies the pad id and the special ids to avoid (or just a
    vocabulary size; default: the embedding matrix's rows).
    """
    causal, _ = _probe(model, tokenizer_or_vocab_size)
    return not causal


def assert_bidirectional(model, tokenizer_or_vocab_size: Union[object, int, None] = None) -> None:
    """Raise :class:`EmbedtrainError` unless the model attends bidirectionally and ignores padding."""
    import transformers

    causal, leaky = _probe(model, tokenizer_or_vocab_size)
    config = _config(model)
    what = (
        f"{type(model).__name__} (model_type '{getattr(config, 'model_type', '?')}', attn_implementation "
        f"'{getattr(config, '_attn_implementation', '?')}', transformers {transformers.__version__})"
    )
    if causal:
        raise EmbedtrainError(
            f"{what} still attends causally with {' and '.join(causal)} padding: changing the last token left "
            "the first token's state unchanged. Call make_bidirectional(model) before training; if it was "
            "called, this transformers version does not honour config.is_causal=False for this model: try "
            "attn_implementation 'eager', or a transformers 5 release it was tested with (5.17, 5.24)"
        )
    if leaky:
        raise EmbedtrainError(
            f"{what} attends to padding tokens with {' and '.join(leaky)} padding after make_bidirectional: "
            "the padding mask was lost; try attn_implementation 'eager'"
        )


def load_bidirectional_decoder(
    name_or_path: str,
    attn_implementation: str = "sdpa",
    dtype: Union[str, torch.dtype, None] = None,
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
):
    """``AutoModel.from_pretrained`` + :func:`make_bidirectional` + :func:`assert_bidirectional`.

    ``dtype``: a torch dtype, its name ('bfloat16'), 'auto' (the checkpoint's), or None (float32).
    ``device``: where to move the model before the check (its probe is a few 8-token forwards, quicker
    on the accelerator for a 7B model than on the CPU).
    """
    from transformers import AutoModel

    from embedtrain.config import resolve_path

    kwargs = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise EmbedtrainError(
                f"dtype '{dtype}' is not a torch dtype; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'"
            )
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModel.from_pretrained(resolve_path(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise load_failure(name_or_path, err) from None
    if device is not None:
        model.to(device)
    make_bidirectional(model)
    assert_bidirectional(model)
    return model


class BidirectionalTransformer(Transformer):
    """sentence-transformers' ``Transformer`` whose decoder attends bidirectionally, checked on load.

    A saved folder keeps ``config.is_causal = false``, but a stock ``Transformer`` would reload it with
    nothing checking that the installed transformers honours it; this class applies
    :func:`make_bidirectional` and :func:`assert_bidirectional` every time it is built or loaded. It also
    counts a prompt's tokens on prompt + text (:func:`embedtrain.models.instructions.prefix_token_lengths`)
    instead of on the prompt alone, which is one token too many for prompts ending in a space (see
    :mod:`embedtrain.models.instructions`), and gives a tokenizer without a pad token its EOS token
    (padding is masked, so the id does not matter; Mistral ships without one).

    Its dotted path goes into ``modules.json``; load such a folder with
    ``SentenceTransformer(path, trust_remote_code=True)`` (the class is imported from the installed
    ``embedtrain`` package, never from the folder).
    """

    def __init__(self, model_name_or_path: str, **kwargs):
        super().__init__(model_name_or_path, **kwargs)
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        make_bidirectional(self.model)
        assert_bidirectional(self.model, tokenizer)
        self._instruction_lengths: dict[str, int] = {}

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Save as sentence-transformers' ``Transformer`` does; a LoRA-wrapped decoder is saved merged
        (plain weights, no peft needed to load them) with its adapter alone in ``adapter/``."""
        if not is_peft_model(self.model):
            return super().save(output_path, *args, safe_serialization=safe_serialization, **kwargs)
        save_merged_transformer(self, output_path, safe_serialization)

    def _get_prompt_length(self, prompt: str, **kwargs) -> Optional[int]:
        tokenizer = self.tokenizer
        if not prompt or tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return super()._get_prompt_length(prompt, **kwargs)
        if prompt not in self._instruction_lengths:
            self._instruction_lengths[prompt] = prefix_token_lengths(tokenizer, [prompt])[0]
        return self._instruction_lengths[prompt]
