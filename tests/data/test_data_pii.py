"""The synthetic PII corpus: realistic rows with their entities, seeded, a prefix per length, and no entity of
the training rows anywhere in the rows past ``data.max_rows`` (the attacker's public text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitlm.config.schema import DataConfig
from splitlm.data import ENTITY_TYPES, known_entities, load_rows, pii_rows, split_rows, write_pii
from splitlm.errors import DataError


def test_rows_hold_their_entities_verbatim() -> None:
    rows = pii_rows(300, seed=3)
    assert len(rows) == 300
    kinds: set[str] = set()
    for row in rows:
        assert row["entities"], row
        assert any(e["type"] == "name" for e in row["entities"])
        for entity in row["entities"]:
            assert entity["type"] in ENTITY_TYPES
            assert entity["text"] in row["text"]
            kinds.add(entity["type"])
    assert kinds == set(ENTITY_TYPES)


def test_the_corpus_depends_on_the_seed_alone_and_a_shorter_one_is_a_prefix() -> None:
    assert pii_rows(50, seed=1) == pii_rows(50, seed=1)
    assert pii_rows(50, seed=1) != pii_rows(50, seed=2)
    assert pii_rows(400, seed=1)[:50] == pii_rows(50, seed=1)


@pytest.mark.parametrize(("seed", "cut"), [(0, 200), (7, 600), (11, 1)])
def test_no_training_entity_appears_in_the_attackers_rows(seed: int, cut: int) -> None:
    cfg = DataConfig(name="pii", max_rows=cut)
    train = load_rows(cfg, seed)
    everything = load_rows(cfg.model_copy(update={"max_rows": None}), seed)
    assert everything[:cut] == train and len(everything) > cut
    public = "\n".join(row["text"] for row in everything[cut:])
    leaked = [e for row in train for e in row["entities"] if e["text"] in public]
    assert leaked == []


def test_a_run_reads_it_as_a_builtin_with_its_seed() -> None:
    cfg = DataConfig(name=" pii ", max_rows=40, eval_size=8)
    rows = load_rows(cfg, 5)
    assert rows == pii_rows(40, seed=5)
    train, held = split_rows(rows, cfg.eval_size, 5)
    assert len(train) == 32 and len(held) == 8
    assert known_entities(cfg, 5) == list(
        dict.fromkeys((e["type"], e["text"]) for row in rows for e in row["entities"])
    )
    with pytest.raises(DataError, match="no column 'prompt'"):
        load_rows(DataConfig(name="pii", format="instruction", max_rows=4))


def test_written_corpus_reads_back_with_its_entities(tmp_path: Path) -> None:
    path = write_pii(tmp_path / "pii.jsonl", 20, seed=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == pii_rows(20, seed=2)
    cfg = DataConfig(name=str(path))
    assert load_rows(cfg) == lines
    assert known_entities(cfg) == known_entities(DataConfig(name="pii", max_rows=20), 2)


def test_other_data_lists_no_entities(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "Ann Lee lives here"}\n')
    assert known_entities(DataConfig(name=str(plain))) == []
    assert known_entities(DataConfig(name="some/hub-dataset")) == []  # never read: no download attempted
