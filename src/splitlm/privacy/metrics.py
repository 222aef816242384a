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


def pii_recovered(truths: list[str], guesses: list[str], entities: list[tuple[str, str]]) -> dict[str, float]:
    """Per entity type, and over all types under ``"all"``, the fraction of entity occurrences present verbatim in
    a truth text that are present verbatim in the matching guess text (exact, case-sensitive substrings).

    ``entities`` are ``(type, text)`` pairs (duplicates count once); an occurrence is one entity in one truth
    text, however often it repeats there. A type with no occurrence in any truth text is absent from the
    result (and ``"all"`` is absent when no entity occurs at all). ``truths`` and ``guesses`` pair up by index.
    """
    found, recovered = pii_counts(truths, guesses, entities)
    result = {kind: recovered[kind] / found[kind] for kind in found}
    if found:
        result["all"] = sum(recovered.values()) / sum(found.values())
    return result


def pii_counts(
    truths: list[str], guesses: list[str], entities: list[tuple[str, str]]
) -> tuple[dict[str, int], dict[str, int]]:
    """``(found, recovered)``: per type, the entity occurrences in the truth texts and how many of them the
    matching guess texts hold (``pii_recovered``'s counts, to pool over several calls)."""
    if len(truths) != len(guesses):
        raise ValueError(
            f"pii_recovered needs one guess per truth text, got {len(truths)} truths, {len(guesses)} guesses"
        )
    unique = list(dict.fromkeys((kind, text) for kind, text in entities if text))
    found: dict[str, int] = {}
    recovered: dict[str, int] = {}
    for truth, guess in zip(truths, guesses, strict=True):
        for kind, text in unique:
            if text in truth:
                found[kind] = found.get(kind, 0) + 1
                recovered[kind] = recovered.get(kind, 0) + (text in guess)
    return found, recovered
