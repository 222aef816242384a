"""Label DP for vanilla splits (step 3): randomized response on each label token the client sends.

Over the K non-special tokens of the vocabulary, each label is kept with probability e^eps / (e^eps + K - 1)
and otherwise replaced by one of the other K - 1 tokens, uniformly: exactly eps-(local) DP per label token.
Labels of -100 (no loss: padding, prompts) and special ids (EOS) pass unchanged: their positions follow the
attention mask and the data format, which the server sees anyway, and the epsilon covers label values only.

Accounting: dp_accounting's ``RandomizedResponseDpEvent(p, k)`` outputs the input with probability 1 - p + p/k
and each bucket with p/k, so this mechanism is p = K / (e^eps + K - 1), k = K; one sequence has at most
``train.seq_len`` labels, composed.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Self

import torch
from dp_accounting import dp_event
from pydantic import Field

from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, MessageDefense
from splitlm.registry import ComponentSettings

IGNORE = -100


@DEFENSES.component
class LabelDp(MessageDefense):
    name = "label_dp"
    former_keys = (("privacy.label_dp", "privacy.defenses.label_dp"),)

    class Settings(ComponentSettings):
        epsilon: float = Field(
            2.0,
            gt=0,
            description="Randomized response for each label token sent (vanilla split): kept with probability "
            "e^eps / (e^eps + K - 1), else a uniformly random other token, over the K non-special tokens; exactly "
            "eps-DP per label, composed over train.seq_len labels per sequence.",
        )

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, settings.epsilon)

    @classmethod
    def problems(cls, settings: Settings, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if config.split.mode != "vanilla":
            problems.append(
                "privacy.defenses.label_dp: protects the labels a vanilla split sends; in a ushape split labels "
                "never leave the client, so drop label_dp or set split.mode=vanilla"
            )
        return problems

    def __init__(self, context: DefenseContext, epsilon: float) -> None:
        if not epsilon > 0:
            raise PrivacyError(f"label_dp: epsilon must be > 0, got {epsilon}; set privacy.defenses.label_dp.epsilon")
        if context.mode != "vanilla":
            raise PrivacyError("label_dp: only a vanilla split sends labels; drop label_dp or set split.mode=vanilla")
        vocab, device = context.vocab_size, context.token_embeddings.device
        special = torch.zeros(vocab, dtype=torch.bool)
        special[[i for i in context.special_ids if 0 <= i < vocab]] = True
        self.allowed = torch.nonzero(~special).squeeze(1).to(device)  # (K,) the buckets
        self.buckets = int(self.allowed.numel())
        if self.buckets < 2:
            raise PrivacyError("label_dp: fewer than two non-special tokens to randomize over; check the tokenizer")
        self.index = torch.full((vocab,), -1, dtype=torch.long, device=device)  # id -> bucket, -1 if special
        self.index[self.allowed] = torch.arange(self.buckets, device=device)
        self.epsilon = float(epsilon)
        others = (self.buckets - 1) * math.exp(-self.epsilon)  # (K - 1) / e^eps, no overflow at large eps
        self.keep_probability = 1.0 / (1.0 + others)
        self.noise_parameter = self.buckets * math.exp(-self.epsilon) / (1.0 + others)  # K / (e^eps + K - 1)
        self.seq_len = context.seq_len
        self.generator = context.generator(zlib.crc32(self.name.encode()))

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        device = self.index.device
        values = labels.to(device)
        inside = (values >= 0) & (values < self.index.numel())
        bucket = torch.where(inside, self.index[values.clamp(0, self.index.numel() - 1)], -1)
        if bool(((values != IGNORE) & ~inside).any()):
            raise PrivacyError(
                f"label_dp: a label lies outside the {self.index.numel()}-token vocabulary; use the model's tokenizer"
            )
        change = bucket >= 0  # (B, T) real, non-special labels
        count = int(change.sum())
        if not count:
            return labels
        own = bucket[change]  # (N,)
        flip = torch.rand(count, generator=self.generator, device=device) >= self.keep_probability
        other = torch.randint(0, self.buckets - 1, (count,), generator=self.generator, device=device)
        other = other + (other >= own).long()  # uniform over the K - 1 other buckets
        out = values.clone()
        out[change] = self.allowed[torch.where(flip, other, own)]
        return out.to(labels.device)

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        one = dp_event.RandomizedResponseDpEvent(noise_parameter=self.noise_parameter, num_buckets=self.buckets)
        return [dp_event.SelfComposedDpEvent(one, self.seq_len)]
