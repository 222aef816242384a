"""A variational information bottleneck at the cut (survey §5.2.2, mutual-information defenses).

The client's head becomes a stochastic encoder: what crosses the cut is ``z = h + sigma * eps`` (``eps`` standard
normal, drawn from the defense's seeded stream), with one noise scale ``sigma_d = r_d * s_d`` per hidden dimension,
``r_d`` learned (initially ``init_scale``) in units of ``s_d``, the per-dimension std of the head output. Against a
Gaussian prior ``q(z) = N(m, s^2)`` (``m``, ``s``: the per-dimension mean and std of ``h``, estimated on the first
``calibration`` training micro-batches and then fixed; an evaluation before them scales its noise by its own
batch's spread) the client's loss gains ``beta`` times, per real token,

    KL(N(h, sigma^2) || N(m, s^2)) = sum_d [ -log r_d + (r_d^2 + ((h_d - m_d) / s_d)^2) / 2 - 1/2 ]   (nats),

which upper-bounds the mutual information I(X; Z) between a token's input and what the server sees
(``I(X; Z) = E_x KL(p(z|x) || p(z)) <= E_x KL(p(z|x) || q(z))`` for any ``q``). The task loss pulls the scales
down (less noise), the KL pushes them towards 1 and the head's output towards its mean: ``beta`` sets the
trade-off. The scales train with their own Adam (``lr``), stepped after the client's optimizer; they and the
prior are the defense's state, saved with the client's adapters (``defense-mi_bottleneck.safetensors``) so an
attacker that holds the client's parts (the *inside* threat model) gets them too.

With ``clip > 0`` each token's vector is first clipped to L2 norm ``clip``: the release is then a Gaussian
mechanism with noise no smaller than ``min_d sigma_d`` per coordinate and per-sequence L2 sensitivity
``sqrt(T) * clip``, so one release is ``GaussianDpEvent(min_d sigma_d / (sqrt(T) * clip))`` at the current scales
(learned scales change over the run: the epsilon is that of the scales at the end). Without a clip there is no
epsilon, only the KL bound. Every position is noised, padding included (as ``smashed_noise``); the KL and the
prior are taken over real tokens.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Self

import torch
from dp_accounting import dp_event
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from splitlm.errors import CheckpointError, PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense, MessageDefense
from splitlm.registry import ComponentSettings
from splitlm.transport import Message

MIN_STD = 1e-6  # floor of a dimension's prior std (a constant dimension still gets some noise)


def gaussian_kl(hidden: torch.Tensor, log_scale: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(h, (r s)^2) || N(m, s^2)) summed over the last dimension, per row of ``hidden`` (N, d) -> (N,)."""
    scale = log_scale.exp()
    centred = (hidden.float() - mean) / std
    return (-log_scale + (scale**2 + centred**2) / 2 - 0.5).sum(-1)


