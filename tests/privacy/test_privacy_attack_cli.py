"""``splitlm attack`` as a user meets it: every rebuilt sequence in a JSONL file beside the result, progress
bars that can be turned off, a SIP inverter trained once per run directory (also across processes), and an
attacker's public knowledge that the runtime can import without the attacks."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from splitlm.cli.main import main
from splitlm.privacy.attacks import AttackContext, make_attack, observations, run_attack, sip
from splitlm.privacy.metrics import rouge_l, token_accuracy

QUICK = {"steps": "30", "aux_rows": "200"}  # a rough SIP; these tests check plumbing, not attack quality
# What the attacker's public knowledge must not import (the runtime and the frameworks build FSHA from it).
ABOVE_PRIVACY = ("splitlm.privacy.attacks", "splitlm.frameworks", "splitlm.runtime", "splitlm.deploy", "splitlm.cli")
FIELDS = {"client", "step", "micro", "row", "truth", "guess", "rouge_l", "token_accuracy"}


@pytest.fixture
def run(record_run, tmp_path: Path) -> Path:
    """A private copy of a recorded ushape run, without any earlier attack results or cached inverters."""
    copy = tmp_path / "run"
    shutil.copytree(record_run("split.head_layers=2"), copy, ignore=shutil.ignore_patterns("attacks"))
    return copy


def _cached(run: Path) -> list[Path]:
    return sorted((run / "attacks" / "cache").glob("sip-*.safetensors"))


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("the SIP inverter was trained again instead of read from the run's cache")


# --- every rebuilt sequence ------------------------------------------------------------------------------


def test_attack_writes_every_sequence_with_its_scores(run: Path) -> None:
    result = run_attack(run, "sip", QUICK, progress=False)
    path = run / "attacks" / "sip.jsonl"
    assert result["sequences"] == str(path)
    assert json.loads((run / "attacks" / "sip.json").read_text())["sequences"] == str(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    obs = observations(run)
    assert len(records) == sum(len(o.attention_mask) for o in obs)
    assert all(set(r) == FIELDS for r in records)

    ctx = AttackContext.from_run(run)
    first = obs[0]
    assert first.truth is not None
    client, step, micro = first.key
    rows = [r for r in records if (r["client"], r["step"], r["micro"]) == (client, step, micro)]
    assert [r["row"] for r in rows] == list(range(len(first.attention_mask)))
    assert rows[0]["truth"] == ctx.decode(first.truth[0], first.attention_mask[0]) == result["example"]["truth"]
    assert rows[0]["guess"] == result["example"]["guess"]
    # Each row's own scores (the guess again, from the inverter the run directory now keeps) ...
    guess = make_attack("sip", QUICK).invert(ctx, first)
    for r in rows:
        i = r["row"]
        truth, mask = first.truth[i : i + 1], first.attention_mask[i : i + 1]
        assert r["guess"] == ctx.decode(guess[i], mask[0])
        assert r["rouge_l"] == rouge_l(truth, guess[i : i + 1], mask)
        assert r["token_accuracy"] == token_accuracy(truth, guess[i : i + 1], mask)
    # ... whose mean over a micro-batch is that micro-batch's score, averaged in the result.
    batch_scores = []
    for o in obs:
        assert o.truth is not None
        mine = [r for r in records if (r["client"], r["step"], r["micro"]) == o.key]
        assert all(0.0 <= r["rouge_l"] <= 1.0 and 0.0 <= r["token_accuracy"] <= 1.0 for r in mine)
        batch_scores.append(sum(r["rouge_l"] for r in mine) / len(mine))
    assert sum(batch_scores) / len(batch_scores) == pytest.approx(result["rouge_l"])


def test_cli_attack_reports_the_sequences_file(run: Path, capsys) -> None:
    assert main(["attack", str(run), "sip", "steps=30", "aux_rows=200", "--batches", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    lines = Path(printed["sequences"]).read_text().splitlines()
    assert len(lines) == len(observations(run)[-1].attention_mask)
    assert printed["example"]["truth"] == json.loads(lines[0])["truth"]


# --- progress bars ---------------------------------------------------------------------------------------


def test_progress_bars_go_to_stderr_and_can_be_turned_off(run: Path, capsys) -> None:
    run_attack(run, "sip", QUICK, progress=True)
    shown = capsys.readouterr()
    assert "sip: micro-batches" in shown.err and "sip: training the inverter" in shown.err
    assert shown.out == ""
    shutil.rmtree(run / "attacks")
    run_attack(run, "sip", QUICK, progress=False)
    assert capsys.readouterr().err == ""


# --- the SIP inverter, trained once per run directory ----------------------------------------------------


def test_sip_inverter_is_trained_once_per_run_directory(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_attack(run, "sip", QUICK, progress=False)  # a fresh context from the run directory
    cached = _cached(run)
    assert len(cached) == 1
    saved = load_file(str(cached[0]))
    assert "mean" in saved and "embeddings" not in saved  # the public embeddings are rebuilt, not copied

    monkeypatch.setattr(sip, "train_inverter", _no_training)
    second = run_attack(run, "sip", QUICK, progress=False)  # another fresh context: reads the file
    assert (second["rouge_l"], second["token_accuracy"]) == (first["rouge_l"], first["token_accuracy"])
    assert second["example"] == first["example"]
    # BiSR's SIP start with the same options is the same inverter.
    bisr = {"sip_steps": QUICK["steps"], "sip_aux_rows": QUICK["aux_rows"], "steps": "1"}
    run_attack(run, "bisr_b", bisr, progress=False)
    assert _cached(run) == cached


def test_sip_inverter_for_other_options_is_trained_and_kept_apart(run: Path) -> None:
    run_attack(run, "sip", QUICK, progress=False)
    run_attack(run, "sip", {**QUICK, "steps": "20"}, progress=False)
    assert len(_cached(run)) == 2


def test_unreadable_cached_inverter_is_retrained(
    run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = run_attack(run, "sip", QUICK, progress=False)
    (path,) = _cached(run)
    path.write_bytes(b"not a safetensors file")
    calls: list[int] = []
    train = sip.train_inverter

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(sip, "train_inverter", counted)
    with caplog.at_level(logging.WARNING, logger="splitlm.privacy.attacks.sip"):
        again = run_attack(run, "sip", QUICK, progress=False)
    assert calls == [1]
    assert "cannot read the cached inverter" in caplog.text
    assert again["rouge_l"] == first["rouge_l"]  # training is deterministic per seed
    assert "mean" in load_file(str(path))  # replaced by the retrained inverter


def test_cached_inverter_for_other_settings_is_not_read(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file under the right name whose recorded settings differ (e.g. copied from another run) is ignored."""
    first = run_attack(run, "sip", QUICK, progress=False)
    (path,) = _cached(run)
    run_attack(run, "sip", {**QUICK, "steps": "20"}, progress=False)
    (other,) = [p for p in _cached(run) if p != path]
    shutil.copy(other, path)  # the 20-step inverter under the 30-step inverter's name
    with caplog.at_level(logging.WARNING, logger="splitlm.privacy.attacks.sip"):
        again = run_attack(run, "sip", QUICK, progress=False)
    assert "trained for other settings" in caplog.text
    assert again["rouge_l"] == first["rouge_l"]


