"""``pii_recovered`` on hand-made cases, and ``score`` reporting it for a run on the PII corpus."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from splitlm.privacy.attacks import AttackContext, observations
from splitlm.privacy.attacks.base import Observation, score
from splitlm.privacy.metrics import pii_recovered

ENTITIES = [
    ("name", "Ann Lee"),
    ("email", "ann.lee@mail.com"),
    ("phone", "555-123-4567"),
    ("account", "1234 5678 9012"),
]


def test_partial_recovery_by_type() -> None:
    truths = ["Dear Ann Lee, mail ann.lee@mail.com or call 555-123-4567.", "Account 1234 5678 9012 of Ann Lee."]
    guesses = ["Dear Ann Lee, mail ann.lee@mail.org or call 555-123-4567.", "Account 1234 5678 9013 of Bob Lee."]
    result = pii_recovered(truths, guesses, ENTITIES)
    assert result == {"name": 0.5, "email": 0.0, "phone": 1.0, "account": 0.0, "all": 2 / 5}


def test_absent_types_are_left_out() -> None:
    result = pii_recovered(["call 555-123-4567 now"], ["call 555-123-4567 now"], ENTITIES)
    assert result == {"phone": 1.0, "all": 1.0}
    assert pii_recovered(["nothing personal here"], ["nothing"], ENTITIES) == {}
    assert pii_recovered([], [], ENTITIES) == {}


def test_verbatim_means_exact_case_and_whole_entity() -> None:
    truths = ["Dear Ann Lee,"] * 4
    guesses = ["dear ann lee,", "Dear ANN LEE,", "Dear Ann Le", "Dear Ann  Lee,"]
    assert pii_recovered(truths, guesses, ENTITIES) == {"name": 0.0, "all": 0.0}
    assert pii_recovered(["Dear Ann Lee,"], ["xAnn Leex"], ENTITIES) == {"name": 1.0, "all": 1.0}  # a substring


def test_entity_split_across_tokens_counts_as_the_decoded_text() -> None:
    # the metric reads decoded text: an entity rebuilt from several tokens counts once it reads the same
    tokens = ["Account ", "1234", " 56", "78 ", "9012", "."]
    assert pii_recovered(["Account 1234 5678 9012."], ["".join(tokens)], ENTITIES)["account"] == 1.0
    assert pii_recovered(["Account 1234 5678 9012."], ["Account 1234 56 78 9012."], ENTITIES)["account"] == 0.0


def test_empty_guess_recovers_nothing() -> None:
    truths = ["Dear Ann Lee, call 555-123-4567."]
    assert pii_recovered(truths, [""], ENTITIES) == {"name": 0.0, "phone": 0.0, "all": 0.0}


def test_duplicates_count_once_per_text() -> None:
    truths = ["Ann Lee and Ann Lee again"]
    assert pii_recovered(truths, ["Ann Lee"], [*ENTITIES, ("name", "Ann Lee")]) == {"name": 1.0, "all": 1.0}


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="one guess per truth"):
        pii_recovered(["a", "b"], ["a"], ENTITIES)


# --- score on a run over the PII corpus -----------------------------------------------------------------


class _Echo:
    """An attack that returns the truth (or, with ``blank``, a constant token): perfect or no recovery."""

    name = "echo"

    def __init__(self, blank: bool = False) -> None:
        self.blank = blank

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        assert obs.truth is not None
        return torch.zeros_like(obs.truth) if self.blank else obs.truth.clone()


@pytest.fixture(scope="module")
def pii_run(record_run) -> Path:
    return record_run("data.name=pii", "data.max_rows=120", "train.seq_len=96")


def test_score_reports_pii_recovered_for_the_pii_corpus(pii_run: Path, tmp_path: Path) -> None:
    ctx = AttackContext.from_run(pii_run)
    obs = observations(pii_run)
    sequences = tmp_path / "echo.jsonl"
    perfect = score(ctx, "echo", _Echo(), obs, sequences=sequences, progress=False)
    assert perfect["pii_recovered"]["all"] == 1.0
    assert {"name", "all"} <= set(perfect["pii_recovered"]) and all(v == 1.0 for v in perfect["pii_recovered"].values())
    records = [json.loads(line) for line in sequences.read_text().splitlines()]
    assert all("pii_recovered" in r for r in records)
    assert any(r["pii_recovered"].get("name") == 1.0 for r in records)

    blank = score(ctx, "echo", _Echo(blank=True), obs, progress=False)
    assert blank["pii_recovered"]["all"] == 0.0 and set(blank["pii_recovered"]) == set(perfect["pii_recovered"])


def test_score_counts_only_entities_in_the_truth_as_decoded(pii_run: Path) -> None:
    ctx = AttackContext.from_run(pii_run)
    obs = observations(pii_run)
    texts = [ctx.decode(t, m) for o in obs for t, m in zip(o.truth, o.attention_mask, strict=True)]
    result = score(ctx, "echo", _Echo(), obs, progress=False)
    entities = ctx.cache["pii_entities"]
    assert entities, "the run's entities were regenerated from its config"
    present = sum(1 for text in texts for _, value in set(entities) if value in text)
    assert present > 0 and not math.isnan(result["pii_recovered"]["all"])


def test_score_of_other_data_has_no_pii_key(record_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(record_run(), run, ignore=shutil.ignore_patterns("attacks"))
    result = score(AttackContext.from_run(run), "echo", _Echo(), observations(run), progress=False)
    assert "pii_recovered" not in result
