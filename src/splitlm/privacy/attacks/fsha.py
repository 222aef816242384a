"""FSHA, the feature-space hijacking attack: a malicious server that steers the client's head.

Pasquini et al. (CCS 2021): instead of the gradient of the training loss, the server returns, for the smashed
data, the gradient of an adversarial loss. Its discriminator D tells the features of the attacker's *pilot*
network f~ (on public text) from the client's smashed data; the forged gradient pushes the client's head f
to make its smashed data look like pilot features. The attacker trains f~ together with a decoder f~^-1 as
an autoencoder on public text, so once f maps into f~'s feature space, f~^-1 reads the client's tokens back
from what it sends (``Fsha.reconstruct``).

``Fsha`` is a server attack (``privacy.server_attack: fsha``, registered in ``privacy.server_attack``'s
``SERVER_ATTACKS`` by this module's name, so the training code asks for it by name and never imports it): a
server-side mod (``transport/mods.py``) around the honest server: the honest server keeps
running underneath, so the client sees ordinary replies (real trunk outputs in U-shape, a real loss in
a vanilla split), but the ``grad`` of a U-shape ``gradients`` reply, or of a vanilla ``loss`` reply, is
replaced by the forged one, of the same shape and dtype, zero on padding. Its norm is a running mean of the
norms of the honest gradients computed so far (times ``gradient_scale``), so it is plausible in size and, like
its direction, does not depend on the labels of the batch at hand: that is what a label-probing detector
(``splitlm.privacy.detectors.splitguard``) notices.

The attacker's networks (all per token, float32, on the trunk's device):

- pilot f~: token ids -> (B, T, d); the public pretrained token embeddings plus a residual MLP;
- decoder f~^-1: (B, T, d) -> (B, T, V) logits; an MLP;
- discriminator D: (B, T, d) -> (B, T) logits, 1 = pilot feature, 0 = client's smashed data (BCE loss).

Each training ``forward`` runs one autoencoder step of (f~, f~^-1) on a public batch and ``disc_steps`` steps
of D on (f~ of that batch, the smashed data received). The forged gradient is that of the non-saturating
generator loss, mean over real tokens of -log sigmoid(D(smashed)).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from splitlm.config import Config
from splitlm.data import Batch
from splitlm.models import ModelSource, Stage
from splitlm.privacy.knowledge import PublicKnowledge
from splitlm.privacy.server_attack import SERVER_ATTACKS, ServerAttack
from splitlm.privacy.tap import Key
from splitlm.registry import ComponentSettings
from splitlm.transport import Answer, Handler, Message
from splitlm.transport.base import then

log = logging.getLogger(__name__)


class _Pilot(nn.Module):
    """f~: token ids -> per-token features (B, T, d): public embeddings + a residual MLP."""

    def __init__(self, embeddings: torch.Tensor, width: int) -> None:
        super().__init__()
        d = embeddings.shape[1]
        self.embed = nn.Embedding.from_pretrained(embeddings.clone(), freeze=False)
        self.mlp = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)  # (B, T, d)
        return e + self.mlp(e)


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2),
                         nn.Linear(width, d_out))  # fmt: skip


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) ``values`` over the positions where ``mask`` is 1."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class FshaSettings(ComponentSettings):
    lr: float = Field(1e-3, gt=0, description="Learning rate of the attacker's pilot, decoder and discriminator.")
    aux_rows: int = Field(512, ge=8, description="Public auxiliary rows the attacker trains its pilot/decoder on.")
    gradient_scale: float = Field(
        1.0,
        gt=0,
        description="Norm of the forged gradient sent to the client, as a multiple of the running mean of the "
        "honest gradients' norms.",
    )
    width: int = Field(256, ge=8, description="Hidden width of the attacker's pilot, decoder and discriminator.")
    disc_steps: int = Field(
        1, ge=1, description="Discriminator updates per training forward (pilot features vs smashed data)."
    )


@SERVER_ATTACKS.component
class Fsha(ServerAttack):
    """A malicious server: the honest server underneath, forged gradients for the smashed data on top."""

    name = "fsha"
    former_keys = (("privacy.fsha", "privacy.server_attack.fsha"),)
    Settings = FshaSettings

    @classmethod
    def create(cls, settings: FshaSettings, config: Config, source: ModelSource, trunk: Stage) -> Fsha:
        return cls(settings, config, source, trunk)

    @classmethod
    def problems(cls, settings: FshaSettings, config: Config, framework: Any) -> list[str]:
        if framework is not None and not framework.split:
            return [
                f"privacy.server_attack.fsha: forges a split server's gradients; framework.name={framework.name} "
                "has no server"
            ]
        if config.framework.num_clients != 1 or config.transport.name != "inprocess":
            return [
                "privacy.server_attack.fsha: the attack is simulated for one in-process client: set "
                "framework.num_clients=1 and transport.name=inprocess"
            ]
        return []

    def __init__(self, settings: FshaSettings, config: Config, source: ModelSource, trunk_stage: Stage) -> None:
        self.settings = settings
        self.device = trunk_stage.device
        ctx = self.knowledge = PublicKnowledge(config, source, device=str(self.device))
        aux = ctx.aux_batches(self.settings.aux_rows, config.train.batch_size)
        self.aux: list[Batch] = [b.to(self.device) for b in aux]  # public text: the pilot's training data
        embeddings = ctx.token_embeddings().float()  # (V, d)
        vocab, d = embeddings.shape
        width = self.settings.width
        with torch.random.fork_rng(devices=[]):  # the attacker's randomness leaves the run's untouched
            torch.manual_seed(config.seed)
            self.pilot = _Pilot(embeddings.cpu(), width).to(self.device)
            self.decoder = nn.Sequential(nn.LayerNorm(d), _mlp(d, width, vocab)).to(self.device)
            self.discriminator = _mlp(d, width, 1).to(self.device)
        lr = self.settings.lr
        self.autoencoder_opt = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=lr)
        self.discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.scale: float | None = None  # RMS of the first smashed data received: D's fixed input scale
        self.honest_norm: float | None = None  # running mean of the honest gradients' norms
        self.history: list[dict[str, float]] = []  # per training forward: the attacker's losses
        self._pending: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}  # U-shape: smashed data until backward
        self._lock = threading.Lock()
        log.info("FSHA: the server forges the gradients of the smashed data (%d public batches)", len(self.aux))

    # --- the wrapper ---------------------------------------------------------------------------------------

    def serve(self, message: Message, call_next: Handler) -> Answer:
        if message.kind == "forward" and "hidden" in message.tensors:
            with self._lock:
                self._observe(message)
        answer = call_next(message)
        if message.kind not in ("forward", "backward"):
            return answer
        key = message.key
        return then(answer, lambda reply: self._forge(key, reply))

    def _observe(self, message: Message) -> None:
        """A training forward: train the attacker's networks on it, keep its smashed data for the forgery."""
        smashed = message.tensors["hidden"].detach().to(self.device, torch.float32)  # (B, T, d)
        mask = message.tensors.get("attention_mask")
        mask = torch.ones(smashed.shape[:2], device=self.device) if mask is None else mask.to(self.device).float()
        if self.scale is None:
            rms = (smashed.pow(2).sum(-1) * mask).sum() / (mask.sum().clamp_min(1.0) * smashed.shape[-1])
            self.scale = max(float(rms.sqrt()), 1e-6)
        self.history.append(self._train(smashed, mask))
        self._pending[message.client_id, message.step, message.micro] = (smashed, mask)
        while len(self._pending) > 64:  # forwards whose backward never came (want_grad=False, a lost client)
            self._pending.pop(next(iter(self._pending)))

    def _train(self, smashed: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        index = int(torch.randint(len(self.aux), (1,), generator=self.generator))
        batch = self.aux[index]
        real = batch.attention_mask.float()
        # the autoencoder (f~, f~^-1) on public text
        logits = self.decoder(self.pilot(batch.input_ids))  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1), batch.input_ids.flatten(), reduction="none")
        ae_loss = _masked_mean(ce.view_as(real), real)
        self.autoencoder_opt.zero_grad(set_to_none=True)
        ae_loss.backward()
        self.autoencoder_opt.step()
        # D: pilot features (1) against the client's smashed data (0)
        with torch.no_grad():
            pilot = self.pilot(batch.input_ids)
        d_loss = torch.zeros((), device=self.device)
        for _ in range(self.settings.disc_steps):
            on_pilot = self._discriminate(pilot)
            on_client = self._discriminate(smashed)
            d_loss = _masked_mean(F.softplus(-on_pilot), real) + _masked_mean(F.softplus(on_client), mask)
            self.discriminator_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.discriminator_opt.step()
        return {"autoencoder_loss": float(ae_loss.detach()), "discriminator_loss": float(d_loss.detach())}

    def _discriminate(self, features: torch.Tensor) -> torch.Tensor:
        return self.discriminator(features / (self.scale or 1.0)).squeeze(-1)  # (B, T) logits: pilot or not

    def _forge(self, key: Key, reply: Message) -> Message:
        """Replace the honest ``grad`` of the smashed data in ``reply`` by the adversarial one."""
        if reply.kind not in ("gradients", "loss"):
            return reply  # U-shape activations: the gradient comes with the backward
        honest = reply.tensors.get("grad")
        with self._lock:
            pending = self._pending.pop(key, None)
            if honest is None or pending is None:
                return reply
            forged = self._adversarial_grad(*pending, honest)
        return Message(reply.kind, reply.client_id, reply.step, reply.micro, {**reply.tensors, "grad": forged},
                       dict(reply.meta))  # fmt: skip

    def _adversarial_grad(self, smashed: torch.Tensor, mask: torch.Tensor, honest: torch.Tensor) -> torch.Tensor:
        """d/d(smashed) of the generator loss, sized like the honest gradients seen so far. (B, T, d)"""
        leaf = smashed.detach().requires_grad_(True)
        loss = _masked_mean(F.softplus(-self._discriminate(leaf)), mask)  # -log sigmoid(D): look like the pilot
        (grad,) = torch.autograd.grad(loss, leaf)
        grad = grad * mask.unsqueeze(-1)
        honest_norm = float(honest.detach().float().norm())
        target = honest_norm if self.honest_norm is None else self.honest_norm
        self.honest_norm = honest_norm if self.honest_norm is None else 0.9 * self.honest_norm + 0.1 * honest_norm
        norm = float(grad.norm())
        if norm > 0:
            grad = grad * (self.settings.gradient_scale * target / norm)
        return grad.to(device=honest.device, dtype=honest.dtype).reshape(honest.shape)

    # --- what the attacker gets out of it -------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, smashed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's guess of the (B, T) token ids behind received (B, T, d) smashed data."""
        with self._lock:
            logits = self.decoder(smashed.to(self.device, torch.float32))  # (B, T, V)
        ids = logits.argmax(-1)
        if mask is not None:
            ids = torch.where(mask.to(ids.device).bool(), ids, torch.zeros_like(ids))
        return ids.to(smashed.device)

    def report(self) -> dict[str, Any]:
        """The attacker's last losses (for benchmarks and logs)."""
        return dict(self.history[-1]) if self.history else {}
