"""The ``jsonl`` sink, which every run has: ``metrics.jsonl`` (a line per client step) and ``rounds.jsonl`` (a line
per round) in the run's folder, what ``splitlm report`` and ``--resume`` read. A rewind drops the lines of the steps
and rounds taken back, so the files hold exactly the work a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from splitlm.files import write_text
from splitlm.runtime.tracking import SINKS, RunInfo, Sink

METRICS_FILE, ROUNDS_FILE = "metrics.jsonl", "rounds.jsonl"


def trim_metrics(path: Path, steps_done: dict[str, int]) -> None:
    """Drop metric lines of client steps after the checkpoint (work the checkpoint does not contain)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["step"] <= steps_done.get(str(record["client"]), 0):
                kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def trim_rounds(path: Path, rounds_done: int) -> None:
    """Drop round lines after the checkpoint's round."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= rounds_done]
    write_text(path, "".join(line + "\n" for line in kept))


@SINKS.component
class JsonlSink(Sink):
    """``metrics.jsonl`` and ``rounds.jsonl`` in the run's folder (always on; listing it in train.report_to adds
    nothing)."""

    name = "jsonl"

    def open(self, run: RunInfo) -> None:
        self.paths = {"step": run.out / METRICS_FILE, "round": run.out / ROUNDS_FILE}
        self.files: dict[str, IO[str]] = {}

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        handle = self.files.get(kind)
        if handle is None:  # opened at the first line: a client that never trains writes no file
            self.paths[kind].parent.mkdir(parents=True, exist_ok=True)
            handle = self.files[kind] = self.paths[kind].open("a")
        handle.write(json.dumps(record) + "\n")
        handle.flush()

    def step(self, record: dict[str, Any]) -> None:
        self._write("step", record)

    def round(self, record: dict[str, Any]) -> None:
        self._write("round", record)

    def rewind(self, steps_done: dict[str, int], rounds_done: int | None) -> None:
        self.close()
        trim_metrics(self.paths["step"], steps_done)
        if rounds_done is not None:
            trim_rounds(self.paths["round"], rounds_done)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files = {}
