"""SIP: a learned inverter from smashed data back to tokens (the BiSR paper's "smashed-data inversion").

The attacker passes public auxiliary text through its copy of the client (``AttackContext.simulate``: the head
per the threat model, the *pretrained* one under ``public``, the client's current one under ``inside``, with the
run's defenses and their settings, noise included) and trains a small sequence model on (smashed data -> input
ids) with per-position cross-entropy. It then applies the inverter to the smashed data a client sent; the guess
is the argmax.

The inverter is a bidirectional GRU over per-dimension standardised head outputs, plus a direct path from
each position's own vector, then a linear map to the vocabulary. By default (``tied=true``) that map is
factorised through the model's public token embeddings, ``logits = proj(h) @ E^T + b``: a token the
auxiliary text never shows still has a meaningful output row, which matters when the aux text is small
and the vocabulary large. ``noise`` replaces that share of auxiliary tokens by random ids, for the same
reason.

A trained inverter is kept in ``ctx.cache`` under its options, so BiSR and repeated runs on the same context
reuse it. A context read from a run directory also keeps it on disk, as safetensors, in
``RUN_DIR/attacks/cache/sip-<key>.safetensors``: ``<key>`` hashes everything that shapes the training (the
options, the model, the split, the seed, the auxiliary text, the threat model, the defenses' settings and, under
``inside``, the client's adapter files), so ``splitlm attack RUN sip`` and a later
``splitlm attack RUN bisr_b`` with the same SIP options train it once. A file that does not match (names,
shapes, key) or cannot be read is reported and replaced by a freshly trained inverter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, bar, parse_options, register_attack

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
            # (V, d_e), frozen; public, so not saved with the inverter (rebuilt from the model when loaded)
            self.register_buffer("embeddings", embeddings / scale, persistent=False)
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


# Bump when the inverter's architecture or training changes, so that older cache files are not read.
CACHE_VERSION = 1


def _identity(ctx: AttackContext, options: SipOptions) -> dict[str, Any]:
    """Everything that shapes a trained inverter: its options, the public model, the split, the seed, the
    auxiliary text (a data name, else the run's data settings and sequence length), and the attacker's copy of the
    client it trains through (threat model, defenses' settings, the client's adapters under ``inside``)."""
    config = ctx.config
    aux: dict[str, Any] = (
        {"name": options.aux}
        if options.aux
        else {"data": config.data.model_dump(mode="json"), "seq_len": config.train.seq_len}
    )
    return {
        "version": CACHE_VERSION,
        "options": dataclasses.asdict(options),
        "model": {"name": config.model.name, "revision": config.model.revision},
        "split": dataclasses.asdict(ctx.spec),
        "seed": config.seed,
        "aux": aux,
        "threat": ctx.threat_identity(),
    }


def _canonical(ctx: AttackContext, options: SipOptions) -> str:
    """``_identity`` as canonical JSON (sorted keys, no spaces); saved in the cache file's metadata."""
    return json.dumps(_identity(ctx, options), sort_keys=True, separators=(",", ":"))


def _cache_key(ctx: AttackContext, options: SipOptions) -> str:
    """A short stable hash of ``_identity``: the inverter's name in ``ctx.cache`` and on disk."""
    return hashlib.sha256(_canonical(ctx, options).encode()).hexdigest()[:16]


def _head_outputs(ctx: AttackContext, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ctx.simulate(ids, mask)  # (B, T, d): what the client would send for these ids


@torch.enable_grad()
def train_inverter(ctx: AttackContext, options: SipOptions) -> Inverter:
    """Train the SIP inverter on auxiliary text through the attacker's copy of the client (deterministic per
    seed)."""
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
        steps = bar(ctx, range(options.steps), "sip: training the inverter")
        for step in steps:
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
                steps.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _skeleton(ctx: AttackContext, options: SipOptions, width: int) -> Inverter:
    """An untrained inverter for ``width``-dim head outputs, to load saved tensors into."""
    zeros, ones = torch.zeros(width), torch.ones(width)
    embeddings = ctx.token_embeddings().float()  # (V, d)
    return Inverter(zeros, ones, embeddings, options.hidden, options.bidirectional, options.tied).to(ctx.device)


def load_inverter(ctx: AttackContext, options: SipOptions, path: Path) -> Inverter | None:
    """The inverter saved at ``path`` (safetensors, never pickle), or ``None`` when the file is missing; a file
    that cannot be read or does not match these options is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            saved = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # a truncated or foreign file: retrain rather than fail the attack
        log.warning("sip: cannot read the cached inverter %s (%s); training a new one", path, error)
        return None
    if metadata.get("identity") != _canonical(ctx, options):
        log.warning("sip: the cached inverter %s was trained for other settings; training a new one", path)
        return None
    if "mean" not in saved or saved["mean"].dim() != 1:
        log.warning("sip: the cached inverter %s lacks its per-dimension statistics; training a new one", path)
        return None
    model = _skeleton(ctx, options, int(saved["mean"].shape[0]))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved.items()}
    if expected != found:
        log.warning(
            "sip: the cached inverter %s does not fit these options (tensors %s, expected %s); training a new one",
            path,
            found,
            expected,
        )
        return None
    model.load_state_dict(saved, strict=True)
    log.info("sip: loaded the trained inverter from %s", path)
    return model.eval()


def save_inverter(ctx: AttackContext, options: SipOptions, model: Inverter, path: Path) -> None:
    """Write ``model`` to ``path`` as safetensors, atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"identity": _canonical(ctx, options)})
    tmp.replace(path)
    log.info("sip: saved the trained inverter to %s", path)


def inverter(ctx: AttackContext, options: SipOptions | None = None) -> Inverter:
    """The SIP inverter for ``options``: trained once per context and kept in ``ctx.cache``, and, for a context
    read from a run directory, kept in ``RUN_DIR/attacks/cache/`` for later processes."""
    options = options or SipOptions()
    key = ("sip", _cache_key(ctx, options))
    if key not in ctx.cache:
        path = ctx.cache_file(f"sip-{key[1]}.safetensors")
        model = None if path is None else load_inverter(ctx, options, path)
        if model is None:
            model = train_inverter(ctx, options)
            if path is not None:
                save_inverter(ctx, options, model, path)
        ctx.cache[key] = model
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
