"""Property inference: a client's share of "rotten" rows, read off its recorded smashed data."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from splitlm.cli.main import main
from splitlm.config import Config
from splitlm.errors import PrivacyError
from splitlm.frameworks import run_framework
from splitlm.privacy.attacks.property import run_property

BAD = ["awful", "dull", "boring", "mess", "tedious", "bland", "stale", "flat", "clumsy", "weak"]
GOOD = ["great", "lovely", "brilliant", "moving", "sharp", "witty", "warm", "fresh", "bold", "vivid"]
SHARED = ["the", "film", "story", "cast", "plot", "movie", "it", "is", "a", "and"]
TRAIN = 56  # rows the run reads (data.max_rows): 8 held out, 48 trained on, one epoch of 12 steps of 4
PUBLIC = "aux_rows=160"  # the 160 rows past them, half of each class: the attacker's labelled public text


def write_reviews(path: Path, rotten_share: float, seed: int = 0, label: bool = True) -> Path:
    """``TRAIN`` rows with ``rotten_share`` of them rotten, then 160 public rows, half rotten; a word list per class."""
    pick = random.Random(seed)
    labels = ["rotten"] * round(TRAIN * rotten_share) + ["fresh"] * (TRAIN - round(TRAIN * rotten_share))
    pick.shuffle(labels)
    labels += ["rotten", "fresh"] * 80
    with path.open("w") as f:
        for name in labels:
            words = pick.choices(BAD if name == "rotten" else GOOD, k=4) + pick.choices(SHARED, k=4)
            pick.shuffle(words)
            row = {"text": " ".join(words), **({"label": name} if label else {})}
            f.write(json.dumps(row) + "\n")
    return path


def train(make_config: Callable[..., Config], tmp_path: Path, name: str, data: Path, *extra: str) -> Path:
    config = make_config(
        name, f"data.name={data}", f"data.max_rows={TRAIN}", "data.eval_size=8", "train.steps=12",
        "privacy.tap.enabled=true", "privacy.tap.max_batches=12", *extra,
    )  # fmt: skip
    run_framework(config)
    return Path(config.output_dir)


def test_estimate_follows_the_clients_true_share(make_config: Callable[..., Config], tmp_path: Path) -> None:
    results = {}
    for share in (0.2, 0.8):
        data = write_reviews(tmp_path / f"reviews-{share}.jsonl", share)
        run = train(make_config, tmp_path, f"run-{share}", data)
        results[share] = run_property(run, {"value": "rotten", "aux_rows": "160"}, progress=False)
        assert json.loads((run / "attacks" / "property.json").read_text())["error"] == results[share]["error"]
    low, high = results[0.2], results[0.8]
    assert abs(low["truth"]["0"] - 0.2) < 0.1 and abs(high["truth"]["0"] - 0.8) < 0.1  # truth: the run's own mix
    for estimator in ("prob", "cc", "acc"):
        assert high["estimates"]["0"][estimator] - low["estimates"]["0"][estimator] > 0.4, estimator
        assert low["error"][estimator] < 0.2 and high["error"][estimator] < 0.2, estimator
    assert low["error"]["acc"] < low["error"]["prior"]  # better than guessing the public mix (0.5) for everyone
    assert low["estimates"]["0"]["rows"] == 48  # the whole epoch the tap kept


def test_clients_each_get_their_own_estimate(make_config: Callable[..., Config], tmp_path: Path) -> None:
    data = write_reviews(tmp_path / "reviews.jsonl", 0.5)
    run = train(
        make_config, tmp_path, "two", data, "framework.name=sflv2", "framework.num_clients=2",
        "data.partition=dirichlet", "data.alpha=0.3", "train.steps=6",
    )  # fmt: skip
    assert main(["attack", str(run), "property", PUBLIC, "--no-progress"]) == 0
    result = json.loads((run / "attacks" / "property.json").read_text())
    assert set(result["estimates"]) == set(result["truth"]) == {"0", "1"}
    truth, guess = result["truth"], {c: e["acc"] for c, e in result["estimates"].items()}
    assert abs(truth["0"] - truth["1"]) > 0.3  # the partition skews the two clients' mixes
    assert (guess["0"] - guess["1"]) * (truth["0"] - truth["1"]) > 0  # the estimates order them as the truth does


def test_refusals(make_config: Callable[..., Config], tmp_path: Path) -> None:
    plain = write_reviews(tmp_path / "plain.jsonl", 0.5, label=False)
    run = train(make_config, tmp_path, "unlabelled", plain, "train.steps=2")
    with pytest.raises(PrivacyError, match="needs class labels"):
        run_property(run, {"aux_rows": "160"}, progress=False)
    data = write_reviews(tmp_path / "reviews.jsonl", 0.5)
    untapped = make_config(
        "untapped", f"data.name={data}", f"data.max_rows={TRAIN}", "data.eval_size=8", "train.steps=2"
    )
    run_framework(untapped)
    with pytest.raises(PrivacyError, match=r"privacy\.tap\.enabled=true"):
        run_property(Path(untapped.output_dir), {"aux_rows": "160"}, progress=False)
    tapped = train(make_config, tmp_path, "tapped", data, "train.steps=2")
    with pytest.raises(PrivacyError, match="not a label"):
        run_property(tapped, {"value": "negative", "aux_rows": "160"}, progress=False)
    with pytest.raises(PrivacyError, match="unknown option"):
        run_property(tapped, {"share": "0.5"}, progress=False)