@DEFENSES.component
class MiBottleneck(MessageDefense, InputDefense):
    name = "mi_bottleneck"

    class Settings(ComponentSettings):
        beta: float = Field(
            1e-3,
            ge=0,
            description="Weight of the KL term (nats per real token, summed over the hidden dimensions: about d "
            "times the per-dimension KL) in the client's loss; larger squeezes more information out of the cut.",
        )
        init_scale: float = Field(
            0.5,
            gt=0,
            description="Initial noise std of each hidden dimension, as a fraction of that dimension's std in the "
            "head output (1: noise as large as the signal's spread).",
        )
        lr: float = Field(
            0.01, ge=0, description="Learning rate of the noise scales' own Adam (0: the scales stay at init_scale)."
        )
        calibration: int = Field(
            4,
            ge=1,
            description="Micro-batches whose head outputs estimate the per-dimension mean and std of the prior "
            "(then fixed).",
        )
        clip: float = Field(
            0.0,
            ge=0,
            description="Clip each token's head output to this L2 norm before the noise; then the release is a "
            "Gaussian mechanism and an epsilon is reported. 0: no clipping, no epsilon (only the KL bound).",
        )

    @classmethod
    def problems(cls, settings: Settings, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if settings.lr > 0 and config.lora.part("head").method == "frozen":
            problems.append(
                "privacy.defenses.mi_bottleneck: its noise scales learn through the head's backward, and "
                "lora.head.method=frozen runs none; set privacy.defenses.mi_bottleneck.lr=0 (fixed noise) or train "
                "the head"
            )
        return problems

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, **settings.model_dump())

    def __init__(
        self,
        context: DefenseContext,
        beta: float = 1e-3,
        init_scale: float = 0.5,
        lr: float = 0.01,
        calibration: int = 4,
        clip: float = 0.0,
    ) -> None:
        if beta < 0 or not init_scale > 0 or lr < 0 or calibration < 1 or clip < 0:
            raise PrivacyError(
                f"mi_bottleneck: need beta >= 0, init_scale > 0, lr >= 0, calibration >= 1, clip >= 0; got "
                f"beta={beta} init_scale={init_scale} lr={lr} calibration={calibration} clip={clip}; fix "
                "privacy.defenses.mi_bottleneck"
            )
        self.beta, self.init_scale, self.lr = float(beta), float(init_scale), float(lr)
        self.calibration, self.clip = int(calibration), float(clip)
        self.seq_len = context.seq_len
        self.generator = context.generator(zlib.crc32(self.name.encode()))
        self.log_scale: torch.Tensor | None = None  # (d,) log r, trainable
        self.optimizer: torch.optim.Optimizer | None = None
        self.mean: torch.Tensor | None = None  # (d,) prior mean, float32
        self.std: torch.Tensor | None = None  # (d,) prior std, float32
        self._sums: torch.Tensor | None = None  # (2, d) float64 sums of h and h^2 over calibration tokens
        self._count = 0  # calibration tokens
        self._seen = 0  # calibration micro-batches
        self._kl_sum, self._kl_tokens = 0.0, 0  # this step's KL over real tokens
        self._last_kl: float | None = None
        self._training = True  # the message in hand is a training forward (it calibrates the prior)

    # --- state ---------------------------------------------------------------------------------------------

    def _ensure(self, dim: int, device: torch.device) -> None:
        if self.log_scale is None:
            start = torch.full((dim,), math.log(self.init_scale), device=device)
            self._set_scales(start)
        elif self.log_scale.shape[0] != dim:
            raise PrivacyError(
                f"mi_bottleneck: its noise scales have {self.log_scale.shape[0]} dimensions but the head output has "
                f"{dim}; the saved defense state belongs to another model"
            )

    def _set_scales(self, log_scale: torch.Tensor) -> None:
        self.log_scale = log_scale.detach().float().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.log_scale], lr=self.lr) if self.lr > 0 else None

    @property
    def scales(self) -> torch.Tensor | None:
        """The current relative noise scales r (d,), or None before the first forward."""
        return None if self.log_scale is None else self.log_scale.detach().exp()

    def _clipped(self, hidden: torch.Tensor) -> torch.Tensor:
        work = hidden.float()
        if self.clip > 0:
            norms = work.norm(dim=-1, keepdim=True)  # (..., 1)
            work = work * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        return work

    def _calibrate(self, work: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Add the real tokens of ``work`` (B, T, d) to the prior's statistics while calibrating."""
        if self._seen >= self.calibration:
            return
        with torch.no_grad():
            rows = work.reshape(-1, work.shape[-1]) if attention_mask is None else work[attention_mask.bool()]
            rows = rows.double()
            if self._sums is None:
                self._sums = torch.zeros(2, work.shape[-1], dtype=torch.float64, device=work.device)
            self._sums += torch.stack([rows.sum(0), (rows**2).sum(0)])
            self._count += int(rows.shape[0])
            self._seen += 1
            if self._count:
                mean = self._sums[0] / self._count
                var = (self._sums[1] / self._count - mean**2).clamp_min(0.0)
                self.mean = mean.float()
                self.std = var.sqrt().float().clamp_min(MIN_STD)

    @staticmethod
    def _spread(work: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The per-dimension std of the real tokens of ``work`` (B, T, d): the scale of the noise of an evaluation
        that comes before any training batch has calibrated the prior (it calibrates nothing)."""
        rows = work.reshape(-1, work.shape[-1]) if attention_mask is None else work[attention_mask.bool()]
        if not rows.shape[0]:
            rows = work.reshape(-1, work.shape[-1])
        return rows.double().std(0, unbiased=False).float().clamp_min(MIN_STD)

    # --- hooks ---------------------------------------------------------------------------------------------

    def labels(self, *args: Any) -> Any:  # type: ignore[override]
        """The message hook ``labels(labels)`` and the plugin hook ``labels(step, labels)`` share a name in a defense
        that is both: this one changes neither, so each gets its labels back."""
        return args[-1]

    def on_request(self, message: Message) -> Message:
        self._training = message.kind == "forward"
        return super().on_request(message)

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        work = self._clipped(hidden)  # (B, T, d) float32
        self._ensure(work.shape[-1], work.device)
        mask = None if attention_mask is None else attention_mask.to(work.device)
        if self._training:
            self._calibrate(work.detach(), mask)
        std = self.std if self.std is not None else self._spread(work.detach(), mask)  # eval before training
        assert self.log_scale is not None
        sigma = self.log_scale.to(work.device).exp() * std.to(work.device)  # (d,)
        noise = torch.randn(work.shape, generator=self.generator, device=self.generator.device).to(work.device)
        return (work + sigma * noise).to(hidden.dtype)

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        if self.log_scale is None or self.mean is None or self.std is None:
            return None
        real = attention_mask.to(hidden.device).bool()  # (B, T)
        rows = self._clipped(hidden)[real]  # (N, d)
        if not rows.shape[0]:
            return None
        device = rows.device
        kl = gaussian_kl(rows, self.log_scale.to(device), self.mean.to(device), self.std.to(device))  # (N,)
        self._kl_sum += float(kl.detach().sum())
        self._kl_tokens += int(kl.shape[0])
        if self.beta == 0:
            return None
        return self.beta * kl.mean()

    def after_step(self, step: int) -> None:
        if self.optimizer is not None and self.log_scale is not None and self.log_scale.grad is not None:
            self.optimizer.step()
        if self.log_scale is not None:
            self.log_scale.grad = None
        if self._kl_tokens:
            self._last_kl = self._kl_sum / self._kl_tokens
        self._kl_sum, self._kl_tokens = 0.0, 0

    def step_metrics(self, step: int) -> dict[str, float]:
        scales = self.scales
        if scales is None or self._last_kl is None:
            return {}
        return {"mi_kl": self._last_kl, "mi_scale": float(scales.mean())}

    def noise_multiplier(self) -> float | None:
        """The Gaussian mechanism's noise multiplier of one sequence at the current scales; None without a clip."""
        if self.clip <= 0 or self.log_scale is None or self.std is None:
            return None
        smallest = float((self.log_scale.detach().exp() * self.std.to(self.log_scale.device)).min())
        return smallest / (math.sqrt(self.seq_len) * self.clip)

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        multiplier = self.noise_multiplier()
        return None if multiplier is None or multiplier <= 0 else [dp_event.GaussianDpEvent(multiplier)]

    def report(self) -> dict[str, float | None]:
        scales = self.scales
        if scales is None:
            return {}
        return {
            "kl_nats_per_token": self._last_kl,  # the I(X; Z) bound of a token, at the last training step
            "scale_mean": float(scales.mean()),
            "scale_min": float(scales.min()),
            "noise_multiplier": self.noise_multiplier(),
        }

    # --- persistence ---------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        if self.log_scale is None or self.mean is None or self.std is None:
            return  # never ran: nothing learned
        tensors = {
            "log_scale": self.log_scale.detach().cpu().contiguous(),
            "mean": self.mean.cpu().contiguous(),
            "std": self.std.cpu().contiguous(),
        }
        if self._sums is not None:
            tensors["sums"] = self._sums.cpu().contiguous()
        adam = self.optimizer.state.get(self.log_scale, {}) if self.optimizer is not None else {}
        if adam:  # so a resumed run steps its scales as the uninterrupted one would
            tensors["adam_step"] = torch.as_tensor(adam["step"], dtype=torch.float32).reshape(()).cpu()
            tensors["adam_exp_avg"] = adam["exp_avg"].detach().cpu().contiguous()
            tensors["adam_exp_avg_sq"] = adam["exp_avg_sq"].detach().cpu().contiguous()
        meta = {"count": str(self._count), "seen": str(self._seen)}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.state_file(folder)), metadata=meta)

    def load(self, folder: Path) -> None:
        path = self.state_file(folder)
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: the run's client trained with mi_bottleneck but its noise scales were not saved; "
                "resume from another checkpoint or drop privacy.defenses.mi_bottleneck"
            )
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as reader:
                meta = reader.metadata() or {}
            log_scale, mean, std = tensors["log_scale"], tensors["mean"], tensors["std"]
        except Exception as error:  # any unreadable file is one clear error
            raise CheckpointError(
                f"{path}: mi_bottleneck state unreadable ({error}); resume from another checkpoint"
            ) from None
        if not (log_scale.shape == mean.shape == std.shape and log_scale.dim() == 1):
            raise CheckpointError(f"{path}: mi_bottleneck state has mismatched shapes; resume from another checkpoint")
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        self._set_scales(log_scale.to(device))
        self.mean, self.std = mean.float().to(device), std.float().to(device)
        self._sums = tensors["sums"].to(device) if "sums" in tensors else None
        self._count, self._seen = int(meta.get("count", 0)), int(meta.get("seen", self.calibration))
        if self.optimizer is not None and "adam_step" in tensors:
            self.optimizer.state[self.log_scale] = {
                "step": tensors["adam_step"].float().cpu(),
                "exp_avg": tensors["adam_exp_avg"].to(device),
                "exp_avg_sq": tensors["adam_exp_avg_sq"].to(device),
            }
