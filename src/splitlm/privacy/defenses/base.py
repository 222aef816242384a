"""The ``Defense`` interface, its registry, and the chain a client applies at each pipeline step.

A defense is a client-side component with one hook per place it can act; each hook defaults to doing
nothing, so a defense overrides only the steps it works at:

| hook          | step | what it sees                                              |
|---------------|------|-----------------------------------------------------------|
| ``tokens``    | 2    | input ids before the head (token-level: DxP, SanText, ...) |
| ``smashed``   | 3    | the head's output before it is sent (differentiable)       |
| ``labels``    | 3    | labels before a vanilla split sends them                   |
| ``grad_up``   | 7    | the gradient a U-shaped client sends for the trunk output  |
| ``grad_down`` | 9    | the gradient the client receives for its head output       |
| ``extra_loss``| 10   | a loss on (input embeddings, smashed data) added to the head's backward |

Defenses with a DP mechanism describe one release of one sequence as a ``dp_accounting`` event; the
accountant (``splitlm.privacy.accounting``) composes them over the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from dp_accounting import dp_event

from splitlm.errors import PrivacyError


@dataclass
class DefenseContext:
    """What a client-side defense may use: the client's own pretrained token vectors and its settings."""

    token_embeddings: torch.Tensor  # (V, d), detached; what the head's embedding gives each id
    special_ids: frozenset[int]  # ids never substituted (padding, BOS/EOS)
    mode: str  # "vanilla" or "ushape"
    seq_len: int  # train.seq_len: the most tokens of one sequence in one release
    seed: int

    @property
    def vocab_size(self) -> int:
        return int(self.token_embeddings.shape[0])

    def generator(self, salt: int) -> torch.Generator:
        """A private random stream per defense (same seed, same noise), on the embeddings' device."""
        gen = torch.Generator(device=self.token_embeddings.device)
        gen.manual_seed(self.seed * 1_000_003 + salt)
        return gen


class Defense:
    """Base of every defense: identity at every step. Subclasses set ``name`` and override their hooks."""

    name: ClassVar[str] = ""

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids  # (B, T)

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden  # (B, T, d)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels  # (B, T), -100 where no loss

    def grad_up(self, grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return grad  # (B, T, d)

    def grad_down(self, grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return grad  # (B, T, d)

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        return None  # a scalar added to the client's loss; gradients flow into ``hidden`` only

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        """The DP mechanism one sequence goes through each time it is sent; None where there is none."""
        return None


DefenseFactory = Callable[[Any, DefenseContext], Defense]
DEFENSES: dict[str, DefenseFactory] = {}


def register_defense(name: str) -> Callable[[DefenseFactory], DefenseFactory]:
    """Register a factory ``(settings section, context) -> Defense`` under ``privacy.defenses`` name ``name``."""

    def wrap(factory: DefenseFactory) -> DefenseFactory:
        DEFENSES[name] = factory
        return factory

    return wrap


class DefenseChain:
    """The configured defenses in order; the client calls one method per pipeline step."""

    def __init__(self, defenses: list[Defense]) -> None:
        self.defenses = defenses

    def __bool__(self) -> bool:
        return bool(self.defenses)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses]

    def _through(self, hook: str, value: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        """``value`` through every defense's ``hook`` in order."""
        for d in self.defenses:
            value = getattr(d, hook)(value, *context)
        return value

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._through("tokens", input_ids, attention_mask)

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._through("smashed", hidden, attention_mask)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._through("labels", labels)

    def grad_up(self, grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._through("grad_up", grad, attention_mask)

    def grad_down(self, grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._through("grad_down", grad, attention_mask)

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        terms = [t for d in self.defenses if (t := d.extra_loss(embeddings, hidden, attention_mask)) is not None]
        return torch.stack(terms).sum() if terms else None

    @property
    def wants_embeddings(self) -> bool:
        return any(type(d).extra_loss is not Defense.extra_loss for d in self.defenses)

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        """Every DP mechanism a sequence goes through per release; None when no defense has one.

        The epsilon they give covers the channels those mechanisms guard (the smashed data for
        smashed_noise, the gradients sent for grad_noise, the labels for label_dp), not every message.
        """
        events: list[dp_event.DpEvent] = []
        for d in self.defenses:
            own = d.dp_events()
            if own:
                events.extend(own)
        return events or None


def build_defenses(privacy: Any, context: DefenseContext) -> DefenseChain:
    """The chain ``privacy.defenses`` names, each built from its own settings section (``privacy.<name>``)."""
    from splitlm.privacy import defenses as _  # noqa: F401  (registers the built-in defenses)

    chain = []
    for name in privacy.defenses:
        factory = DEFENSES.get(name)
        if factory is None:
            raise PrivacyError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
        chain.append(factory(getattr(privacy, name), context))
    return DefenseChain(chain)
