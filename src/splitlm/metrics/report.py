"""``splitlm report``: compare finished runs in three figures and a markdown summary.

Reads what ``splitlm train`` left in each run directory (``summary.json``, ``metrics.jsonl`` and, for
multi-client runs, ``rounds.jsonl``) and writes into one output folder, touching nothing else:

    loss.png    training loss per client step, one line per (run, client)
    eval.png    held-out loss and perplexity: per round (multi-client) or before / during / after (single)
    bytes.png   traffic: per-round increments (multi-client), cumulative per step (single-client)
    report.md   one table row per run, the figures, and a per-client table for each multi-client run

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no display, no global
backend switch) and saved without a version stamp, so the same runs give the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from splitlm.errors import CheckpointError

__all__ = ["Run", "load_run", "write_report"]

_FINISHED = "pass the output_dir of a finished `splitlm train` run"
_MIB = 2**20
_SMOOTHING = 0.5  # weight of the past in the loss curves' moving average; 0 draws the raw losses
_DPI = 110


@dataclass
class Run:
    """One finished run directory, as read from disk."""

    name: str  # label in figures and tables (the directory's name, widened where two runs share one)
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]  # one object per client step (eval fields on steps that evaluated)
    rounds: list[dict[str, Any]] | None  # one object per round; None for single-client runs

    @property
    def multi(self) -> bool:
        return self.rounds is not None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}); {_FINISHED}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(value).__name__}; {_FINISHED}")
    return value


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not readable ({error}); {_FINISHED}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"{path} line {number} is not valid JSON ({error.msg}); the file is corrupt: {_FINISHED}"
            ) from None
        if not isinstance(record, dict):
            raise CheckpointError(
                f"{path} line {number} should be a JSON object, found {type(record).__name__}; {_FINISHED}"
            )
        records.append(record)
    return records


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory; ``CheckpointError`` naming the path if it is missing, unfinished or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist; {_FINISHED}")
    for required in ("summary.json", "metrics.jsonl"):
        if not (path / required).is_file():
            raise CheckpointError(f"{path} has no {required}; {_FINISHED}")
    rounds_path = path / "rounds.jsonl"
    return Run(
        name=name or path.resolve().name,
        path=path,
        summary=_read_json(path / "summary.json"),
        metrics=_read_jsonl(path / "metrics.jsonl"),
        rounds=_read_jsonl(rounds_path) if rounds_path.is_file() else None,
    )


def _names(paths: list[Path]) -> list[str]:
    """Directory names, widened with the parent's name (then a counter) where two runs would share one."""
    plain = [path.resolve().name or str(path) for path in paths]
    names = [
        f"{path.resolve().parent.name}/{name}" if plain.count(name) > 1 else name
        for path, name in zip(paths, plain, strict=True)
    ]
    for index, name in enumerate(names):
        if names[:index].count(name):
            names[index] = f"{name}#{names[:index].count(name) + 1}"
    return names


# ---------------------------------------------------------------------------------------------- figures


def _number(value: Any) -> float | None:
    """A finite float, or None for what is missing, null, non-numeric or not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _client_key(client: str) -> tuple[int, int | str]:
    return (0, int(client)) if client.isdigit() else (1, client)


def _smooth(values: list[float], weight: float = _SMOOTHING) -> list[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard draws it)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def _perplexity(loss: float, given: Any = None) -> float | None:
    if (value := _number(given)) is not None:
        return value
    return math.exp(loss) if loss < 700 else None


def _new_figure(panels: int, title: str) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(6.4 * panels if panels > 1 else 8.0, 4.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0].tolist()
    figure.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    figure.clear()


def _legend(ax: Any, entries: int) -> None:
    if entries == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif entries <= 8:
        ax.legend(fontsize="small")
    else:  # many lines: keep the legend off the curves
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=1 + entries // 20)


def plot_loss(runs: list[Run], path: Path) -> None:
    """Training loss against each client's own step: a faint raw line under a lightly smoothed one."""
    series: list[tuple[str, list[float], list[float]]] = []
    for run in runs:
        per_client: dict[str, list[tuple[float, float]]] = {}
        for record in run.metrics:
            step, loss = _number(record.get("step")), _number(record.get("loss"))
            if step is not None and loss is not None:
                per_client.setdefault(str(record.get("client", "0")), []).append((step, loss))
        for client in sorted(per_client, key=_client_key):
            points = sorted(per_client[client])
            series.append((f"{run.name} / client {client}", [p[0] for p in points], [p[1] for p in points]))
    figure, (ax,) = _new_figure(1, "Training loss per client step")
    palette = _palette(len(series))
    for (label, steps, losses), color in zip(series, palette, strict=True):
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=1.0)
        ax.plot(steps, _smooth(losses), color=color, linewidth=1.8, label=label)
    ax.set_xlabel("client step")
    ax.set_ylabel("training loss (moving average; raw faint)")
    _legend(ax, len(series))
    _save(figure, path)


