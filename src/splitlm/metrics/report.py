"""``splitlm report``: compare finished runs in three figures and a markdown summary.

Reads what ``splitlm train`` left in each run directory (``summary.json`` of format ``SUMMARY_FORMAT``,
``metrics.jsonl`` and ``rounds.jsonl``; every run writes all three, one client or many) and writes into one
output folder, touching nothing else:

    loss.png    training loss per client step, one line per run (per client where a run has several)
    eval.png    held-out loss and perplexity: before training, at train.eval_every, at the end of each round
    bytes.png   cumulative training traffic, uploaded and downloaded, per client step
    report.md   one table row per run (training and evaluation traffic apart), the figures, and a per-client
                table for each run of several clients

The x axis of every figure is the client step, counted across rounds: round r ends at r * local_steps and a
client's k-th step of round r is at (r - 1) * local_steps + k, so clients sampled in some rounds only and
runs of one client or many line up. Each run has its own marker and dash pattern (``run_style``), so two
identical curves stay distinguishable.

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
from splitlm.files import JsonLineError, read_jsonl

__all__ = [
    "SUMMARY_FORMAT",
    "Run",
    "bytes_figure",
    "eval_figure",
    "load_run",
    "loss_figure",
    "run_style",
    "write_report",
]

# The ``summary.json`` format this module reads; ``splitlm.frameworks.driver.SUMMARY_FORMAT`` writes it (not
# imported from there: the report needs no torch).
SUMMARY_FORMAT = 2
_FINISHED = "pass the output_dir of a finished `splitlm train` run"
_MIB = 2**20
_SMOOTHING = 0.5  # weight of the past in the loss curves' moving average; 0 draws the raw losses
_DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", ":", "-.")
_MARKS_PER_LINE = 8  # markers on a long line (every point of a short one)


@dataclass
class Run:
    """One finished run directory, as read from disk."""

    name: str  # label in figures and tables (the directory's name, widened where two runs share one)
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]  # one object per client step (eval fields on steps that evaluated)
    rounds: list[dict[str, Any]]  # one object per round (a run of one round has one)

    @property
    def num_clients(self) -> int:
        """The summary's client count; without one, the clients that stepped (at least one)."""
        given = self.summary.get("num_clients")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        return len({str(record.get("client", "0")) for record in self.metrics}) or 1

    @property
    def own_client_sides(self) -> bool:
        """Whether the clients keep their own client side (psl): only then do rounds hold per-client losses."""
        return any(isinstance(record.get("per_client_eval_loss"), dict) for record in self.rounds)


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
    try:
        return read_jsonl(text.splitlines())
    except JsonLineError as error:
        if error.problem is None:
            raise CheckpointError(
                f"{path} line {error.number} should be a JSON object, found {error.found}; {_FINISHED}"
            ) from None
        raise CheckpointError(
            f"{path} line {error.number} is not valid JSON ({error.problem}); the file is corrupt: {_FINISHED}"
        ) from None


