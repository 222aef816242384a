"""SIP: a learned inverter from smashed data back to tokens (the BiSR paper's "smashed-data inversion").

The attacker passes public auxiliary text through the *pretrained* head (it does not know the client's
adapters) and trains a small sequence model on (head output -> input ids) with per-position
cross-entropy. It then applies the inverter to the smashed data a client sent; the guess is the argmax.

The inverter is a bidirectional GRU over per-dimension standardised head outputs, plus a direct path from
each position's own vector, then a linear map to the vocabulary. By default (``tied=true``) that map is
factorised through the model's public token embeddings, ``logits = proj(h) @ E^T + b``: a token the
auxiliary text never shows still has a meaningful output row, which matters when the aux text is small
and the vocabulary large. ``noise`` replaces that share of auxiliary tokens by random ids, for the same
reason. A trained inverter is kept in ``ctx.cache`` under its options, so BiSR and repeated runs on the
same context reuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, parse_options, register_attack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SipOptions:
    steps: int = 120  # optimiser steps over auxiliary batches
    lr: float = 0.005  # AdamW peak learning rate (linear warm-up, then linear decay to 10%)
    hidden: int = 256  # GRU hidden size per direction
    bidirectional: bool = True  # read the whole sequence (the attack is offline)
    tied: bool = True  # factor the vocabulary map through the public token embeddings
    noise: float = 0.1  # share of aux tokens replaced by uniformly random ids
    aux_rows: int = 2000  # rows of auxiliary text to train on
    batch_size: int = 8  # aux sequences per step
    aux: str | None = None  # a data name for the aux text; default: the run's rows the client never saw

    def check(self) -> None:
        problems = []
        for name in ("steps", "hidden", "aux_rows", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be > 0")
        if not 0.0 <= self.noise < 1.0:
            problems.append("noise must be in [0, 1)")
        if problems:
            raise PrivacyError(f"sip options: {'; '.join(problems)}; fix them, e.g. steps=300 lr=0.003")


@contextlib.contextmanager
def seeded(ctx: AttackContext, salt: int = 0) -> Iterator[None]:
    """Run a block with the global RNG seeded from the run's seed, leaving the caller's RNG untouched."""
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((ctx.config.seed * 1_000_003 + salt) % 2**63)
        yield


class Inverter(nn.Module):
    """(B, T, d) head outputs -> (B, T, V) token logits."""

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        embeddings: torch.Tensor,
        hidden: int,
        bidirectional: bool,
        tied: bool,
    ) -> None:
        super().__init__()
        d = mean.shape[-1]
        vocab, d_embed = embeddings.shape
        self.register_buffer("mean", mean)  # (d,)
        self.register_buffer("std", std)  # (d,)
        self.gru = nn.GRU(d, hidden, batch_first=True, bidirectional=bidirectional)
        width = hidden * (2 if bidirectional else 1) + d
        self.tied = tied
        if tied:
            scale = embeddings.norm(dim=1).mean().clamp_min(1e-6)
            self.register_buffer("embeddings", embeddings / scale)  # (V, d_e), frozen
            self.proj = nn.Linear(width, d_embed)
            self.bias = nn.Parameter(torch.zeros(vocab))
        else:
            self.out = nn.Linear(width, vocab)

    def features(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) smashed data -> (B, T, F) per-position features."""
        x = (smashed - self.mean) / self.std * mask.unsqueeze(-1).to(smashed.dtype)  # (B, T, d)
        h, _ = self.gru(x)  # (B, T, H or 2H)
        return torch.cat([h, x], dim=-1)

    def vocabulary(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) features -> (..., V) token logits."""
        if self.tied:
            return self.proj(features) @ self.embeddings.T + self.bias
        return self.out(features)

    def forward(self, smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.vocabulary(self.features(smashed, mask))  # (B, T, V)


def _cache_key(ctx: AttackContext, options: SipOptions) -> str:
    fields = ",".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(options).items()))
    spec = ctx.spec
    return f"sip:{ctx.config.model.name}:{spec.mode}:{spec.head_layers}:{spec.tail_layers}:{fields}"


@torch.no_grad()
def _head_outputs(ctx: AttackContext, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ctx.stage("head")(input_ids=ids, attention_mask=mask).float()  # (B, T, d)


@torch.enable_grad()
def train_inverter(ctx: AttackContext, options: SipOptions) -> Inverter:
    """Train the SIP inverter on auxiliary text through the pretrained head (deterministic per seed)."""
    options.check()
    batches = [b.to(ctx.device) for b in ctx.aux_batches(options.aux_rows, options.batch_size, options.aux)]
    log.info(
        "sip: training on %d auxiliary sequences for %d steps", sum(len(b.input_ids) for b in batches), options.steps
    )
    embeddings = ctx.token_embeddings().float()  # (V, d)
    vocab = embeddings.shape[0]
    with seeded(ctx, salt=1):
        # Per-dimension statistics of the head's outputs on real aux positions (a few batches suffice).
        sample = torch.cat(
            [_head_outputs(ctx, b.input_ids, b.attention_mask)[b.attention_mask.bool()] for b in batches[:16]]
        )  # (N, d)
        mean, std = sample.mean(0), sample.std(0).clamp_min(1e-4)
        model = Inverter(mean, std, embeddings, options.hidden, options.bidirectional, options.tied).to(ctx.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
        warmup = max(1, options.steps // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 1.0 - 0.9 * (step - warmup) / max(1, options.steps - warmup)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        order: list[int] = []
        model.train()
        for step in range(options.steps):
            if not order:
                order = torch.randperm(len(batches)).tolist()
            batch = batches[order.pop()]
            ids, mask = batch.input_ids, batch.attention_mask
            if options.noise > 0:
                swap = torch.rand(ids.shape, device=ids.device) < options.noise
                ids = torch.where(swap, torch.randint_like(ids, vocab), ids)
            real = mask.bool()
            logits = model.vocabulary(model.features(_head_outputs(ctx, ids, mask), mask)[real])  # (N, V)
            loss = F.cross_entropy(logits, ids[real])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == options.steps - 1:
                log.info("sip step %d/%d: loss %.3f", step + 1, options.steps, loss.item())
    return model.eval()


def inverter(ctx: AttackContext, options: SipOptions | None = None) -> Inverter:
    """The SIP inverter for ``options``, trained once per context and kept in ``ctx.cache``."""
    options = options or SipOptions()
    key = _cache_key(ctx, options)
    if key not in ctx.cache:
        ctx.cache[key] = train_inverter(ctx, options)
    return ctx.cache[key]


@torch.no_grad()
def sip_logits(
    ctx: AttackContext, smashed: torch.Tensor, mask: torch.Tensor, options: SipOptions | None = None
) -> torch.Tensor:
    """SIP's (B, T, V) token logits for smashed data (B, T, d) with its (B, T) attention mask."""
    model = inverter(ctx, options)
    width = int(model.mean.shape[0])
    if smashed.shape[-1] != width:
        raise PrivacyError(
            f"SIP was trained on {width}-dim head outputs but the smashed data has {smashed.shape[-1]} dims "
            "(a defense or codec changed its width); attack a run whose smashed data keeps the model's width"
        )
    return model(smashed.to(ctx.device).float(), mask.to(ctx.device))


@dataclass
class SipAttack:
    name: ClassVar[str] = "sip"
    options: SipOptions

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        return sip_logits(ctx, obs.smashed, obs.attention_mask, self.options).argmax(-1)  # (B, T)


def sip_options(options: dict[str, str], prefix: str = "sip_") -> SipOptions:
    """SIP options given to another attack as ``sip_<name>=value`` (e.g. ``sip_steps=500``)."""
    picked = {k[len(prefix) :]: v for k, v in options.items() if k.startswith(prefix)}
    sip = parse_options(SipOptions, picked)
    sip.check()
    return sip


@register_attack("sip")
def make_sip(options: dict[str, str]) -> SipAttack:
    parsed = parse_options(SipOptions, options)
    parsed.check()
    return SipAttack(parsed)
