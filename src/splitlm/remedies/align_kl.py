"""Aligning the clients' smashed data: FlexP-SFL's KL regularization (survey §3.1.1), ``remedies: {align_kl:
{weight: lambda}}``.

Non-IID clients push their heads' outputs (the smashed data) apart, and the trunk has to serve them all. With
weight lambda each client adds

    lambda x KL( N(mu_c, var_c) || N(mu_s, var_s) )

to its loss. ``mu_c`` / ``var_c`` (d,) are the per-feature mean and (population) variance of its head's
output over the micro-batch's real tokens (attention_mask = 1), differentiable in the head's output;
``mu_s`` / ``var_s`` (d,) are the server's running average of every client's smashed-data statistics,
constants on the client. Both Gaussians are diagonal; the KL is taken per feature, with ``EPS`` added to
both variances, and **averaged over the d features** (not summed), so that lambda means the same at every
hidden width:

    KL = mean_j 1/2 [ log(vs_j / vc_j) + (vc_j + (mu_c_j - mu_s_j)^2) / vs_j - 1 ],   vc = var_c + eps, vs = var_s + eps

The term is scaled like every other loss of a micro-batch (1 / micro-batches of the step) and joins the
head's backward (step 10): the head gets the server's gradient plus lambda x dKL/dh.

The server half is a server mod, ``AlignStats`` (the remedy's ``server_mod``: the server's pipeline puts it
innermost, after the server's codec, so it sees decoded smashed data). On each *training* ``forward`` request
(never ``eval``) it computes the per-feature mean and variance of the arriving ``hidden`` over its real tokens
and, once the trunk has served the request, folds them into an exponential moving average

    running = DECAY x running + (1 - DECAY) x this micro-batch's,     DECAY = 0.9

(the first micro-batch sets the average), one micro-batch one weight whatever its size, then attaches the
running mean and variance (after this micro-batch's update) to the reply as ``align_mean`` / ``align_var``
(float32, (d,)): the ``activations`` reply in a U-shaped split, the ``loss`` reply in a vanilla one. Nothing
new leaves the client: the server sees the smashed data anyway; the replies grow by 2 x d floats. The
client's codec and defenses pass tensors they do not know through untouched.

One average serves every client (one per feature width, should widths differ). With clients training at
once, forwards are folded in the order the server serves them, so such runs are reproducible only up to that
order; the average is neither checkpointed nor rolled back with a failed round (it restarts on resume).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from pydantic import Field

from splitlm.config import Config
from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy
from splitlm.runtime.plugins import ClientPlugin, Micro
from splitlm.transport import Mod
from splitlm.transport.base import Answer, Handler, then
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)

DECAY = 0.9  # the server's running average: running = DECAY x running + (1 - DECAY) x micro-batch's statistics
EPS = 1e-5  # added to both variances in the KL
MEAN, VAR = "align_mean", "align_var"  # the reply tensors that carry the server's running statistics
REPLIES = ("activations", "loss")  # the replies to a training forward (U-shaped, vanilla)

Moments = tuple[torch.Tensor, torch.Tensor]  # per-feature (mean, variance), each (d,)


def feature_moments(hidden: torch.Tensor, mask: torch.Tensor | None) -> Moments | None:
    """Per-feature mean and population variance (float32, (d,) each) of ``hidden`` (B, T, d) over its real
    tokens (``mask`` (B, T) or (1, T) != 0; None or a mask of another shape: every token); differentiable in
    ``hidden``. None when no token is real."""
    hidden = hidden.float()
    weights = _token_weights(hidden, mask)  # (B, T, 1)
    count = weights.sum()
    if float(count) == 0:
        return None
    mean = (hidden * weights).sum(dim=(0, 1)) / count  # (d,)
    var = ((hidden - mean).pow(2) * weights).sum(dim=(0, 1)) / count  # (d,)
    return mean, var


def _token_weights(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, tokens = hidden.shape[:2]
    if mask is None or mask.dim() != 2 or mask.shape[1] != tokens or mask.shape[0] not in (1, batch):
        return hidden.new_ones(batch, tokens, 1)
    return (mask.to(hidden.device) != 0).to(hidden.dtype).expand(batch, tokens).unsqueeze(-1)


def gaussian_kl(client: Moments, server: Moments, eps: float = EPS) -> torch.Tensor:
    """KL( N(mu_c, var_c) || N(mu_s, var_s) ) of diagonal Gaussians, averaged over the features (a scalar)."""
    mu_c, var_c = client
    mu_s, var_s = (t.to(device=mu_c.device, dtype=mu_c.dtype) for t in server)
    var_c, var_s = var_c + eps, var_s + eps
    per_feature = 0.5 * (torch.log(var_s / var_c) + (var_c + (mu_c - mu_s).pow(2)) / var_s - 1.0)
    return per_feature.mean()


class Alignment(ClientPlugin):
    """The client half: lambda x KL between its head's output and the server's running statistics."""

    name = "align_kl"

    def __init__(self, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"the alignment's weight is {weight}; expected lambda > 0 (remedies.align_kl.weight)")
        self.weight = weight
        self._warned = False

    def reference(self, reply: Message) -> Moments | None:
        """The server's running (mean, variance) a forward's reply carries; None (warned once) without them."""
        mean, var = reply.tensors.get(MEAN), reply.tensors.get(VAR)
        if mean is not None and var is not None:
            return mean, var
        if not self._warned:
            self._warned = True
            log.warning(
                "remedies.align_kl: client %s got a reply without the server's running statistics; that micro-batch "
                "has no alignment term (run the server with the same remedies.align_kl)",
                reply.client_id,
            )
        return None

    def loss(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, reference: Moments, scale: float
    ) -> torch.Tensor | None:
        """lambda x ``scale`` x KL of ``hidden`` (B, T, d), the head's output, against ``reference``; None when
        ``hidden`` has no real token or no graph."""
        if not hidden.requires_grad:
            return None
        moments = feature_moments(hidden, mask)
        if moments is None:
            return None
        return gaussian_kl(moments, reference) * (self.weight * scale)

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        if micro.reply is None or micro.hidden is None:
            return None
        reference = self.reference(micro.reply)
        if reference is None:
            return None
        return self.loss(micro.hidden, micro.batch.attention_mask, reference, micro.scale)


class AlignStats(Mod):
    """The server half: the running average of the smashed data's statistics, sent back with each training
    forward's reply (``DECAY``: its decay)."""

    name = "align"

    def __init__(self, decay: float = DECAY) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the running average's decay is {decay}; expected 0 <= decay < 1")
        self.decay = decay
        self.running: dict[int, Moments] = {}  # feature width -> (mean, variance), float32 (d,)
        self._lock = threading.Lock()

    def serve(self, message: Message, call_next: Handler) -> Answer:
        hidden = message.tensors.get("hidden")
        if message.kind != "forward" or hidden is None or hidden.dim() != 3:
            return call_next(message)
        with torch.no_grad():
            moments = feature_moments(hidden.detach(), message.tensors.get("attention_mask"))
        if moments is None or not all(bool(torch.isfinite(t).all()) for t in moments):
            return call_next(message)  # nothing to learn from (the server refuses non-finite smashed data)
        return then(call_next(message), lambda reply: self._attach(reply, moments))

    def update(self, moments: Moments) -> Moments:
        """Fold one micro-batch's (mean, variance) into the running average of its width; the new average."""
        mean, var = (t.detach().float() for t in moments)
        with self._lock:
            previous = self.running.get(mean.shape[0])
            if previous is not None:
                mean = self.decay * previous[0].to(mean.device) + (1.0 - self.decay) * mean
                var = self.decay * previous[1].to(var.device) + (1.0 - self.decay) * var
            self.running[mean.shape[0]] = (mean, var)
            return mean, var

    def _attach(self, reply: Message, moments: Moments) -> Message:
        """A served training forward: update the average, and send it back with the reply."""
        if reply.kind not in REPLIES:
            return reply
        mean, var = self.update(moments)
        return reply.replace({**reply.tensors, MEAN: mean.clone(), VAR: var.clone()})


@REMEDIES.component
class AlignKL(Remedy):
    name = "align_kl"
    former_keys = (("train.align_kl", "remedies.align_kl.weight"),)

    class Settings(ComponentSettings):
        weight: float = Field(
            0.1,
            ge=0,
            allow_inf_nan=False,
            description="lambda: the weight of KL(client || server) between the per-feature Gaussian of the head's "
            "output at the cut and the server's running average of every client's (0: off).",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if settings.weight and framework is not None and not framework.split:
            return [
                "remedies.align_kl: aligns a split client's head output with the server's statistics at the cut; "
                f"framework.name={framework.name} has no cut, so remove it from remedies"
            ]
        return []

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        return Alignment(self.settings.weight) if self.settings.weight > 0 else None

    def server_mod(self, config: Config) -> Mod | None:
        return AlignStats() if self.settings.weight > 0 else None
