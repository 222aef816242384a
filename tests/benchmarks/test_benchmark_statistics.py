"""The statistics the benchmarks report their noise with (benchmarks/noniid.py, hetero.py, plan.py)."""

from __future__ import annotations

import importlib.util
import math
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
from scipy import stats

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def noniid() -> ModuleType:
    return load("noniid")


def test_mean_ci_is_the_student_t_interval(noniid) -> None:
    values = [0.79, 0.76, 0.78, 0.81]
    mean, (low, high) = noniid.mean_ci(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values), scale=stats.sem(values))
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-4)
    assert (low, high) == pytest.approx(expected, abs=1e-4)
    assert noniid.mean_ci([0.5]) == (0.5, [None, None])


def test_fieller_interval_holds_the_ratio_and_shrinks_with_agreement(noniid) -> None:
    gains, gaps = [0.10, 0.08, 0.12], [0.13, 0.10, 0.12]
    low, high = noniid.fieller(gains, gaps)
    ratio = statistics.fmean(gains) / statistics.fmean(gaps)
    assert low < ratio < high
    # the ratio at each end makes the paired difference exactly t standard errors from zero
    t = stats.t.ppf(0.975, 2)
    for r in (low, high):
        diffs = [g - r * d for g, d in zip(gains, gaps, strict=True)]
        assert abs(statistics.fmean(diffs)) == pytest.approx(t * stats.sem(diffs), rel=1e-2)
    tight_low, tight_high = noniid.fieller([0.10, 0.101, 0.099], [0.12, 0.121, 0.119])
    assert tight_high - tight_low < high - low


def test_fieller_is_unbounded_when_the_gap_is_within_its_noise(noniid) -> None:
    assert noniid.fieller([0.05, -0.02, 0.01], [0.10, -0.08, 0.02]) == [None, None]
    assert noniid.fieller([0.1], [0.1]) == [None, None]


def test_gaps_pair_runs_by_seed(noniid) -> None:
    runs = []
    for seed, (iid, skew, fixed) in enumerate([(0.80, 0.66, 0.76), (0.78, 0.70, 0.78), (0.82, 0.68, 0.79)]):
        for partition, remedy, acc in (("iid", "none", iid), ("skew", "none", skew), ("skew", "la", fixed)):
            untrained = 0.6 if partition == "iid" else None
            runs.append({"task": "rotten_tomatoes", "framework": "sflv2", "partition": partition, "remedy": remedy,
                         "seed": seed, "global_acc": acc, "untrained_acc": untrained})  # fmt: skip
    (entry,) = noniid.gaps(runs)
    assert entry["remedy"] == "la" and entry["seeds"] == [0, 1, 2]
    assert entry["gap_mean"] == pytest.approx((0.14 + 0.08 + 0.14) / 3, abs=1e-4)
    assert entry["gap_recovered_mean"] == pytest.approx((0.10 + 0.08 + 0.11) / (0.14 + 0.08 + 0.14), abs=1e-3)
    assert entry["gap_recovered_per_seed"] == pytest.approx([0.10 / 0.14, 0.08 / 0.08, 0.11 / 0.14], abs=1e-3)
    low, high = entry["gap_recovered_ci"]
    assert low < entry["gap_recovered_mean"] < high
    assert entry["exceeds_noise"] is True and entry["iid_above_untrained"] is True


def test_plan_step_noise() -> None:
    plan = load("plan")
    steps = [9.5, 9.8, 10.1, 9.9, 10.2]
    noise = plan.step_noise(steps, predicted=9.9)
    assert noise["step_spread_pct"] == pytest.approx(100 * statistics.stdev(steps) / statistics.fmean(steps), abs=0.01)
    assert noise["prediction_within_step_noise"] is True
    assert plan.step_noise(steps, predicted=5.0)["prediction_within_step_noise"] is False
    low, high = noise["measured_mean_ci"]
    assert low < statistics.fmean(steps) < high and not math.isnan(low)


def test_plan_records_the_config_relative_to_the_repository(tmp_path: Path) -> None:
    plan = load("plan")
    repo = BENCHMARKS.parent
    assert plan.recorded_path(repo / "configs" / "demo.yaml") == "configs/demo.yaml"
    assert plan.recorded_path(repo / "configs" / ".." / "configs" / "demo.yaml") == "configs/demo.yaml"
    assert plan.recorded_path(tmp_path / "mine.yaml") == "mine.yaml"  # outside the repository: its name only


ABSOLUTE = re.compile(r"""["'(\s=](/(?:home|work|tmp|root|Users|mnt|srv|var|opt)/[^"'\s)]*)""")


def test_nothing_committed_under_docs_records_an_absolute_path() -> None:
    docs = BENCHMARKS.parent / "docs"
    found = [
        f"{path.name}: {match.group(1)}"
        for path in sorted(docs.rglob("*"))
        if path.suffix in (".json", ".jsonl", ".md", ".txt", ".csv", ".yaml")
        for match in ABSOLUTE.finditer(path.read_text())
    ]
    assert found == []
