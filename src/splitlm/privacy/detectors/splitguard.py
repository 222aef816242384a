"""A client-side detector of training hijacking, in the spirit of SplitGuard (Erdogan et al., WPES 2022).

Now and then the client sends a *probe*: a batch whose labels are replaced by random tokens. An honest server
returns, for the smashed data, the gradient of the training loss, which depends on the labels: the gradients
of a probe differ from those of regular batches. A hijacking server (FSHA, ``splitlm.privacy.attacks.fsha``)
returns the gradient of a loss that never sees the labels, so a probe's gradients look like any other batch's. The
probe's fake labels never train the client's own parts (``SplitClient.train_step`` drops their gradients).

What is compared. Each micro-batch's (B, T, d) gradient becomes the directions u_t = g_t / |g_t| of its real
tokens with a nonzero gradient (randomly projected to at most ``projection`` dimensions) and their second
moment M = mean_t u_t u_t^T. Two statistics of M stand in for SplitGuard's angle and magnitude:

- the angle between two batches, arccos(<M_a, M_b> / (|M_a| |M_b|)) in [0, pi/2]: honest gradients follow
  the labels, so a probe's directions differ from the regular ones;
- the concentration c = |M|_F^2 (the mean squared cosine between two token gradients of the batch): real
  labels repeat frequent tokens, so their gradients bunch together; uniformly random labels spread them.

Score of a probe. Against the ``window`` latest regular micro-batches except the newest (the "older" ones),
the probe's statistics are compared with those of the newest regular micro-batch, which stands in for a
regular batch at about the probe's time (so that slow drift of the gradients cancels):

    gap_angle = mean angle(probe, older) - mean angle(newest, older)          (radians)
    gap_conc  = log c(newest) - log c(probe)
    score     = exp(-max(0, gap_angle / (pi/4) + gap_conc / log 2))           in (0, 1]

A probe whose gradients react to its fake labels (a 45 degree larger angle, or half the concentration) scores
1/e or less: LOW means honest, 1 means the labels made no difference. With several micro-batches in a probe
step, their statistics are averaged. The first probe is scored once three regular micro-batches were seen.
The smoothed score is an exponential moving average over probes (weight ``smoothing`` for the newest); the
alarm goes off when it exceeds ``threshold`` on ``patience`` consecutive probes.

Observed on the tiny random-init test models (30-40 steps, U-shape and vanilla, several seeds): honest probes
scored 0.04-0.24 on tiny-llama, tiny-qwen2 and tiny-gpt2, and FSHA probes 0.58-1.0 on every model. Under FSHA
the forged gradients do not depend on the labels, so only drift separates a probe from the newest regular
batch. tiny-gemma3's first honest probes score up to 0.66 (its random-init gradients barely follow the labels
yet) and fall below 0.3 after about 15 steps, which is why ``patience`` defaults to 3. On the default real model
(SmolLM2-135M, U-shape 2/2, plain-text reviews, ``benchmarks/security_hijack.py``) honest probes scored 0.92-1.0 as
FSHA's do: there a probe's gradients differ from the regular ones no more than regular ones do by these two
statistics, so this detector raises false alarms on that model whatever its threshold (the report's ``scores``
show it); the passive detectors do not depend on them.

``alarm_step`` is the step number of the alarm as ``metrics.jsonl`` counts steps (1 = the first step).
The detector is a client plugin (it swaps in the probe's labels, keeps a probe from training the client, and
checks after each step) and a client mod placed after the codec and before the defenses: it observes the
gradient as the server sent it, before the client's own ``grad_noise`` (direction ``down``) blurs it. An
honest server still takes one trunk step on each probe's fake labels.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from splitlm.data.batch import IGNORE_INDEX
from splitlm.errors import HijackAlarm
from splitlm.privacy.detectors.base import DETECTORS, Detector, DetectorContext
from splitlm.registry import ComponentSettings
from splitlm.runtime.rng import derive
from splitlm.transport import Message

log = logging.getLogger(__name__)

ANGLE_UNIT = math.pi / 4  # a probe this much farther (in angle) from the regular batches counts as one unit
CONCENTRATION_UNIT = math.log(2.0)  # ... or this much less concentrated (half the mean squared cosine)


@dataclass
class _Summary:
    step: int
    moment: torch.Tensor  # (k, k): second moment of the token gradients' unit directions
    concentration: float  # |moment|_F^2, in [1/k, 1]


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float((a * b).sum()) / max(float(a.norm() * b.norm()), 1e-30)
    return math.acos(max(-1.0, min(1.0, cos)))


class SplitGuardSettings(ComponentSettings):
    probe_every: int = Field(
        4, ge=2, description="Every N-th step is a probe with fake labels (it does not train the client's parts)."
    )
    warmup_steps: int = Field(0, ge=0, description="No probes before this step.")
    window: int = Field(
        8, ge=3, description="Latest regular micro-batches whose gradients a probe's gradients are compared with."
    )
    projection: int = Field(
        128, ge=8, description="Gradients wider than this are randomly projected to this many dimensions first."
    )
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Alarm when the smoothed SplitGuard score exceeds this (per probe score in (0, 1]: near 0 when "
        "the server's gradients react to the fake labels, 1 when they ignore them).",
    )
    smoothing: float = Field(
        0.5, gt=0, le=1, description="Weight of the newest probe in the smoothed score (1: no smoothing)."
    )
    patience: int = Field(
        3,
        ge=1,
        description="Consecutive probes whose smoothed score exceeds the threshold that raise the alarm (the first "
        "probes of a randomly initialised model can look label-blind).",
    )
    stop: bool = Field(True, description="Stop training on alarm (else only log and record it).")


@DETECTORS.component
class SplitGuard(Detector):
    """Probes with fake labels; raises ``HijackAlarm`` when the returned gradients ignore the labels."""

    name = "splitguard"
    former_keys = (("privacy.splitguard", "privacy.detectors.splitguard"),)
    Settings = SplitGuardSettings

    @classmethod
    def create(cls, settings: SplitGuardSettings, context: DetectorContext) -> SplitGuard:
        return cls(settings, vocab_size=context.vocab_size, seed=context.seed)

    def __init__(self, settings: SplitGuardSettings, vocab_size: int, seed: int = 0) -> None:
        self.settings = settings
        self.vocab_size = vocab_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # fake labels, reseeded per micro-batch
        self._projection_generator = torch.Generator().manual_seed(seed)
        self.regular: deque[_Summary] = deque(maxlen=settings.window)
        self.probes: list[_Summary] = []  # the current probe step's micro-batches
        self.scores: list[tuple[int, float]] = []  # (step, score) of every scored probe
        self.smoothed: float | None = None
        self.streak = 0
        self.alarm_step: int | None = None
        self._projection: torch.Tensor | None = None
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # (step, micro) -> mask, until its gradient is back

    def report(self) -> dict[str, Any]:
        """``alarm_step`` and ``scores``: each scored probe's ``[step, score]`` (a low score: the probe's labels
        changed the server's gradients, as an honest server's do), to see how near the threshold a run came."""
        return {"alarm_step": self.alarm_step, "scores": [[step, round(score, 4)] for step, score in self.scores]}

    # --- as a plugin and a mod ----------------------------------------------------------------------------

    def on_forward(self, key: tuple[str, int, int], training: bool) -> None:
        self.generator.manual_seed(derive(self.seed, "splitguard", *key))  # the same fake labels in any process

    def labels(self, step: int, labels: torch.Tensor) -> torch.Tensor:
        return self.fake_labels(labels) if self.is_probe(step) else labels

    def keeps_gradients(self, step: int) -> bool:
        return not self.is_probe(step)  # a probe's fake labels must not train the client's own parts

    def after_step(self, step: int) -> None:
        self.check(step)

    def on_request(self, message: Message) -> Message:
        if message.kind == "forward" and "attention_mask" in message.tensors:
            self._masks[message.step, message.micro] = message.tensors["attention_mask"]
            while len(self._masks) > 64:  # forwards whose gradient never came back
                self._masks.pop(next(iter(self._masks)))
        return message

    def on_reply(self, request: Message, reply: Message) -> Message:
        if reply.kind in ("gradients", "loss") and "grad" in reply.tensors:
            mask = self._masks.pop((request.step, request.micro), None)
            if mask is not None:
                self.observe(request.step, reply.tensors["grad"], mask, self.is_probe(request.step))
        return reply

    # --- the detector ---------------------------------------------------------------------------------------

    def is_probe(self, step: int) -> bool:
        """Every ``probe_every``-th step from ``warmup_steps`` on (steps count from 0)."""
        s = self.settings
        return step >= s.warmup_steps and (step - s.warmup_steps) % s.probe_every == s.probe_every - 1

    def fake_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each real label (not -100) replaced by a uniformly random token. (B, T)"""
        fake = torch.randint(self.vocab_size, labels.shape, generator=self.generator, dtype=labels.dtype)
        return torch.where(labels != IGNORE_INDEX, fake.to(labels.device), labels)

    def observe(self, step: int, grad: torch.Tensor, attention_mask: torch.Tensor, probe: bool) -> None:
        summary = self._summarise(step, grad, attention_mask)
        if summary is None:
            return
        if probe:
            self.probes.append(summary)
        else:
            self.regular.append(summary)

    def check(self, step: int) -> None:
        if self.is_probe(step):
            score = self._score()
            self.probes = []
            if score is not None:
                self._update(step, score)
        if self.alarm_step is not None and self.settings.stop:
            raise HijackAlarm(
                f"the server appears to hijack training (SplitGuard alarm at step {self.alarm_step}: its gradients "
                f"ignore the probe labels, smoothed score {self.smoothed:.2f} > {self.settings.threshold}); "
                "training stopped: do not train with this server (privacy.detectors.splitguard.stop=false only "
                "records it)"
            )

    # --- statistics ------------------------------------------------------------------------------------------

    def _summarise(self, step: int, grad: torch.Tensor, attention_mask: torch.Tensor) -> _Summary | None:
        tokens = grad.detach().float().cpu()[attention_mask.detach().cpu().bool()]  # (n, d)
        norms = tokens.norm(dim=-1)
        tokens = tokens[norms > 0]  # e.g. the last token, which no loss depends on
        if len(tokens) < 2:
            return None
        d = tokens.shape[-1]
        if d > self.settings.projection:
            if self._projection is None or self._projection.shape[0] != d:
                self._projection = torch.randn(d, self.settings.projection, generator=self._projection_generator)
            tokens = tokens @ self._projection  # (n, k): a random projection keeps angles roughly
        units = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        moment = units.T @ units / len(units)  # (k, k)
        return _Summary(step, moment, float(moment.pow(2).sum()))

    def _score(self) -> float | None:
        """The probe's score (see the module docstring); None while there is too little to compare with."""
        if not self.probes or len(self.regular) < 3:
            return None
        *older, newest = self.regular
        angle_ref = sum(_angle(newest.moment, o.moment) for o in older) / len(older)
        angle_probe = sum(_angle(p.moment, o.moment) for p in self.probes for o in older) / (
            len(older) * len(self.probes)
        )
        log_conc_probe = sum(math.log(p.concentration) for p in self.probes) / len(self.probes)
        gap = (angle_probe - angle_ref) / ANGLE_UNIT + (math.log(newest.concentration) - log_conc_probe) / (
            CONCENTRATION_UNIT
        )
        return math.exp(-max(0.0, gap))

    def _update(self, step: int, score: float) -> None:
        self.scores.append((step + 1, score))
        weight = self.settings.smoothing
        self.smoothed = score if self.smoothed is None else (1 - weight) * self.smoothed + weight * score
        self.streak = self.streak + 1 if self.smoothed > self.settings.threshold else 0
        log.debug("SplitGuard probe at step %d: score %.3f, smoothed %.3f", step + 1, score, self.smoothed)
        if self.alarm_step is None and self.streak >= self.settings.patience:
            self.alarm_step = step + 1
            log.warning(
                "SplitGuard: the server's gradients ignore the probe labels (smoothed score %.2f > %s for %d "
                "probes): it appears to hijack training (step %d)",
                self.smoothed, self.settings.threshold, self.streak, self.alarm_step,
            )  # fmt: skip
