"""A passive client-side detector of training hijacking: Gradients Scrutinizer (Fu et al., NDSS 2023, "Focusing on
Pinocchio's Nose: a Gradients Scrutinizer to thwart split-learning hijacking attacks using intrinsic attributes").

The idea. An honest server returns the gradient of the training loss, so the gradients of samples with the same
label are more alike than those of samples with different labels, and the two similarities change smoothly as
training goes. A hijacking server (FSHA, SplitSpy) returns the gradient of a loss that never sees the labels: the
two similarities merge and jitter. The detector only reads the gradients the server returns (no probes, no fake
labels: nothing changes in training).

Adapted to a causal LM. The paper's samples are images with one class each; here a sample is one *token* at the
cut: its gradient g_t (a row of the (B, T, d) reply, randomly projected to at most ``projection`` dimensions) and
its label, the next token (the loss at position t is on token t+1, and the residual stream carries that term's
gradient straight down to position t). Each step, from at most ``max_tokens`` of its tokens (all micro-batches):

- similarities: s(a, b) = (1 + cos(g_a, g_b)) / 2 over all pairs, split into same-label pairs (S) and
  different-label pairs (D); a step with fewer than ``min_pairs`` pairs of either kind is not scored;
- set gap: G = (mean S - mean D) / (mean S + mean D), as in the paper;
- overlapping ratio: the intervals mean +- std of S and of D, their intersection over their union (0: apart,
  1: one inside the other), as in the paper;
- fitting error: the paper fits a degree-2 polynomial over all steps so far to the mean similarity of each set and
  takes the RMS residual (averaged over S and D). An LM's steps see different tokens each time, so here the fit is
  over the latest ``window`` scored steps, and the error is relative: the RMS residual over the mean distance
  between the two fitted curves (|fit S - fit D|), which keeps it comparable across models whose similarities sit
  at different levels (and SplitGuard's probe steps, whose random labels shift both levels, from swamping it).
  E = that ratio.

The paper's detection score, with its shape and its constants kept (``LAMBDA_*`` below); the gap, the error and the
overlap are put on the LM's scale first, with units measured on SmolLM2-135M (U-shape 2/2, Rotten Tomatoes, the
``benchmarks/security_hijack.py`` setting) and checked on the tiny test models:

- G is divided by ``gap_unit`` (0.01): honest gaps were 0.026-0.047 on SmolLM2-135M and 0.1-0.3 on the tiny models,
  FSHA's 0.0002-0.01 after its first two steps;
- E is divided by ``error_unit`` (20): honest relative errors are about 0.01-0.4, FSHA's 0.5-8 (the two curves it
  is relative to nearly coincide); the paper's absolute errors are about 0.01;
- the overlapping ratio is weighted by ``overlap_weight`` (0.25; the paper's code has the weight too, at 1): an LM's
  honest sets overlap by 0.5-0.65 on SmolLM2-135M (0 on the tiny models), FSHA's by 0.5-0.85, so at weight 1 the
  overlap term alone would condemn honest training.

    m_gap = sign(g) |g|^0.4 with g = G / gap_unit               (the paper's G / |G|^0.6)
    m_err = -log(7 E / error_unit + e^-2)                       (at most 2)
    m_iou = -log(overlap_weight IoU + e^-1)                     (at most 1)
    score = sigmoid(5 (m_gap m_err m_iou - 0.7))                in (0, 1): HIGH means honest

Each step is decided from the ``min_steps``-th scored step on (the fit needs a few points): hijacked when its score
is below ``threshold`` (0.5, as in the paper). The alarm goes off when more than half of the latest ``votes`` decided
steps (at least 3) were hijacked: a majority rather than a streak, because SplitSpy answers SplitGuard's probe steps
with honest gradients, which break any streak. SplitGuard's own probe steps (uniformly random labels) seldom have
enough same-label pairs in a large vocabulary and are then not scored.

Observed. On the tiny random-init test models (``tests/privacy/test_privacy_hijack_passive.py``, 12 honest runs over
4 architectures and both modes): honest steps score above 0.9, FSHA's and SplitSpy's regular steps below 0.1. On
SmolLM2-135M (``benchmarks/security_hijack.py``, 16 steps): honest steps mostly score 0.82-1, with a rare dip (one
step of 24 had a gap of -0.002 and scored 0.003: the majority vote absorbs it); FSHA's steps score 0.04-0.24 (gap
0.0002-0.002 after its first steps), and the alarm comes at step 7. The margin on the gap is thin at the start: FSHA's
first two steps still show gaps of 0.01, which honest steps sometimes fall to.

``alarm_step`` counts steps as ``metrics.jsonl`` does (1 = the first step).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import numpy as np
import torch
from pydantic import Field

from splitlm.errors import HijackAlarm
from splitlm.privacy.detectors.base import DETECTORS, DetectorContext
from splitlm.privacy.detectors.cut import CutTokens, CutWatcher
from splitlm.registry import ComponentSettings

log = logging.getLogger(__name__)

LAMBDA_ERR = 7.0  # the paper's constants (its detection score)
LAMBDA_GAP = 0.6
LAMBDA_SCORE = 5.0
OFFSET = 0.7


class ScrutinizerSettings(ComponentSettings):
    max_tokens: int = Field(256, ge=8, description="Tokens of a step whose pairwise gradient similarities are taken.")
    projection: int = Field(
        128, ge=8, description="Gradients wider than this are randomly projected to this many dimensions first."
    )
    min_pairs: int = Field(
        8, ge=1, description="A step needs this many same-label and different-label token pairs to be scored."
    )
    window: int = Field(8, ge=4, description="Latest scored steps the fitting error's degree-2 fit runs over.")
    gap_unit: float = Field(
        0.01,
        gt=0,
        description="The set gap is divided by this before the paper's score (honest gaps: 0.03-0.05 on "
        "SmolLM2-135M, 0.1-0.3 on the tiny test models; FSHA's about 0.001; 1 keeps the paper's scale).",
    )
    overlap_weight: float = Field(
        0.25,
        gt=0,
        description="The overlapping ratio's weight in the score (the paper's code has 1: its honest sets end up "
        "apart; an LM's honest same- and different-label similarities overlap by 0.5-0.65 on SmolLM2-135M).",
    )
    error_unit: float = Field(
        20.0,
        gt=0,
        description="The relative fitting error is divided by this before the paper's score (honest relative errors "
        "are a few hundredths to a tenth, the paper's absolute ones about 0.01; 1 keeps the relative error).",
    )
    min_steps: int = Field(4, ge=3, description="Scored steps before the first decision (the fit needs points).")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Alarm when the detection score (high: honest) is below this."
    )
    votes: int = Field(
        5,
        ge=3,
        description="Alarm when more than half of the latest N decided steps (at least 3) score below the threshold.",
    )
    stop: bool = Field(True, description="Stop training on alarm (else only log and record it).")


@DETECTORS.component
class GradientsScrutinizer(CutWatcher):
    """Scores each step by how the server's gradients cluster by label; raises ``HijackAlarm`` when they do not."""

    name = "gradients_scrutinizer"
    Settings = ScrutinizerSettings

    @classmethod
    def create(cls, settings: ScrutinizerSettings, context: DetectorContext) -> GradientsScrutinizer:
        return cls(settings, seed=context.seed)

    def __init__(self, settings: ScrutinizerSettings, seed: int = 0) -> None:
        super().__init__()
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        self._projection: torch.Tensor | None = None
        self._tokens: list[CutTokens] = []  # the current step's micro-batches
        self.same: deque[tuple[int, float]] = deque(maxlen=settings.window)  # (step, mean S)
        self.different: deque[tuple[int, float]] = deque(maxlen=settings.window)
        self.history: list[dict[str, float]] = []  # per scored step: its statistics and score
        self.decisions: deque[bool] = deque(maxlen=settings.votes)  # per decided step: below the threshold
        self.alarm_step: int | None = None

    def gradient(self, tokens: CutTokens) -> None:
        self._tokens.append(tokens)

    def check(self, step: int) -> None:
        tokens, self._tokens = self._tokens, []
        if tokens:
            grads = torch.cat([t.grads for t in tokens])
            labels = torch.cat([t.labels for t in tokens])
            stats = self.statistics(grads, labels)
            if stats is not None:
                self._update(step, stats)
        if self.alarm_step is not None and self.settings.stop:
            raise HijackAlarm(
                f"the server appears to hijack training (Gradients Scrutinizer alarm at step {self.alarm_step}: its "
                f"gradients do not cluster by label, score {self.history[-1]['score']:.2f} < "
                f"{self.settings.threshold}); training stopped: do not train with this server "
                "(privacy.detectors.gradients_scrutinizer.stop=false only records it)"
            )

    def report(self) -> dict[str, Any]:
        scores = [h["score"] for h in self.history if "score" in h]
        return {
            "alarm_step": self.alarm_step, "scored_steps": len(self.history),
            "last_score": scores[-1] if scores else None, "min_score": min(scores, default=None),
            # per scored step: (step, set gap, overlapping ratio, relative fitting error or -1, score or None)
            "steps": [[int(h["step"]), round(h["gap"], 4), round(h["overlap"], 3), round(h.get("fit_error", -1), 3),
                       None if "score" not in h else round(h["score"], 3)] for h in self.history],
        }  # fmt: skip

    # --- statistics ------------------------------------------------------------------------------------------

    def statistics(self, grads: torch.Tensor, labels: torch.Tensor) -> dict[str, float] | None:
        """Mean and std of the same-label and different-label similarities of (n, d) token gradients; None when
        there are too few pairs of either kind."""
        s = self.settings
        if len(grads) > s.max_tokens:
            pick = torch.randperm(len(grads), generator=self.generator)[: s.max_tokens]
            grads, labels = grads[pick], labels[pick]
        d = grads.shape[-1]
        if d > s.projection:
            if self._projection is None or self._projection.shape[0] != d:
                self._projection = torch.randn(d, s.projection, generator=self.generator)
            grads = grads @ self._projection
        units = grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        rows, cols = torch.triu_indices(len(units), len(units), offset=1)
        similarity = (1 + (units @ units.T)[rows, cols]) / 2
        same = labels[rows] == labels[cols]
        if int(same.sum()) < s.min_pairs or int((~same).sum()) < s.min_pairs:
            return None
        a, b = similarity[same].double(), similarity[~same].double()
        return {"same": float(a.mean()), "same_std": float(a.std()), "different": float(b.mean()),
                "different_std": float(b.std())}  # fmt: skip

    def _update(self, step: int, stats: dict[str, float]) -> None:
        s = self.settings
        self.same.append((step, stats["same"]))
        self.different.append((step, stats["different"]))
        gap = (stats["same"] - stats["different"]) / max(stats["same"] + stats["different"], 1e-12)
        low = max(stats["same"] - stats["same_std"], stats["different"] - stats["different_std"])
        high = min(stats["same"] + stats["same_std"], stats["different"] + stats["different_std"])
        union = max(stats["same"] + stats["same_std"], stats["different"] + stats["different_std"]) - min(
            stats["same"] - stats["same_std"], stats["different"] - stats["different_std"]
        )
        overlap = max(0.0, high - low) / max(union, 1e-12)
        record = {"step": float(step + 1), **stats, "gap": gap, "overlap": overlap}
        if len(self.same) >= 3:
            record["fit_error"] = self._fit_error()
        if len(self.history) + 1 >= s.min_steps and "fit_error" in record:
            record["score"] = detection_score(
                gap / s.gap_unit, record["fit_error"] / s.error_unit, overlap * s.overlap_weight
            )
            self.decisions.append(record["score"] < s.threshold)
            low = sum(self.decisions)
            if self.alarm_step is None and len(self.decisions) >= 3 and 2 * low > len(self.decisions):
                self.alarm_step = step + 1
                log.warning(
                    "Gradients Scrutinizer: the server's gradients do not cluster by label (%d of the latest %d steps "
                    "score below %s): it appears to hijack training (step %d)",
                    low, len(self.decisions), s.threshold, self.alarm_step,
                )  # fmt: skip
        self.history.append(record)
        log.debug("Gradients Scrutinizer at step %d: %s", step + 1, record)

    def _fit_error(self) -> float:
        """RMS residual of a degree-2 fit to each set's mean similarity over the window, over the mean distance
        between the two fitted curves."""
        x = np.array([step for step, _ in self.same], dtype=float)
        x = (x - x.mean()) / max(float(x.std()), 1.0)
        fits, residuals = [], []
        for series in (self.same, self.different):
            y = np.array([value for _, value in series])
            fit = np.polyval(np.polyfit(x, y, min(2, len(y) - 1)), x)
            fits.append(fit)
            residuals.append(math.sqrt(float(np.mean((y - fit) ** 2))))
        distance = float(np.mean(np.abs(fits[0] - fits[1])))
        return float(np.mean(residuals)) / max(distance, 1e-12)


def detection_score(gap: float, fit_error: float, overlap: float) -> float:
    """The paper's detection score in (0, 1) from the (scaled) set gap, fitting error and overlapping ratio;
    above 0.5: honest."""
    m_gap = math.copysign(abs(gap) ** (1 - LAMBDA_GAP), gap)
    m_err = -math.log(LAMBDA_ERR * fit_error + math.exp(-2))
    m_iou = -math.log(overlap + math.exp(-1))
    return 1 / (1 + math.exp(-LAMBDA_SCORE * (m_gap * m_err * m_iou - OFFSET)))
