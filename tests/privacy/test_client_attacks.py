"""Malicious clients (``privacy.client_attack``): each attack's mechanics on the tiny model, and its refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from splitlm.config import Config
from splitlm.data import IGNORE_INDEX, Example
from splitlm.errors import SplitLMError
from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import Federation, build_federation

MakeConfig = Callable[..., Config]

TWO = (
    "data.format=instruction",
    "framework.name=sflv1",
    "framework.num_clients=2",
    "framework.rounds=1",
    "train.steps=2",
)


def responses(examples: list[Example]) -> list[list[int]]:
    out = []
    for e in examples:
        start = next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)
        out.append(e.input_ids[start:])
    return out


def federation(make_config: MakeConfig, name: str, *overrides: str) -> Federation:
    return build_federation(make_config(name, *TWO, *overrides))


def test_label_flip_trains_the_malicious_client_on_the_other_class(make_config: MakeConfig) -> None:
    honest = federation(make_config, "honest")
    flipped = federation(make_config, "flip", "privacy.client_attack={label_flip: {clients: [1]}}")
    classes = honest.data.responses
    assert len(classes) == 2
    # the honest client trains on its rows as they are
    assert [e.input_ids for e in flipped.members[0].examples] == [e.input_ids for e in honest.members[0].examples]
    before, after = responses(honest.members[1].examples), responses(flipped.members[1].examples)
    assert len(before) == len(after) > 0
    for old, new in zip(before, after, strict=True):
        if old in classes:  # every whole response is the other class's now
            assert new == classes[1 - classes.index(old)]
    assert sum(old in classes for old in before) > len(before) // 2
    # its held-out examples (its own accuracy) are the true ones
    assert [c[1] for c in flipped.members[1].choices] == [c[1] for c in honest.members[1].choices]
    assert flipped.members[1].pipeline is not None and flipped.members[0].pipeline is not None
    assert [a.name for a in flipped.members[1].pipeline.attacks] == ["label_flip"]
    assert flipped.members[0].pipeline.attacks == []


def test_label_flip_to_a_target_and_a_fraction(make_config: MakeConfig) -> None:
    honest = federation(make_config, "honest")
    fed = federation(
        make_config, "flip", "privacy.client_attack={label_flip: {clients: [0], target: rotten, fraction: 0.5}}"
    )
    classes = honest.data.responses
    assert fed.members[0].pipeline is not None
    rotten = fed.members[0].pipeline.attacks[0].context.classes.index("rotten")
    before, after = responses(honest.members[0].examples), responses(fed.members[0].examples)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed and all(after[i] == classes[rotten] for i in changed)
    fresh_rows = sum(r == classes[1 - rotten] for r in before)
    assert 0 < len(changed) < fresh_rows  # only some of the fresh rows (half of all rows are chosen)


def test_label_flip_permutes_the_loss_tokens_of_language_modelling_data(make_config: MakeConfig) -> None:
    lm = ("data.format=lm",)
    honest = federation(make_config, "honest", *lm)
    fed = federation(make_config, "flip", *lm, "privacy.client_attack={label_flip: {clients: [1], tokens: shift}}")
    assert fed.members[1].pipeline is not None
    vocab = fed.members[1].pipeline.attacks[0].context.vocab_size
    for old, new in zip(honest.members[1].examples, fed.members[1].examples, strict=True):
        assert new.input_ids == old.input_ids  # the inputs stay; what it is taught to predict does not
        assert new.labels == [t if t == IGNORE_INDEX else (t + 1) % vocab for t in old.labels]


def test_the_summary_reports_each_client_attack(make_config: MakeConfig) -> None:
    config = make_config("run", *TWO, "privacy.client_attack={label_flip: {clients: [1]}}")
    run_framework(config)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    report = summary["privacy"]["client_attacks"]["label_flip"]
    assert report["clients"] == [1]
    assert 0 < report["flipped"] <= report["rows"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.client_attack={label_flip: {clients: [2]}}",), r"clients: \[2\] outside 0\.\.1"),
        (("privacy.client_attack={label_flip: {clients: []}}",), "name at least one malicious client"),
        (("privacy.client_attack={label_flip: {clients: [1, 1]}}",), "names a client twice"),
        (("privacy.client_attack={label_flip: {target: stale}}",), r"'stale': not one of the data's classes"),
        (
            ("data.format=lm", "privacy.client_attack={label_flip: {target: rotten}}"),
            "data.format=lm has no classes",
        ),
        (("privacy.client_attack={label_flop: {}}",), "did you mean 'label_flip'"),
    ],
)
def test_client_attack_refusals(make_config: MakeConfig, overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(SplitLMError, match=message) as caught:
        run_framework(make_config("bad", *TWO, *overrides))
    assert "\n" not in str(caught.value)


def test_a_client_attack_needs_a_split(make_config: MakeConfig) -> None:
    with pytest.raises(SplitLMError, match=r"framework\.name=centralized has none"):
        run_framework(make_config("bad", "framework.name=centralized", "privacy.client_attack=[label_flip]"))