def _check_format(path: Path, summary: dict[str, Any]) -> None:
    """``CheckpointError`` (one line, naming ``path``) unless ``summary`` is of format ``SUMMARY_FORMAT``."""
    found = summary.get("format")
    if isinstance(found, int) and not isinstance(found, bool) and found > SUMMARY_FORMAT:
        raise CheckpointError(
            f"{path} has format {found}, written by a newer splitlm than this one (it reads format "
            f"{SUMMARY_FORMAT}); report it with the splitlm version that wrote it"
        )
    if found != SUMMARY_FORMAT or isinstance(found, bool):
        raise CheckpointError(
            f'{path} was written by an older splitlm (it has no "format": {SUMMARY_FORMAT}); re-run that run '
            "with this splitlm, or report it with the splitlm version that wrote it"
        )


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory; ``CheckpointError`` naming the path if it is missing, unfinished, corrupt or was
    written by another splitlm (a ``summary.json`` of another format)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist; {_FINISHED}")
    if not (path / "summary.json").is_file():
        raise CheckpointError(f"{path} has no summary.json; {_FINISHED}")
    summary = _read_json(path / "summary.json")
    _check_format(path / "summary.json", summary)
    for required in ("metrics.jsonl", "rounds.jsonl"):
        if not (path / required).is_file():
            raise CheckpointError(f"{path} has no {required}; {_FINISHED}")
    return Run(
        name=name or path.resolve().name,
        path=path,
        summary=summary,
        metrics=_read_jsonl(path / "metrics.jsonl"),
        rounds=_read_jsonl(path / "rounds.jsonl"),
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


# ----------------------------------------------------------------------------------------- client steps


def _number(value: Any) -> float | None:
    """A finite float, or None for what is missing, null, non-numeric or not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _client_key(client: str) -> tuple[int, int | str]:
    return (0, int(client)) if client.isdigit() else (1, client)


def _local_steps(run: Run) -> float:
    """Steps a participating client takes per round: the summary's ``local_steps``; without it, the most steps
    one client took in one round of ``metrics.jsonl`` (1 when that is empty too)."""
    if (given := _number(run.summary.get("local_steps"))) is not None and given > 0:
        return given
    counts: dict[tuple[str, Any], int] = {}
    for record in run.metrics:
        key = (str(record.get("client", "0")), record.get("round"))
        counts[key] = counts.get(key, 0) + 1
    return float(max(counts.values(), default=1))


def _client_steps(run: Run) -> list[tuple[str, float, dict[str, Any]]]:
    """(client, x, record) for each record of ``metrics.jsonl`` that has a step, by client then step: x is
    (round - 1) * local_steps + the client's steps so far in that round (the record's own step when it names
    no round), which is the client's own step when every client takes part in every round."""
    local = _local_steps(run)
    records = [
        (str(record.get("client", "0")), step, record)
        for record in run.metrics
        if (step := _number(record.get("step"))) is not None
    ]
    records.sort(key=lambda item: (_client_key(item[0]), item[1]))
    taken: dict[tuple[str, float], int] = {}
    out = []
    for client, step, record in records:
        if (round_ := _number(record.get("round"))) is None:
            out.append((client, step, record))
            continue
        taken[client, round_] = taken.get((client, round_), 0) + 1
        out.append((client, (round_ - 1) * local + taken[client, round_], record))
    return out


# ---------------------------------------------------------------------------------------------- figures


