"""Every multi-client framework runs end to end on a tiny model and writes what it promises.

4 clients, 2 rounds of 2 local steps each. Each framework runs once per module; the assertions read its files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.frameworks import FRAMEWORKS as REGISTRY
from splitlm.frameworks import run_framework
from splitlm.frameworks.setup import load_source, prepare_data

FRAMEWORKS = ["sl", "psl", "sflv1", "sflv2", "gsfl"]
COMMON = ("framework.num_clients=4", "framework.rounds=2", "train.steps=4")
NON_IID = {"sflv2", "gsfl"}  # label-skewed clients
SINGLE_HOLDER = ["sl", "sflv1", "sflv2", "gsfl"]  # one global client side after each round (psl: one per client)


def rounds_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines() if line.strip()]


def _overrides(name: str) -> tuple[str, ...]:
    skew = ("data.partition=dirichlet", "data.alpha=0.3") if name in NON_IID else ()
    return (f"framework.name={name}", *COMMON, *skew)


@pytest.fixture(scope="module")
def runs(fast_config, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    done = {}
    for name in FRAMEWORKS:
        out = tmp_path_factory.mktemp(name)
        done[name] = (out, run_framework(fast_config(out, *_overrides(name))))
    return done


@pytest.fixture(scope="module")
def train_size(fast_config, tmp_path_factory) -> int:
    config = fast_config(tmp_path_factory.mktemp("size"), *_overrides("sl"))
    return len(prepare_data(config, load_source(config).tokenizer()).train)


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_framework_runs_and_learns(name, runs, run_files, train_size) -> None:
    out, summary = runs[name]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["framework"] == name
    assert (summary["rounds"], summary["num_clients"]) == (2, 4)
    metrics = run_files.metrics(out)
    assert all("round" in r for r in metrics)
    assert {r["client"] for r in metrics} == {"0", "1", "2", "3"}
    assert len(metrics) == 4 * 2 * 2  # every client, every round, 2 local steps
    for client in ("0", "1", "2", "3"):
        own = [r for r in metrics if r["client"] == client]
        assert [(r["round"], r["step"]) for r in own] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    rounds = rounds_of(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["eval_loss"] == summary["eval_loss_after"]
    assert all(r["eval_ppl"] == pytest.approx(torch.tensor(r["eval_loss"]).exp().item(), rel=1e-6) for r in rounds)
    clients = summary["clients"]
    assert [c["client"] for c in clients] == ["0", "1", "2", "3"]
    assert all(c["examples"] > 0 and c["steps"] == 4 for c in clients)
    assert sum(c["examples"] for c in clients) == train_size
    assert summary["steps"] == 16
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in clients) > 0


def test_dirichlet_clients_are_skewed(runs) -> None:
    # alpha=0.3 over two labels: some client's label mix is far from the 50/50-ish overall mix.
    for name in NON_IID:
        _, summary = runs[name]
        assert summary["partition"] == "dirichlet"
        shares = []
        for client in summary["clients"]:
            histogram = client["label_histogram"]
            shares.append(histogram.get("fresh", 0) / sum(histogram.values()))
        assert max(shares) - min(shares) > 0.3, shares
    iid = [c["examples"] for c in runs["sflv1"][1]["clients"]]
    assert max(iid) - min(iid) <= 1


def test_psl_reports_each_clients_eval_loss(runs) -> None:
    out, summary = runs["psl"]
    for record in rounds_of(out):
        per_client = record["per_client_eval_loss"]
        assert set(per_client) == {"0", "1", "2", "3"}
        assert all(isinstance(v, float) and v > 0 for v in per_client.values())
        assert record["accuracy"] is None  # lm data: no classification accuracy
    assert [c["eval_loss"] for c in summary["clients"]] == [per_client[c] for c in "0123"]
    # clients keep their own heads/tails: they no longer agree after training on different data
    assert len(set(per_client.values())) > 1


@pytest.mark.parametrize("name", SINGLE_HOLDER)
def test_the_assembled_model_is_the_one_that_was_evaluated(name, runs, assembled_loss) -> None:
    """``splitlm export`` / ``generate`` rebuild the model from ``adapters/``: its held-out loss must be the
    run's final ``eval_loss_after``. Merging LoRA into the weights reassociates float32 sums (~1e-6 of the
    logits), far below the change training made (eval_loss_before - eval_loss_after > 1e-2 here)."""
    out, summary = runs[name]
    assert summary["eval_loss_before"] - summary["eval_loss_after"] > 1e-2
    assert assembled_loss(out) == pytest.approx(summary["eval_loss_after"], abs=1e-4)


def test_clients_per_round_samples_that_many(make_config, run_files) -> None:
    config = make_config("sampled", "framework.name=sflv1", *COMMON, "framework.rounds=3", "train.steps=6",
                         "framework.clients_per_round=2")  # fmt: skip
    summary = run_framework(config)
    out = Path(config.output_dir)
    rounds = rounds_of(out)
    assert len(rounds) == 3
    metrics = run_files.metrics(out)
    for record in rounds:
        assert len(record["participants"]) == 2 == len(set(record["participants"]))
        trained = {r["client"] for r in metrics if r["round"] == record["round"]}
        assert trained == set(record["participants"])  # only the sampled clients trained that round
    assert len({tuple(r["participants"]) for r in rounds}) > 1  # a fresh sample each round
    assert sum(c["steps"] for c in summary["clients"]) == 3 * 2 * 2


def test_gsfl_explicit_groups(make_config) -> None:
    config = make_config("groups", "framework.name=gsfl", *COMMON, "framework.groups=[[0,1],[2,3]]")
    summary = run_framework(config)
    assert summary["groups"] == [[0, 1], [2, 3]]
    assert {"group-0", "group-1"} <= set(summary["server_adapters"])
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_instruction_data_reports_accuracy(make_config) -> None:
    config = make_config("instruct", "framework.name=sflv1", "framework.num_clients=2", "framework.rounds=2",
                         "train.steps=4", "data.format=instruction")  # fmt: skip
    data = prepare_data(config, load_source(config).tokenizer())
    candidates = {tuple(e.input_ids) for options, _ in data.choices for e in options}
    assert data.choices and len(candidates) > 2  # ' fresh' / ' rotten' for each held-out prompt
    summary = run_framework(config)
    rounds = rounds_of(Path(config.output_dir))
    assert len(rounds) == 2
    for record in rounds:
        accuracy = record["accuracy"]
        assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
        assert accuracy * len(data.choices) == pytest.approx(round(accuracy * len(data.choices)))
    assert isinstance(summary["accuracy_before"], float)
    assert summary["accuracy_after"] == rounds[-1]["accuracy"]


def test_resume_after_an_interruption_matches_an_uninterrupted_run(make_config, run_files, monkeypatch) -> None:
    overrides = ("framework.name=sflv1", "framework.num_clients=2", "framework.rounds=3", "train.steps=3")
    straight = make_config("straight", *overrides)
    run_framework(straight)

    interrupted = make_config("interrupted", *overrides)
    real = REGISTRY.get("sflv1")

    def until_round_two(fed, round_index, members):
        if round_index == 2:
            raise KeyboardInterrupt
        return real.round(fed, round_index, members)

    REGISTRY.remove("sflv1")
    REGISTRY.add("sflv1", dataclasses.replace(real, round=until_round_two))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_framework(interrupted)
    finally:
        REGISTRY.remove("sflv1")
        REGISTRY.add("sflv1", real)
    assert REGISTRY.get("sflv1") is real
    out = Path(interrupted.output_dir)
    assert [r["round"] for r in rounds_of(out)] == [1, 2]
    assert not (out / "adapters").exists()
    run_framework(interrupted, resume=True)

    expected, actual = rounds_of(Path(straight.output_dir)), rounds_of(out)
    assert [r["round"] for r in actual] == [1, 2, 3]
    assert [r["eval_loss"] for r in actual] == [r["eval_loss"] for r in expected]
    # clients train on threads, so lines of one round may come in either order
    losses = sorted((r["round"], r["client"], r["step"], r["loss"]) for r in run_files.metrics(out))
    reference = sorted(
        (r["round"], r["client"], r["step"], r["loss"]) for r in run_files.metrics(Path(straight.output_dir))
    )
    assert losses == reference
    names = sorted(p.name.removesuffix(".safetensors") for p in (out / "adapters").glob("*.safetensors"))
    assert names == sorted(
        p.name.removesuffix(".safetensors") for p in (Path(straight.output_dir) / "adapters").glob("*.safetensors")
    )
    theirs = {n: run_files.adapters(Path(straight.output_dir), n) for n in names}
    ours = {n: run_files.adapters(out, n) for n in names}
    for n in names:
        assert set(ours[n]) == set(theirs[n])
        for key in theirs[n]:
            assert torch.equal(ours[n][key], theirs[n][key]), (n, key)


def test_eval_each_round_false_evaluates_only_after_the_last_round(fast_config, tmp_path: Path) -> None:
    config = fast_config(tmp_path, *_overrides("sflv2"), "train.eval_each_round=false", "train.eval_before=false")
    summary = run_framework(config)
    first, last = rounds_of(tmp_path)
    assert first["eval_loss"] is None and first["accuracy"] is None and first["round"] == 1
    assert last["eval_loss"] == summary["eval_loss_after"] and summary["eval_loss_after"] > 0
    assert summary["eval_loss_before"] is None
