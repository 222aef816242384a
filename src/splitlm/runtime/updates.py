"""How the client's head learns, and what that saves on the wire (survey §4.3.2 and §4.5.1).

Every split step normally ends with step 9: the server sends the gradient at the head's output, and the
client waits for it before its head can step. A ``ClientUpdate`` decides, per step, whether the client asks
for that gradient and waits for it (``waits``), whether the head trains at all (``trains_head``), and what
local loss, if any, drives the head instead (``local_loss``). ``train.client_update`` and
``train.client_update_every`` pick one:

| update            | step 9                  | the head learns from                         | method              |
|-------------------|-------------------------|----------------------------------------------|---------------------|
| ``split``         | every step              | the server's gradient                        | SL                  |
| ``split`` + ``H`` | every H-th step         | the server's gradient, on those steps only   | CSE-FSL             |
| ``local_loss``    | never (or align steps)  | a logit-lens loss on its own output          | LocSplitFed, FSL-SAGE |
| ``frozen``        | never                   | nothing: the client only streams activations | StreamSL            |

The logit lens applies the tail's final norm and LM head (frozen, pretrained) to the head's output, so the
head gets a next-token loss of its own. With ``train.align_every=N`` the client also fetches the server's
gradient every N-th step and trains a small low-rank map in front of the lens so that the local loss's
gradient at the cut matches the server's (FSL-SAGE's alignment); the head itself still learns from the local
loss only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitlm.config import Config
from splitlm.errors import ConfigError
from splitlm.models.split import Stage
from splitlm.runtime.loss import causal_lm_loss

ALIGN_RANK = 16  # rank of the auxiliary map trained by alignment


def logit_lens(tail: Stage, hidden: torch.Tensor) -> torch.Tensor:
    """The tail's final norm and LM head applied to ``hidden`` (B, T, d) -> logits (B, T, V)."""
    hidden = hidden.to(device=tail.device, dtype=tail.dtype)
    return tail.family.finish(tail, tail.config, hidden)


class ClientUpdate:
    """``split``: the head learns from the server's gradient on steps where ``every`` divides the step number
    (every step by default); on the others the client neither asks for nor waits for step 9."""

    name = "split"

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

    def local_loss(self, hidden: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor | None:
        """A loss of the head's own, backpropagated into the head (None: none)."""
        return None

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        """See the server's gradient at the cut of a step that waited for it."""


class Frozen(ClientUpdate):
    """``frozen`` (StreamSL): the head never trains, so the client never asks for step 9."""

    name = "frozen"

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

    def local_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, scale: float, trains_aux: bool = False
    ) -> torch.Tensor | None:
        """The head's loss; the auxiliary map only learns by alignment (``trains_aux`` there)."""
        total, count = causal_lm_loss(logit_lens(self.tail, self.aux(hidden, trainable=trains_aux)), labels)
        return total / max(count, 1) * scale

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        """One step of the auxiliary map on || d(local loss)/dh - server gradient ||^2 / ||server gradient||^2."""
        point = hidden.detach().requires_grad_(True)
        loss = self.local_loss(point, labels, scale, trains_aux=True)
        assert loss is not None
        (local,) = torch.autograd.grad(loss, point, create_graph=True)
        target = grad.to(device=local.device, dtype=local.dtype)
        mismatch = (local - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
        self.optimizer.zero_grad(set_to_none=True)
        mismatch.backward(inputs=list(self.aux.parameters()))
        self.optimizer.step()
        self.alignment = float(mismatch.detach())


def make_update(config: Config, stages: dict[str, Stage]) -> ClientUpdate:
    """The client's update from ``train.client_update`` / ``client_update_every`` / ``align_every``."""
    train = config.train
    if train.client_update == "frozen":
        return Frozen()
    if train.client_update == "local_loss":
        if "tail" not in stages:
            raise ConfigError("train.client_update=local_loss needs split.mode=ushape (the tail's LM head)")
        return LocalLoss(stages["tail"], train.align_every, train.lr, config.seed)
    return ClientUpdate(train.client_update_every)


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


def keep_fraction(prune: str) -> float | None:
    """The fraction ``data.prune=el2n:F`` keeps (None for ``none``)."""
    if prune == "none":
        return None
    return float(prune.partition(":")[2])


def most_informative(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ceil(fraction * B) rows with the highest scores; ties keep the earlier row."""
    keep = max(1, math.ceil(fraction * scores.numel() - 1e-9))
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)
