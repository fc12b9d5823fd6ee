import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.models.instructions import (
    format_document,
    format_query,
    instruction_prefix,
    pooling_mask,
    prefix_token_lengths,
    tokenize_with_instructions,
)
from nvembed_support import TASKS, TEXTS, build_tokenizer

STYLES = ["sentencepiece", "byte_level"]


@pytest.fixture(scope="module", params=STYLES)
def tokenizer(request):
    return build_tokenizer(request.param)


def test_query_template_and_documents():
    assert format_query("Retrieve passages", "what is rain") == "Instruct: Retrieve passages\nQuery: what is rain"
    assert instruction_prefix("  Retrieve passages ") == "Instruct: Retrieve passages\nQuery: "
    assert format_document("rain falls") == "rain falls"
    with pytest.raises(EmbedtrainError, match="task description is empty"):
        instruction_prefix(" ")


@pytest.mark.parametrize("task", TASKS)
def test_prefix_length_covers_exactly_the_instruction(tokenizer, task):
    prefix = instruction_prefix(task)
    (n,) = prefix_token_lengths(tokenizer, [prefix])
    for text in TEXTS:
        enc = tokenizer(prefix + text, return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets, special, ids = enc["offset_mapping"], enc["special_tokens_mask"], enc["input_ids"]
        # everything before position n is a special token (BOS) or instruction characters only
        assert all(special[i] or offsets[i][1] <= len(prefix) for i in range(n))
        assert any(not special[i] for i in range(n))
        # the first pooled token starts at the text or at the prompt's separating space, which goes
        # with the text as the tokenizers put it (sentencepiece '▁what', byte-level 'Ġwhat'; a lone
        # 'Ġ' before a digit)
        start, end = offsets[n]
        assert len(prefix.rstrip()) <= start <= len(prefix)
        assert end > len(prefix) or prefix[start:end].isspace()
        # and the pooled tokens spell the text, nothing more, nothing less
        assert tokenizer.decode(ids[n:], skip_special_tokens=True).strip() == text.strip()


def test_prompt_alone_counts_one_token_too_many(tokenizer):
    # why the count is taken on prompt + text: the prompt's trailing space becomes a token of its own
    prefix = instruction_prefix(TASKS[0])
    alone = len(tokenizer(prefix)["input_ids"])
    assert alone == prefix_token_lengths(tokenizer, [prefix])[0] + 1


def test_bos_is_counted_with_the_instruction_and_documents_mask_nothing():
    tokenizer = build_tokenizer("sentencepiece")  # adds <s> in front of every text
    prefix = instruction_prefix(TASKS[1])
    n = prefix_token_lengths(tokenizer, [prefix])[0]
    enc = tokenizer(prefix + "x", return_special_tokens_mask=True)
    assert enc["special_tokens_mask"][0] == 1 and sum(enc["special_tokens_mask"][:n]) == 1
    # BOS + the prompt without its trailing space, which is where the token boundary is
    assert n == 1 + len(tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"])
    assert prefix_token_lengths(tokenizer, ["", prefix, ""]) == [0, n, 0]


def test_prefix_that_ends_inside_a_token_is_refused():
    tokenizer = build_tokenizer("byte_level")
    # 'Query' is one token of this vocabulary: a prefix ending after 'Que' cannot be told apart
    with pytest.raises(EmbedtrainError, match="runs into the text"):
        prefix_token_lengths(tokenizer, ["Instruct: Retrieve semantically similar text\nQue"])


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(EmbedtrainError, match="fast tokenizer"):
        prefix_token_lengths(Slow(), ["Instruct: x\nQuery: "])


def test_pooling_mask_under_left_and_right_padding():
    ids = torch.zeros(3, 6, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    left = right.flip(1)
    lengths = torch.tensor([2, 1, 0])
    assert pooling_mask(ids, right, lengths).tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert pooling_mask(ids, left, lengths).tolist() == [[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert pooling_mask(ids, right, 1).tolist()[2] == [0, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="entries"):
        pooling_mask(ids, right, [1, 2])


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenize_with_instructions_pools_the_text_tokens(tokenizer, side):
    tokenizer.padding_side = side
    prefix = instruction_prefix(TASKS[0])
    texts = ["what is the capital of france", "a", "How do plants grow in the dark?"]
    out = tokenize_with_instructions(tokenizer, texts, [prefix, prefix, ""], max_length=64)
    for i, text in enumerate(texts):
        pooled = out["input_ids"][i][out["pooling_mask"][i].bool()].tolist()
        expected = tokenizer(prefix + text if i < 2 else text)["input_ids"]
        n = prefix_token_lengths(tokenizer, [prefix if i < 2 else ""])[0]
        assert pooled == expected[n:]
    tokenizer.padding_side = "right"


def test_instruction_longer_than_max_length_is_an_error(tokenizer):
    prefix = instruction_prefix(TASKS[0])
    with pytest.raises(EmbedtrainError, match="raise the query max_length"):
        tokenize_with_instructions(tokenizer, ["what is it"], prefix, max_length=4)
