"""The ``Defense`` interface, its registry, and how a client's defenses enter its pipeline.

A defense is a client-side component. Those that act on what crosses the cut are message mods
(``MessageDefense``, see ``transport/mods.py``); those that act on the client's private inputs or loss are
client plugins (``InputDefense``, see ``runtime/plugins.py``). Each hook defaults to doing nothing, so a
defense overrides only the steps it works at:

| hook          | step | kind    | what it sees                                                |
|---------------|------|---------|-------------------------------------------------------------|
| ``tokens``    | 2    | plugin  | input ids before the head (token-level: DxP, SanText, ...)  |
| ``embeddings``| 2    | plugin  | the head's input token vectors, after ``tokens`` (TextObfuscator) |
| ``smashed``   | 3    | mod     | the head's output in a forward/eval request (differentiable)|
| ``labels``    | 3    | mod     | the labels a vanilla split sends                            |
| ``grad_up``   | 7    | mod     | the gradient a U-shaped client sends for the trunk output   |
| ``grad_down`` | 9    | mod     | the gradient the client receives for its head output        |
| ``extra_loss``| 10   | plugin  | a loss on (input embeddings, smashed data) added to the head's backward |
| ``after_step``| 10   | plugin  | after the client's optimizer step: a defense steps its own optimizer |

A defense with trained state of its own (mi_bottleneck's noise scales) keeps it with the client's adapters:
``save(folder)`` / ``load(folder)`` (``defense-<name>.safetensors`` under RUN/adapters and every checkpoint's
client folder) ride on the client plugins' hooks of the same names, so such a defense is an ``InputDefense``
(it needs ``after_step`` anyway); one that is also a ``MessageDefense`` (it noises the smashed data) has two
``labels`` hooks, the mod's ``labels(labels)`` and the plugin's ``labels(step, labels)``, and answers both (see
``mi_bottleneck.py``). ``report()`` gives a few numbers for the run's summary
(``summary["privacy"]["defenses"][name]``), e.g. a mutual-information bound.

Defenses with a DP mechanism describe one release of one sequence as a ``dp_accounting`` event; the
accountant (``splitlm.privacy.accounting``) composes them over the run.

A defense is a ``registry.Component``: one class in its own module declares its ``name``, its ``Settings`` (what a
config gives under ``privacy.defenses.<name>``), its ``problems`` (what it cannot work with) and the hooks above,
and registers itself with ``@DEFENSES.component``. A config names defenses in order, with their settings
(``privacy.defenses: {smashed_noise: {clip: 1.0}, nopeek: {beta: 4}}``; a list of names means their defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from dp_accounting import dp_event
from torch import nn

from splitlm.config.schema import as_mapping
from splitlm.data import Example
from splitlm.errors import PrivacyError
from splitlm.models import Stage
from splitlm.registry import Component, ComponentRegistry
from splitlm.runtime.plugins import ClientPlugin
from splitlm.runtime.rng import derive
from splitlm.transport import Message, Mod


@dataclass
class DefenseContext:
    """What a client-side defense may use: the client's own pretrained token vectors and its settings; where the
    pipeline has them, the client's live parts, the public pretrained parts, its training examples and a cache
    folder (defenses that learn, e.g. against a simulated attacker or away from the public weights)."""

    token_embeddings: torch.Tensor  # (V, d), detached; what the head's embedding gives each id
    special_ids: frozenset[int]  # ids never substituted (padding, BOS/EOS)
    mode: str  # "vanilla" or "ushape"
    seq_len: int  # train.seq_len: the most tokens of one sequence in one release
    seed: int
    # the client's trainable parts as it trains them ("head" [+ "tail"], possibly peft-wrapped); empty: unknown
    parts: dict[str, nn.Module] = field(default_factory=dict)
    # role -> that part with the PUBLIC pretrained weights (no adapters), frozen, in eval mode, loaded on demand
    # from the model source on the client's device (never a copy of a possibly resumed or trained part); None: none
    public_stage: Callable[[str], Stage] | None = None
    examples: Sequence[Example] = ()  # the client's own training examples (packed as it trains on them)
    pad_id: int = 0
    cache_dir: Path | None = None  # where a defense may keep what it trained once (e.g. <output_dir>/cache)
    model_key: str = ""  # the model's name and revision, for cache keys
    # the chain's token defenses (``tokens`` hooks, e.g. dxp) as training applies them, for a defense that trains the
    # client's parts on its own (dualguard's local warm-up): (ids, mask, *key) -> ids; set by ``build_defenses``
    tokens: Callable[..., torch.Tensor] | None = None
    # the text of each token id as the tokenizer spells it (``convert_ids_to_tokens``), for defenses that pick tokens
    # by what they spell (the token defenses' ``numbers``); empty: unknown
    token_texts: Sequence[str] = ()

    @property
    def vocab_size(self) -> int:
        return int(self.token_embeddings.shape[0])

    def generator(self, salt: int) -> torch.Generator:
        """A private random stream per defense (same seed, same noise), on the embeddings' device."""
        gen = torch.Generator(device=self.token_embeddings.device)
        gen.manual_seed(self.seed * 1_000_003 + salt)
        return gen


