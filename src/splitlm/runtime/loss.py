"""The causal language-modelling loss, computed the same way by every party and by the baseline, and the logit
lens (a head's output read through the tail's final norm and LM head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitlm.models.split import Stage

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


def logit_lens(tail: Stage, hidden: torch.Tensor) -> torch.Tensor:
    """The tail's final norm and LM head applied to ``hidden`` (B, T, d) -> logits (B, T, V)."""
    hidden = hidden.to(device=tail.device, dtype=tail.dtype)
    return tail.family.finish(tail, tail.config, hidden)
