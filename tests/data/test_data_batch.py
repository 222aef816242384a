"""collate, Batch.num_loss_tokens and eval_batches."""

from __future__ import annotations

import pytest
import torch

from splitlm.data import Example, collate, eval_batches
from splitlm.errors import DataError

PAD = 257
A = Example(input_ids=[1, 2, 3], labels=[-100, 2, 3], label="x")
B = Example(input_ids=[4, 5], labels=[4, 5])


def test_collate_right_padding() -> None:
    batch = collate([A, B], PAD)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [-100, 5, -100]]  # first labels never count


def test_collate_left_padding() -> None:
    batch = collate([A, B], PAD, padding_side="left")
    assert batch.input_ids.tolist() == [[1, 2, 3], [PAD, 4, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    # B's first token follows a pad: its label must not count, or the model learns to predict from padding.
    assert batch.labels.tolist() == [[-100, 2, 3], [-100, -100, 5]]


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"padding_side must be 'left' or 'right', got 'middle'"):
        collate([A], PAD, padding_side="middle")
    with pytest.raises(DataError, match=r"empty"):
        collate([], PAD)


@pytest.mark.parametrize("side", ["left", "right"])
def test_num_loss_tokens_counts_after_the_shift(side: str) -> None:
    # A: positions 1, 2 count (0 is never predicted). B: position 1 counts; its position 0 label does not.
    assert collate([A, B], PAD, padding_side=side).num_loss_tokens() == 3
    assert collate([B], PAD, padding_side=side).num_loss_tokens() == 1


def test_eval_batches_in_order_with_a_smaller_last_batch() -> None:
    examples = [Example(input_ids=[i, i + 1], labels=[i, i + 1]) for i in range(5)]
    batches = eval_batches(examples, batch_size=2, pad_id=PAD)
    assert [b.input_ids[:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert len(eval_batches(examples, batch_size=2, pad_id=PAD, max_batches=2)) == 2
    assert len(eval_batches(examples, batch_size=2, pad_id=PAD, max_batches=9)) == 3
    assert eval_batches([], batch_size=2, pad_id=PAD) == []
