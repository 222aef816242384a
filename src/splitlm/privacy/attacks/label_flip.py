"""Label flipping (survey §5.1.6): dirty-label poisoning by a malicious client.

The malicious client trains on wrong answers. On classification-style instruction data (Rotten Tomatoes' " fresh"
/ " rotten": few distinct responses, ``ClientAttackContext.responses``) a flipped row's response becomes another
class's: ``target`` (a targeted flip, every flipped row gets that class) or, unset, the next class in order (with
two classes, the other one: an untargeted flip); the row stays consistent (its input ids carry the new response
too, as if the client's data said so). On other data the loss tokens of a flipped row are mapped to other tokens
(``tokens``: a seeded random permutation of the vocabulary, or each id shifted by one), its inputs unchanged.
``fraction`` of the client's rows are flipped, chosen by a seeded draw. Kohankhaki et al.; Gajbhiye et al.

``privacy.client_attack: {label_flip: {clients: [3], fraction: 1.0}}``. The report counts the rows flipped.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
from pydantic import Field

from splitlm.data import IGNORE_INDEX, Example, shorten
from splitlm.errors import PrivacyError
from splitlm.privacy.client_attack import (
    CLIENT_ATTACKS,
    KEY,
    ClientAttack,
    ClientAttackContext,
    ClientAttackSettings,
    response_start,
)


def class_of(example: Example, responses: list[list[int]]) -> int | None:
    """Which of ``responses`` ``example``'s response is (its tokens from the first loss token on), or None."""
    response = example.input_ids[response_start(example) :]
    return responses.index(response) if response in responses else None


def with_response(example: Example, response: list[int], seq_len: int) -> Example:
    """``example``'s prompt followed by ``response`` (loss on it), cut to ``seq_len`` as tokenize_rows cuts rows."""
    prompt = example.input_ids[: response_start(example)]
    rewritten = Example(prompt + response, [IGNORE_INDEX] * len(prompt) + list(response), example.label)
    return shorten(rewritten, seq_len) if seq_len else rewritten


def class_index(name: str, context: ClientAttackContext, key: str) -> int:
    """The index of class ``name`` among the data's classes (a one-line ``PrivacyError`` if it is none of them)."""
    if not context.classes:
        raise PrivacyError(
            f"{key}={name!r} names a class, but data.name's responses are not classification-style (2..10 distinct "
            "responses of instruction data); unset it"
        )
    wanted = name.strip()
    if wanted not in context.classes:
        raise PrivacyError(f"{key}={name!r}: not one of the data's classes {context.classes}; name one of them")
    return context.classes.index(wanted)


def chosen_rows(count: int, fraction: float, salt: str, context: ClientAttackContext) -> set[int]:
    """``fraction`` of ``count`` rows (rounded, at least one where fraction > 0), by a draw seeded by the run's seed,
    the client and ``salt`` (the same on every machine)."""
    size = min(count, max(1, round(fraction * count))) if fraction > 0 and count else 0
    return set(random.Random(f"{salt}/{context.seed}/{context.index}").sample(range(count), size))


def flip_classes(examples: list[Example], chosen: set[int], target: int | None, context: ClientAttackContext) -> int:
    """Flip the ``chosen`` rows of classification-style ``examples`` in place to ``target`` (None: the next class);
    returns how many changed."""
    responses = context.responses
    flipped = 0
    for i in sorted(chosen):
        own = class_of(examples[i], responses)
        if own is None:
            continue  # its response was cut (train.seq_len) or is none of the classes
        new = target if target is not None else (own + 1) % len(responses)
        if new != own:
            examples[i] = with_response(examples[i], responses[new], context.seq_len)
            flipped += 1
    return flipped


@CLIENT_ATTACKS.component
class LabelFlip(ClientAttack):
    name = "label_flip"

    class Settings(ClientAttackSettings):
        fraction: float = Field(
            1.0, gt=0, le=1, allow_inf_nan=False, description="Share of the malicious client's rows flipped."
        )
        target: str | None = Field(
            None,
            description="Classification-style data: the class every flipped row gets (targeted, e.g. rotten); unset: "
            "the next class (with two, the other one).",
        )
        tokens: Literal["permute", "shift"] = Field(
            "permute",
            description="Other data: a flipped row's loss tokens are mapped by a seeded random permutation of the "
            "vocabulary (permute) or each id + 1 (shift).",
        )

    flipped = 0
    rows_seen = 0

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if settings.target is not None and config.data.format != "instruction":
            problems.append(
                f"{KEY}.label_flip.target: names a class of classification-style instruction data; data.format="
                f"{config.data.format} has no classes, unset it"
            )
        return problems

    def examples(self, examples: list[Example]) -> list[Example]:
        settings: Any = self.settings
        context = self.context
        examples = list(examples)
        chosen = chosen_rows(len(examples), settings.fraction, self.name, context)
        self.rows_seen = len(examples)
        if context.responses:
            key = f"{KEY}.label_flip.target"
            target = None if settings.target is None else class_index(settings.target, context, key)
            self.flipped = flip_classes(examples, chosen, target, context)
            return examples
        if settings.target is not None:
            class_index(settings.target, context, f"{KEY}.label_flip.target")  # raises: no classes here
        mapping = self.token_map()
        for i in sorted(chosen):
            labels = torch.tensor(examples[i].labels)
            keep = labels == IGNORE_INDEX
            labels = torch.where(keep, labels, mapping[labels.clamp(min=0)])
            examples[i] = Example(examples[i].input_ids, labels.tolist(), examples[i].label)
            self.flipped += 1
        return examples

    def token_map(self) -> torch.Tensor:
        """Each token id's replacement (V,)."""
        vocab = self.context.vocab_size
        if self.settings.tokens == "shift":  # type: ignore[attr-defined]
            return (torch.arange(vocab) + 1) % vocab
        gen = torch.Generator().manual_seed(self.context.seed * 1_000_003 + 17)
        return torch.randperm(vocab, generator=gen)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rows": self.rows_seen, "flipped": self.flipped}
