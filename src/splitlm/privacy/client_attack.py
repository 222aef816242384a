"""Simulated malicious clients, installed by name: the ``ClientAttack`` interface and its registry.

``privacy.client_attack`` names integrity attacks (survey §5.1.6-5.1.7) with their settings, e.g.
``{backdoor: {clients: [3], trigger: " cf", target: rotten}}``; every attack's ``clients`` are the malicious
clients' indices (in a networked ``splitlm client`` process, the attack runs when that client's own index is
listed). Empty, every client is honest. An attack is a client plugin (``runtime/plugins.py``) and a client mod
(``transport/mods.py``), the innermost of the client's mods (it acts as the client's own code, before any
defense), and it may rewrite the malicious client's training rows before they are packed and trained on
(``examples``: the backdoor's trigger and target, a label flip). ``report`` gives a few numbers for the run's
``summary.json`` (``privacy.client_attacks.<name>``).

The attacks themselves live in ``privacy.attacks`` (``label_flip.py``, ``smash_poison.py``, ``backdoor.py``),
which the training code never imports: this registry names their modules as strings (``builtins``), so the
pipeline asks it for an attack by name and the import-linter contracts hold by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field
from torch import nn

from splitlm.config.schema import as_mapping
from splitlm.data import IGNORE_INDEX, Example
from splitlm.errors import PrivacyError
from splitlm.registry import Component, ComponentRegistry, ComponentSettings
from splitlm.runtime.plugins import ClientPlugin
from splitlm.transport import Mod

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from splitlm.config import Config
    from splitlm.models import ModelSource

KEY = "privacy.client_attack"


class ClientAttackSettings(ComponentSettings):
    """What every client attack has: the malicious clients."""

    clients: list[int] = Field(
        default_factory=lambda: [0],
        description="The malicious clients' indices (0-based, as framework.num_clients counts them); the others are "
        "honest.",
    )


@dataclass
class ClientAttackContext:
    """What a malicious client may use: its own index, the tokenizer, and for classification-style instruction
    data (few distinct responses, ``frameworks.setup.MAX_CHOICES``) the candidate responses."""

    index: int
    seed: int
    tokenizer: PreTrainedTokenizerBase | None = None
    seq_len: int = 0  # train.seq_len: a rewritten row is cut back to it as tokenize_rows cuts rows
    data_format: str = "lm"  # data.format: "lm" or "instruction"
    vocab_size: int = 0
    # classification-style data: each candidate response's token ids as tokenize_rows appends them (EOS included)
    # and its text, in the same order (sorted, as the accuracy's choices list them); empty for other data
    responses: list[list[int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    local_steps: int = 1  # the client's steps in one round (framework.local_steps, or train.steps / rounds)
    # the client's trainable parts ("head" [+ "tail"], possibly peft-wrapped), given once they are built
    parts: dict[str, nn.Module] = field(default_factory=dict)


def attack_context(config: Config, source: ModelSource, index: int, responses: list[list[int]]) -> ClientAttackContext:
    """What client ``index`` of the run ``config`` may use to attack; ``responses``: classification-style data's
    candidate responses (``RunData.responses``), empty for other data."""
    tokenizer = source.tokenizer()
    eos = tokenizer.eos_token_id if config.data.add_eos else None
    classes = [tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids).strip() for ids in responses]
    return ClientAttackContext(
        index=index,
        seed=config.seed,
        tokenizer=tokenizer,
        seq_len=config.train.seq_len,
        data_format=config.data.format,
        vocab_size=int(source.config().vocab_size),
        responses=[list(ids) for ids in responses],
        classes=classes,
        local_steps=config.framework.steps_per_round(config.train.steps),
    )


def response_start(example: Example) -> int:
    """Where ``example``'s loss starts: its first label that counts (the response of a prompt/response pair)."""
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


class ClientAttack(Component, ClientPlugin, Mod):
    """Base of a simulated malicious client: a client plugin and a client mod with its own ``Settings`` (with
    ``clients``) and ``problems``; ``examples`` rewrites its training rows (none by default). An attack's own
    attributes must not shadow a hook's name (``rows``, ``labels``, ``tokens``, ...)."""

    Settings = ClientAttackSettings

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.context = ClientAttackContext(index=0, seed=0)

    @classmethod
    def create(cls, settings: Any, context: ClientAttackContext) -> Self:
        """The attack with ``settings`` on the malicious client ``context`` describes."""
        attack = cls(settings)
        attack.context = context
        return attack

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        key = f"{KEY}.{cls.name}.clients"
        problems = []
        if framework is not None and not framework.split:
            problems.append(
                f"{KEY}.{cls.name}: a malicious client of a split run; framework.name={framework.name} has none"
            )
        count = config.framework.num_clients
        outside = [i for i in settings.clients if not 0 <= i < count]
        if not settings.clients:
            problems.append(f"{key}: name at least one malicious client (0..{count - 1})")
        elif outside:
            problems.append(
                f"{key}: {outside} outside 0..{count - 1} (framework.num_clients={count}); name clients of the run"
            )
        elif len(set(settings.clients)) < len(settings.clients):
            problems.append(f"{key}: {settings.clients} names a client twice; name each once")
        return problems

    def examples(self, examples: list[Example]) -> list[Example]:
        """The malicious client's training rows as it trains on them (before packing); as they are by default."""
        return examples

    def report(self) -> dict[str, Any]:
        """A few numbers for ``summary.json`` (``privacy.client_attacks.<name>``)."""
        return {"clients": list(self.settings.clients)}  # type: ignore[attr-defined]


CLIENT_ATTACKS = ComponentRegistry[ClientAttack](
    "client attack",
    KEY,
    error=PrivacyError,
    builtins=(
        "splitlm.privacy.attacks.label_flip",
        "splitlm.privacy.attacks.smash_poison",
        "splitlm.privacy.attacks.backdoor",
        "splitlm.privacy.attacks.boost",
    ),
)


def build_client_attacks(spec: Any, context: ClientAttackContext) -> list[ClientAttack]:
    """The attacks ``spec`` (``privacy.client_attack``) names whose ``clients`` include ``context.index``, in order,
    with their settings: none for an honest client."""
    mapping = as_mapping(spec)
    chosen: dict[str, Any] = {}
    for name, settings in CLIENT_ATTACKS.parse(mapping).items():
        if context.index in settings.clients:  # type: ignore[attr-defined]
            chosen[name] = mapping[name]  # type: ignore[index]
    return CLIENT_ATTACKS.build(chosen, context)


def attack_reports(attacks: Sequence[Sequence[ClientAttack]]) -> dict[str, dict[str, Any]]:
    """Each attack's ``report`` by name, over the malicious clients that ran it here (``attacks``: each client's):
    numbers summed, the rest from the first of them."""
    reports: dict[str, dict[str, Any]] = {}
    for own in attacks:
        for attack in own:
            report = attack.report()
            merged = reports.get(attack.name)
            if merged is None:
                reports[attack.name] = dict(report)
                continue
            for key, value in report.items():
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and isinstance(merged.get(key), int | float):
                    merged[key] = merged[key] + value
    return reports
