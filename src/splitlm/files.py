"""Writing files so that an interruption never leaves a half-written one: write a temporary file, rename. And
reading a JSON lines file, the one format splitlm both writes (metrics, rounds) and reads (data files)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a reader sees the old file or the new one, never a part)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(record) + "\n" for record in records))


class JsonLineError(ValueError):
    """Line ``number`` of a JSON lines file holds no JSON object: not valid JSON (``problem``, the parser's
    message), or a value of type ``found``. Each reader turns it into its own one-line error."""

    def __init__(self, number: int, problem: str | None = None, found: str | None = None) -> None:
        super().__init__(f"line {number}: {problem if problem is not None else f'a {found}, not a JSON object'}")
        self.number = number
        self.problem = problem
        self.found = found


def read_jsonl(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON object on each line of ``lines`` (blank lines skipped); ``JsonLineError`` at the first line that
    holds anything else."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise JsonLineError(number, problem=error.msg) from error
        if not isinstance(record, dict):
            raise JsonLineError(number, found=type(record).__name__)
        records.append(record)
    return records
