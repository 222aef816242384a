"""SCALA's logit-adjusted loss (survey §3.1.2): ``remedies: {logit_adjustment: {tau: 1.0}}``.

A client trains on ``logits + tau * log(prior)``, the prior being the token frequencies of its own training labels.
Frequent tokens then need less of the model's own logit to win, so the model learns the data's signal rather than
the client's label skew. Only the training loss is adjusted (the split path's and any early exit's); evaluation and
sequence scoring measure the plain model, which is what the adjustment trains and what is deployed. tau = 0 is off.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field

from splitlm.data import Example
from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy
from splitlm.runtime.loss import IGNORE
from splitlm.runtime.plugins import ClientPlugin


class LogitAdjustment(ClientPlugin):
    """``logits + tau * log(prior)``: the training-time logit adjustment of one client (prior (V,), > 0)."""

    name = "logit_adjustment"

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

    def train_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self(logits)


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


@REMEDIES.component
class LogitAdjustmentRemedy(Remedy):
    name = "logit_adjustment"
    former_keys = (("train.logit_adjustment", "remedies.logit_adjustment.tau"),)

    class Settings(ComponentSettings):
        tau: float = Field(
            1.0,
            ge=0,
            allow_inf_nan=False,
            description="tau: the client's training logits add tau * log(prior of its own label tokens) (0: off).",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if not settings.tau:
            return []
        problems = []
        if framework is not None and not framework.split:
            problems.append(
                f"remedies.logit_adjustment: adjusts a split client's loss; framework.name={framework.name} has no "
                "client side, so remove it from remedies"
            )
        if config.split.mode != "ushape":
            problems.append("remedies.logit_adjustment: the client's loss is adjusted, so it needs split.mode=ushape")
        return problems

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        if not self.settings.tau:
            return None
        vocab = int(setup.stages["tail"].config.vocab_size)  # the prior is this client's own label mix, nobody else's
        return LogitAdjustment(label_prior(setup.examples, vocab), self.settings.tau)
