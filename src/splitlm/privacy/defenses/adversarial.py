"""Attacker-aware training (ResSFL, Li et al., CVPR 2022; survey §5.2.2): the head learns against a simulated inverter.

The client keeps a small inverter of its own (``SimulatedInverter``: a bidirectional GRU over per-dimension
standardised head outputs plus each position's own vector, mapped to the vocabulary through the public token
embeddings: the architecture of the SIP attack's inverter, ``privacy/attacks/sip.py``, rebuilt here because
training never imports the attacks). Each client step alternates two moves:

(a) the inverter's step (``after_step``, after the client's optimizer step): it trains with its own AdamW on
    (head output, detached -> the true input ids) of the step's micro-batches, ``inverter_steps`` passes; the head
    output is what crossed the cut (after any message defense such as ``smashed_noise``; codecs excepted);
(b) the head's step (``head_loss``, joined to the head's backward): the head's loss gets
    ``weight * (log V - H(softmax(inverter(hidden))))`` averaged over real tokens (``objective=entropy``, the
    default: the head is pushed to make the inverter maximally unsure; bounded in [0, log V] and stable), or
    ``-weight * min(CE(inverter(hidden), ids), log V)`` (``objective=ce``: ResSFL's negated attacker loss, cut at
    log V, where the inverter is no better than chance, so that it cannot run away). The inverter's own weights
    get no gradient from this term: it sees them as constants.

``pretrain_steps`` > 0 first trains the inverter on the client's own examples through the PUBLIC pretrained head
(what an attacker starts from), once; the result is kept as safetensors under ``<output_dir>/cache/`` keyed by
the settings, the model, the split, the seed and the examples, and reused by later runs.

``step_metrics`` reports ``adversarial_inverter_acc`` (the inverter's top-1 token accuracy on the step's head
outputs, before its own update: how much a freshly trained attacker of the same kind recovers) and
``adversarial_inverter_loss``.

What it costs: the inverter's parameters and AdamW state on the client (``3 x (3 x 2 x (H x (d + H) + 2H) +
(2H + d) x d_e + V)`` floats for GRU width H, cut width d, embedding width d_e and vocabulary V; the public token
embeddings are shared, not copied) and one inverter forward+backward per micro-batch and per inverter step. The
protection is against an inverter of this kind trained on this head; the head may still leak to a different or
stronger attacker, which the privacy benchmark measures.

Measured (default model, U-shape 2/2, the ``base`` settings of benchmarks/privacy.py, 20 steps, one seed, public
threat model, SIP with default options; no defense: SIP ROUGE-L 0.99 at held-out ppl 100.9): with
``lora.head.method=full``, weight 1: SIP 0.52 at ppl 220 (+118 %); weight 0.3: SIP 0.85 at ppl 155 (+54 %).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from splitlm.data import collate
from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense
from splitlm.registry import ComponentSettings
from splitlm.runtime.plugins import Micro

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class SimulatedInverter(nn.Module):
    """(B, T, d) head outputs -> (B, T, V) token logits (SIP's architecture, smaller by default)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, embeddings: torch.Tensor, hidden: int) -> None:
        super().__init__()
        d = mean.shape[-1]
        vocab, d_embed = embeddings.shape
        self.register_buffer("mean", mean.clone())  # (d,)
        self.register_buffer("std", std.clone())  # (d,)
        self.gru = nn.GRU(d, hidden, batch_first=True, bidirectional=True)
        scale = embeddings.norm(dim=1).mean().clamp_min(1e-6)
        self.register_buffer("embeddings", embeddings / scale, persistent=False)  # (V, d_e), public, frozen
        self.proj = nn.Linear(2 * hidden + d, d_embed)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (hidden.float() - self.mean) / self.std * mask.unsqueeze(-1).float()  # (B, T, d)
        h, _ = self.gru(x)  # (B, T, 2H)
        return self.proj(torch.cat([h, x], dim=-1)) @ self.embeddings.T + self.bias  # (B, T, V)


@DEFENSES.component
class Adversarial(InputDefense):
    name = "adversarial"

    class Settings(ComponentSettings):
        weight: float = Field(
            0.5, ge=0, description="Weight of the adversarial term in the head's loss (0: the inverter only watches)."
        )
        objective: Literal["entropy", "ce"] = Field(
            "entropy",
            description="entropy: push the inverter's prediction toward uniform (log V - entropy, bounded, stable); "
            "ce: maximise the inverter's cross-entropy, cut at log V.",
        )
        hidden: int = Field(64, ge=1, description="GRU width (per direction) of the simulated inverter.")
        lr: float = Field(0.003, gt=0, description="AdamW learning rate of the simulated inverter.")
        inverter_steps: int = Field(
            1, ge=1, description="Passes of the inverter over the step's micro-batches after each client step."
        )
        pretrain_steps: int = Field(
            0,
            ge=0,
            description="Steps to pre-train the inverter once on the client's own data through the public head "
            "before training (cached under <output_dir>/cache); 0: it starts untrained.",
        )
        pretrain_batch_size: int = Field(8, ge=1, description="Sequences per pre-training step.")

    @classmethod
    def problems(cls, settings: Settings, config: object, framework: object) -> list[str]:
        found = super().problems(settings, config, framework)
        if found or config is None:
            return found
        head = config.lora.part("head")  # type: ignore[attr-defined]
        if head.method == "frozen" and settings.weight > 0:
            found.append(
                f"privacy.defenses.{cls.name}: trains the head against an inverter, but lora.head.method=frozen; "
                "set lora.head.method to lora or full, or weight=0"
            )
        return found

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, settings)

    def __init__(self, context: DefenseContext, settings: Settings) -> None:
        self.context = context
        self.settings = settings
        self.weight = float(settings.weight)
        self.embeddings = context.token_embeddings.float()  # (V, d_e)
        self.log_vocab = math.log(self.embeddings.shape[0])
        self.inverter: SimulatedInverter | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (hidden, mask, ids) of this step
        self.correct = 0
        self.seen = 0
        self.loss_sum = 0.0
        self.salt = zlib.crc32(self.name.encode())

    # --- the inverter ------------------------------------------------------------------------------------

    def _build(self, real: torch.Tensor) -> SimulatedInverter:
        """The inverter (seeded), its per-dimension statistics taken from head outputs ``real`` (N, d)."""
        real = real.detach().float()
        mean = real.mean(0)
        std = real.std(0).clamp_min(1e-4) if len(real) > 1 else torch.ones_like(mean)
        with torch.random.fork_rng(devices=[real.device] if real.device.type == "cuda" else []):
            torch.manual_seed(self.context.seed * 1_000_003 + self.salt)
            model = SimulatedInverter(mean, std, self.embeddings.to(real.device), self.settings.hidden)
        return model.to(real.device)

    def _ensure(self, hidden: torch.Tensor, mask: torch.Tensor) -> SimulatedInverter:
        if self.inverter is None:
            self.inverter = self._pretrained(hidden.device) or self._build(hidden[mask.bool()])
            self.optimizer = torch.optim.AdamW(self.inverter.parameters(), lr=self.settings.lr, weight_decay=0.01)
        return self.inverter

    def _train_on(self, hidden: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> float:
        assert self.inverter is not None and self.optimizer is not None
        real = mask.bool()
        with torch.enable_grad():
            logits = self.inverter(hidden, mask)[real]  # (N, V)
            loss = F.cross_entropy(logits, ids[real])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.inverter.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())

    def _cache_path(self) -> Path | None:
        ctx = self.context
        if ctx.cache_dir is None:
            return None
        digest = hashlib.sha256()
        for example in ctx.examples:
            digest.update(json.dumps(example.input_ids).encode())
        identity = {
            "version": CACHE_VERSION,
            "settings": self.settings.model_dump(include={"hidden", "lr", "pretrain_steps", "pretrain_batch_size"}),
            "model": ctx.model_key,
            "mode": ctx.mode,
            "seed": ctx.seed,
            "vocab": int(self.embeddings.shape[0]),
            "examples": digest.hexdigest(),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return ctx.cache_dir / f"adversarial-{key}.safetensors"

    @torch.no_grad()
    def _pretrained(self, device: torch.device) -> SimulatedInverter | None:
        """The inverter pre-trained on the client's examples through the public head (cached), or None."""
        steps = self.settings.pretrain_steps
        ctx = self.context
        if steps == 0:
            return None
        if ctx.public_stage is None or not ctx.examples:
            raise PrivacyError(
                "adversarial: pretrain_steps needs the client's examples and the public head, which this client "
                "does not have; set privacy.defenses.adversarial.pretrain_steps=0"
            )
        head = ctx.public_stage("head")
        size = self.settings.pretrain_batch_size
        batches = [collate(ctx.examples[i : i + size], ctx.pad_id) for i in range(0, len(ctx.examples), size)]
        batches = [b.to(device) for b in batches]
        real = [head(input_ids=b.input_ids, attention_mask=b.attention_mask)[b.attention_mask > 0] for b in batches[:9]]
        model = self._build(torch.cat(real))  # (N, d): statistics of the public head's outputs
        path = self._cache_path()
        if path is not None and path.is_file():
            try:
                state = load_file(str(path), device=str(device))
                model.load_state_dict(state)
                log.info("adversarial: pre-trained inverter read from %s", path)
                return model
            except (OSError, RuntimeError, ValueError) as error:
                log.warning("adversarial: cannot read %s (%s); pre-training again", path, error)
        self.inverter = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.settings.lr, weight_decay=0.01)
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + self.salt + 1)
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            b = batches[order.pop()]
            hidden = head(input_ids=b.input_ids, attention_mask=b.attention_mask).float()
            loss = self._train_on(hidden, b.attention_mask, b.input_ids)
            if step % 50 == 0 or step == steps - 1:
                log.info("adversarial: pre-training step %d/%d: loss %.3f", step + 1, steps, loss)
        self.inverter = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
            tmp.replace(path)
        return model

    # --- the hooks ---------------------------------------------------------------------------------------

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        # what the server received (after the message defenses before this one, e.g. noise), else the head's output
        sent = micro.sent if micro.sent is not None and micro.sent.requires_grad else None
        hidden, batch = (sent if sent is not None else micro.hidden), micro.batch
        if hidden is None or not hidden.requires_grad:
            return None
        mask, ids = batch.attention_mask.to(hidden.device), batch.input_ids.to(hidden.device)
        inverter = self._ensure(hidden, mask)
        self.pending.append((hidden.detach(), mask, ids))
        real = mask.bool()
        if not real.any():
            return None
        inverter.requires_grad_(False)  # the head's term treats the inverter as a constant
        try:
            logits = inverter(hidden, mask)[real]  # (N, V)
        finally:
            inverter.requires_grad_(True)
        with torch.no_grad():
            self.correct += int((logits.argmax(-1) == ids[real]).sum())
            self.seen += int(real.sum())
        if self.weight == 0:
            return None
        if self.settings.objective == "entropy":
            logp = F.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            term = self.log_vocab - entropy
        else:
            term = -F.cross_entropy(logits, ids[real]).clamp(max=self.log_vocab)
        return self.weight * term * micro.scale

    def after_step(self, step: int) -> None:
        if self.inverter is None:
            return
        self.loss_sum = 0.0
        count = 0
        for _ in range(self.settings.inverter_steps):
            for hidden, mask, ids in self.pending:
                if mask.any():
                    self.loss_sum += self._train_on(hidden, mask, ids)
                    count += 1
        self.loss_sum /= max(count, 1)
        self.pending = []

    def step_metrics(self, step: int) -> dict[str, float]:
        if not self.seen:
            return {}
        out = {"adversarial_inverter_acc": self.correct / self.seen, "adversarial_inverter_loss": self.loss_sum}
        self.correct = self.seen = 0
        return out
