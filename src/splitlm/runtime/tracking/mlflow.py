"""The ``mlflow`` sink: an MLflow run in a local file store, ``output_dir/mlruns`` (``mlflow ui --backend-store-uri
runs/NAME/mlruns``), or at ``tracking_uri``.

Each client step's numbers are metrics ``client<ID>/<metric>`` at that client's step, each round's ``round/<metric>``
at the round's number; the config's keys are the run's parameters. Used only where the ``mlflow`` package is
installed."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from splitlm.registry import ComponentSettings
from splitlm.runtime.tracking import ROUND_KEYS, SINKS, STEP_KEYS, RunInfo, Sink, flat_config, scalars

BATCH = 100  # MLflow takes at most this many parameters in one call
VALUE_CHARS = 500  # and parameter values this long


class MlflowSettings(ComponentSettings):
    tracking_uri: str | None = Field(None, description="Where to track (None: a file store in output_dir/mlruns).")
    experiment: str = Field("splitlm", description="The MLflow experiment of the run.")


@SINKS.component
class MlflowSink(Sink):
    """An MLflow run (a local file store by default)."""

    name = "mlflow"
    package = "mlflow"
    Settings = MlflowSettings

    def open(self, run: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = self.settings
        assert isinstance(settings, MlflowSettings)
        uri = settings.tracking_uri or (run.out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(settings.experiment)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(settings.experiment)
        self.run_id = self.client.create_run(experiment, run_name=f"{run.out.name} {run.name}").info.run_id
        params = [Param(key, str(value)[:VALUE_CHARS]) for key, value in flat_config(run.config).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + BATCH])

    def _log(self, prefix: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{key}", value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])

    def step(self, record: dict[str, Any]) -> None:
        self._log(f"client{record['client']}", int(record["step"]), scalars(record, STEP_KEYS))

    def round(self, record: dict[str, Any]) -> None:
        self._log("round", int(record["round"]), scalars(record, ROUND_KEYS))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
