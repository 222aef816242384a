"""``write_report``: figures and a markdown summary over finished runs; clear errors for bad run folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from splitlm.config import build_config
from splitlm.errors import CheckpointError
from splitlm.frameworks import run_framework
from splitlm.metrics.report import Run, _eval_points, _round_traffic, load_run, render_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = [
    "model.name=tiny-llama",
    "split.head_layers=1",
    "split.tail_layers=1",
    "data.max_rows=120",
    "data.eval_size=16",
    "train.seq_len=32",
    "train.steps=4",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-client run (evaluating mid-run too) and one three-client SFL-V1 run over two rounds."""
    root = tmp_path_factory.mktemp("runs")
    single, multi = root / "single-run", root / "multi-run"
    run_framework(build_config({}, [*SMALL, "train.eval_every=2", f"output_dir={single}"]))
    run_framework(
        build_config(
            {},
            [*SMALL, "framework.name=sflv1", "framework.num_clients=3", "framework.rounds=2", f"output_dir={multi}"],
        )
    )
    return {"single": single, "multi": multi}


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_report_over_single_and_multi_run(runs: dict[str, Path], tmp_path: Path) -> None:
    before = {name: _snapshot(path) for name, path in runs.items()}
    out = tmp_path / "new" / "report"

    report = write_report([runs["single"], runs["multi"]], out)

    assert report == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == ["bytes.png", "eval.png", "loss.png", "report.md"]
    for image in ("loss.png", "eval.png", "bytes.png"):
        data = (out / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE), image
        assert len(data) > 10_000, image
    text = report.read_text()
    assert "`single-run`" in text and "`multi-run`" in text
    for image in ("loss.png", "eval.png", "bytes.png"):
        assert f"]({image})" in text
    assert "## Clients of `multi-run`" in text
    assert "| client | examples | label histogram | steps | eval loss |" in text
    client_rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert len(client_rows) == 3
    assert "Clients of `single-run`" not in text
    assert {name: _snapshot(path) for name, path in runs.items()} == before  # the runs are left untouched


def test_report_is_deterministic(runs: dict[str, Path], tmp_path: Path) -> None:
    first = write_report([runs["multi"], runs["single"]], tmp_path / "a").parent
    second = write_report([runs["multi"], runs["single"]], tmp_path / "b").parent
    for name in ("loss.png", "eval.png", "bytes.png", "report.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_single_run_eval_points_cover_before_during_after(runs: dict[str, Path]) -> None:
    points = _eval_points(load_run(runs["single"]))

    assert [x for x, *_ in points] == [0.0, 2.0, 4.0]  # before, train.eval_every=2, after the last step


def test_round_traffic_is_the_increment_of_running_totals() -> None:
    mib = 2**20
    rounds = [
        {"round": 2, "bytes_up": 5 * mib, "bytes_down": 3 * mib},
        {"round": 1, "bytes_up": 2 * mib, "bytes_down": 1 * mib},
    ]
    run = Run(name="r", path=Path("r"), summary={}, metrics=[], rounds=rounds)

    assert _round_traffic(run) == [(1.0, 2.0, 1.0), (2.0, 3.0, 2.0)]


def test_missing_summary_keys_show_a_dash() -> None:
    old = Run(name="old", path=Path("old"), summary={"framework": "sl"}, metrics=[], rounds=None)

    row = next(line for line in render_markdown([old], {}).splitlines() if line.startswith("| `old`"))

    assert row == "| `old` | sl | - | 1 | 1 | - | - | - | - | - | - |"


def test_missing_run_dir_raises(runs: dict[str, Path], tmp_path: Path) -> None:
    missing, out = tmp_path / "no-such-run", tmp_path / "out"

    with pytest.raises(CheckpointError, match="finished `splitlm train` run") as error:
        write_report([runs["single"], missing], out)

    assert str(missing) in str(error.value)
    assert "\n" not in str(error.value)
    assert not out.exists()  # nothing written before every run has been read


def test_run_dir_without_summary_raises(runs: dict[str, Path], tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["single"] / "metrics.jsonl", unfinished)

    with pytest.raises(CheckpointError, match=r"summary\.json") as error:
        write_report([unfinished], tmp_path / "out")

    assert str(unfinished) in str(error.value)


def test_corrupt_metrics_line_raises_naming_file_and_line(runs: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(runs["single"], broken)
    metrics = broken / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:20]  # a line cut short, as a crash mid-write leaves it
    metrics.write_text("\n".join(lines) + "\n")

    with pytest.raises(CheckpointError) as error:
        write_report([broken], tmp_path / "out")

    assert str(metrics) in str(error.value)
    assert "line 3" in str(error.value)
