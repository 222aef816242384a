"""SFPrompt's pruning (survey §4.5.1): ``remedies: {prune: {keep: F}}``.

Of each training micro-batch only the fraction F of its rows with the highest EL2N score crosses the wire (and is
trained on). The client scores its rows itself, before anything is sent, with its own parts: its head's output
through the logit lens (its tail's final norm and LM head), so it needs a U-shaped split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from splitlm.models.split import Stage
from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy
from splitlm.runtime.loss import logit_lens
from splitlm.runtime.plugins import ClientPlugin, Micro


def el2n_scores(tail: Stage, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N of each row (SFPrompt): the mean over its loss tokens of || softmax(lens logits) - one-hot(label) ||_2,
    from the client's own head output through the logit lens; rows without a loss token score 0. (B,)"""
    with torch.no_grad():
        logits = logit_lens(tail, hidden.detach())[:, :-1].float()  # position t predicts token t + 1
        targets = labels[:, 1:].to(logits.device)
        real = targets != -100
        probs = torch.softmax(logits, dim=-1)
        picked = probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        # || p - e_y ||^2 = sum p^2 - 2 p_y + 1
        error = (probs.pow(2).sum(-1) - 2 * picked + 1).clamp_min(0).sqrt()
        counts = real.sum(-1)
        return (error * real).sum(-1) / counts.clamp_min(1)


def most_informative(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ceil(fraction * B) rows with the highest scores; ties keep the earlier row."""
    keep = max(1, math.ceil(fraction * scores.numel() - 1e-9))
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


class El2nPrune(ClientPlugin):
    """Keeps the most informative ``fraction`` of each micro-batch's rows (by EL2N through ``tail``'s lens)."""

    name = "prune"

    def __init__(self, tail: Stage, fraction: float) -> None:
        self.tail = tail
        self.fraction = fraction

    def rows(self, micro: Micro) -> torch.Tensor | None:
        assert micro.hidden is not None and micro.labels is not None
        return most_informative(el2n_scores(self.tail, micro.hidden, micro.labels), self.fraction)


@REMEDIES.component
class Prune(Remedy):
    name = "prune"
    former_keys = (("data.prune", "remedies.prune.keep (el2n:F is keep=F)"),)

    class Settings(ComponentSettings):
        keep: float = Field(
            0.5,
            gt=0,
            le=1,
            allow_inf_nan=False,
            description="The fraction of each micro-batch's rows kept: those with the highest EL2N score (SFPrompt), "
            "computed by the client with its own parts (head + logit lens) before anything crosses the wire.",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if config.split.mode != "ushape":
            return [
                "remedies.prune: el2n scores rows with the client's head and the LM head of its tail; set "
                "split.mode=ushape"
            ]
        return []

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        if "tail" not in setup.stages:
            raise ValueError(f"client {setup.client_id}: prune needs a tail (a U-shaped split)")
        return El2nPrune(setup.stages["tail"], self.settings.keep)
