"""The metric logger of a run: one component that hands each step's and each round's record to its sinks.

Every run writes ``metrics.jsonl`` (a record per client step) and ``rounds.jsonl`` (a record per round) through the
``jsonl`` sink; ``train.report_to`` adds more sinks by name (``tensorboard``, ``wandb``, ``mlflow``, or one of a
user's own), each with its settings. A sink is a ``Sink`` registered in ``SINKS`` in its own module; it receives the
run's config once (``open``: its hyperparameters), then the records as they are written, and ``rewind`` when steps or
rounds were taken back (a rolled-back round, a resume). The driver and a networked client (``splitlm client``, its
own ``output_dir``) each keep one ``MetricLogger``; they never learn a sink's name.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from splitlm.config import Config
from splitlm.registry import Component, ComponentRegistry

# the keys of a record that place it (its x axis and whose it is), not values to plot
STEP_KEYS = ("step", "client")
ROUND_KEYS = ("round",)


@dataclass
class RunInfo:
    """What a sink opens on: the run's config (its hyperparameters), its folder, and whose records these are."""

    config: Config
    out: Path
    name: str  # "run" (the driver: every client's steps and the rounds) or "client 0" (a networked client)
    resume: bool = False


def scalars(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of ``record`` by name, nested mappings flattened with ``/`` (``per_client_eval_loss/0``); None,
    strings and lists are left out, booleans are 0/1."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            values.update({f"{key}/{inner}": number for inner, number in scalars(value).items()})
        elif isinstance(value, int | float):
            values[key] = float(value)
    return values


def flat_config(config: Config) -> dict[str, Any]:
    """The config as ``section.key: value`` (lists and mappings as their text), for a tracker's hyperparameters."""

    def walk(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                flat.update(walk(value, f"{name}."))
            elif isinstance(value, bool | int | float | str):
                flat[name] = value
            else:
                flat[name] = str(value)
        return flat

    return walk(config.model_dump(mode="json"), "")


class Sink(Component):
    """Where a run's records go: ``step`` gets each client step's record (``metrics.jsonl``'s lines), ``round``
    each round's (``rounds.jsonl``'s). ``package``: the Python package it needs, if any (a config that names the
    sink where it is not installed is refused with one line naming it)."""

    package: ClassVar[str | None] = None

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if cls.package is not None and importlib.util.find_spec(cls.package) is None:
            return [missing_package(cls.name, cls.package)]
        return []

    def open(self, run: RunInfo) -> None:
        """Start: the run's folder, name and config (write its hyperparameters here)."""

    def step(self, record: dict[str, Any]) -> None:
        """One client step's record (``step``, ``client``, ``round``, ``loss``, ...)."""

    def round(self, record: dict[str, Any]) -> None:
        """One round's record (``round``, ``eval_loss``, ``per_client_eval_loss``, ...)."""

    def rewind(self, steps_done: dict[str, int], rounds_done: int | None) -> None:
        """Steps after ``steps_done`` (per client) and rounds after ``rounds_done`` (None: rounds unchanged) were
        taken back; a sink that can forget them does (a tracker that cannot keeps them)."""

    def close(self) -> None:
        """The run ended (or stopped): flush and release."""


def missing_package(sink: str, package: str) -> str:
    return (
        f"train.report_to: {sink} needs the {package} package, which is not installed; pip install {package}, or "
        f"remove {sink} from train.report_to"
    )


SINKS = ComponentRegistry[Sink](
    "metric sink",
    "train.report_to",
    builtins=(
        "splitlm.runtime.tracking.jsonl",
        "splitlm.runtime.tracking.tensorboard",
        "splitlm.runtime.tracking.wandb",
        "splitlm.runtime.tracking.mlflow",
    ),
)
ALWAYS = "jsonl"  # every run writes metrics.jsonl and rounds.jsonl, whatever train.report_to says


class MetricLogger:
    """One run's (or one networked client's) metric logger: every record goes to each sink, in order."""

    def __init__(self, config: Config, out: Path, name: str = "run", resume: bool = False) -> None:
        self.sinks: list[Sink] = SINKS.build({ALWAYS: {}, **config.train.report_to})
        self.lock = threading.Lock()
        run = RunInfo(config, out, name, resume)
        opened: list[Sink] = []
        try:
            for sink in self.sinks:
                sink.open(run)
                opened.append(sink)
        except BaseException:
            for sink in opened:
                sink.close()
            raise

    def step(self, record: dict[str, Any]) -> None:
        with self.lock:
            for sink in self.sinks:
                sink.step(record)

    def round(self, record: dict[str, Any]) -> None:
        with self.lock:
            for sink in self.sinks:
                sink.round(record)

    def rewind(self, steps_done: dict[str, int], rounds_done: int | None = None) -> None:
        with self.lock:
            for sink in self.sinks:
                sink.rewind(steps_done, rounds_done)

    def close(self) -> None:
        with self.lock:
            for sink in self.sinks:
                sink.close()
