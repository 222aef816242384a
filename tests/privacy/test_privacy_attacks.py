"""The honest-but-curious server's reconstruction attacks on tiny recorded runs: each recovers the private
tokens far above chance, none reads the truth, and misuse is a one-line PrivacyError."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from splitlm.cli.main import main
from splitlm.errors import PrivacyError
from splitlm.privacy.attacks import ATTACKS, AttackContext, Observation, make_attack, observations, score
from splitlm.privacy.metrics import rouge_l, token_accuracy

SIP = {"steps": "150"}  # a short SIP keeps the file fast; the tiny head is easy to invert
FAST: dict[str, dict[str, str]] = {
    "sip": SIP,
    "bisr_b": {"sip_steps": "150", "steps": "20"},
    "bisr_f": {"sip_steps": "150", "steps": "100"},
    "tag": {"steps": "60"},
    "nn_inversion": {},
    "eia": {"steps": "100", "full_steps": "30"},
    "pidi": {"sip_steps": "150", "steps": "20", "grad_steps": "10"},
}


@pytest.fixture(scope="module")
def ushape_run(record_run) -> Path:
    return record_run("split.head_layers=2")


@pytest.fixture(scope="module")
def ctx(ushape_run: Path) -> AttackContext:
    """One attacker context for the module, so the SIP inverter is trained once and shared."""
    return AttackContext.from_run(ushape_run)


@pytest.fixture(scope="module")
def chance(ctx: AttackContext, ushape_run: Path) -> dict[str, float]:
    """Scores of uniformly random guesses over the vocabulary, shaped like the recorded batches."""
    vocab = ctx.token_embeddings().shape[0]
    generator = torch.Generator().manual_seed(0)
    rouges, accuracies = [], []
    for o in observations(ushape_run):
        assert o.truth is not None
        for _ in range(5):
            guess = torch.randint(0, vocab, o.truth.shape, generator=generator)
            rouges.append(rouge_l(o.truth, guess, o.attention_mask))
            accuracies.append(token_accuracy(o.truth, guess, o.attention_mask))
    return {"rouge_l": sum(rouges) / len(rouges), "token_accuracy": sum(accuracies) / len(accuracies)}


def _without_truth(o: Observation) -> Observation:
    return dataclasses.replace(o, truth=None)


# --- each attack works -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAST))
def test_attack_recovers_far_above_chance(name: str, ctx: AttackContext, ushape_run: Path, chance) -> None:
    result = score(ctx, name, make_attack(name, FAST[name]), observations(ushape_run))
    assert result["batches"] == 2
    assert chance["rouge_l"] < 0.15 and chance["token_accuracy"] < 0.02
    margin = 0.4 if name == "tag" else 0.6  # tag cannot recover the first token of each row
    assert result["rouge_l"] > chance["rouge_l"] + margin, result
    assert result["token_accuracy"] > chance["token_accuracy"] + margin, result


@pytest.mark.parametrize("name", list(FAST))
def test_attacks_never_read_the_truth(name: str, ctx: AttackContext, ushape_run: Path) -> None:
    attack = make_attack(name, FAST[name])
    obs = observations(ushape_run)[-1]
    torch.manual_seed(1)
    with_truth = attack.invert(ctx, obs)
    torch.manual_seed(1)
    without = attack.invert(ctx, _without_truth(obs))
    assert with_truth.shape == obs.attention_mask.shape and with_truth.dtype == torch.long
    assert torch.equal(with_truth, without)


def test_bisr_b_recovers_from_gradients_alone(ctx: AttackContext, ushape_run: Path, chance) -> None:
    """With a SIP prior trained for a single step (near chance), the recovered tokens come from the gradient."""
    weak = {"steps": "1", "lr": "0.0001"}
    prior = score(ctx, "sip", make_attack("sip", weak), observations(ushape_run))
    bisr = make_attack("bisr_b", {"sip_steps": "1", "sip_lr": "0.0001", "steps": "60", "lr": "0.5"})
    result = score(ctx, "bisr_b", bisr, observations(ushape_run))
    assert prior["token_accuracy"] < chance["token_accuracy"] + 0.1
    assert result["token_accuracy"] > prior["token_accuracy"] + 0.5, (prior, result)


def test_bisr_f_from_random_start(ctx: AttackContext, ushape_run: Path, chance) -> None:
    result = score(ctx, "bisr_f", make_attack("bisr_f", {"init": "random", "steps": "300"}), observations(ushape_run))
    assert result["token_accuracy"] > chance["token_accuracy"] + 0.5, result


def test_sip_inverter_is_cached_and_shared(ctx: AttackContext, ushape_run: Path) -> None:
    obs = observations(ushape_run)[-1]
    make_attack("sip", SIP).invert(ctx, obs)
    cached = dict(ctx.cache)
    make_attack("bisr_b", {"sip_steps": "150", "steps": "1"}).invert(ctx, obs)
    assert ctx.cache.keys() == cached.keys()
    assert all(ctx.cache[k] is cached[k] for k in cached)


def test_nn_inversion_is_exact_without_head_blocks(record_run) -> None:
    run = record_run("split.head_layers=0", "lora.head.method=frozen")
    result = score(AttackContext.from_run(run), "nn_inversion", make_attack("nn_inversion"), observations(run))
    assert result["token_accuracy"] == 1.0


# --- misuse --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bisr_b", "tag"])
def test_gradient_attacks_need_a_ushape_run(name: str, record_run) -> None:
    run = record_run("split.mode=vanilla")
    ctx = AttackContext.from_run(run)
    with pytest.raises(PrivacyError, match="ushape"):
        make_attack(name, {"steps": "1"}).invert(ctx, observations(run)[-1])


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("nope", {}, "unknown attack 'nope'"),
        ("sip", {"stepz": "10"}, "unknown option 'stepz'"),
        ("sip", {"steps": "many"}, "steps='many'"),
        ("sip", {"steps": "0"}, "steps must be >= 1"),
        ("sip", {"noise": "1.5"}, "noise"),
        ("bisr_b", {"sip_hidden": "x"}, "hidden='x'"),
        ("bisr_b", {"lr": "-1"}, "bisr_b options"),
        ("bisr_f", {"init": "zeros"}, "init='zeros'"),
        ("eia", {"distance": "l3"}, "distance='l3'"),
        ("tag", {"alpha": "-0.1"}, "tag options"),
        ("nn_inversion", {"steps": "1"}, "unknown option"),
        ("nn_inversion", {"dictionary": "books"}, "dictionary must be"),
    ],
)
def test_bad_attack_or_option(name: str, options: dict[str, str], match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        make_attack(name, options)


def test_attacks_are_registered_by_name() -> None:
    assert sorted(ATTACKS) == ["bisr_b", "bisr_f", "eia", "nn_inversion", "pidi", "sip", "tag"]
    assert "sip" in ATTACKS and "nope" not in ATTACKS and len(ATTACKS) == 7
    with pytest.raises(PrivacyError, match=r"unknown attack 'sipp'; choose from \[.*'tag'\] \(did you mean 'sip'\?\)"):
        make_attack("sipp")


# --- the CLI -------------------------------------------------------------------------------------------


def test_cli_attack_prints_json_and_writes_result(ushape_run: Path, capsys) -> None:
    assert main(["attack", str(ushape_run), "sip", "steps=100", "--batches", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["attack"] == "sip" and printed["batches"] == 1
    assert printed["options"] == {"steps": "100"}
    assert 0.0 <= printed["rouge_l"] <= 1.0
    saved = json.loads((ushape_run / "attacks" / "sip.json").read_text())
    assert saved["rouge_l"] == printed["rouge_l"]


def test_cli_attack_without_tap_is_one_line_error(ushape_run: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(ushape_run / "config.yaml", tmp_path / "config.yaml")
    assert main(["attack", str(tmp_path), "sip"]) == 7
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitlm: error: ")
    assert "privacy.tap.enabled=true" in lines[0]


def test_cli_bad_option_is_one_line_error(ushape_run: Path, capsys) -> None:
    assert main(["attack", str(ushape_run), "bisr_f", "init=zeros"]) == 7
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "init='zeros'" in lines[0]
