"""Clip-and-noise defenses on what crosses the cut.

- ``smashed_noise`` (step 3): each token's vector of the head output is clipped to norm ``clip`` (L2 for
  gaussian, L1 for laplace), then noise is added with per-coordinate std (gaussian) or scale b (laplace)
  ``noise_multiplier * clip`` (the absolute ``noise_multiplier`` when clip=0). It stays differentiable: the
  client backpropagates the server's gradient through the clipping.
- ``grad_noise``: the same mechanism on the gradient a U-shaped client sends for the trunk output (step 7,
  direction "up") and/or on the gradient it receives for its head output (step 9, direction "down").

Every position is clipped and noised, padding included: in a causal model a padding position's vector is
computed from the real tokens before it, so it carries their information too.

Accounting (one sequence of up to T = ``train.seq_len`` positions, one release): per-token clipping bounds the
sequence's L2 sensitivity by sqrt(T)*C (gaussian) and its L1 sensitivity by T*C (laplace), against the
sequence replaced by a zero record (the accountant's neighbouring relation). dp_accounting defines
``GaussianDpEvent(s / C)`` and ``LaplaceDpEvent(s / C)`` for noise scale s and sensitivity C, so one release is
``GaussianDpEvent(noise_multiplier / sqrt(T))`` or ``LaplaceDpEvent(noise_multiplier / T)``. Without clipping
the sensitivity is unbounded and there is no epsilon.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal, Self

import torch
from dp_accounting import dp_event
from pydantic import Field

from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, MessageDefense
from splitlm.registry import ComponentSettings

MECHANISMS = ("gaussian", "laplace")
VANILLA_UP = (
    "privacy.defenses.grad_noise: direction up acts on the gradient a ushape client sends, and a vanilla split "
    "sends none; set privacy.defenses.grad_noise.directions=[down] or split.mode=ushape"
)
Mechanism = Literal["gaussian", "laplace"]


class NoiseSettings(ComponentSettings):
    mechanism: Mechanism = Field(
        "gaussian", description="gaussian (L2 clipping, Gaussian noise) or laplace (L1 clipping, Laplace noise)."
    )
    clip: float = Field(
        0.0,
        ge=0,
        description="Clip each token's vector to this norm (L2 for gaussian, L1 for laplace) before adding noise; "
        "0: no clipping (then no epsilon can be given).",
    )
    noise_multiplier: float = Field(
        1.0,
        ge=0,
        description="Noise scale per coordinate as a multiple of clip (std for gaussian, scale b for laplace); "
        "with clip=0 it is the absolute scale. The epsilon of one sequence of train.seq_len tokens is that of "
        "a Gaussian mechanism with noise multiplier noise_multiplier / sqrt(seq_len) (Laplace: / seq_len).",
    )


class GradNoiseSettings(NoiseSettings):
    clip: float = Field(
        0.0,
        ge=0,
        description="Clip each token's gradient to this norm (L2 for gaussian, L1 for laplace) before adding "
        "noise; an absolute norm: cut-layer gradients are small (about 1e-4 to 1e-2 per coordinate), so pick it "
        "from their scale (e.g. 1e-3), not the smashed data's. 0: no clipping (then no epsilon can be given).",
    )
    directions: list[Literal["up", "down"]] = Field(
        default_factory=lambda: ["up"],
        min_length=1,
        description="up: the gradient the client sends at the tail cut (step 7, U-shape); down: the gradient the "
        "client receives at the head cut (step 9) before it reaches the head.",
    )


class ClipNoise:
    """Per-token clipping to ``clip`` then additive noise, drawn from ``generator``."""

    def __init__(
        self, name: str, mechanism: str, clip: float, noise_multiplier: float, generator: torch.Generator
    ) -> None:
        if mechanism not in MECHANISMS:
            raise PrivacyError(f"{name}: mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
        if clip < 0 or noise_multiplier < 0:
            raise PrivacyError(
                f"{name}: clip and noise_multiplier must be >= 0, got {clip} and {noise_multiplier}; fix "
                f"privacy.defenses.{name}"
            )
        self.mechanism = mechanism
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator

    @property
    def scale(self) -> float:
        """Per-coordinate std (gaussian) or Laplace scale b of the noise."""
        return self.noise_multiplier * self.clip if self.clip > 0 else self.noise_multiplier

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d), same dtype; differentiable in ``x``."""
        work = x.float()
        if self.clip > 0:
            order = 2 if self.mechanism == "gaussian" else 1
            norms = work.norm(p=order, dim=-1, keepdim=True)  # (..., 1)
            work = work * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        if self.scale > 0:
            device = self.generator.device
            if self.mechanism == "gaussian":
                noise = torch.randn(work.shape, generator=self.generator, device=device)
            else:  # Laplace(0, 1) as the difference of two unit exponentials
                pair = torch.empty((2, *work.shape), device=device).exponential_(1.0, generator=self.generator)
                noise = pair[0] - pair[1]
            work = work + self.scale * noise.to(work.device)
        return work.to(x.dtype)

    def events(self, seq_len: int) -> list[dp_event.DpEvent] | None:
        """One release of a sequence of ``seq_len`` positions, or None without clipping or noise."""
        if self.clip <= 0 or self.noise_multiplier <= 0:
            return None
        if self.mechanism == "gaussian":
            return [dp_event.GaussianDpEvent(self.noise_multiplier / math.sqrt(seq_len))]
        return [dp_event.LaplaceDpEvent(self.noise_multiplier / seq_len)]


