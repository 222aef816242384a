"""Personalization by an early exit: SplitGP's multi-exit objective (survey §3.1.1, ``framework.personalize``).

In a U-shaped split the client holds both ends of the model, so it can also skip the server: its own tail
applied straight to its head's output is a small model of its own, the *early exit*. With
``framework.personalize=multi_exit`` every training micro-batch also takes that path, with the same labels,
and the client minimizes

    (1 - w) x global loss + w x exit loss,        w = framework.exit_weight

where the global loss is the split path's (tail after the server's trunk). Scaling the global loss by
(1 - w) scales everything its backward reaches: the tail's gradient from it, the gradient of the trunk output
sent at step 7, hence the trunk's gradient and the head gradient the server returns at step 9. The exit
loss's gradient (w-scaled) reaches the tail and the head directly, and the head's backward (step 10) is one
backward of both terms together: the server's gradient at the cut and the exit loss. On a step where the
head does not train (``ClientUpdate``: a frozen head, an intermittent update), the exit loss still trains the
tail. The step's reported loss stays the global one; the exit loss is reported next to it
(``StepStats.exit_loss``).

``SplitClient.personal()`` evaluates the personalized model (the early exit) instead of the split one: the
client then measures its own head and tail alone, without a request to the server.
"""

from __future__ import annotations

import torch

from splitlm.config import Config
from splitlm.runtime.loss import causal_lm_loss


class MultiExit:
    """The multi-exit objective with early-exit weight ``weight`` (w, in (0, 1))."""

    name = "multi_exit"

    def __init__(self, weight: float) -> None:
        if not 0.0 < weight < 1.0:
            raise ValueError(f"the early exit's weight is {weight}; expected 0 < w < 1 (framework.exit_weight)")
        self.weight = weight

    def global_scale(self, scale: float) -> float:
        """The factor of the split path's per-token loss: (1 - w) x the micro-batch's ``scale``."""
        return scale * (1.0 - self.weight)

    def exit_loss(self, logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[torch.Tensor | None, float]:
        """The early exit's loss to backpropagate (w x ``scale`` x per-token loss; None when it has no token or
        nothing to train) and its per-token value. logits: (B, T, V) of tail(head(x)); labels: (B, T)."""
        total, count = causal_lm_loss(logits, labels)
        value = total.item() / max(count, 1)
        if not count or not total.requires_grad:
            return None, value
        return total / count * (self.weight * scale), value


def make_personalize(config: Config) -> MultiExit | None:
    """The client's personalization from ``framework.personalize`` / ``exit_weight`` (None: none)."""
    if config.framework.personalize == "multi_exit":
        return MultiExit(config.framework.exit_weight)
    return None
