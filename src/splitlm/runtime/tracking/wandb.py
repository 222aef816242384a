"""The ``wandb`` sink: a Weights & Biases run in ``output_dir/wandb``, offline unless told otherwise.

``mode``: offline (the default, unless the ``WANDB_MODE`` environment variable says another: nothing leaves the
machine; ``wandb sync`` uploads it later), online or disabled. Each client step's numbers go under
``client<ID>/<metric>`` against ``client<ID>/step``, each round's under ``round/<metric>`` against ``round/round``;
the config is the run's config. Used only where the ``wandb`` package is installed."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from splitlm.registry import ComponentSettings
from splitlm.runtime.tracking import ROUND_KEYS, SINKS, STEP_KEYS, RunInfo, Sink, scalars


class WandbSettings(ComponentSettings):
    project: str = Field("splitlm", description="The W&B project of the run.")
    mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="offline, online or disabled (None: the WANDB_MODE environment variable, else offline)."
    )


@SINKS.component
class WandbSink(Sink):
    """A Weights & Biases run (offline by default)."""

    name = "wandb"
    package = "wandb"
    Settings = WandbSettings

    def open(self, run: RunInfo) -> None:
        import wandb

        settings = self.settings
        assert isinstance(settings, WandbSettings)
        run.out.mkdir(parents=True, exist_ok=True)
        mode = settings.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=settings.project, dir=str(run.out), mode=mode, name=f"{run.out.name} {run.name}",
            config=run.config.model_dump(mode="json"),
        )  # fmt: skip
        self.axes: set[str] = set()

    def _log(self, prefix: str, axis: str, record: dict[str, Any], skip: tuple[str, ...]) -> None:
        if prefix not in self.axes:  # each client's steps (and the rounds) on an axis of their own
            self.run.define_metric(f"{prefix}/{axis}")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/{axis}")
            self.axes.add(prefix)
        values = {f"{prefix}/{key}": value for key, value in scalars(record, skip).items()}
        self.run.log({**values, f"{prefix}/{axis}": int(record[axis])})

    def step(self, record: dict[str, Any]) -> None:
        self._log(f"client{record['client']}", "step", record, STEP_KEYS)

    def round(self, record: dict[str, Any]) -> None:
        self._log("round", "round", record, ROUND_KEYS)

    def close(self) -> None:
        self.run.finish()
