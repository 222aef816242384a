"""``splitlm audit``'s advice and report, and the privacy benchmark's Pareto front."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from splitlm.errors import PrivacyError
from splitlm.privacy.audit import advice, audit, render

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _benchmark():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_privacy", BENCHMARKS / "privacy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _point(defense: str, strength: float | None, threat: str, attack: str, rouge: float, ppl: float) -> dict:
    return {
        "defense": defense, "strength": strength, "threat_model": threat, "attack": attack, "rouge_l": rouge,
        "ppl_increase_pct": ppl,
    }  # fmt: skip


def test_the_pareto_front_keeps_only_undominated_points() -> None:
    bench = _benchmark()
    points = [(0.0, 0.99, "none"), (5.0, 0.4, "a"), (8.0, 0.6, "b"), (300.0, 0.1, "c"), (5.0, 0.4, "twin")]
    assert bench.pareto(points) == ["none", "a", "c", "twin"]  # b is beaten by a on both counts


def test_worst_per_cell_takes_the_strongest_attack_per_threat_model() -> None:
    bench = _benchmark()
    rows = [
        _point("x", 1.0, "public", "sip", 0.3, 4.0),
        _point("x", 1.0, "public", "bisr_f", 0.6, 4.0),
        _point("x", 1.0, "inside", "sip", 0.9, 4.0),
    ]
    assert bench.worst_per_cell(rows, "public") == {("x", 1.0): (4.0, 0.6)}
    assert bench.worst_per_cell(rows, "inside") == {("x", 1.0): (4.0, 0.9)}


def test_quick_mode_keeps_the_middle_strength_and_combos_their_middle_settings() -> None:
    bench = _benchmark()
    _key, strengths, _ = bench.DEFENSES["dxp"]
    assert [s for s, _ in bench.cells_for("dxp", quick=True)] == [strengths[1]]
    assert len(bench.cells_for("dxp", quick=False)) == 3
    (strength, overrides), *_ = bench.cells_for(next(iter(bench.COMBOS)), quick=False)
    assert strength is None and overrides[0].startswith("privacy.defenses=[")


def test_a_combination_overrides_its_defenses_middle_settings_once() -> None:
    bench = _benchmark()
    ((_, overrides),) = bench.cells_for("dualguard+dxp", quick=True)
    keys = [o.split("=")[0] for o in overrides]
    assert len(keys) == len(set(keys))  # each setting once, so the combination's own value is the one that counts
    assert "privacy.defenses.dxp.epsilon=50.0" in overrides and "privacy.defenses.dualguard.margin=1.0" in overrides
    assert "privacy.defenses.dualguard.local_steps=60" in overrides  # the rest from dualguard's own cell


def test_a_row_label_names_its_registered_defense_alone_and_in_combinations() -> None:
    bench = _benchmark()
    ((strength, overrides),) = bench.cells_for("custext_sensitive", quick=True)
    assert (
        overrides[0] == "privacy.defenses=[custext]" and f"privacy.defenses.custext.keep_share={strength}" in overrides
    )
    cells = bench.cells_for("dualguard+custext_sensitive", quick=True)
    assert [s for s, _ in cells] == [0.9, 0.75]  # a combination swept over one setting, in --quick too
    for strength, combined in cells:
        assert (
            combined[0] == "privacy.defenses=[dualguard,custext]"
            and "privacy.defenses.custext.numbers=true" in combined
        )
        keep = [o for o in combined if o.startswith("privacy.defenses.custext.keep_share=")]
        assert keep == [f"privacy.defenses.custext.keep_share={strength}"]  # once, the swept value


def test_merge_keeps_the_earlier_cells_this_run_does_not_measure(tmp_path: Path) -> None:
    import argparse

    bench = _benchmark()
    setting = {"model": "m", "data": "pii", "steps": 20, "batch_size": 4}
    rows = [_point("none", None, "public", "sip", 1.0, 0.0), _point("dxp", 40.0, "public", "sip", 0.6, 500.0),
            _point("dxp", 30.0, "public", "sip", 0.4, 900.0)]  # fmt: skip
    utility = [{"defense": r["defense"], "strength": r["strength"], "eval_ppl": 1.0} for r in rows]
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({**setting, "frontier": rows, "utility": utility}))
    args = argparse.Namespace(**setting)
    kept, kept_utility = bench.earlier(path, args, {("dxp", 40.0)})
    assert [(r["defense"], r["strength"]) for r in kept] == [("none", None), ("dxp", 30.0)]
    assert [(u["defense"], u["strength"]) for u in kept_utility] == [("none", None), ("dxp", 30.0)]
    with pytest.raises(SystemExit, match="steps"):
        bench.earlier(path, argparse.Namespace(**{**setting, "steps": 40}), set())


def test_advice_picks_the_least_leaky_defense_within_the_perplexity_budget(tmp_path: Path) -> None:
    frontier = tmp_path / "frontier.json"
    rows = [
        _point("none", None, "public", "sip", 0.99, 0.0),
        _point("cheap", 1.0, "public", "sip", 0.6, 5.0),
        _point("cheap", 1.0, "inside", "sip", 0.8, 5.0),
        _point("good", 2.0, "public", "sip", 0.3, 20.0),
        _point("good", 2.0, "inside", "sip", 0.5, 20.0),
        _point("ruinous", 3.0, "public", "sip", 0.0, 900.0),  # private, but over the budget
        _point("ruinous", 3.0, "inside", "sip", 0.0, 900.0),
    ]
    frontier.write_text(json.dumps({"frontier": rows}))
    leaked = [{"attack": "sip", "threat_model": "public", "rouge_l": 0.97}]
    line = advice(leaked, [], frontier)
    assert "good 2 " in line and "public 0.30" in line and "inside 0.50" in line and "+20%" in line
    assert "already" in advice(leaked, ["good"], frontier)
    # Nothing affordable cuts a leak this small by more than the noise: the advice says so, and names the least
    # leaky defense at any cost.
    small = advice([{"attack": "sip", "threat_model": "public", "rouge_l": 0.35}], [], frontier)
    assert "no measured defense within +50% perplexity" in small and "ruinous 3" in small and "+900%" in small
    assert "benchmarks/privacy.py" in advice(leaked, [], tmp_path / "missing.json")
    # A row label that is not a defense's name: the advice quotes the cell's settings and reads the names from them
    labelled = [dict(r, defense="good_label", settings=["privacy.defenses=[good,other]", "x.y=1"]) for r in rows[3:5]]
    frontier.write_text(json.dumps({"frontier": [*rows[:3], *labelled]}))
    line = advice(leaked, [], frontier)
    assert "good_label 2 (privacy.defenses=[good,other] x.y=1) cut it" in line
    assert "already" in advice(leaked, ["good", "other"], frontier) and "already" not in advice(
        leaked, ["good"], frontier
    )
    frontier.write_text("{not json")
    assert "not a frontier file" in advice(leaked, [], frontier)


def test_the_report_names_each_attack_and_threat_model() -> None:
    report = {
        "run_dir": "runs/x", "split": "ushape", "defenses": [], "epsilon": None, "batches": 2, "advice": "use y",
        "attacks": [
            {"attack": "sip", "threat_model": "public", "rouge_l": 0.9, "token_accuracy": 0.8, "pii_recovered": None},
            {"attack": "sip", "threat_model": "inside", "rouge_l": 0.95, "token_accuracy": 0.9,
             "pii_recovered": {"email": 0.5, "all": 0.25}},
        ],
    }  # fmt: skip
    lines = render(report)
    assert "defenses: none" in lines[0] and "epsilon: n/a" in lines[0]
    assert any("sip" in line and "inside" in line and "email 0.50" in line for line in lines)
    assert lines[-1] == "advice: use y"


# --- end to end on tiny runs ------------------------------------------------------------------------------

QUICK = {"sip": {"steps": "60"}, "bisr_f": {"sip_steps": "60", "steps": "20"}}


def test_audit_attacks_a_tapped_run_under_both_threat_models(record_run, tmp_path: Path) -> None:
    run = record_run("data.name=pii", "data.max_rows=64", "train.seq_len=48")
    lines: list[str] = []
    report = audit(
        run, attacks=["sip", "bisr_f"], options=QUICK, progress=False, frontier=tmp_path / "x", say=lines.append
    )
    assert [(r["attack"], r["threat_model"]) for r in report["attacks"]] == [
        ("sip", "public"), ("bisr_f", "public"), ("sip", "inside"), ("bisr_f", "inside"),
    ]  # fmt: skip
    for row in report["attacks"]:
        assert 0.0 <= row["rouge_l"] <= 1.0
        assert row["pii_recovered"] is not None and "all" in row["pii_recovered"]  # the PII corpus lists them
    assert json.loads((run / "audit.json").read_text())["attacks"] == report["attacks"]
    assert lines[0].startswith(f"audit of {run}") and lines[-1].startswith("advice: ")
    assert sum(line.split()[1:2] == ["inside"] for line in lines) == 2


def test_audit_refuses_a_run_without_truth_in_one_line(record_run, tmp_path: Path) -> None:
    run = record_run("split.head_layers=2")
    empty = tmp_path / "client"
    empty.mkdir()
    with pytest.raises(PrivacyError, match="not a client's output_dir"):
        audit(run, client_dir=empty, attacks=["sip"], options=QUICK, progress=False)
    with pytest.raises(PrivacyError, match="unknown threat model"):
        audit(run, threat_models=("everyone",), progress=False)
