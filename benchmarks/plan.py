"""How well `splitlm plan` predicts: predicted against measured step time of three cuts of the default config.

    python benchmarks/plan.py [--config configs/demo.yaml] [--steps 6] [key=value ...]

Profiles the config's model (batch 4 x 128 packed tokens) and predicts every cut (``splitlm.planning``) for one
client twice as slow as this machine (``framework.clients[0].speed=2``) behind an emulated 50 Mbit/s, 20 ms link,
then trains three cuts for real:
the predicted-best one, a shallow one and a deep one, each ``--steps`` steps through the in-process split
pipeline (``run_framework``, packed data so every row is ``train.seq_len`` tokens, as the planner assumes).
A cut's measured step time is the median of its metrics.jsonl ``seconds`` after the first step.

Prediction and measurement run in this one process with one torch thread (``torch.set_num_threads(1)``), so
both see the same machine; the client and the server threads may still run at once on two cores. The
prediction is the schedule the run uses (serial unless ``train.pipeline.micro_batches > 1``). Prints one JSON
line: ``{"cuts": [{"head", "tail", "predicted_step_s", "measured_step_s", "error_pct", "steps_s",
"step_spread_pct", "measured_mean_ci", "prediction_within_step_noise"}], "profile_s", ...}`` (``steps_s``: every
step's seconds, the first included; the noise figures are over the steps after the first, see ``step_noise``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splitlm.config import Config
from splitlm.planning import Prediction

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "train.progress=false", "train.eval_batches=1", "data.eval_size=8", "data.max_rows=1500", "data.pack=true",
    "train.batch_size=4",
]  # fmt: skip
# A client twice as slow as this machine behind a 50 Mbit/s, 20 ms link: cuts then differ in step time (the
# client's share of the blocks runs at half speed), and the prediction covers compute, speed and the link.
CLIENT = "framework.clients=[{speed: 2, link: {bandwidth_mbps: 50, latency_ms: 20}}]"


def measured_steps_s(config: Config, head: int, tail: int, out: Path) -> list[float]:
    from splitlm.frameworks import run_framework

    split = config.split.model_copy(update={"head_layers": head, "tail_layers": tail})
    run = config.model_copy(update={"split": split, "output_dir": str(out / f"cut-{head}-{tail}")})
    run_framework(run)
    lines = (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines if line.strip()]


def pick_cuts(best: Prediction, layers: int, mode: str) -> list[tuple[int, int]]:
    """The predicted-best cut, then a shallow and a deep one (other than it)."""
    tail = 1 if mode == "ushape" else 0
    shallow = (1, tail) if (1, tail) != best.cut else (2, tail)
    deep = (layers // 2, layers // 2 - 1) if mode == "ushape" else (layers - 2, 0)
    if deep in (best.cut, shallow):
        deep = (deep[0] - 1, deep[1])
    return [best.cut, shallow, deep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="more dotted overrides, e.g. transport.link.bandwidth_mbps=100")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from splitlm.cli.main import _quiet_libraries
    from splitlm.config import load_config
    from splitlm.planning import make_plan, profile_model

    _quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="splitlm-plan-") as tmp:
        overrides = [*RUN, CLIENT, f"train.steps={args.steps}", f"output_dir={tmp}", *args.overrides]
        config = load_config(args.config, overrides)
        started = time.perf_counter()
        profile = profile_model(config)
        plan = make_plan(config, profile)
        planned = time.perf_counter() - started
        group = plan.groups[0]
        by_cut = {p.cut: p for p in group.predictions}
        if group.best is None:
            raise SystemExit(f"no cut fits plan.client_memory_mb={config.plan.client_memory_mb}: drop the budget")
        rows = []
        for head, tail in pick_cuts(group.best, profile.layers, profile.mode):
            predicted = by_cut[head, tail].pipelined_s if plan.by_pipelined else by_cut[head, tail].serial_s
            steps = measured_steps_s(config, head, tail, Path(tmp))
            measured = statistics.median(steps[1:] or steps)
            rows.append(
                {
                    "head": head,
                    "tail": tail,
                    "predicted_step_s": round(predicted, 4),
                    "measured_step_s": round(measured, 4),
                    "error_pct": round(abs(predicted - measured) / measured * 100, 2),
                    "steps_s": [round(x, 3) for x in steps],
                    **step_noise(steps[1:] or steps, predicted),
                }
            )
    result = {
        "cuts": rows,
        "best_cut": list(group.best.cut),
        "profile_s": round(profile.seconds, 2),
        "plan_s": round(planned, 2),
        "torch_threads": torch.get_num_threads(),
        "config": recorded_path(args.config),
        "steps": args.steps,
    }
    print(json.dumps(result))
    return 0


def recorded_path(path: str | Path) -> str:
    """``path`` as the result records it: relative to the repository when it lies inside it, else its file name; never
    the absolute path of the machine that ran it (the result is committed under docs/)."""
    resolved = Path(path).resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else resolved.name


def step_noise(steps: list[float], predicted: float) -> dict[str, Any]:
    """How much the measured steps differ among themselves, next to the prediction's error: their spread (standard
    deviation over mean, %), the 95 % Student-t interval of their mean, and whether the prediction lies within
    the range of single steps that interval's spread allows (mean +- t x sd)."""
    from scipy.stats import t as student_t

    mean, sd = statistics.fmean(steps), statistics.stdev(steps) if len(steps) > 1 else 0.0
    t = float(student_t.ppf(0.975, len(steps) - 1)) if len(steps) > 1 else math.inf
    half = t * sd / math.sqrt(len(steps))
    return {
        "step_spread_pct": round(100 * sd / mean, 2),
        "measured_mean_ci": [round(mean - half, 4), round(mean + half, 4)],
        "prediction_within_step_noise": bool(abs(predicted - mean) <= t * sd),
    }


if __name__ == "__main__":
    sys.exit(main())
