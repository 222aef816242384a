"""Turning rows into token ids and per-token labels, for plain language modelling or prompt/response pairs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from splitlm.config.schema import DataConfig
from splitlm.data.batch import IGNORE_INDEX, Example
from splitlm.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seq_len: int
) -> list[Example]:
    """One ``Example`` per row with at least two tokens and one loss token after the causal shift.

    lm: loss on every token. instruction: prompt then response tokens, loss on the response only; when
    the pair is longer than ``seq_len`` the prompt loses tokens from its start, keeping at least one
    prompt token and one response token where both exist.
    """
    if seq_len < 2:
        raise DataError(f"train.seq_len must be >= 2 to predict a token, got {seq_len}")
    eos: list[int] = []
    if cfg.add_eos:
        if tokenizer.eos_token_id is None:
            raise DataError("data.add_eos is set but the tokenizer has no EOS token; set data.add_eos=false")
        eos = [int(tokenizer.eos_token_id)]

    if cfg.format == "lm":
        sequences = [(ids + eos)[:seq_len] for ids in _ids(tokenizer, rows, cfg.text_field)]
        encoded = [(ids, list(ids)) for ids in sequences]
    else:
        prompts = _ids(tokenizer, rows, cfg.prompt_field)
        responses = _ids(tokenizer, rows, cfg.response_field)
        encoded = [_instruction(p, r + eos, seq_len) for p, r in zip(prompts, responses, strict=True)]

    examples = []
    for row, (input_ids, labels) in zip(rows, encoded, strict=True):
        if len(input_ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            continue
        examples.append(Example(input_ids=input_ids, labels=labels, label=_label(row, cfg)))
    if not examples:
        raise DataError(
            f"none of the {len(rows)} rows gave a training example (each needs >= 2 tokens and a loss "
            f"token after the first); check that data.format={cfg.format} names non-empty columns"
        )
    if len(examples) < len(rows):
        log.warning("dropped %d of %d rows: too short or no loss token", len(rows) - len(examples), len(rows))
    return examples


def _ids(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], column: str) -> list[list[int]]:
    texts = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        if not isinstance(value, str):
            raise DataError(
                f"row {number}: column {column!r} holds {type(value).__name__}, expected a string; "
                "fix the data or choose another column"
            )
        texts.append(value)
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _instruction(prompt: list[int], response: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of prompt + response within ``seq_len``, loss on response tokens only."""
    if len(prompt) + len(response) > seq_len:
        # Keep one prompt token if there is one, so the first response token is predicted from something.
        keep = max(seq_len - len(response), min(1, len(prompt)))
        prompt = prompt[len(prompt) - keep :]
        response = response[: seq_len - keep]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def shorten(example: Example, seq_len: int) -> Example:
    """``example`` within ``seq_len`` tokens as ``tokenize_rows`` would have cut it: a prompt + response pair (loss
    on a suffix only) loses prompt tokens from its start, so its response stays; anything else loses its end."""
    if len(example.input_ids) <= seq_len:
        return example
    start = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    if 0 < start < len(example.labels) and all(label != IGNORE_INDEX for label in example.labels[start:]):
        ids, labels = _instruction(example.input_ids[:start], example.input_ids[start:], seq_len)
        return Example(ids, labels, example.label)
    return Example(example.input_ids[:seq_len], example.labels[:seq_len], example.label)


def _label(row: dict[str, Any], cfg: DataConfig) -> str | None:
    if cfg.label_field is not None:
        return str(row[cfg.label_field])
    label = row.get("label")
    return None if label is None else str(label)


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples (each already ending in EOS where wanted) and cut the stream into ``seq_len`` blocks.

    Every training token then does work (no padding); labels keep their masks, so instruction data keeps
    its loss on responses only. A last block shorter than 2 tokens is dropped.
    """
    ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    blocks = [
        Example(input_ids=ids[i : i + seq_len], labels=labels[i : i + seq_len])
        for i in range(0, len(ids), seq_len)
        if len(ids[i : i + seq_len]) >= 2
    ]
    blocks = [b for b in blocks if any(label != IGNORE_INDEX for label in b.labels[1:])]
    if not blocks:
        raise DataError(f"packing {len(examples)} examples into blocks of {seq_len} tokens left none to train on")
    return blocks