def _palette(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(index % cmap.N) for index in range(count)]


def _eval_points(run: Run) -> list[tuple[float, float, float | None, float | None]]:
    """(x, eval loss, perplexity, accuracy): x is the round for multi-client runs, the step otherwise;
    x = 0 is the evaluation before training."""
    summary, points = run.summary, []
    if (before := _number(summary.get("eval_loss_before"))) is not None:
        points.append((0.0, before, _perplexity(before, summary.get("eval_ppl_before")), None))
        if (accuracy := _number(summary.get("accuracy_before"))) is not None:
            points[-1] = (*points[-1][:3], accuracy)
    if run.rounds is not None:
        for record in run.rounds:
            x, loss = _number(record.get("round")), _number(record.get("eval_loss"))
            if x is not None and loss is not None:
                points.append((x, loss, _perplexity(loss, record.get("eval_ppl")), _number(record.get("accuracy"))))
        return sorted(points, key=lambda p: p[0])
    steps = [s for r in run.metrics if (s := _number(r.get("step"))) is not None]
    for record in run.metrics:
        x, loss = _number(record.get("step")), _number(record.get("eval_loss"))
        if x is not None and loss is not None:
            points.append((x, loss, _perplexity(loss, record.get("eval_ppl")), None))
    if (after := _number(summary.get("eval_loss_after"))) is not None:
        last = _number(summary.get("steps")) or (max(steps) if steps else 1.0)
        accuracy = _number(summary.get("accuracy_after"))
        points.append((last, after, _perplexity(after, summary.get("eval_ppl_after")), accuracy))
    return sorted(points, key=lambda p: p[0])


def _x_label(runs: list[Run], multi: str, single: str) -> str:
    kinds = {run.multi for run in runs}
    if kinds == {True}:
        return multi
    if kinds == {False}:
        return single
    return f"{multi} (multi-client runs) / {single} (single-client runs)"