class Defense(Component):
    """Base of every defense. Subclasses set ``name`` and ``Settings`` and derive from ``MessageDefense`` or
    ``InputDefense``; one whose constructor needs more than its settings (the client's token vectors, its split)
    overrides ``create``.

    A defense that draws noise keeps its stream in ``generator``; before each piece of work the pipeline
    ``reseed``s it from (its seed, the work's key), so the noise does not depend on which process draws it
    or on what it drew before (``runtime/rng.py``)."""

    generator: torch.Generator | None = None
    _base_seed: int | None = None

    @classmethod
    def create(cls, settings: Any, context: DefenseContext) -> Self:
        """The defense with ``settings`` (its validated ``Settings``) on the client's ``context``."""
        return cls(settings)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is not None and not framework.split:
            return [f"privacy.defenses.{cls.name}: defenses act at the cut; framework.name={framework.name} has none"]
        return []

    def reseed(self, *key: object) -> None:
        if self.generator is None:
            return
        if self._base_seed is None:
            self._base_seed = self.generator.initial_seed()
        self.generator.manual_seed(derive(self._base_seed, *key))

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        """The DP mechanism one sequence goes through each time it is sent; None where there is none."""
        return None

    def report(self) -> dict[str, float | None]:
        """A few numbers for the run's summary (``summary["privacy"]["defenses"][name]``); none by default."""
        return {}

    def imitate(self, context: DefenseContext) -> bool:
        """What a defense-aware attacker holding only the public weights and public text does with this defense's
        own recipe for the client's parts: train ``context.parts`` (a trainable copy of the public head, the public
        tail in U-shape) as the client would, on ``context.examples`` (the attacker's public text), with its own
        seed. Returns whether it changed them; by default it does nothing (the defense has no such recipe)."""
        return False

    def state_file(self, folder: Path) -> Path:
        """Where ``save`` keeps this defense's trained state in a client's adapter or checkpoint folder."""
        return folder / f"defense-{self.name}.safetensors"

    def save(self, folder: Path) -> None:
        """Write this defense's trained state under ``folder`` (with the client's adapters); nothing by default."""

    def load(self, folder: Path) -> None:
        """Read back what ``save`` wrote under ``folder``; nothing by default."""


class MessageDefense(Defense, Mod):
    """A defense on the messages the client sends (steps 3, 7) and receives (step 9): a client mod."""

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden  # (B, T, d)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels  # (B, T), -100 where no loss

    def grad_up(self, grad: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return grad  # (B, T, d)

    def grad_down(self, grad: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return grad  # (B, T, d)

    def on_request(self, message: Message) -> Message:
        self.reseed(*message.key, message.kind)
        tensors = dict(message.tensors)
        mask = tensors.get("attention_mask")
        if message.kind in ("forward", "eval"):
            if "hidden" in tensors:
                tensors["hidden"] = self.smashed(tensors["hidden"], mask)
            if "labels" in tensors:
                tensors["labels"] = self.labels(tensors["labels"])
        elif message.kind == "backward" and "grad" in tensors:
            tensors["grad"] = self.grad_up(tensors["grad"], mask)
        else:
            return message
        return message.replace(tensors)

    def on_reply(self, request: Message, reply: Message) -> Message:
        if reply.kind not in ("gradients", "loss") or "grad" not in reply.tensors:
            return reply
        self.reseed(*reply.key, "down")
        grad = self.grad_down(reply.tensors["grad"], request.tensors.get("attention_mask"))
        return reply.replace({**reply.tensors, "grad": grad})


class InputDefense(Defense, ClientPlugin):
    """A defense on the client's own inputs or loss (steps 2, 10): a client plugin (``tokens``, ``extra_loss``)."""

    def on_forward(self, key: tuple[str, int, int], training: bool) -> None:
        self.reseed(*key)


DEFENSES = ComponentRegistry[Defense](
    "defense", "privacy.defenses", error=PrivacyError, builtins=("splitlm.privacy.defenses",)
)


class DefenseChain:
    """The configured defenses in order: the message ones enter the client's mods, the others its plugins."""

    def __init__(self, defenses: list[Defense]) -> None:
        self.defenses = defenses

    def __bool__(self) -> bool:
        return bool(self.defenses)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses]

    @property
    def mods(self) -> list[MessageDefense]:
        return [d for d in self.defenses if isinstance(d, MessageDefense)]

    @property
    def plugins(self) -> list[InputDefense]:
        return [d for d in self.defenses if isinstance(d, InputDefense)]

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *key: object) -> torch.Tensor:
        """The input ids after every defense's ``tokens`` hook, their noise drawn for ``key`` (outside the split
        training's keys: a defense's own training of the client's parts)."""
        for defense in self.plugins:
            defense.reseed(*key)
            input_ids = defense.tokens(input_ids, attention_mask)
        return input_ids

    def reports(self) -> dict[str, dict[str, float | None]]:
        """Each defense's ``report``, by name, in order."""
        return {d.name: d.report() for d in self.defenses}

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


def token_texts(tokenizer: Any) -> tuple[str, ...]:
    """``DefenseContext.token_texts`` for a Hugging Face tokenizer: each id's token as the tokenizer spells it."""
    return tuple(str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def build_defenses(spec: Any, context: DefenseContext) -> DefenseChain:
    """The chain ``spec`` (``privacy.defenses``: ``{name: settings}`` in order) names, each with its own settings."""
    chain = DefenseChain(DEFENSES.build(as_mapping(spec), context))
    context.tokens = chain.tokens
    return chain