def run_style(index: int) -> dict[str, Any]:
    """The line style of the ``index``-th run: its own (hollow) marker and dash pattern, so that two runs
    with identical curves stay distinguishable; distinct for the first ``len(_MARKERS) * len(_DASHES)`` runs."""
    return {
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _DASHES[(index + index // len(_MARKERS)) % len(_DASHES)],
        "markerfacecolor": "none",
        "markersize": 6.0,
    }


def _marks(index: int, points: int) -> int | tuple[int, int]:
    """``markevery`` for a line of ``points`` points: every point of a short line; on a long one about
    ``_MARKS_PER_LINE`` markers, shifted per run so that identical curves show their markers apart."""
    every = max(1, points // _MARKS_PER_LINE)
    return 1 if every == 1 else (index % every, every)


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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    figure.clear()


def _legend(ax: Any, entries: int) -> None:
    """A legend long enough in its handles to show each run's dash pattern and marker."""
    if entries == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif entries <= 6:
        ax.legend(fontsize="small", handlelength=4.0, framealpha=0.9)
    else:  # many lines: keep the legend off the curves
        ax.legend(fontsize="x-small", handlelength=4.0, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncols=1 + entries // 20)  # fmt: skip


def _palette(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(index % cmap.N) for index in range(count)]


_X_LABEL = "client step (round r ends at r × local_steps)"


def _loss_label(run: Run, client: str) -> str:
    """The run's name; with the client's id where the run has several clients."""
    return run.name if run.num_clients == 1 else f"{run.name} / client {client}"


def loss_figure(runs: list[Run]) -> Figure:
    """Training loss against the client step: a faint raw line under a lightly smoothed one; the colour tells
    the line apart, the run's style (``run_style``) the run."""
    series: list[tuple[int, str, list[float], list[float]]] = []
    for index, run in enumerate(runs):
        per_client: dict[str, list[tuple[float, float]]] = {}
        for client, x, record in _client_steps(run):
            if (loss := _number(record.get("loss"))) is not None:
                per_client.setdefault(client, []).append((x, loss))
        for client in sorted(per_client, key=_client_key):
            points = per_client[client]
            series.append((index, _loss_label(run, client), [p[0] for p in points], [p[1] for p in points]))
    figure, (ax,) = _new_figure(1, "Training loss per client step")
    for (index, label, steps, losses), color in zip(series, _palette(len(series)), strict=True):
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=1.0)
        ax.plot(steps, _smooth(losses), color=color, linewidth=1.6, label=label, markevery=_marks(index, len(steps)),
                **run_style(index))  # fmt: skip
    ax.set_xlabel(_X_LABEL)
    ax.set_ylabel("training loss (moving average; raw faint)")
    _legend(ax, len(series))
    return figure


def _eval_points(run: Run) -> list[tuple[float, float, float | None, float | None]]:
    """(x, eval loss, perplexity, accuracy) in x order: x = 0 before training, the ``train.eval_every``
    evaluations (their mean where several clients evaluated at the same x), and each round's end from
    ``rounds.jsonl`` at round * local_steps (the model after the round, aggregated where the framework
    aggregates), which replaces the ``eval_every`` evaluations at its x."""
    summary = run.summary
    points: dict[float, tuple[float, float, float | None, float | None]] = {}
    if (before := _number(summary.get("eval_loss_before"))) is not None:
        accuracy = _number(summary.get("accuracy_before"))
        points[0.0] = (0.0, before, _perplexity(before, summary.get("eval_ppl_before")), accuracy)
    during: dict[float, list[float]] = {}
    for _, x, record in _client_steps(run):
        if (loss := _number(record.get("eval_loss"))) is not None:
            during.setdefault(x, []).append(loss)
    for x, losses in during.items():
        mean = sum(losses) / len(losses)
        points[x] = (x, mean, _perplexity(mean), None)
    local = _local_steps(run)
    for record in run.rounds:
        round_, loss = _number(record.get("round")), _number(record.get("eval_loss"))
        if round_ is not None and loss is not None:
            x = round_ * local
            points[x] = (x, loss, _perplexity(loss, record.get("eval_ppl")), _number(record.get("accuracy")))
    return sorted(points.values(), key=lambda p: p[0])


def eval_figure(runs: list[Run]) -> Figure:
    """Held-out loss and perplexity (and accuracy where a run measured it), one line per run."""
    points = [_eval_points(run) for run in runs]
    with_accuracy = any(p[3] is not None for run_points in points for p in run_points)
    figure, axes = _new_figure(3 if with_accuracy else 2, "Held-out evaluation")
    panels: list[tuple[str, Callable[[tuple[float, float, float | None, float | None]], float | None]]] = [
        ("eval loss", lambda p: p[1]),
        ("eval perplexity", lambda p: p[2]),
        ("accuracy", lambda p: p[3]),
    ]
    for ax, (y_label, pick) in zip(axes, panels, strict=False):
        drawn = 0
        for index, (run, run_points, color) in enumerate(zip(runs, points, _palette(len(runs)), strict=True)):
            xy = [(p[0], y) for p in run_points if (y := pick(p)) is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], color=color, label=run.name, **run_style(index))
                drawn += 1
        ax.set_xlabel(_X_LABEL)
        ax.set_ylabel(y_label)
        ax.set_title(y_label)
        _legend(ax, drawn)
    return figure


def _traffic(run: Run) -> list[tuple[float, float, float]]:
    """(x, cumulative MiB up, cumulative MiB down) of the training steps of every client up to x:
    ``metrics.jsonl`` holds each step's own bytes (evaluation traffic is not in it)."""
    per_x: dict[float, tuple[float, float]] = {}
    for _, x, record in _client_steps(run):
        up, down = per_x.get(x, (0.0, 0.0))
        per_x[x] = (up + (_number(record.get("bytes_up")) or 0.0), down + (_number(record.get("bytes_down")) or 0.0))
    rows, up_total, down_total = [], 0.0, 0.0
    for x in sorted(per_x):
        up_total, down_total = up_total + per_x[x][0], down_total + per_x[x][1]
        rows.append((x, up_total / _MIB, down_total / _MIB))
    return rows


def bytes_figure(runs: list[Run]) -> Figure:
    """Cumulative training traffic of all clients against the client step: upload and download side by side."""
    figure, axes = _new_figure(2, "Client-server training traffic (evaluation traffic: see the table)")
    traffic = [_traffic(run) for run in runs]
    for ax, (column, title) in zip(axes, [(1, "uploaded (client → server)"), (2, "downloaded (server → client)")],
                                   strict=True):  # fmt: skip
        drawn = 0
        for index, (run, rows, color) in enumerate(zip(runs, traffic, _palette(len(runs)), strict=True)):
            if rows:
                ax.plot([row[0] for row in rows], [row[column] for row in rows], color=color, label=run.name,
                        markevery=_marks(index, len(rows)), **run_style(index))  # fmt: skip
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel(_X_LABEL)
        ax.set_ylabel("cumulative MiB, all clients")
        _legend(ax, drawn)
    return figure


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


def _mib(summary: dict[str, Any], up: str, down: str) -> str:
    """'up / down' in MiB, '-' where both are missing."""
    values = [_number(summary.get(key)) for key in (up, down)]
    if values == [None, None]:
        return "-"
    return " / ".join(_cell(None if value is None else value / _MIB, 2) for value in values)


def _run_row(run: Run, with_accuracy: bool) -> list[str]:
    summary = run.summary
    row = [
        f"`{_cell(run.name)}`",
        _cell(summary.get("framework")),
        _cell(summary.get("split_mode")),
        _cell(summary.get("num_clients")),
        _cell(summary.get("rounds")),
        _cell(summary.get("steps")),
        _cell(summary.get("tokens")),
        _cell(_number(summary.get("eval_ppl_before")), 2),
        _cell(_number(summary.get("eval_ppl_after")), 2),
    ]
    if with_accuracy:
        row.append(_cell(_number(summary.get("accuracy_after")), 3))
    return [
        *row,
        _mib(summary, "bytes_up", "bytes_down"),
        _mib(summary, "eval_bytes_up", "eval_bytes_down"),
        _cell(_number(summary.get("wall_seconds")), 1),
    ]


_TRAFFIC_NOTE = (
    "Traffic in MiB, up (client → server) / down (server → client), all clients together: train is the "
    "training steps' traffic (drawn in bytes.png), eval the held-out evaluations' traffic, counted apart."
)
_NOTES = {
    "eval.png": "x = 0 is before training; between round ends, the train.eval_every evaluations (the mean over "
    "the clients that evaluated at the same step); at round r's end (r × local_steps), the model after the "
    "round (aggregated where the framework aggregates) from rounds.jsonl.",
    "bytes.png": "The per-step bytes of metrics.jsonl added up over all clients: training traffic only.",
}
_CLIENT_EVAL = {
    True: (
        "eval loss (own client side)",
        "eval loss: each client's held-out loss with its own client side (the clients keep their own).",
    ),
    False: (
        "eval loss (global model)",
        "eval loss: the held-out loss of the global model, which every client holds after the last round.",
    ),
}


def _client_table(run: Run) -> list[str]:
    """The per-client table of a run of several clients (nothing for a run of one: its row says it all)."""
    clients = run.summary.get("clients")
    if run.num_clients == 1 or not isinstance(clients, list):
        return []
    header, note = _CLIENT_EVAL[run.own_client_sides]
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
    lines = [f"## Clients of `{_cell(run.name)}`", ""]
    return [*lines, *_table(["client", "examples", "label histogram", "steps", header], rows), "", note, ""]


def render_markdown(runs: list[Run], images: dict[str, str]) -> str:
    """The report: a row per run, the figures (``images``: file name -> caption), per-client tables."""
    with_accuracy = any(_number(run.summary.get("accuracy_after")) is not None for run in runs)
    header = ["run", "framework", "split", "clients", "rounds", "steps", "tokens", "eval ppl before",
              "eval ppl after", *(["accuracy after"] if with_accuracy else []), "train MiB up / down",
              "eval MiB up / down", "wall s"]  # fmt: skip
    lines = ["# splitlm report", ""]
    lines += [f"- `{_cell(run.name)}`: {_cell(str(run.path))}" for run in runs]
    lines += ["", *_table(header, (_run_row(run, with_accuracy) for run in runs)), "", _TRAFFIC_NOTE, ""]
    for file_name, caption in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({file_name})", ""]
        if file_name in _NOTES:
            lines += [_NOTES[file_name], ""]
    for run in runs:
        lines += _client_table(run)
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Read every run directory, then write the figures and ``report.md`` into ``out`` (created if needed);
    returns the path of ``report.md``. Raises ``CheckpointError`` before writing anything if a run
    directory is missing, unfinished, corrupt or of another ``summary.json`` format."""
    if not run_dirs:
        raise CheckpointError(f"no run directories given; {_FINISHED}")
    paths = [Path(path) for path in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, _names(paths), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {"loss.png": "Training loss", "eval.png": "Held-out evaluation", "bytes.png": "Training traffic"}
    _save(loss_figure(runs), out / "loss.png")
    _save(eval_figure(runs), out / "eval.png")
    _save(bytes_figure(runs), out / "bytes.png")
    report = out / "report.md"
    report.write_text(render_markdown(runs, images) + "\n")
    return report
