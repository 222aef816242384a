"""``write_report``: figures and a markdown summary over finished runs; clear errors for bad run folders."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from splitlm.config import build_config
from splitlm.errors import CheckpointError
from splitlm.frameworks import run_framework
from splitlm.frameworks.driver import SUMMARY_FORMAT as WRITTEN_FORMAT
from splitlm.metrics.report import (
    SUMMARY_FORMAT,
    Run,
    _client_steps,
    _eval_points,
    _traffic,
    bytes_figure,
    eval_figure,
    load_run,
    loss_figure,
    render_markdown,
    run_style,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 2**20
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


def _labelled_lines(figure: Any, panel: int = 0) -> list[Any]:
    """The Line2D objects of a panel that carry a legend label (the faint raw loss lines carry none)."""
    return [line for line in figure.axes[panel].get_lines() if not line.get_label().startswith("_")]


def _row(text: str, name: str) -> dict[str, str]:
    """The cells of run ``name``'s row in the first table of a report, keyed by the header."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    row = next(line for line in lines if line.startswith(f"| `{name}` |"))
    return dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))


def _copy_with_summary(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of run ``source`` whose summary.json has ``changes`` (a value of None drops the key)."""
    shutil.copytree(source, target)
    summary = json.loads((target / "summary.json").read_text())
    for key, value in changes.items():
        if value is None:
            summary.pop(key, None)
        else:
            summary[key] = value
    (target / "summary.json").write_text(json.dumps(summary))
    return target


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
    assert "| client | examples | label histogram | steps | eval loss (global model) |" in text
    client_rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert len(client_rows) == 3
    assert "Clients of `single-run`" not in text  # one client: the run's row says it all
    assert {name: _snapshot(path) for name, path in runs.items()} == before  # the runs are left untouched


def test_report_is_deterministic(runs: dict[str, Path], tmp_path: Path) -> None:
    first = write_report([runs["multi"], runs["single"]], tmp_path / "a").parent
    second = write_report([runs["multi"], runs["single"]], tmp_path / "b").parent
    for name in ("loss.png", "eval.png", "bytes.png", "report.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_summary_format_is_the_one_the_driver_writes(runs: dict[str, Path]) -> None:
    assert SUMMARY_FORMAT == WRITTEN_FORMAT
    assert json.loads((runs["single"] / "summary.json").read_text())["format"] == SUMMARY_FORMAT


@pytest.mark.parametrize("found", [None, 1, "2", True])
def test_summary_of_an_older_splitlm_is_refused(runs: dict[str, Path], tmp_path: Path, found: Any) -> None:
    old = _copy_with_summary(runs["single"], tmp_path / "old-run", format=found)
    out = tmp_path / "out"

    with pytest.raises(CheckpointError, match="older splitlm") as error:
        write_report([runs["multi"], old], out)

    message = str(error.value)
    assert str(old / "summary.json") in message
    assert "re-run" in message and "splitlm version that wrote it" in message
    assert "\n" not in message
    assert not out.exists()  # nothing written before every run has been read


def test_summary_of_a_newer_splitlm_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    new = _copy_with_summary(runs["single"], tmp_path / "new-run", format=SUMMARY_FORMAT + 1)

    with pytest.raises(CheckpointError, match="newer splitlm") as error:
        load_run(new)

    assert str(new / "summary.json") in str(error.value)
    assert "\n" not in str(error.value)


def test_run_dir_without_rounds_raises(runs: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(runs["single"], partial)
    (partial / "rounds.jsonl").unlink()

    with pytest.raises(CheckpointError, match=r"rounds\.jsonl") as error:
        load_run(partial)

    assert str(partial) in str(error.value)


def test_single_run_eval_points_cover_before_during_after(runs: dict[str, Path]) -> None:
    run = load_run(runs["single"])

    points = _eval_points(run)

    assert [x for x, *_ in points] == [0.0, 2.0, 4.0]  # before, train.eval_every=2, after the last step
    during = next(r["eval_loss"] for r in run.metrics if r["step"] == 2)
    assert [loss for _, loss, *_ in points] == [run.summary["eval_loss_before"], during, run.summary["eval_loss_after"]]
    assert len(run.rounds) == 1  # a single-client run is a run of one round


def test_multi_run_eval_points_are_before_and_each_round_end(runs: dict[str, Path]) -> None:
    run = load_run(runs["multi"])

    points = _eval_points(run)

    assert run.summary["local_steps"] == 2
    assert [x for x, *_ in points] == [0.0, 2.0, 4.0]  # rounds end every local_steps client steps
    assert [loss for _, loss, *_ in points] == [run.summary["eval_loss_before"], *(r["eval_loss"] for r in run.rounds)]
    assert points[-1][1] == run.summary["eval_loss_after"]


def test_eval_points_average_clients_and_yield_to_the_round_end() -> None:
    metrics = [
        {"step": 1, "client": "0", "round": 1, "eval_loss": 4.0},
        {"step": 1, "client": "1", "round": 1, "eval_loss": 6.0},
        {"step": 2, "client": "0", "round": 1, "eval_loss": 9.0},  # before aggregation: the round's end wins
    ]
    rounds = [{"round": 1, "eval_loss": 3.0}]
    run = Run(name="r", path=Path("r"), summary={"local_steps": 2, "eval_loss_before": 7.0}, metrics=metrics,
              rounds=rounds)  # fmt: skip

    assert [(x, loss) for x, loss, *_ in _eval_points(run)] == [(0.0, 7.0), (1.0, 5.0), (2.0, 3.0)]


def test_client_steps_line_up_with_rounds_when_clients_skip_rounds() -> None:
    # client 1 was sampled in rounds 1 and 3 only: its steps 3 and 4 belong to round 3, x 5 and 6
    metrics = [{"step": s, "client": "1", "round": r} for s, r in [(1, 1), (2, 1), (3, 3), (4, 3)]]
    metrics += [{"step": s, "client": "0", "round": r} for s, r in [(1, 1), (2, 1), (3, 2), (4, 2)]]
    run = Run(name="r", path=Path("r"), summary={"local_steps": 2}, metrics=metrics, rounds=[])

    xs = {(client, record["step"]): x for client, x, record in _client_steps(run)}

    assert [xs["1", step] for step in (1, 2, 3, 4)] == [1.0, 2.0, 5.0, 6.0]
    assert [xs["0", step] for step in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]


def test_traffic_adds_up_every_clients_step_bytes() -> None:
    metrics = [
        {"step": 2, "client": "0", "round": 1, "bytes_up": 3 * MIB, "bytes_down": 0},
        {"step": 1, "client": "1", "round": 1, "bytes_up": 1 * MIB, "bytes_down": 2 * MIB},
        {"step": 1, "client": "0", "round": 1, "bytes_up": 1 * MIB, "bytes_down": 1 * MIB},
    ]
    run = Run(name="r", path=Path("r"), summary={"local_steps": 2}, metrics=metrics, rounds=[])

    assert _traffic(run) == [(1.0, 2.0, 3.0), (2.0, 5.0, 3.0)]


def test_traffic_at_round_ends_matches_the_running_totals(runs: dict[str, Path]) -> None:
    run = load_run(runs["multi"])
    local = run.summary["local_steps"]

    traffic = {x: (up, down) for x, up, down in _traffic(run)}

    for record in run.rounds:
        assert traffic[record["round"] * local] == (record["bytes_up"] / MIB, record["bytes_down"] / MIB)
    assert traffic[max(traffic)] == (run.summary["bytes_up"] / MIB, run.summary["bytes_down"] / MIB)


def test_run_styles_differ() -> None:
    styles = [run_style(index) for index in range(32)]

    assert len({(style["marker"], style["linestyle"]) for style in styles}) == 32
    for first, second in pairwise(styles):  # neighbours differ in both
        assert first["marker"] != second["marker"]
        assert first["linestyle"] != second["linestyle"]


def test_identical_runs_stay_distinguishable(runs: dict[str, Path]) -> None:
    twins = [load_run(runs["single"], "a"), load_run(runs["single"], "b")]

    for figure in (loss_figure(twins), eval_figure(twins), bytes_figure(twins)):
        first, second = _labelled_lines(figure)
        assert [first.get_label(), second.get_label()] == ["a", "b"]
        assert list(first.get_ydata()) == list(second.get_ydata())  # the curves are the same...
        assert first.get_marker() != second.get_marker()  # ...their styles are not
        assert first.get_linestyle() != second.get_linestyle()


def test_legend_names_the_client_only_for_multi_client_runs(runs: dict[str, Path]) -> None:
    both = [load_run(runs["single"]), load_run(runs["multi"])]

    figure = loss_figure(both)

    labels = [line.get_label() for line in _labelled_lines(figure)]
    assert labels == ["single-run", "multi-run / client 0", "multi-run / client 1", "multi-run / client 2"]
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == labels


def test_every_clients_global_eval_loss_is_shown(runs: dict[str, Path]) -> None:
    run = load_run(runs["multi"])

    text = render_markdown([run], {})

    lines = text.splitlines()
    start = lines.index("| client | examples | label histogram | steps | eval loss (global model) |")
    cells = [line.strip("| ").split(" | ")[-1] for line in lines[start + 2 : start + 5]]
    assert cells == [f"{client['eval_loss']:.4f}" for client in run.summary["clients"]]
    assert cells == [f"{run.summary['eval_loss_after']:.4f}"] * 3
    assert "global model, which every client holds" in text


def test_every_clients_own_eval_loss_is_shown() -> None:
    clients = [{"client": str(c), "examples": 5, "steps": 2, "eval_loss": 5.0 + c / 10} for c in range(3)]
    rounds = [{"round": 1, "eval_loss": 5.1, "per_client_eval_loss": {"0": 5.0, "1": 5.1, "2": 5.2}}]
    run = Run(name="p", path=Path("p"), summary={"num_clients": 3, "clients": clients}, metrics=[], rounds=rounds)

    text = render_markdown([run], {})

    assert "| client | examples | label histogram | steps | eval loss (own client side) |" in text
    for client, loss in (("0", "5.0000"), ("1", "5.1000"), ("2", "5.2000")):
        assert f"| {client} | 5 | - | 2 | {loss} |" in text
    assert "with its own client side" in text


def test_training_and_evaluation_traffic_are_apart(runs: dict[str, Path]) -> None:
    run = load_run(runs["single"])
    summary = run.summary

    row = _row(render_markdown([run], {}), "single-run")

    assert summary["eval_bytes_up"] > 0  # a split run sends activations to evaluate, too
    assert row["train MiB up / down"] == f"{summary['bytes_up'] / MIB:.2f} / {summary['bytes_down'] / MIB:.2f}"
    assert row["eval MiB up / down"] == f"{summary['eval_bytes_up'] / MIB:.2f} / {summary['eval_bytes_down'] / MIB:.2f}"


def test_missing_summary_keys_show_a_dash() -> None:
    sparse = Run(name="sparse", path=Path("sparse"), summary={"framework": "sl"}, metrics=[], rounds=[])

    row = next(line for line in render_markdown([sparse], {}).splitlines() if line.startswith("| `sparse`"))

    assert row == "| `sparse` | sl | - | - | - | - | - | - | - | - | - | - |"


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
