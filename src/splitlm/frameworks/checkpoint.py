"""A run's folder: refusing to mix runs, resumable checkpoints, and trimming metrics back to a checkpoint.

    output_dir/
      config.yaml       the resolved config
      metrics.jsonl     one object per client step (eval fields on steps that evaluated)
      rounds.jsonl      one object per round: held-out loss, perplexity, accuracy, per-client results, traffic
      summary.json      the run's outcome (``driver.summarize``)
      adapters/         what training changed, per part, as safetensors
      checkpoints/      step-NNNNNN/ (NNNNNN: client steps of all clients so far), the last two kept

A checkpoint holds each party's state in its own folder (``client-<id>/``, ``server/``, as on separate
machines; a remote client writes its own on its machine under the same name), ``members.json`` (each
client's progress), ``progress.json`` (the driver's), the RNG state and the client side being passed along.
It is written to a temporary folder and renamed, so an interruption never leaves half of one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from splitlm.config import Config, dump_config
from splitlm.errors import CheckpointError
from splitlm.files import write_json, write_text

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"


class Saveable(Protocol):
    def save(self, folder: Path, with_optimizer: bool = True) -> None: ...

    def load(self, folder: Path) -> None: ...


def checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def checkpoint_name(steps: int) -> str:
    return f"step-{steps:06d}"


def save_checkpoint(
    out: Path, parties: Saveable, steps: int, progress: dict[str, Any], name: str | None = None
) -> Path:
    """Write ``checkpoints/<name>`` (default ``step-<steps>``): each party's state, the RNG, ``progress``."""
    final = out / CHECKPOINTS / (name or checkpoint_name(steps))
    tmp = out / CHECKPOINTS / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parties.save(tmp, with_optimizer=True)
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    write_json(tmp / "progress.json", {**progress, "steps": steps, "name": final.name})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(out)[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, parties: Saveable, name: str | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint (or ``checkpoints/<name>``) into ``parties``; return its progress."""
    found = checkpoints(out)
    if name is not None:
        found = [folder for folder in found if folder.name == name]
    if not found:
        where = f"checkpoints/{name}" if name else "checkpoints/step-* folder"
        raise CheckpointError(f"--resume: {out} has no {where}; start the run without --resume")
    folder = found[-1]
    try:
        progress = json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{folder}/progress.json unreadable ({error}); delete that folder to resume earlier"
        ) from None
    if "steps" not in progress:
        raise CheckpointError(
            f"{folder} was written by an older splitlm (no steps in progress.json); start the run again in a new "
            "output_dir"
        )
    parties.load(folder)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    log.info("resumed from %s", folder)
    return progress


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


def stopped_at_once(out: Path) -> str:
    """What to do after a run into ``out`` stopped at once (Ctrl-C while it loads, or a second Ctrl-C): continue
    from its newest checkpoint, or, before the first one, start it again."""
    found = checkpoints(out)
    if not found:
        return "interrupted before the first checkpoint; nothing to resume: run the same command again without --resume"
    return f"interrupted at once; --resume continues from {out}/{CHECKPOINTS}/{found[-1].name}"


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
