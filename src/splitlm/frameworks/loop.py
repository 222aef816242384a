"""The training loop every framework shares: evaluate, step, log, checkpoint, resume, summarise.

A framework supplies a ``Learner`` (who computes a step and where the parts live); the loop owns the data
order, metrics files, checkpoints and the summary. Everything a run writes goes under ``output_dir``:

    config.yaml       the resolved config
    metrics.jsonl     one object per optimizer step (eval fields on steps that evaluated)
    summary.json      before/after held-out loss and perplexity, traffic, time, parameter counts
    adapters/         what training changed, per part, as safetensors (+ parts.json)
    checkpoints/      resumable states, step-NNNNNN/ (written to a temporary folder, then renamed)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from splitlm.config import Config, dump_config
from splitlm.data import Batch, DataOrder, collate
from splitlm.errors import CheckpointError
from splitlm.frameworks.setup import RunData
from splitlm.privacy.accounting import releases
from splitlm.runtime.client import EvalStats, StepStats

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class Learner(Protocol):
    """What a framework hands the loop."""

    client_id: str

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats: ...

    def evaluate(self, batches: list[Batch]) -> EvalStats: ...

    def traffic(self) -> tuple[int, int]: ...

    def save(self, folder: Path, with_optimizer: bool) -> None: ...

    def load(self, folder: Path) -> None: ...

    def info(self) -> dict[str, Any]: ...


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def save_checkpoint(out: Path, learner: Learner, step: int, progress: dict[str, Any]) -> None:
    final = out / CHECKPOINTS / f"step-{step:06d}"
    tmp = out / CHECKPOINTS / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.save(tmp, with_optimizer=True)
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    write_json(tmp / "progress.json", {**progress, "step": step})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(out)[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, learner: Learner) -> dict[str, Any]:
    found = checkpoints(out)
    if not found:
        raise CheckpointError(f"--resume: {out} has no checkpoints/step-* folder; start the run without --resume")
    folder = found[-1]
    try:
        progress = json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{folder}/progress.json unreadable ({error}); delete that folder to resume earlier"
        ) from None
    learner.load(folder)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    log.info("resumed from %s", folder)
    return progress


def trim_metrics(path: Path, step: int, key: str = "step") -> None:
    """Drop metric lines after ``step`` (they belong to work the checkpoint does not contain)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def prepare_output(config: Config, resume: bool) -> Path:
    """The run directory: refuse to mix a new run into an old one; write the resolved config."""
    out = Path(config.output_dir)
    if not resume and ((out / "metrics.jsonl").exists() or checkpoints(out)):
        raise CheckpointError(
            f"output_dir {out} already holds a run: pass --resume to continue it, or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    return out


def train(config: Config, learner: Learner, data: RunData, resume: bool = False) -> dict[str, Any]:
    out = prepare_output(config, resume)
    metrics_path = out / "metrics.jsonl"
    train_cfg = config.train
    order = DataOrder(len(data.train), train_cfg.batch_size, config.seed)

    progress: dict[str, Any] = {"step": 0, "wall_seconds": 0.0, "tokens": 0, "bytes_up": 0, "bytes_down": 0}
    if resume:
        progress = load_checkpoint(out, learner)
        trim_metrics(metrics_path, progress["step"])
    else:
        torch.manual_seed(config.seed)
        before = learner.evaluate(data.eval)
        progress.update(eval_loss_before=before.loss, eval_tokens=before.tokens)
    start_step = int(progress["step"])
    wall_before = float(progress["wall_seconds"])
    # Traffic before a resume was counted by the previous process; this one's meter starts at zero.
    up_before, down_before = int(progress["bytes_up"]), int(progress["bytes_down"])

    def account() -> None:
        up, down = learner.traffic()
        progress.update(
            bytes_up=up_before + up,
            bytes_down=down_before + down,
            wall_seconds=wall_before + time.perf_counter() - started,
        )

    started = time.perf_counter()

    bar = tqdm(
        range(start_step, train_cfg.steps),
        initial=start_step,
        total=train_cfg.steps,
        desc=f"{config.framework.name}",
        disable=not train_cfg.progress,
        dynamic_ncols=True,
    )
    with metrics_path.open("a") as metrics:
        for step in bar:
            micro = [
                collate([data.train[i] for i in order.indices(step * train_cfg.grad_accum + m)], data.pad_id)
                for m in range(train_cfg.grad_accum)
            ]
            up0, down0 = learner.traffic()
            t0 = time.perf_counter()
            stats = learner.train_step(step, micro)
            seconds = time.perf_counter() - t0
            up1, down1 = learner.traffic()
            progress["tokens"] += stats.tokens
            record: dict[str, Any] = {
                "step": step + 1,
                "client": learner.client_id,
                "loss": stats.loss,
                "tokens": stats.tokens,
                "bytes_up": up1 - up0,
                "bytes_down": down1 - down0,
                "seconds": seconds,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "epoch": order.epoch((step + 1) * train_cfg.grad_accum),
            }
            if train_cfg.eval_every and (step + 1) % train_cfg.eval_every == 0 and step + 1 < train_cfg.steps:
                result = learner.evaluate(data.eval)
                record.update(eval_loss=result.loss, eval_ppl=perplexity(result.loss))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{stats.loss:.4f}")
            if train_cfg.save_every and (step + 1) % train_cfg.save_every == 0 and step + 1 < train_cfg.steps:
                account()
                save_checkpoint(out, learner, step + 1, progress)
    bar.close()

    after = learner.evaluate(data.eval)
    account()
    wall = progress["wall_seconds"]
    save_checkpoint(out, learner, train_cfg.steps, progress)
    adapters = out / "adapters"
    adapters.mkdir(exist_ok=True)
    learner.save(adapters, with_optimizer=False)
    summary = {
        "framework": config.framework.name,
        "split_mode": config.split.mode if config.framework.name != "centralized" else None,
        "model": config.model.name,
        "steps": train_cfg.steps,
        "tokens": progress["tokens"],
        "eval_loss_before": progress["eval_loss_before"],
        "eval_loss_after": after.loss,
        "eval_ppl_before": perplexity(progress["eval_loss_before"]),
        "eval_ppl_after": perplexity(after.loss),
        "eval_tokens": after.tokens,
        "bytes_up": progress["bytes_up"],
        "bytes_down": progress["bytes_down"],
        "wall_seconds": wall,
        "train_tokens_per_s": progress["tokens"] / wall if wall else 0.0,
        **learner.info(),
    }
    report = getattr(learner, "privacy", None)  # split learners: tap records, defenses and their epsilon
    if report is not None:
        summary["privacy"] = report(
            out, releases(train_cfg.steps, train_cfg.batch_size, train_cfg.grad_accum, len(data.train))
        )
    write_json(out / "summary.json", summary)
    return summary
