"""Tokenized examples and padded batches of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitlm.errors import DataError

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt tokens, padding)


@dataclass(frozen=True)
class Example:
    """One tokenized sequence. ``labels`` has the length of ``input_ids`` and is not shifted."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss (prompt tokens in instruction format)
    label: str | None = None  # class label of the row (e.g. "fresh"), for partitioners and metrics


@dataclass
class Batch:
    """Padded tensors of a micro-batch, each ``(B, T)`` long."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token, 0 = padding
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on padding and non-loss tokens

    def num_loss_tokens(self) -> int:
        """Label positions that count after the causal shift (position 0 is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad ``examples`` to the longest one: ``pad_id`` in inputs, 0 in the mask, IGNORE_INDEX in labels.

    Each example's first label is set to IGNORE_INDEX too: nothing precedes that token, and with left
    padding it would otherwise be "predicted" from a pad token. Both padding sides count the same loss.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[i, span] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[i, span] = torch.tensor(example.labels, dtype=torch.long)
        labels[i, span.start] = IGNORE_INDEX
        attention_mask[i, span] = 1
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int, max_batches: int = 0) -> list[Batch]:
    """Held-out ``examples`` in order, ``batch_size`` per batch (the last may be smaller); 0 = all batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (0 = all), got {max_batches}")
    starts = range(0, len(examples), batch_size)
    if max_batches:
        starts = starts[:max_batches]
    return [collate(examples[s : s + batch_size], pad_id) for s in starts]