@DEFENSES.component
class SmashedNoise(MessageDefense):
    name = "smashed_noise"
    former_keys = (("privacy.smashed_noise", "privacy.defenses.smashed_noise"),)
    Settings = NoiseSettings

    @classmethod
    def create(cls, settings: NoiseSettings, context: DefenseContext) -> Self:
        return cls(context, settings.mechanism, settings.clip, settings.noise_multiplier)

    def __init__(self, context: DefenseContext, mechanism: str, clip: float, noise_multiplier: float) -> None:
        self.generator = generator = context.generator(zlib.crc32(self.name.encode()))
        self.noise = ClipNoise(self.name, mechanism, clip, noise_multiplier, generator)
        self.seq_len = context.seq_len

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.noise(hidden)  # (B, T, d)

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        return self.noise.events(self.seq_len)


@DEFENSES.component
class GradNoise(MessageDefense):
    name = "grad_noise"
    former_keys = (("privacy.grad_noise", "privacy.defenses.grad_noise"),)
    Settings = GradNoiseSettings

    @classmethod
    def create(cls, settings: GradNoiseSettings, context: DefenseContext) -> Self:
        return cls(context, settings.mechanism, settings.clip, settings.noise_multiplier, list(settings.directions))

    @classmethod
    def problems(cls, settings: GradNoiseSettings, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if config.split.mode != "ushape" and "down" not in settings.directions:
            problems.append(VANILLA_UP)
        return problems

    def __init__(
        self,
        context: DefenseContext,
        mechanism: str,
        clip: float,
        noise_multiplier: float,
        directions: list[str] | tuple[str, ...] = ("up",),
    ) -> None:
        unknown = sorted(set(directions) - {"up", "down"})
        if unknown or not directions:
            raise PrivacyError(f"grad_noise: directions must be a non-empty subset of [up, down], got {directions}")
        if context.mode != "ushape" and "down" not in directions:
            raise PrivacyError(VANILLA_UP)
        self.generator = generator = context.generator(zlib.crc32(self.name.encode()))
        self.noise = ClipNoise(self.name, mechanism, clip, noise_multiplier, generator)
        self.up = "up" in directions and context.mode == "ushape"
        self.down = "down" in directions
        self.seq_len = context.seq_len

    def grad_up(self, grad: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.noise(grad) if self.up else grad

    def grad_down(self, grad: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.noise(grad) if self.down else grad

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        # Only "up" releases something computed from the client's data (its labels, its tail) to the server;
        # "down" noises what the client receives: nothing leaves the client through it, so it has no epsilon.
        return self.noise.events(self.seq_len) if self.up else None
