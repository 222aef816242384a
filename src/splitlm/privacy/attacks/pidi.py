"""PIDI: patched model inversion with dual-sided initialization (the ADMI paper, VFLAIR-LLM), in two stages.

The paper's attack targets a split LLM's prompt *and* its response: it initialises the input side from the
smashed data and the response side from what the server learns about the labels, then refines the sequence by
model inversion patch by patch, which keeps long sequences tractable. splitlm's version:

1. **Dual-sided initialization.** The *prompt side* is SIP's guess from the smashed data (every position; the
   inverter is trained on ``ctx.simulate`` outputs, so it knows the threat model and the defenses, and is shared
   with ``sip``/``bisr_*`` through the context's cache). The *response side* is a second, independent guess of
   the tokens that carry a label: in a U-shaped split, BiSR(b)'s gradient matching through the attacker's tail
   (soft labels started at SIP's guess, matched to the gradient the client sent for the trunk output); in a
   vanilla split, the labels the client sent (``-100`` where none; after ``label_dp`` they are noisy). Where the
   response side has a guess the start is that guess, elsewhere SIP's.
2. **Patched inversion.** The positions are cut into consecutive patches of ``patch`` tokens, refined left to
   right. Positions where both sides *agree* are fixed (two independent channels voting for one token); the
   others in the patch are free: their input embeddings are optimised (AdamW, cosine distance on real
   positions, as ``bisr_f``) so that the attacker's head (pretrained under ``public``, the client's own under
   ``inside``) maps the prefix up to the patch's end onto the smashed data of the patch's positions. The head is
   causal, so a patch's outputs depend only on the prefix: later positions are left out of its forward. After
   its steps a patch's free positions are decoded to their nearest token embeddings and committed as tokens,
   the context of every later patch.

Where it departs from the paper (whose method section was not available to us beyond its abstract): the
response side comes from BiSR(b)'s gradient matching (U-shape) or the received labels (vanilla), the forward
refinement is BiSR(f)'s cosine objective, and "agreement of both sides fixes a position" is our patching rule.
With only the forward side (a vanilla run whose labels were not recorded, ``response=off``, or a U-shape record
without gradients) nothing is fixed and every patch is free: PIDI is then a patch-wise BiSR(f) from SIP's start.

Options prefixed ``sip_`` configure the SIP inverter (as for ``bisr_b``/``bisr_f``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from splitlm.data import IGNORE_INDEX
from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, bar, register_attack
from splitlm.privacy.attacks.bisr import label_positions, labels_to_tokens, match_gradients, split_options
from splitlm.privacy.attacks.inversion import nearest_tokens
from splitlm.privacy.attacks.sip import SipOptions, seeded, sip_logits

log = logging.getLogger(__name__)

RESPONSE_SIDES = ("auto", "off")


@dataclass(frozen=True)
class PidiOptions:
    """``pidi`` options; ``sip_<name>`` options (``SipOptions``) configure the prompt side's SIP inverter."""

    patch: int = 16  # positions per patch of the patched inversion
    steps: int = 60  # AdamW steps per patch on its free input embeddings
    lr: float = 0.01  # AdamW learning rate of the input embeddings
    response: str = "auto"  # auto: the labels (vanilla) or the tail's gradients (ushape); off: forward side only
    grad_steps: int = 30  # U-shape response side: BiSR(b) steps on the soft labels
    grad_lr: float = 0.09  # ... and their learning rate
    temperature: float = 1.2  # ... whose start is softmax(SIP logits / temperature)

    def check(self) -> None:
        if self.patch < 1 or self.steps < 0 or self.grad_steps < 0:
            raise PrivacyError("pidi options: patch >= 1, steps >= 0 and grad_steps >= 0; fix them, e.g. patch=16")
        if self.lr <= 0 or self.grad_lr <= 0 or self.temperature <= 0:
            raise PrivacyError("pidi options: lr, grad_lr and temperature must be > 0; fix them, e.g. lr=0.01")
        if self.response not in RESPONSE_SIDES:
            raise PrivacyError(f"pidi option response={self.response!r}: expected {' or '.join(RESPONSE_SIDES)}")


