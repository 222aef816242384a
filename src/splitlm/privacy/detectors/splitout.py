"""A passive client-side detector of training hijacking: SplitOut (Erdogan et al., CANS 2024, "SplitOut: out-of-the-box
training-hijacking detection in split learning via outlier detection").

The idea. The client can compute honest gradients itself: it briefly simulates the server's part and records the
gradients that part returns; an off-the-shelf outlier detector, the Local Outlier Factor (scikit-learn's
``LocalOutlierFactor(novelty=True)``), is fitted on them, and every gradient the real server returns is checked
against it. A sliding window of the latest decisions raises the alarm when most are outliers.

Adapted to a causal LM. The server's part is public here: the client loads the pretrained trunk
(``DetectorContext.public_stage``), the very weights the honest server starts from (its LoRA adapters start at
zero), so the simulation is exact at the start. Instead of a separate epoch before training, the first ``fit_steps``
training steps double as the simulation: for each of their micro-batches the client runs the public trunk on the
smashed data it sends (in U-shape, then its own tail; in vanilla the trunk ends at the LM head) with the labels it
trains on, and takes the gradient of the loss with respect to the smashed data: the honest gradient of that very batch.

The samples are *tokens*, as the paper's are examples. A raw token gradient (d wide, its direction set by the token's
label among tens of thousands) gives LOF nothing to work with: in many dimensions every point is about as far from
its neighbours, and forged gradients score like honest ones (measured: LOF about 1.0-1.1 for both). So each token is
described by what an honest gradient has and a forged one lacks, its relation to the labels: two features, the cosine
of its gradient with the mean gradient of the micro-batch's *other* tokens with the same label (the next token), and
with the mean gradient of the tokens with other labels. Honest gradients sit at about (0.8, 0.2) on the tiny test
models, FSHA's at about (0.9, 0.9). Tokens whose label no other token of the micro-batch shares are left out; at most
``max_tokens`` per micro-batch.

The LOF (``n_neighbors`` neighbours, capped at the number of samples minus one; the paper takes as many as it can) is
fitted on the simulated tokens once ``fit_steps`` steps are in, and then every micro-batch the server returned, those
of the fitting steps included, is scored: its *outlier share* is the fraction of its tokens the LOF predicts as
outliers. A micro-batch is flagged when that share exceeds ``max_outlier_share``, and the alarm goes off when more
than half of the latest ``window`` micro-batches were flagged (the paper's sliding window).

Drift (not in the paper, which fits once). The model trains, and so do the honest server's trunk adapters, which
the public trunk does not follow: on the tiny test models (learning rate 5e-3) honest outlier shares grew from a few
percent to 0.6-0.8 within 20 steps against a fixed fit. So every ``refit_every`` steps the client simulates one step
again and refits on the honest samples of the latest ``memory`` steps: the simulated ones, and the server's own
micro-batches that were *not* flagged. The latter lets the detector follow the honest server's drift; it also means
a server that starts honest and drifts into hijacking slowly enough to stay under the flagging share could be
followed too (the paper's fixed fit has the opposite weakness: false alarms as honest training moves on).
``refit_every=0`` keeps the first fit.

Observed on the tiny random-init test models (``tests/privacy/test_privacy_hijack_passive.py``, 12 honest runs over
4 architectures, both modes): honest micro-batches have outlier shares of 0.06-0.14 on average, FSHA's and SplitSpy's
0.55-1 (SplitSpy's probe steps are honest). On SmolLM2-135M (``benchmarks/security_hijack.py``, 16 steps, 2 honest
runs): honest shares 0.07-0.4 (mean 0.16-0.19), FSHA's and SplitSpy's 1.0 from the first step; the alarm comes at step 6
(the window needs 5 scored micro-batches; SplitGuard's probe steps, whose random labels no two tokens share, are not
scored). The cost: a forward and backward of the public trunk for the micro-batches
of the first ``fit_steps`` steps and every ``refit_every``-th step after, on the client.

``alarm_step`` counts steps as ``metrics.jsonl`` does (1 = the first step).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from pydantic import Field
from sklearn.neighbors import LocalOutlierFactor
from torch import nn

from splitlm.errors import HijackAlarm, PrivacyError
from splitlm.models import Stage
from splitlm.privacy.detectors.base import DETECTORS, DetectorContext
from splitlm.privacy.detectors.cut import CutTokens, CutWatcher, cut_tokens
from splitlm.registry import ComponentSettings
from splitlm.runtime.loss import causal_lm_loss

log = logging.getLogger(__name__)


class SplitOutSettings(ComponentSettings):
    fit_steps: int = Field(
        3, ge=1, description="First training steps whose micro-batches the client also runs through the public trunk "
        "to get honest gradients to fit the outlier detector on (a short local simulation)."
    )  # fmt: skip
    refit_every: int = Field(
        4, ge=0, description="After the first fit, every N-th step is simulated again and the detector refitted on "
        "the honest gradients of the latest `memory` steps (the model changes as it trains); 0: never."
    )  # fmt: skip
    memory: int = Field(
        8, ge=1, description="Steps whose honest gradients a refit uses: those simulated, and those the server "
        "returned that were not flagged (they follow the trunk's own training, which the public trunk does not)."
    )  # fmt: skip
    max_tokens: int = Field(128, ge=8, description="Tokens per micro-batch used to fit and to score.")
    n_neighbors: int = Field(50, ge=2, description="LOF neighbours (capped at the number of fitted tokens minus one).")
    max_outlier_share: float = Field(
        0.5, gt=0, lt=1, description="A micro-batch is flagged when more than this share of its tokens are outliers."
    )
    window: int = Field(5, ge=1, description="Latest micro-batches whose majority being flagged raises the alarm.")
    stop: bool = Field(True, description="Stop training on alarm (else only log and record it).")


@DETECTORS.component
class SplitOut(CutWatcher):
    """LOF on the server's token gradients, fitted on honest gradients simulated with the public trunk."""

    name = "splitout"
    Settings = SplitOutSettings

    @classmethod
    def problems(cls, settings: SplitOutSettings, config: Any, framework: Any) -> list[str]:
        found = super().problems(settings, config, framework)
        if config.split.bottleneck:
            found.append(
                "privacy.detectors.splitout: simulates the server with the public trunk, which a learned bottleneck "
                "at the cut (split.bottleneck) does not have: drop one of them"
            )
        return found

    @classmethod
    def create(cls, settings: SplitOutSettings, context: DetectorContext) -> SplitOut:
        if context.public_stage is None:
            raise PrivacyError("privacy.detectors.splitout: needs the public pretrained trunk, which this client lacks")
        if context.mode == "ushape" and "tail" not in context.parts:
            raise PrivacyError("privacy.detectors.splitout: needs the client's tail to simulate a U-shaped split")
        return cls(settings, context.public_stage, context.parts, context.mode, seed=context.seed)

    def __init__(
        self,
        settings: SplitOutSettings,
        public_stage: Callable[[str], Stage],
        parts: Mapping[str, nn.Module],
        mode: str,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.public_stage = public_stage
        self.parts = parts
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)
        self.fitted: deque[tuple[int, np.ndarray]] = deque()  # (step, features) of honest micro-batches
        self.lof: LocalOutlierFactor | None = None
        self.waiting: list[CutTokens] = []  # the server's micro-batches of the fitting steps, scored once fitted
        self.decisions: deque[bool] = deque(maxlen=settings.window)
        self.shares: list[tuple[int, float]] = []  # (step, outlier share) of every scored micro-batch
        self.alarm_step: int | None = None

    def simulates(self, step: int) -> bool:
        """Whether ``step``'s micro-batches are also run through the public trunk: the first ``fit_steps``, then
        every ``refit_every``-th."""
        s = self.settings
        return step < s.fit_steps or (s.refit_every > 0 and (step - s.fit_steps) % s.refit_every == s.refit_every - 1)

    def gradient(self, tokens: CutTokens) -> None:
        if self.simulates(tokens.step):
            self.fitted.append((tokens.step, self.features(self._simulate(tokens))))
        if self.lof is None:
            self.waiting.append(tokens)
        else:
            self._score(tokens)

    def check(self, step: int) -> None:
        if step + 1 >= self.settings.fit_steps and self.simulates(step) and self.fitted:
            self._fit(step)
            waiting, self.waiting = self.waiting, []
            for tokens in waiting:
                self._score(tokens)
        window = self.settings.window
        if self.alarm_step is None and len(self.decisions) == window and sum(self.decisions) * 2 > window:
            self.alarm_step = step + 1
            log.warning(
                "SplitOut: %d of the latest %d micro-batches' gradients are outliers to honest ones: the server "
                "appears to hijack training (step %d)", sum(self.decisions), window, self.alarm_step
            )  # fmt: skip
        if self.alarm_step is not None and self.settings.stop:
            raise HijackAlarm(
                f"the server appears to hijack training (SplitOut alarm at step {self.alarm_step}: most of its latest "
                f"{self.settings.window} gradients are outliers to the honest ones the client simulated); training "
                "stopped: do not train with this server (privacy.detectors.splitout.stop=false only records it)"
            )

    def report(self) -> dict[str, Any]:
        shares = [share for _, share in self.shares]
        return {"alarm_step": self.alarm_step, "scored": len(shares),
                "mean_outlier_share": float(np.mean(shares)) if shares else None,
                "shares": [[step, round(share, 3)] for step, share in self.shares]}  # fmt: skip

    # --- the simulation and the outlier detector ---------------------------------------------------------------

    def _simulate(self, tokens: CutTokens) -> CutTokens:
        """The honest gradient of ``tokens``' micro-batch: the public trunk (and the client's tail) on what was sent."""
        trunk = self.public_stage("trunk")
        leaf = tokens.hidden.to(device=trunk.device, dtype=trunk.dtype).requires_grad_(True)
        mask = tokens.mask.to(trunk.device).long()
        with torch.enable_grad():
            out = trunk(hidden_states=leaf, attention_mask=mask)
            if self.mode == "ushape":
                tail = self.parts["tail"]
                out = tail(hidden_states=out, attention_mask=mask)
            total, count = causal_lm_loss(out, tokens.batch_labels.to(out.device))
            (grad,) = torch.autograd.grad(total / max(count, 1), leaf)
        return cut_tokens(tokens.step, tokens.micro, grad, tokens.hidden, tokens.mask, tokens.batch_labels)

    def features(self, tokens: CutTokens) -> np.ndarray:
        """(n, 2) features of the tokens of a micro-batch whose label another of its tokens shares: the cosine of
        each token's gradient with the mean gradient of the other tokens with its label, and with the mean gradient
        of the tokens with other labels."""
        grads, labels = tokens.grads, tokens.labels
        if len(grads) > self.settings.max_tokens:
            pick = torch.randperm(len(grads), generator=self.generator)[: self.settings.max_tokens]
            grads, labels = grads[pick], labels[pick]
        units = grads / grads.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (n, n)
        same.fill_diagonal_(False)
        other = labels.unsqueeze(0) != labels.unsqueeze(1)
        keep = same.any(1) & other.any(1)
        if not bool(keep.any()):
            return np.zeros((0, 2))
        same_mean = same.float() @ units / same.sum(1, keepdim=True).clamp_min(1)  # (n, d)
        other_mean = other.float() @ units / other.sum(1, keepdim=True).clamp_min(1)
        cos_same = torch.nn.functional.cosine_similarity(units, same_mean, dim=-1)
        cos_other = torch.nn.functional.cosine_similarity(units, other_mean, dim=-1)
        return torch.stack([cos_same, cos_other], dim=-1)[keep].double().numpy()

    def _fit(self, step: int) -> None:
        while self.fitted and self.fitted[0][0] <= step - self.settings.memory:
            self.fitted.popleft()
        samples = np.concatenate([features for _, features in self.fitted])
        neighbours = max(1, min(self.settings.n_neighbors, len(samples) - 1))
        self.lof = LocalOutlierFactor(n_neighbors=neighbours, novelty=True)
        self.lof.fit(samples)
        log.info("SplitOut: LOF fitted on %d honest token gradients (step %d)", len(samples), step + 1)

    def _score(self, tokens: CutTokens) -> None:
        assert self.lof is not None
        features = self.features(tokens)
        if not len(features):
            return
        share = float(np.mean(self.lof.predict(features) == -1))
        self.shares.append((tokens.step + 1, share))
        flagged = share > self.settings.max_outlier_share
        self.decisions.append(flagged)
        if not flagged and self.settings.refit_every > 0:
            self.fitted.append((tokens.step, features))
