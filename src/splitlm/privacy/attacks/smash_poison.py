"""Smash poisoning (Wu et al.; survey §5.1.6): a malicious client perturbs the smashed data it sends by gradient ascent.

The server's gradient for the smashed data points where the training loss grows. The malicious client keeps a running
mean of the gradients the server returned (its history: per feature, the mean over real tokens of each training
step's ``grad``, decayed by ``momentum``) and adds to every real token of each training forward's smashed data a step
along that direction: ``h_t + eps * ||h_t|| * u``, ``u`` the history's unit vector (B, T, d) -> same. The server
trains its trunk (and, through the returned gradient, the client its own side) on features pushed towards a higher
loss, and what they learn is averaged into the global model. Nothing is sent perturbed before the first gradient came
back, nor in evaluation. With ``label_flip`` the client also trains on flipped classes (``label_flip.py``'s
untargeted flip on classification-style data), which Wu et al. found much stronger than either alone.

``privacy.client_attack: {smash_poison: {clients: [3], eps: 1.0}}``. The report counts the perturbed forwards and
the rows flipped.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from pydantic import Field

from splitlm.data import Example
from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.label_flip import chosen_rows, flip_classes
from splitlm.privacy.client_attack import CLIENT_ATTACKS, KEY, ClientAttack, ClientAttackSettings
from splitlm.transport import Message


@CLIENT_ATTACKS.component
class SmashPoison(ClientAttack):
    name = "smash_poison"

    class Settings(ClientAttackSettings):
        eps: float = Field(
            1.0,
            gt=0,
            allow_inf_nan=False,
            description="Size of the ascent step per token, relative to the norm of that token's smashed data.",
        )
        momentum: float = Field(
            0.9,
            ge=0,
            lt=1,
            allow_inf_nan=False,
            description="Decay of the history of the server's gradients (0: the last step's gradient alone).",
        )
        label_flip: bool = Field(
            False,
            description="Also flip the class of every training row (classification-style data), as label_flip does.",
        )

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.history: torch.Tensor | None = None  # (d,) running mean of the server's gradients, float32
        self.forwards = 0  # training forwards sent perturbed
        self._masks: dict[tuple[str, int, int], torch.Tensor | None] = {}  # forwards in flight: their masks
        self.flipped = 0
        self._lock = threading.Lock()  # micro-batches in flight reply on other threads

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if settings.label_flip and config.data.format != "instruction":
            problems.append(
                f"{KEY}.smash_poison.label_flip: flips classes of classification-style instruction data; "
                f"data.format={config.data.format} has none, set it to false"
            )
        return problems

    def examples(self, examples: list[Example]) -> list[Example]:
        if not self.settings.label_flip:  # type: ignore[attr-defined]
            return examples
        if not self.context.responses:
            raise PrivacyError(
                f"{KEY}.smash_poison.label_flip: the data's responses are not classification-style (2..10 distinct "
                "responses); set it to false"
            )
        examples = list(examples)
        every = chosen_rows(len(examples), 1.0, self.name, self.context)
        self.flipped = flip_classes(examples, every, None, self.context)
        return examples

    def direction(self) -> torch.Tensor | None:
        """The unit ascent direction (d,), or None before the first gradient came back."""
        with self._lock:
            if self.history is None:
                return None
            norm = self.history.norm()
            return self.history / norm if norm > 0 else None

    def perturb(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` (B, T, d) one ascent step further, on real tokens (``mask`` (B, T), 1 = real)."""
        unit = self.direction()
        if unit is None:
            return hidden
        size = hidden.detach().float().norm(dim=-1, keepdim=True)  # (B, T, 1)
        if mask is not None:
            size = size * mask.unsqueeze(-1).to(size.device, size.dtype)
        delta = (self.settings.eps * size * unit.to(hidden.device)).to(hidden.dtype)  # type: ignore[attr-defined]
        with self._lock:
            self.forwards += 1
        return hidden + delta  # (B, T, d); a constant shift: the gradient reaches the head as before

    def on_request(self, message: Message) -> Message:
        if message.kind != "forward" or "hidden" not in message.tensors:
            return message
        tensors = dict(message.tensors)
        mask = tensors.get("attention_mask")
        with self._lock:
            self._masks[message.key] = mask  # the gradient's reply (U-shape: to a backward) has no mask
        tensors["hidden"] = self.perturb(tensors["hidden"], mask)
        return message.replace(tensors)

    def on_reply(self, request: Message, reply: Message) -> Message:
        if reply.kind not in ("gradients", "loss") or "grad" not in reply.tensors:
            return reply
        with self._lock:
            mask = self._masks.pop(request.key, None)
        grad = reply.tensors["grad"].detach().float()  # (B, T, d)
        weights = torch.ones_like(grad[..., :1]) if mask is None else mask.to(grad.device, grad.dtype).unsqueeze(-1)
        mean = ((grad * weights).sum(dim=(0, 1)) / weights.sum().clamp(min=1.0)).cpu()  # (d,)
        momentum = self.settings.momentum  # type: ignore[attr-defined]
        with self._lock:
            self.history = mean if self.history is None else momentum * self.history + (1 - momentum) * mean
        return reply

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "perturbed_forwards": self.forwards,
            "flipped": self.flipped,
        }
