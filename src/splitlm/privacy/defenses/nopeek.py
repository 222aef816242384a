"""NoPeek (Vepakomma et al., 2019): a loss that decorrelates the smashed data from the input.

The client adds ``beta * dCor(E[x], head(x))`` to its loss, the (Székely) distance correlation between the
true input token vectors and the head's output over the real tokens of the micro-batch, each token one
sample. The cost is quadratic in the number of tokens, so at most ``MAX_TOKENS`` real tokens are drawn
(seeded) each step. Gradients flow into the head's output only; the embeddings are constants.
"""

from __future__ import annotations

import zlib
from typing import Self

import torch
from pydantic import Field

from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense
from splitlm.registry import ComponentSettings

MAX_TOKENS = 256


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distances of the rows of ``x`` (N, d) -> (N, N)."""
    # The exact (non-matmul) form keeps the diagonal at 0, where its backward gives 0 instead of NaN.
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    return dist - dist.mean(0, keepdim=True) - dist.mean(1, keepdim=True) + dist.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (V-statistic) of paired rows ``x`` (N, p) and ``y`` (N, q), in [0, 1]."""
    a, b = _centred_distances(x.float()), _centred_distances(y.float())
    cov_xy, var_x, var_y = (a * b).mean(), (a * a).mean(), (b * b).mean()
    squared = cov_xy / (var_x * var_y).sqrt().clamp_min(1e-12)
    return squared.clamp_min(1e-12).sqrt()


@DEFENSES.component
class NoPeek(InputDefense):
    name = "nopeek"
    former_keys = (("privacy.nopeek", "privacy.defenses.nopeek"),)

    class Settings(ComponentSettings):
        beta: float = Field(
            1.0,
            ge=0,
            description="Weight of the distance correlation between input embeddings and smashed data (over at most "
            "256 real tokens drawn per micro-batch).",
        )

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, settings.beta)

    def __init__(self, context: DefenseContext, beta: float, max_tokens: int = MAX_TOKENS) -> None:
        if beta < 0:
            raise PrivacyError(f"nopeek: beta must be >= 0, got {beta}; set privacy.defenses.nopeek.beta")
        self.beta = float(beta)
        self.max_tokens = max_tokens
        self.generator = context.generator(zlib.crc32(self.name.encode()))

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        if self.beta == 0:
            return None
        real = attention_mask.to(hidden.device).bool()  # (B, T)
        x = embeddings.to(hidden.device)[real].detach()  # (N, d)
        z = hidden[real]  # (N, d')
        count = x.shape[0]
        if count < 2:
            return None
        if count > self.max_tokens:
            keep = torch.randperm(count, generator=self.generator, device=self.generator.device)[: self.max_tokens]
            keep = keep.to(hidden.device)
            x, z = x[keep], z[keep]
        return self.beta * distance_correlation(x, z)
