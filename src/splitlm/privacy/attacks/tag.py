"""TAG-style gradient matching from a random start (Deng et al., "TAG: Gradient attack on transformer-based
language models"), as a baseline for BiSR(b).

Like ``bisr_b`` it optimises soft labels so that the gradient of the soft cross-entropy through the
attacker's tail (per the threat model) matches, in direction, the gradient a U-shaped client sent for the trunk
output; unlike it, the labels start from random logits (no SIP prior) and the distance is TAG's
``L2 + alpha * L1``. The first token of each row is never a label, so it cannot be recovered: it is guessed
as a fixed id (the tokenizer's BOS, else EOS, else 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, parse_options, register_attack
from splitlm.privacy.attacks.bisr import labels_to_tokens, match_gradients, require_gradients
from splitlm.privacy.attacks.sip import seeded


@dataclass(frozen=True)
class TagOptions:
    steps: int = 60  # AdamW steps on the soft labels
    lr: float = 0.5  # large: random logits over a big vocabulary must move far
    alpha: float = 0.01  # weight of the L1 distance next to the squared L2 distance
    init_scale: float = 1.0  # std of the random initial label logits

    def check(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.alpha < 0 or self.init_scale < 0:
            raise PrivacyError("tag options: steps >= 0, lr > 0, alpha >= 0 and init_scale >= 0; fix them")


def fixed_token(ctx: AttackContext) -> int:
    """The id guessed where nothing is known: the tokenizer's BOS, else its EOS, else 0."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(ctx.tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class TagAttack:
    name: ClassVar[str] = "tag"
    options: TagOptions

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        trunk_out, grad = require_gradients(ctx, obs, self.name)
        mask = obs.attention_mask.to(ctx.device)
        vocab = ctx.token_embeddings().shape[0]
        with seeded(ctx, salt=4):
            init = torch.randn((*mask.shape, vocab), device=ctx.device) * self.options.init_scale
            y = match_gradients(
                ctx, trunk_out, grad, mask, init, self.options.steps, self.options.lr,
                1.0, self.options.alpha, self.name,
            )  # fmt: skip
        fallback = torch.full(mask.shape, fixed_token(ctx), dtype=torch.long, device=ctx.device)
        return labels_to_tokens(y, mask, fallback)


@register_attack("tag")
def make_tag(options: dict[str, str]) -> TagAttack:
    parsed = parse_options(TagOptions, options)
    parsed.check()
    return TagAttack(parsed)