def plot_eval(runs: list[Run], path: Path) -> None:
    """Held-out loss and perplexity (and accuracy where a run measured it), one line per run."""
    points = {run.name: _eval_points(run) for run in runs}
    with_accuracy = any(p[3] is not None for run_points in points.values() for p in run_points)
    figure, axes = _new_figure(3 if with_accuracy else 2, "Held-out evaluation")
    x_label = _x_label(runs, "round", "step")
    panels: list[tuple[str, Callable[[tuple], float | None]]] = [
        ("eval loss", lambda p: p[1]),
        ("eval perplexity", lambda p: p[2]),
        ("accuracy", lambda p: p[3]),
    ]
    for ax, (y_label, pick) in zip(axes, panels, strict=False):
        drawn = 0
        for run, color in zip(runs, _palette(len(runs)), strict=True):
            xy = [(p[0], y) for p in points[run.name] if (y := pick(p)) is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", color=color, label=run.name)
                drawn += 1
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(y_label)
        _legend(ax, drawn)
    _save(figure, path)


def _round_traffic(run: Run) -> list[tuple[float, float, float]]:
    """(round, MiB up, MiB down) sent in each round: rounds.jsonl holds running totals."""
    rows, up_total, down_total = [], 0.0, 0.0
    for record in sorted(run.rounds or [], key=lambda r: _number(r.get("round")) or 0.0):
        x, up, down = _number(record.get("round")), _number(record.get("bytes_up")), _number(record.get("bytes_down"))
        if x is None or up is None or down is None:
            continue
        rows.append((x, (up - up_total) / _MIB, (down - down_total) / _MIB))
        up_total, down_total = up, down
    return rows


def _step_traffic(run: Run) -> list[tuple[float, float, float]]:
    """(step, cumulative MiB up, cumulative MiB down): metrics.jsonl holds each step's own bytes."""
    records = sorted(
        (step, _number(r.get("bytes_up")) or 0.0, _number(r.get("bytes_down")) or 0.0)
        for r in run.metrics
        if (step := _number(r.get("step"))) is not None
    )
    rows, up_total, down_total = [], 0.0, 0.0
    for step, up, down in records:
        up_total, down_total = up_total + up, down_total + down
        rows.append((step, up_total / _MIB, down_total / _MIB))
    return rows


def plot_bytes(runs: list[Run], path: Path) -> None:
    """Traffic: per-round MiB for multi-client runs, cumulative MiB per step for single-client runs;
    upload solid, download dashed."""
    kinds: list[tuple[bool, str, str, Callable[[Run], list[tuple[float, float, float]]]]] = [
        (True, "multi-client runs: traffic per round", "round", _round_traffic),
        (False, "single-client runs: cumulative traffic of training steps", "step", _step_traffic),
    ]
    kinds = [kind for kind in kinds if any(run.multi == kind[0] for run in runs)]
    figure, axes = _new_figure(len(kinds), "Client-server traffic")
    colors = dict(zip((run.name for run in runs), _palette(len(runs)), strict=True))
    for ax, (multi, title, x_label, rows_of) in zip(axes, kinds, strict=True):
        drawn = 0
        for run in (run for run in runs if run.multi == multi):
            rows = rows_of(run)
            if not rows:
                continue
            xs = [row[0] for row in rows]
            ax.plot(xs, [row[1] for row in rows], color=colors[run.name], marker="o", label=f"{run.name} up")
            ax.plot(xs, [row[2] for row in rows], color=colors[run.name], marker="s", linestyle="--",
                    label=f"{run.name} down")  # fmt: skip
            drawn += 2
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel("MiB per round" if multi else "cumulative MiB")
        _legend(ax, drawn)
    _save(figure, path)


# --------------------------------------------------------------------------------------------- markdown


def _cell(value: Any, digits: int | None = None) -> str:
    """A table cell: '-' for missing or null, floats to ``digits`` places, pipes escaped."""
    if value is None:
        return "-"
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        value = ", ".join(f"{key} {count}" for key, count in value.items()) or "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _run_row(run: Run, with_accuracy: bool) -> list[str]:
    summary = run.summary
    single = None if run.multi else 1  # a single-client run is one client, one round
    up, down = _number(summary.get("bytes_up")), _number(summary.get("bytes_down"))
    traffic = None if up is None and down is None else ((up or 0.0) + (down or 0.0)) / _MIB
    row = [
        f"`{_cell(run.name)}`",
        _cell(summary.get("framework")),
        _cell(summary.get("split_mode")),
        _cell(summary.get("num_clients", single)),
        _cell(summary.get("rounds", single)),
        _cell(summary.get("steps")),
        _cell(summary.get("tokens")),
        _cell(_number(summary.get("eval_ppl_before")), 2),
        _cell(_number(summary.get("eval_ppl_after")), 2),
    ]
    if with_accuracy:
        row.append(_cell(_number(summary.get("accuracy_after")), 3))
    return [*row, _cell(traffic, 2), _cell(_number(summary.get("wall_seconds")), 1)]


_NOTES = {
    "eval.png": "x is the round for multi-client runs and the step for single-client runs; 0 is before training.",
    "bytes.png": "Multi-client runs: the per-round difference of the running totals in rounds.jsonl, held-out "
    "evaluation traffic included. Single-client runs: the per-step bytes of metrics.jsonl added up, training "
    "steps only (summary.json's totals also count evaluation).",
}


def render_markdown(runs: list[Run], images: dict[str, str]) -> str:
    """The report: a row per run, the figures (``images``: file name -> caption), per-client tables."""
    with_accuracy = any(_number(run.summary.get("accuracy_after")) is not None for run in runs)
    header = ["run", "framework", "split", "clients", "rounds", "steps", "tokens", "eval ppl before",
              "eval ppl after", *(["accuracy after"] if with_accuracy else []), "traffic MiB (up+down)",
              "wall s"]  # fmt: skip
    lines = ["# splitlm report", ""]
    lines += [f"- `{_cell(run.name)}`: {_cell(str(run.path))}" for run in runs]
    lines += ["", *_table(header, (_run_row(run, with_accuracy) for run in runs)), ""]
    for file_name, caption in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({file_name})", ""]
        if file_name in _NOTES:
            lines += [_NOTES[file_name], ""]
    for run in runs:
        clients = run.summary.get("clients")
        if not run.multi or not isinstance(clients, list):
            continue
        rows = [
            [
                _cell(client.get("client")),
                _cell(client.get("examples")),
                _cell(client.get("label_histogram")),
                _cell(client.get("steps")),
                _cell(_number(client.get("eval_loss")), 4),
            ]
            for client in clients
            if isinstance(client, dict)
        ]
        lines += [f"## Clients of `{_cell(run.name)}`", ""]
        lines += [*_table(["client", "examples", "label histogram", "steps", "eval loss"], rows), ""]
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Read every run directory, then write the figures and ``report.md`` into ``out`` (created if needed);
    returns the path of ``report.md``. Raises ``CheckpointError`` before writing anything if a run
    directory is missing, unfinished or corrupt."""
    if not run_dirs:
        raise CheckpointError(f"no run directories given; {_FINISHED}")
    paths = [Path(path) for path in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, _names(paths), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {"loss.png": "Training loss", "eval.png": "Held-out evaluation", "bytes.png": "Traffic"}
    plot_loss(runs, out / "loss.png")
    plot_eval(runs, out / "eval.png")
    plot_bytes(runs, out / "bytes.png")
    report = out / "report.md"
    report.write_text(render_markdown(runs, images) + "\n")
    return report
