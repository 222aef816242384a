"""How the client's head learns, and what that saves on the wire (survey §4.3.2 and §4.5.1).

Every split step normally ends with step 9: the server sends the gradient at the head's output, and the
client waits for it before its head can step. A client update (a client plugin) decides, per step, whether the
client asks for that gradient and waits for it (``waits``), whether the head trains at all (``trains_head``), and
what local loss, if any, drives the head instead (``local_loss``). At most one of these remedies picks it:

| remedy                           | step 9                 | the head learns from                       | method     |
|----------------------------------|------------------------|--------------------------------------------|------------|
| (none)                           | every step             | the server's gradient                      | SL         |
| ``intermittent: {every: H}``     | every H-th step        | the server's gradient, on those steps only | CSE-FSL    |
| ``local_loss: {align_every: N}`` | never (or align steps) | a logit-lens loss on its own output        | FSL-SAGE   |
| ``frozen_head``                  | never                  | nothing: the client streams activations    | StreamSL   |

The logit lens applies the tail's final norm and LM head (frozen, pretrained) to the head's output, so the
head gets a next-token loss of its own. With ``align_every=N`` the client also fetches the server's
gradient every N-th step and trains a small low-rank map in front of the lens so that the local loss's
gradient at the cut matches the server's (FSL-SAGE's alignment); the head itself still learns from the local
loss only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from splitlm.models.split import Stage
from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy
from splitlm.runtime.loss import causal_lm_loss, logit_lens
from splitlm.runtime.plugins import ClientPlugin

ALIGN_RANK = 16  # rank of the auxiliary map trained by alignment


class ClientUpdate(ClientPlugin):
    """``intermittent``: the head learns from the server's gradient on steps where ``every`` divides the step number
    (every step by default); on the others the client neither asks for nor waits for step 9."""

    name = "intermittent"

    def __init__(self, every: int = 1) -> None:
        self.every = every

    def waits(self, step: int) -> bool:
        """Whether this step asks for the server's gradient at the cut and waits for it."""
        return step % self.every == 0

    def trains_head(self, step: int) -> bool:
        return self.waits(step)

    def follows_server(self, step: int) -> bool:
        """Whether the head backpropagates the server's gradient (else it is only observed)."""
        return True

    def own_loss(self, hidden: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor | None:
        """A loss of the head's own, backpropagated into the head (None: none)."""
        return None

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        """See the server's gradient at the cut of a step that waited for it."""


class Frozen(ClientUpdate):
    """``frozen_head`` (StreamSL): the head never trains, so the client never asks for step 9."""

    name = "frozen_head"

    def waits(self, step: int) -> bool:
        return False


class AuxiliaryMap(nn.Module):
    """``h + up(down(h))``: a low-rank residual map in front of the logit lens, zero at first (then the local
    loss is exactly the lens's)."""

    def __init__(self, hidden_size: int, rank: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, hidden_size, generator=generator) / math.sqrt(hidden_size))
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))

    def forward(self, hidden: torch.Tensor, trainable: bool = True) -> torch.Tensor:
        """``trainable=False``: with a copy of the weights, so no loss on this output trains (or pins) them."""
        down, up = (self.down, self.up) if trainable else (self.down.detach().clone(), self.up.detach().clone())
        return hidden + (hidden @ down.T) @ up.T


class LocalLoss(ClientUpdate):
    """``local_loss``: the head learns from the logit lens's next-token loss on its own output; with
    ``align_every`` the auxiliary map is trained to make that loss's gradient match the server's."""

    name = "local_loss"

    def __init__(self, tail: Stage, align_every: int, lr: float, seed: int) -> None:
        super().__init__()
        self.tail = tail
        self.align_every = align_every
        self.aux = AuxiliaryMap(int(tail.config.hidden_size), ALIGN_RANK, seed).to(tail.device)
        self.optimizer = torch.optim.Adam(self.aux.parameters(), lr=lr)
        self.alignment: float | None = None  # relative mismatch before the latest alignment step

    def waits(self, step: int) -> bool:
        return bool(self.align_every) and step % self.align_every == 0

    def trains_head(self, step: int) -> bool:
        return True

    def follows_server(self, step: int) -> bool:
        return False

    def own_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, scale: float, trains_aux: bool = False
    ) -> torch.Tensor | None:
        """The head's loss; the auxiliary map only learns by alignment (``trains_aux`` there)."""
        total, count = causal_lm_loss(logit_lens(self.tail, self.aux(hidden, trainable=trains_aux)), labels)
        return total / max(count, 1) * scale

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        """One step of the auxiliary map on || d(local loss)/dh - server gradient ||^2 / ||server gradient||^2."""
        point = hidden.detach().requires_grad_(True)
        loss = self.own_loss(point, labels, scale, trains_aux=True)
        assert loss is not None
        (local,) = torch.autograd.grad(loss, point, create_graph=True)
        target = grad.to(device=local.device, dtype=local.dtype)
        mismatch = (local - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
        self.optimizer.zero_grad(set_to_none=True)
        mismatch.backward(inputs=list(self.aux.parameters()))
        self.optimizer.step()
        self.alignment = float(mismatch.detach())


UPDATES = ("intermittent", "local_loss", "frozen_head")  # the remedies that decide how the head learns


class _Update(Remedy):
    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        chosen = [name for name in config.remedies if name in UPDATES]
        if len(chosen) > 1 and chosen[0] == cls.name:  # said once, by the first of them
            return [f"remedies: {' and '.join(chosen)} each decide how the client's head learns; keep one of them"]
        return []


@REMEDIES.component
class Intermittent(_Update):
    name = "intermittent"
    former_keys = (("train.client_update_every", "remedies.intermittent.every"),)

    class Settings(ComponentSettings):
        every: int = Field(
            2,
            ge=1,
            description="Update the head from the server's gradient only every H-th step (CSE-FSL); on the other "
            "steps no step-9 gradient is sent and the head does not change (its tail still trains).",
        )

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        return ClientUpdate(self.settings.every)


@REMEDIES.component
class FrozenHead(_Update):
    name = "frozen_head"

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        return Frozen()


@REMEDIES.component
class LocalLossRemedy(_Update):
    name = "local_loss"
    former_keys = (
        ("train.client_update", "remedies: [local_loss] or [frozen_head]"),
        ("train.align_every", "remedies.local_loss.align_every"),
    )

    class Settings(ComponentSettings):
        align_every: int = Field(
            0,
            ge=0,
            description="Every N-th step also fetch the server's gradient at the cut and train the auxiliary part "
            "(a low-rank map in front of the logit lens) to match it (FSL-SAGE); 0: never.",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if config.split.mode != "ushape":
            problems.append(
                "remedies.local_loss: needs split.mode=ushape (its auxiliary loss uses the final norm and LM head of "
                "the client's tail)"
            )
        return problems

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        if "tail" not in setup.stages:
            raise ValueError(f"client {setup.client_id}: local_loss needs a tail (a U-shaped split)")
        train = setup.config.train
        return LocalLoss(setup.stages["tail"], self.settings.align_every, train.lr, setup.seed)
