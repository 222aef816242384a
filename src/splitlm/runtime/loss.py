"""The causal language-modelling loss, computed the same way by every party and by the baseline.

``LogitAdjustment`` is SCALA's logit-adjusted loss (survey §3.1.2, ``train.logit_adjustment``): a client trains
on ``logits + tau * log(prior)``, the prior being the token frequencies of its own training labels. Frequent
tokens then need less of the model's own logit to win, so the model learns the data's signal rather than the
client's label skew; evaluation uses the plain logits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from splitlm.data import Example

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (float32) and the number of tokens it covers.

    logits: (B, T, V); labels: (B, T), unshifted, ``-100`` where no loss is taken.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    count = int((shift_labels != IGNORE).sum())
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, count


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each sequence (B,), e.g. to score candidate responses."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    per_token = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    )  # (B, T-1)
    return per_token.sum(dim=1)


class LogitAdjustment:
    """``logits + tau * log(prior)``: the training-time logit adjustment of one client (prior (V,), > 0)."""

    def __init__(self, prior: torch.Tensor, tau: float) -> None:
        if prior.dim() != 1 or not bool((prior > 0).all()):
            raise ValueError(f"a logit adjustment needs a positive prior of shape (V,), got {tuple(prior.shape)}")
        self.tau = tau
        self.offset = tau * prior.double().log().float()  # (V,), computed once

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted logits (B, T, V), differentiable in ``logits`` (the offset is a constant)."""
        if logits.shape[-1] != self.offset.shape[0]:
            raise ValueError(f"logits of width {logits.shape[-1]} for a prior over {self.offset.shape[0]} tokens")
        return logits + self.offset.to(device=logits.device, dtype=logits.dtype)


def label_prior(examples: Iterable[Example], vocab_size: int) -> torch.Tensor:
    """Token frequencies (V,) of the labels the loss is taken on: positions 1.. (position 0 is never predicted
    after the causal shift) other than ``-100``, add-one smoothed so no token has probability 0 (log(0) would
    make a token the client never saw impossible to predict)."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for example in examples:
        labels = torch.tensor(example.labels[1:], dtype=torch.long)
        labels = labels[labels != IGNORE]
        if labels.numel():
            if int(labels.min()) < 0 or int(labels.max()) >= vocab_size:
                raise ValueError(f"label token outside the vocabulary of {vocab_size} tokens")
            counts += torch.bincount(labels, minlength=vocab_size).double()
    return (counts / counts.sum()).float()
