"""``train.report_to``: the metric logger's sinks get every number of metrics.jsonl and rounds.jsonl.

TensorBoard's event files are read back with TensorBoard's own reader; a tracker whose package is missing is a
one-line config error naming the package; wandb and mlflow (not installed here) are checked against stand-in
modules that record what they are given."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from helpers import assert_events_hold, expected_scalars
from splitlm.cli.main import main
from splitlm.config import load_config
from splitlm.frameworks import config_problems

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["train.steps=4", "train.progress=false", "data.max_rows=120", "data.eval_size=8", "train.seq_len=32"]


def test_tensorboard_holds_every_logged_scalar(tmp_path: Path) -> None:
    out = tmp_path / "tb-run"
    args = ["train", str(TINY), "train.report_to=[tensorboard]", f"output_dir={out}", *FAST]
    clients = ["framework.name=sflv2", "framework.num_clients=2", "framework.rounds=2", "data.client_eval_size=4"]
    assert main([*args, *clients]) == 0
    wanted = expected_scalars(out)
    assert {"client0/loss", "client1/loss", "round/eval_loss", "round/client_eval_loss/1"} <= set(wanted)
    assert len(wanted["client1/loss"]) == 4 and sorted(wanted["round/eval_loss"]) == [1, 2]
    events = assert_events_hold(out, wanted)
    hparams = events.PluginTagToContent("hparams")  # the config as hyperparameters
    assert b"train.lr" in b"".join(hparams.values())
    assert "config/text_summary" in events.Tags()["tensors"]


def test_a_missing_tracker_package_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "wandb" not in sys.modules  # this environment has no wandb
    assert main(["train", str(TINY), "train.report_to=[wandb]", f"output_dir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitlm: error: ")
    assert err[0].endswith(
        "train.report_to: wandb needs the wandb package, which is not installed; pip install wandb, or remove wandb "
        "from train.report_to"
    )
    assert not (tmp_path / "w").exists()


def test_unknown_tracker_names_the_choices(tmp_path: Path) -> None:
    problems = " ".join(config_problems({"train": {"report_to": ["tensorbord"]}, "output_dir": str(tmp_path)}))
    assert "train.report_to: unknown metric sink 'tensorbord'" in problems and "'tensorboard'" in problems


STAND_INS = {
    "wandb.py": """
        calls = []
        class Run:
            def define_metric(self, name, step_metric=None): calls.append(("define", name, step_metric))
            def log(self, values): calls.append(("log", values))
            def finish(self): calls.append(("finish",))
        def init(**kwargs):
            calls.append(("init", kwargs))
            return Run()
    """,
    "mlflow/__init__.py": "calls = []\n",
    "mlflow/entities.py": """
        from collections import namedtuple
        Param = namedtuple("Param", "key value")
        Metric = namedtuple("Metric", "key value timestamp step")
    """,
    "mlflow/tracking.py": """
        from mlflow import calls
        class MlflowClient:
            def __init__(self, tracking_uri): calls.append(("uri", tracking_uri))
            def get_experiment_by_name(self, name): return None
            def create_experiment(self, name): return "7"
            def create_run(self, experiment, run_name):
                calls.append(("run", experiment, run_name))
                return type("R", (), {"info": type("I", (), {"run_id": "r1"})})()
            def log_batch(self, run_id, metrics=(), params=()): calls.append(("batch", list(metrics), list(params)))
            def set_terminated(self, run_id): calls.append(("end", run_id))
    """,
}


def test_wandb_and_mlflow_get_every_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = tmp_path / "modules"
    for name, text in STAND_INS.items():
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        (modules / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(modules))
    for name in ("wandb", "mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    args = ["train", str(TINY), "train.report_to=[wandb, mlflow]", f"output_dir={out}", *FAST, "train.steps=2"]
    assert main(args) == 0
    import mlflow
    import wandb

    wanted = expected_scalars(out)
    init = wandb.calls[0]
    assert init[0] == "init" and init[1]["mode"] == "offline" and init[1]["config"]["train"]["steps"] == 2
    logged = {key: value for call in wandb.calls if call[0] == "log" for key, value in call[1].items()}
    assert {key: value for key, value in logged.items() if not key.endswith(("/step", "round/round"))} == {
        tag: points[max(points)] for tag, points in wanted.items()
    }  # the last value of each
    assert ("define", "client0/*", "client0/step") in wandb.calls and wandb.calls[-1] == ("finish",)
    assert mlflow.calls[0] == ("uri", (out / "mlruns").resolve().as_uri())
    metrics = {(m.key, m.step): m.value for call in mlflow.calls if call[0] == "batch" for m in call[1]}
    assert metrics == {(tag, step): value for tag, points in wanted.items() for step, value in points.items()}
    params = {p.key: p.value for call in mlflow.calls if call[0] == "batch" for p in call[2]}
    assert params["train.steps"] == "2" and params["model.name"] == "tiny-llama"
    assert mlflow.calls[-1] == ("end", "r1")


def test_config_loads_with_tensorboard(tmp_path: Path) -> None:
    config = load_config(TINY, ["train.report_to=[tensorboard]"], checks=[config_problems])
    assert config.train.report_to == {"tensorboard": {}}
