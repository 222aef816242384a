"""tokenize_rows: lm and instruction formats, masking, truncation, labels, dropped rows."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from splitlm.config.schema import DataConfig
from splitlm.data import Example, tokenize_rows
from splitlm.errors import DataError
from splitlm.models.tokenizer import byte_level_tokenizer

EOS = 256


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer()


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_lm_labels_equal_inputs_with_eos(tok: PreTrainedTokenizerFast) -> None:
    [example] = tokenize_rows([{"text": "hello world"}], tok, DataConfig(), seq_len=64)
    assert example.input_ids == [*encode(tok, "hello world"), EOS]
    assert example.labels == example.input_ids
    assert example.label is None


def test_lm_without_eos_and_truncated(tok: PreTrainedTokenizerFast) -> None:
    [example] = tokenize_rows([{"text": "hello world"}], tok, DataConfig(add_eos=False), seq_len=5)
    assert example.input_ids == encode(tok, "hello")
    [example] = tokenize_rows([{"text": "abcd"}], tok, DataConfig(), seq_len=4)
    assert EOS not in example.input_ids  # the EOS is cut with the rest


def test_instruction_masks_exactly_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    row = {"prompt": "Review: great fun\nSentiment:", "response": " fresh"}
    [example] = tokenize_rows([row], tok, DataConfig(format="instruction"), seq_len=128)
    prompt, response = encode(tok, row["prompt"]), encode(tok, row["response"])
    assert example.input_ids == prompt + response + [EOS]
    assert example.labels == [-100] * len(prompt) + response + [EOS]


def test_instruction_truncates_the_prompt_from_the_left(tok: PreTrainedTokenizerFast) -> None:
    row = {"prompt": "0123456789", "response": "ab"}
    [example] = tokenize_rows([row], tok, DataConfig(format="instruction"), seq_len=6)
    assert example.input_ids == [*encode(tok, "789ab"), EOS]
    assert example.labels == [-100] * 3 + encode(tok, "ab") + [EOS]


def test_truncation_keeps_a_response_token_and_a_prompt_token(tok: PreTrainedTokenizerFast) -> None:
    row = {"prompt": "a long prompt", "response": "a long response"}
    [example] = tokenize_rows([row], tok, DataConfig(format="instruction"), seq_len=4)
    assert example.input_ids == encode(tok, "t") + encode(tok, "a l")
    assert example.labels == [-100, *encode(tok, "a l")]
    [example] = tokenize_rows([row], tok, DataConfig(format="instruction"), seq_len=2)
    assert example.labels == [-100, *encode(tok, "a")]


def test_labels_from_label_field_or_label_column(tok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": "xx", "label": 1, "cls": "pos"}, {"text": "yy", "label": "rotten", "cls": 0}]
    assert [e.label for e in tokenize_rows(rows, tok, DataConfig(), 16)] == ["1", "rotten"]
    assert [e.label for e in tokenize_rows(rows, tok, DataConfig(label_field="cls"), 16)] == ["pos", "0"]


def test_short_rows_and_rows_without_loss_are_dropped(tok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": ""}, {"text": "k"}, {"text": "ok"}]
    examples = tokenize_rows(rows, tok, DataConfig(add_eos=False), seq_len=8)
    assert examples == [Example(input_ids=encode(tok, "ok"), labels=encode(tok, "ok"))]
    # An empty response leaves no loss token without EOS.
    rows = [{"prompt": "p", "response": ""}, {"prompt": "p", "response": "r"}]
    examples = tokenize_rows(rows, tok, DataConfig(format="instruction", add_eos=False), seq_len=8)
    assert [e.input_ids for e in examples] == [encode(tok, "pr")]


def test_nothing_left_is_a_data_error(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match=r"none of the 2 rows gave a training example"):
        tokenize_rows([{"text": ""}, {"text": "a"}], tok, DataConfig(add_eos=False), seq_len=8)


def test_non_string_column_is_a_data_error(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match=r"row 2: column 'text' holds NoneType, expected a string"):
        tokenize_rows([{"text": "fine"}, {"text": None}], tok, DataConfig(), seq_len=8)


def test_rotten_tomatoes_instruction_ends_in_the_sentiment(tok: PreTrainedTokenizerFast) -> None:
    from splitlm.data import load_rows

    cfg = DataConfig(format="instruction", max_rows=20)
    examples = tokenize_rows(load_rows(cfg), tok, cfg, seq_len=32)
    assert len(examples) == 20
    for example in examples:
        loss_ids = [t for t in example.labels if t != -100]
        assert tok.decode(loss_ids[:-1]) == f" {example.label}" and loss_ids[-1] == EOS
        assert len(example.input_ids) <= 32


def test_pack_examples_fills_blocks_and_keeps_label_masks() -> None:
    from splitlm.data import pack_examples

    examples = [
        Example(input_ids=[1, 2, 3], labels=[-100, 2, 3]),
        Example(input_ids=[4, 5, 6, 7], labels=[4, 5, 6, 7]),
        Example(input_ids=[8, 9], labels=[-100, 9]),
    ]
    blocks = pack_examples(examples, seq_len=4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the lone [9] is too short to train on
    assert blocks[0].labels == [-100, 2, 3, 4]
    assert blocks[1].labels == [5, 6, 7, -100]
    assert all(b.label is None for b in blocks)


def test_shorten_cuts_like_tokenize_rows() -> None:
    from splitlm.data import IGNORE_INDEX, Example, shorten

    pair = Example([1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 4 + [5, 6], "x")
    assert shorten(pair, 4) == Example([3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 5, 6], "x")  # the response stays
    assert shorten(pair, 2) == Example([4, 5], [IGNORE_INDEX, 5], "x")  # one prompt token kept, as tokenize_rows
    assert shorten(pair, 6) is pair
    plain = Example([1, 2, 3, 4], [1, 2, 3, 4])
    assert shorten(plain, 3) == Example([1, 2, 3], [1, 2, 3])  # plain text loses its end