def response_side(
    ctx: AttackContext, obs: Observation, mask: torch.Tensor, prior: torch.Tensor, options: PidiOptions, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The response side's guess: ((B, T) ids, (B, T) bool where it has one). ``prior``: SIP's (B, T, V) logits."""
    none = torch.zeros_like(mask, dtype=torch.bool)
    guess = prior.argmax(-1)
    if options.response == "off":
        return guess, none
    if obs.labels is not None:  # vanilla: the client sent its labels (unshifted: labels[t] is the token at t)
        labels = obs.labels.to(ctx.device).long()
        has = (labels != IGNORE_INDEX) & mask.bool()
        return torch.where(has, labels, guess), has
    if ctx.spec.mode == "ushape" and obs.trunk_out is not None and obs.grad_trunk_out is not None:
        trunk_out = obs.trunk_out.to(ctx.device).float()
        grad = obs.grad_trunk_out.to(ctx.device).float()
        init = torch.zeros_like(prior)
        init[:, :-1] = (prior[:, 1:] / options.temperature).log_softmax(-1)  # label at t = token at t + 1
        y = match_gradients(
            ctx, trunk_out, grad, mask, init, options.grad_steps, options.grad_lr, 0.85, 0.15, name
        )  # (B, T, V)
        has = torch.zeros_like(none)
        has[:, 1:] = label_positions(mask)[:, :-1]  # the token at t + 1 is guessed from the label of t
        return labels_to_tokens(y, mask, guess), has
    log.info("%s: no labels or gradients in record %s: forward side only (nothing is fixed)", name, obs.key)
    return guess, none


@torch.enable_grad()
def patched_inversion(
    ctx: AttackContext,
    smashed: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    fixed: torch.Tensor,
    options: PidiOptions,
    name: str,
) -> torch.Tensor:
    """(B, T) ids: ``start`` (B, T) refined patch by patch; ``fixed`` (B, T) bool positions keep their start token.

    Each patch optimises the input embeddings of its free real positions so that the attacker's head maps the
    prefix up to the patch's end onto ``smashed`` (B, T, d) at the patch's real positions, then decodes them."""
    head = ctx.stage("head")
    embeddings = ctx.token_embeddings().float()  # (V, d)
    real = mask.bool()
    target = smashed.to(ctx.device).float()  # (B, T, d)
    tokens = start.clone()
    length = int(mask.shape[1])
    patches = range(0, length, options.patch)
    for begin in bar(ctx, patches, f"{name}: patches"):
        end = min(length, begin + options.patch)
        free = ~fixed[:, begin:end] & real[:, begin:end]  # (B, P)
        if not bool(free.any()) or options.steps == 0:
            continue
        prefix = embeddings[tokens[:, :begin]]  # (B, begin, d): committed context
        base = embeddings[tokens[:, begin:end]]  # (B, P, d)
        x = base.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([x], lr=options.lr, weight_decay=0.0)
        inside = real[:, begin:end]  # (B, P)
        goal = target[:, begin:end][inside]  # (N, d)
        for _ in range(options.steps):
            patch = torch.where(free.unsqueeze(-1), x, base)  # fixed positions never move
            inputs = torch.cat([prefix, patch], dim=1)  # (B, end, d)
            out = head(inputs_embeds=inputs, attention_mask=mask[:, :end]).float()[:, begin:end]  # (B, P, d)
            loss = (1.0 - F.cosine_similarity(out[inside], goal, dim=-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        decoded = nearest_tokens(x.detach(), embeddings)  # (B, P)
        tokens[:, begin:end] = torch.where(free, decoded, tokens[:, begin:end])
        log.info("%s: patch %d-%d: cosine distance %.4f", name, begin, end, loss.item())
    return tokens


@dataclass
class PidiAttack:
    name: ClassVar[str] = "pidi"
    options: PidiOptions
    sip: SipOptions

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        return self.invert_with_fixed(ctx, obs)[0]

    def invert_with_fixed(
        self, ctx: AttackContext, obs: Observation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(guess (B, T), start (B, T), fixed (B, T) bool): the refined ids, the dual-sided start and the
        positions where both sides agreed (kept as they started)."""
        mask = obs.attention_mask.to(ctx.device)
        prior = sip_logits(ctx, obs.smashed, mask, self.sip)  # (B, T, V): the prompt side
        prompt = prior.argmax(-1)
        with seeded(ctx, salt=5):
            response, has = response_side(ctx, obs, mask, prior, self.options, self.name)
            start = torch.where(has, response, prompt)
            fixed = has & (response == prompt) & mask.bool()
            guess = patched_inversion(ctx, obs.smashed, mask, start, fixed, self.options, self.name)
        return guess, start, fixed


@register_attack("pidi")
def make_pidi(options: dict[str, str]) -> PidiAttack:
    parsed, sip = split_options(PidiOptions, options)
    parsed.check()  # type: ignore[attr-defined]
    return PidiAttack(parsed, sip)  # type: ignore[arg-type]
