"""BiSR: bidirectional semi-white-box reconstruction (the BiSR paper), backward and forward halves.

``bisr_b`` (backward) reads the gradient a U-shaped client sent back for the trunk output (step 7). That
gradient is ``J^T (softmax(logits) - onehot(labels)) / n`` with ``J`` the Jacobian of the client's tail at
the trunk output, so it carries the labels, which are the input shifted by one token. The attacker
optimises soft labels ``Y`` (B, T, V), starting from SIP's guess, so that the same gradient computed
through the attacker's tail (the *pretrained* one under ``public``, the client's own under ``inside``) matches
the observed one. Both gradients are scaled to unit norm: the attacker knows neither the client's token count
nor its gradient-accumulation factor, and under ``public`` the client's tail is fine-tuned, so only the
direction is trusted. ``Y[t]`` guesses the token at ``t + 1``; the first
token of each row has no label and comes from SIP.

``bisr_f`` (forward) optimises input embeddings ``e`` (B, T, d), starting from SIP's guess, so that the
attacker's head (pretrained under ``public``, the client's under ``inside``) maps them onto the smashed data
(cosine distance on real positions), then decodes each position by its nearest token embedding.

Both start from SIP (``sip``), whose inverter they train first, or reuse. Options prefixed ``sip_`` configure
that inverter and map to SIP's options of the same name without the prefix: ``sip_steps``, ``sip_lr``,
``sip_hidden``, ``sip_bidirectional``, ``sip_tied``, ``sip_noise``, ``sip_aux_rows``, ``sip_batch_size`` and
``sip_aux`` (e.g. ``splitlm attack RUN bisr_b sip_steps=500`` uses the inverter of ``splitlm attack RUN sip
steps=500``). An inverter with the same SIP options is shared: within one process through the context's cache,
across processes through ``RUN_DIR/attacks/cache/``, so it is trained once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, bar, parse_options, register_attack
from splitlm.privacy.attacks.inversion import nearest_tokens
from splitlm.privacy.attacks.sip import SipOptions, seeded, sip_logits

log = logging.getLogger(__name__)


def split_options(kind: type, options: dict[str, str]) -> tuple[object, SipOptions]:
    """``(attack options, SIP options)``: keys ``sip_<name>`` configure the SIP inverter an attack uses."""
    own = {k: v for k, v in options.items() if not k.startswith("sip_")}
    sip = {k[len("sip_") :]: v for k, v in options.items() if k.startswith("sip_")}
    sip_parsed: SipOptions = parse_options(SipOptions, sip)
    sip_parsed.check()
    return parse_options(kind, own), sip_parsed


def require_gradients(ctx: AttackContext, obs: Observation, attack: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded trunk output and the client's gradient for it (U-shape only), on ``ctx.device``."""
    if ctx.spec.mode != "ushape":
        raise PrivacyError(
            f"{attack} needs the trunk output and the gradient the client sent back for it, which only a "
            f"ushape run records (this run is split.mode={ctx.spec.mode}); attack a ushape run, or use sip"
        )
    if obs.trunk_out is None or obs.grad_trunk_out is None:
        raise PrivacyError(
            f"{attack} needs the trunk output and the client's gradient for it, but tap record {obs.key} of this "
            "ushape run lacks them (no gradient was sent back); attack a ushape run that trains, or use sip"
        )
    return obs.trunk_out.to(ctx.device).float(), obs.grad_trunk_out.to(ctx.device).float()