def test_contexts_without_a_run_directory_keep_nothing_on_disk(run: Path) -> None:
    ctx = AttackContext(AttackContext.from_run(run).config)
    assert ctx.run_dir is None and ctx.cache_file("sip-x.safetensors") is None
    assert AttackContext.from_run(run).cache_file("x") == run / "attacks" / "cache" / "x"


# --- layering --------------------------------------------------------------------------------------------


def test_training_imports_no_attack_and_installs_fsha_by_name(tmp_path: Path) -> None:
    """The public knowledge pulls in nothing above the privacy layer; a run with defenses and a detector against an
    honest server, validated and built, imports no attack; FSHA comes by name from the server-attack registry."""
    tree = {"model": {"name": "tiny-llama"}, "split": {"head_layers": 1, "tail_layers": 1}, "output_dir": str(tmp_path)}
    code = (
        "import json, sys\n"
        "import splitlm.privacy.knowledge\n"
        f"above = {ABOVE_PRIVACY!r}\n"
        "knowledge = sorted(m for m in sys.modules if m.startswith(above))\n"
        "from splitlm.config import build_config\n"
        "from splitlm.frameworks.base import config_problems\n"
        "from splitlm.frameworks.federation import build_federation\n"
        "overrides = ['privacy.defenses=[smashed_noise, nopeek]', 'privacy.detectors=[splitguard]']\n"
        f"config = build_config({tree!r}, overrides, checks=[config_problems])\n"
        "fed = build_federation(config)\n"
        "honest = sorted(m for m in sys.modules if m.startswith('splitlm.privacy.attacks'))\n"
        "mods = [type(m).__name__ for m in fed.members[0].pipeline.mods]\n"
        "from splitlm.privacy.server_attack import SERVER_ATTACKS\n"
        "print(json.dumps([knowledge, honest, mods, SERVER_ATTACKS.get('fsha').__module__]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    knowledge, honest, mods, fsha = json.loads(done.stdout.strip().splitlines()[-1])
    assert knowledge == [] and honest == []
    assert mods[:2] == ["SmashedNoise", "SplitGuard"]  # the defenses' and the detector's mods, in that order
    assert fsha == "splitlm.privacy.attacks.fsha"
