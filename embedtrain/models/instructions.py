"""NV-Embed instructions: the query template and the pooling mask that leaves the instruction out.

Queries carry a task instruction, documents do not (NV-Embed, arXiv 2405.17428, section 3.3)::

    Instruct: {task}
    Query: {text}

The instruction conditions the whole sequence through attention, but its tokens are excluded when the
token states are pooled into one vector, so the embedding summarises the text only.

Where the instruction ends, in tokens
--------------------------------------
The prompt ``instruction_prefix(task)`` ends in a space (``"...\\nQuery: "``). That space is *not* a
token boundary for real decoder tokenizers: sentencepiece-style ones (Mistral, Llama 2, Gemma) turn it
into the ``▁`` that starts the next token, byte-level ones (Qwen2, Llama 3) put it in front of the next
word (``Ġwhat``). The prompt's trailing space and the text's first word form **one** token, so
tokenizing the prompt on its own counts one token too many (a lone ``▁``/``Ġ``); masking that many
tokens would drop the first word of every query from the embedding (sentence-transformers' own prompt
length has this off-by-one; :class:`embedtrain.models.bidirectional.BidirectionalTransformer` replaces it
with the count below).

:func:`prefix_token_lengths` counts on the tokenized *prompt + text*, using the tokenizer's offset
mapping. The boundary that is a token boundary is the one *before* the separating whitespace: a token is
part of the instruction when it starts inside the prompt without its trailing whitespace; the whitespace
goes with the text, as the tokenizers put it. Every instruction token must end inside the prompt, and the
count must be the same in front of several probe texts; a tokenizer that merges instruction characters
into the text's first token (possible for a prompt ending in a letter or a colon with no space) is
reported, not guessed.

Leading special tokens (a BOS token) are counted with the instruction, as sentence-transformers counts
them in a prompt: for a query exactly the text tokens are pooled. A document has no instruction, so
nothing is masked and its BOS token, if any, is pooled, as sentence-transformers does for texts without
a prompt; this keeps a saved folder and embedtrain in exact agreement. A trailing EOS token (if the
tokenizer adds one) is pooled in both.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from embedtrain.errors import EmbedtrainError

QUERY_TEMPLATE = "Instruct: {task}\nQuery: {text}"
"""NV-Embed's query format; documents are embedded as they are."""

# Texts that start the way real texts start (lower case, capital, digit, punctuation, quote); the
# instruction's token count must be the same in front of each of them.
PROBE_TEXTS = ("what is it", "The river", "2024 was", "(see also)", '"quoted"', "x")


NV_EMBED_TABLE = "nv-embed"
"""The name of the packaged NV-Embed MTEB instruction table (``embedtrain eval --instructions nv-embed``)."""
NV_EMBED_TABLE_FILE = "data/nv_embed_mteb_instructions.yaml"
"""The table's file inside this package; its header cites the paper's table it reproduces."""


def nv_embed_mteb_instructions() -> dict[str, str]:
    """NV-Embed's instruction per MTEB task (the 56 tasks of ``MTEB(eng, v1)``), as ``{task name: instruction}``.

    Lee et al., "NV-Embed", arXiv:2405.17428, appendix A, Table 7; the packaged file's header gives the
    mapping from the paper's task names to mteb's.
    """
    from importlib.resources import files

    import yaml

    table = yaml.safe_load(files("embedtrain.models").joinpath(NV_EMBED_TABLE_FILE).read_text(encoding="utf-8"))
    return {str(task): str(instruction) for task, instruction in table.items()}


def instruction_prefix(task: str) -> str:
    """The text put before a query: ``"Instruct: {task}\\nQuery: "``."""
    task = task.strip()
    if not task:
        raise EmbedtrainError(
            "instruction: the task description is empty; give one such as "
            "'Given a question, retrieve passages that answer the question'"
        )
    return QUERY_TEMPLATE.format(task=task, text="")


def format_query(task: str, text: str) -> str:
    """``Instruct: {task}\\nQuery: {text}``."""
    return instruction_prefix(task) + text


def format_document(text: str) -> str:
    """Documents are embedded without an instruction."""
    return text