def label_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions ``t`` whose next token ``t + 1`` is real, i.e. that carry a label."""
    mask = mask.bool()
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


@torch.enable_grad()
def match_gradients(
    ctx: AttackContext,
    trunk_out: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    init: torch.Tensor,
    steps: int,
    lr: float,
    l2: float,
    l1: float,
    name: str,
) -> torch.Tensor:
    """Soft-label logits ``Y`` (B, T, V), started at ``init``, whose gradient through the attacker's tail
    matches ``grad`` (B, T, d) in direction: minimises ``l2 * ||g' - g||^2 + l1 * ||g' - g||_1`` over unit-norm
    gradients. ``Y[t]`` is the label of position ``t``, the token at ``t + 1``.

    The gradient of the soft cross-entropy w.r.t. the logits is ``softmax(logits) - softmax(Y)``, so the
    tail runs forward once and each step is one vector-Jacobian product (create_graph) and its backward.
    """
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        tail = ctx.stage("tail")
        z = trunk_out.detach().requires_grad_(True)  # (B, T, d)
        logits = tail(hidden_states=z, attention_mask=mask).float()  # (B, T, V)
        q = logits.detach().softmax(-1)
        weight = label_positions(mask).unsqueeze(-1).float()  # (B, T, 1)
        target = grad * mask.unsqueeze(-1)
        target = target / target.norm().clamp_min(1e-30)
        y = init.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([y], lr=lr, weight_decay=0.0)
        for step in bar(ctx, range(steps), f"{name}: matching gradients"):
            cotangent = (q - y.softmax(-1)) * weight  # d(soft CE)/d(logits), (B, T, V)
            (guess,) = torch.autograd.grad(logits, z, cotangent, create_graph=True, retain_graph=True)
            guess = guess * mask.unsqueeze(-1)
            diff = guess / guess.norm().clamp_min(1e-30) - target
            loss = l2 * diff.pow(2).sum() + l1 * diff.abs().sum()
            (y.grad,) = torch.autograd.grad(loss, y, retain_graph=True)
            optimizer.step()
            if step % 10 == 0 or step == steps - 1:
                log.info("%s step %d/%d: gradient distance %.4f", name, step + 1, steps, loss.item())
        return y.detach()


def labels_to_tokens(y: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """(B, T) ids: ``argmax y[t]`` at ``t + 1`` where position ``t`` carries a label, else ``fallback``."""
    guess = fallback.clone()
    has_label = label_positions(mask)[:, :-1]  # (B, T-1)
    shifted = y[:, :-1].argmax(-1)  # (B, T-1): the token at t + 1
    guess[:, 1:] = torch.where(has_label, shifted, guess[:, 1:])
    return guess


@dataclass(frozen=True)
class BisrBOptions:
    """``bisr_b`` options; ``sip_<name>`` options (``SipOptions``) configure the SIP start."""

    steps: int = 30  # AdamW steps on the soft labels (0: SIP's guess, shifted into labels, as is)
    lr: float = 0.09  # AdamW learning rate of the soft-label logits
    temperature: float = 1.2  # the soft labels start at softmax(SIP logits / temperature)
    l2: float = 0.85  # weight of the squared L2 gradient distance
    l1: float = 0.15  # weight of the L1 gradient distance

    def check(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.temperature <= 0 or self.l1 < 0 or self.l2 < 0:
            raise PrivacyError("bisr_b options: steps >= 0, lr > 0, temperature > 0, l1 >= 0, l2 >= 0; fix them")


@dataclass
class BisrBAttack:
    name: ClassVar[str] = "bisr_b"
    options: BisrBOptions
    sip: SipOptions

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        trunk_out, grad = require_gradients(ctx, obs, self.name)
        mask = obs.attention_mask.to(ctx.device)
        prior = sip_logits(ctx, obs.smashed, mask, self.sip)  # (B, T, V): logits of the token at t
        init = torch.zeros_like(prior)
        init[:, :-1] = (prior[:, 1:] / self.options.temperature).log_softmax(-1)  # label at t = token at t+1
        with seeded(ctx, salt=2):
            y = match_gradients(
                ctx, trunk_out, grad, mask, init, self.options.steps, self.options.lr,
                self.options.l2, self.options.l1, self.name,
            )  # fmt: skip
        return labels_to_tokens(y, mask, prior.argmax(-1))


@register_attack("bisr_b")
def make_bisr_b(options: dict[str, str]) -> BisrBAttack:
    parsed, sip = split_options(BisrBOptions, options)
    parsed.check()  # type: ignore[attr-defined]
    return BisrBAttack(parsed, sip)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BisrFOptions:
    """``bisr_f`` options; ``sip_<name>`` options (``SipOptions``) configure the SIP start (init=sip)."""

    steps: int = 300  # AdamW steps on the input embeddings
    lr: float = 0.01  # AdamW learning rate of the input embeddings
    init: str = "sip"  # sip: start from SIP's guess; random: from noise of the embeddings' scale

    def check(self) -> None:
        if self.steps < 0 or self.lr <= 0:
            raise PrivacyError("bisr_f options: steps must be >= 0 and lr > 0; fix them, e.g. steps=300 lr=0.01")
        if self.init not in ("sip", "random"):
            raise PrivacyError(f"bisr_f option init={self.init!r}: expected sip or random")


@torch.enable_grad()
def match_smashed(
    ctx: AttackContext, smashed: torch.Tensor, mask: torch.Tensor, init: torch.Tensor, steps: int, lr: float, name: str
) -> torch.Tensor:
    """Input embeddings (B, T, d), started at ``init``, whose output through the attacker's head is closest in cosine
    to ``smashed`` on the real positions."""
    head = ctx.stage("head")
    real = mask.bool()
    target = smashed.to(ctx.device).float()[real]  # (N, d)
    e = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([e], lr=lr, weight_decay=0.0)
    for step in bar(ctx, range(steps), f"{name}: matching smashed data"):
        out = head(inputs_embeds=e, attention_mask=mask).float()  # (B, T, d)
        loss = (1.0 - F.cosine_similarity(out[real], target, dim=-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d: cosine distance %.4f", name, step + 1, steps, loss.item())
    return e.detach()


@dataclass
class BisrFAttack:
    name: ClassVar[str] = "bisr_f"
    options: BisrFOptions
    sip: SipOptions

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        mask = obs.attention_mask.to(ctx.device)
        embeddings = ctx.token_embeddings().float()  # (V, d)
        with seeded(ctx, salt=3):
            if self.options.init == "sip":
                init = embeddings[sip_logits(ctx, obs.smashed, mask, self.sip).argmax(-1)]  # (B, T, d)
            else:
                shape = (*mask.shape, embeddings.shape[1])
                init = torch.randn(shape, device=ctx.device) * embeddings.std()
            e = match_smashed(ctx, obs.smashed, mask, init, self.options.steps, self.options.lr, self.name)
        return nearest_tokens(e, embeddings)


@register_attack("bisr_f")
def make_bisr_f(options: dict[str, str]) -> BisrFAttack:
    parsed, sip = split_options(BisrFOptions, options)
    parsed.check()  # type: ignore[attr-defined]
    return BisrFAttack(parsed, sip)  # type: ignore[arg-type]
