"""The ``tensorboard`` sink: event files under ``output_dir/tb`` (``tensorboard --logdir runs/NAME/tb``).

Each client step's numbers go under ``client<ID>/<metric>`` at that client's step, each round's under
``round/<metric>`` at the round's number (per-client mappings as ``round/per_client_eval_loss/<ID>``); the run's
config is written once as hyperparameters (the HPARAMS tab) and as text (``config``). Needs the ``tensorboard``
package (``pip install tensorboard``, part of splitlm's dev and ``tensorboard`` extras)."""

from __future__ import annotations

from typing import Any

import yaml

from splitlm.runtime.tracking import ROUND_KEYS, SINKS, STEP_KEYS, RunInfo, Sink, flat_config, scalars

FOLDER = "tb"


@SINKS.component
class TensorBoardSink(Sink):
    """TensorBoard event files under ``output_dir/tb``."""

    name = "tensorboard"
    package = "tensorboard"

    def open(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run.out / FOLDER))
        experiment, start, end = hparams(flat_config(run.config), {})  # the HPARAMS tab
        events = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            events.add_summary(summary)
        text = yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False)
        self.writer.add_text("config", f"```yaml\n{text}```")

    def step(self, record: dict[str, Any]) -> None:
        prefix = f"client{record['client']}"
        for key, value in scalars(record, STEP_KEYS).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, int(record["step"]))
        self.writer.flush()

    def round(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record, ROUND_KEYS).items():
            self.writer.add_scalar(f"round/{key}", value, int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