def _instruction_token_count(prefix: str, offsets, special) -> int:
    """Leading special tokens plus the tokens that start inside ``prefix`` without its trailing whitespace.

    Raises when one of those tokens also holds characters of the text (the prefix's end is not a token
    boundary).
    """
    visible = len(prefix.rstrip())
    count = 0
    for (start, end), is_special in zip(offsets, special):
        if is_special and start == end:
            count += 1
            continue
        if start >= visible:
            break
        if end > len(prefix):
            raise EmbedtrainError(
                f"instruction {prefix!r}: its last token {prefix[start:]!r}... runs into the text after it, so "
                "instruction and text cannot be told apart in tokens; end the instruction with a space or a newline"
            )
        count += 1
    return count


def prefix_token_lengths(tokenizer, prefixes: Sequence[str]) -> list[int]:
    """Tokens to leave out of pooling for each prefix: leading special tokens plus the instruction.

    ``""`` (a document) gives 0. Counted on ``prefix + text`` with the offset mapping (see the module
    docstring), identically for every probe text; raises :class:`EmbedtrainError` for a tokenizer
    without offset mappings or a prefix whose end is not a token boundary.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise EmbedtrainError(
            f"instruction masking needs a fast tokenizer with offset mappings; {type(tokenizer).__name__} is not "
            "one (load the model's tokenizer.json, or convert the tokenizer with transformers' convert_slow_tokenizer)"
        )
    lengths: dict[str, int] = {"": 0}
    for prefix in prefixes:
        if prefix in lengths:
            continue
        texts = [prefix + probe for probe in PROBE_TEXTS]
        enc = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True, add_special_tokens=True)
        counts = {
            _instruction_token_count(prefix, offsets, special)
            for offsets, special in zip(enc["offset_mapping"], enc["special_tokens_mask"])
        }
        if len(counts) != 1:
            raise EmbedtrainError(
                f"instruction {prefix!r}: the number of instruction tokens depends on the text after it "
                f"({sorted(counts)} for different texts); end the instruction with a space or a newline"
            )
        lengths[prefix] = counts.pop()
    return [lengths[p] for p in prefixes]


def pooling_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_lengths: Union[int, Sequence[int], torch.Tensor],
) -> torch.Tensor:
    """``attention_mask`` with the first ``prefix_lengths[i]`` real tokens of row ``i`` set to 0.

    Works under left and right padding (counting starts at each row's first real token), like
    sentence-transformers' ``Pooling(include_prompt=False)``. Shapes: (batch, seq) → (batch, seq), same
    dtype as ``attention_mask``; ``input_ids`` only supplies the shape and device.
    """
    batch, seq_len = input_ids.shape
    if attention_mask.shape != (batch, seq_len):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(batch, seq_len)}")
    lengths = torch.as_tensor(prefix_lengths, device=attention_mask.device, dtype=torch.long)
    lengths = lengths.expand(batch) if lengths.dim() == 0 else lengths
    if lengths.shape != (batch,):
        raise ValueError(f"prefix_lengths has {lengths.numel()} entries for a batch of {batch}")
    # index of each row's first real token (0 under right padding, the pad count under left padding)
    first = attention_mask.to(torch.int32).argmax(dim=1).to(torch.long)
    positions = torch.arange(seq_len, device=attention_mask.device).unsqueeze(0)
    keep = positions >= (first + lengths).unsqueeze(1)
    return attention_mask * keep.to(attention_mask.dtype)


def tokenize_with_instructions(
    tokenizer,
    texts: Sequence[str],
    prefixes: Union[str, Sequence[str]] = "",
    max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """Tokenize ``prefix + text`` and return ``input_ids``, ``attention_mask`` and ``pooling_mask``.

    ``prefixes`` is one prefix for all texts or one per text (``""`` for documents). Raises
    :class:`EmbedtrainError` when ``max_length`` leaves a text with no token after its instruction.
    """
    prefixes = [prefixes] * len(texts) if isinstance(prefixes, str) else list(prefixes)
    if len(prefixes) != len(texts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(texts)} texts")
    enc = tokenizer(
        [p + t for p, t in zip(prefixes, texts)],
        padding=True, truncation=True, max_length=max_length, return_tensors="pt",
    )
    lengths = torch.tensor(prefix_token_lengths(tokenizer, prefixes), dtype=torch.long)
    mask = pooling_mask(enc["input_ids"], enc["attention_mask"], lengths)
    empty = [i for i in range(len(texts)) if texts[i] and not mask[i].any()]
    if empty:
        raise EmbedtrainError(
            f"instruction {prefixes[empty[0]]!r} takes {int(lengths[empty[0]])} of the {max_length} tokens allowed, "
            "leaving no text token to pool; raise the query max_length or shorten the instruction"
        )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pooling_mask": mask}
