"""How well an attack rebuilt the private text: token-level ROUGE-L F1 (``rouge-score``) and token accuracy.

Both compare token ids (not detokenized strings) at the positions the attention mask marks as real, so a
score is the same for every tokenizer and language.
"""

from __future__ import annotations

import torch
from rouge_score import rouge_scorer


class _Ids:
    """rouge-score's tokenizer interface over space-separated token ids."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Ids())


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [" ".join(str(int(t)) for t in row[m.bool()]) for row, m in zip(ids, mask, strict=True)]


def rouge_l(truth: torch.Tensor, guess: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean ROUGE-L F1 over rows of (B, T) token ids, on the real (mask=1) positions."""
    scores = [
        _SCORER.score(t, g)["rougeL"].fmeasure for t, g in zip(_rows(truth, mask), _rows(guess, mask), strict=True) if t
    ]
    return sum(scores) / len(scores) if scores else 0.0


def token_accuracy(truth: torch.Tensor, guess: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of real positions where the guessed id is the true one."""
    real = mask.bool()
    total = int(real.sum())
    return float((truth.eq(guess) & real).sum()) / total if total else 0.0
