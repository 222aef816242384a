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

``--resume`` continues the run ``config.yaml`` describes. Overrides that change what it computes (model, split,
LoRA, data, seed, ...) are refused, naming the keys; those that only say where and how it runs
(``OPERATIONAL``) are taken and not written down. Its length may change (``train.steps``, ``framework.rounds``,
``framework.local_steps``), as a Hugging Face Trainer resumed with a larger ``max_steps`` trains on: more rounds of
the same steps per round, or, in a run of one client and one round, more (or fewer, down to those done) steps.
Each learning-rate schedule is then rebuilt for the new total and its position kept: from the checkpoint on, the
learning rate at step k is what a fresh run of the new length has at step k (the steps before were taken on the
old schedule). ``config.yaml`` gets the new length, written atomically, with a line on stderr
``splitlm: resume: train.steps 300 -> 400 ...``; nothing else in it changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors.torch import load_file, save_file

from splitlm.config import Config, build_config
from splitlm.errors import CheckpointError, SplitLMError
from splitlm.files import write_json, write_text
from splitlm.frameworks.aggregation import strategy_of
from splitlm.frameworks.base import framework_of

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
CONFIG_FILE = "config.yaml"
# Keys a resume may change (with their sub-keys): where and how the run goes on, not what it computes.
OPERATIONAL = (
    "output_dir", "train.progress", "train.save_every", "train.eval_every", "train.eval_before",
    "train.eval_each_round", "model.client_device", "model.server_device", "framework.min_clients",
    "framework.round_timeout_s", "framework.client_grace_s", "framework.wait_for_clients_s", "transport.address",
    "server.offload_dir", "server.max_resident_adapters", "server.max_pending", "plan",
)  # fmt: skip
LENGTH = ("train.steps", "framework.rounds", "framework.local_steps")  # a resume may extend the run (see above)


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


def stopped_at_once(out: Path) -> str:
    """What to do after a run into ``out`` stopped at once (Ctrl-C while it loads, or a second Ctrl-C): continue
    from its newest checkpoint, or, before the first one, start it again."""
    found = checkpoints(out)
    if not found:
        return "interrupted before the first checkpoint; nothing to resume: run the same command again without --resume"
    return f"interrupted at once; --resume continues from {out}/{CHECKPOINTS}/{found[-1].name}"


def prepare_output(config: Config, resume: bool) -> Path:
    """The run directory: refuse to mix a new run into an old one; write the resolved config (on ``--resume``: only
    a change of the run's length, said on stderr; any other change that matters is refused)."""
    out = Path(config.output_dir)
    if not resume and ((out / "metrics.jsonl").exists() or checkpoints(out)):
        raise CheckpointError(
            f"output_dir {out} already holds a run: pass --resume to continue it, or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    saved = _saved_config(path) if resume else None
    if saved is None:
        _write_config(config, path)
        return out
    changes = length_changes(out, saved, config)
    if changes:
        tree = saved.model_dump(mode="json")
        for key, (_, new) in changes.items():
            section, name = key.split(".")
            tree[section][name] = new
        _write_config(build_config(tree), path)
        said = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
        fw = config.framework
        print(
            f"splitlm: resume: {said} ({CONFIG_FILE} updated): {fw.rounds} round(s) of "
            f"{fw.steps_per_round(config.train.steps)} steps per client; the learning-rate schedule spans the new "
            "total from the checkpoint on",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return out


def _write_config(config: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _saved_config(path: Path) -> Config | None:
    """The config a run was started with (None where there is none, or it no longer loads: nothing to compare)."""
    if not path.is_file():
        return None
    try:
        return build_config(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, SplitLMError) as error:
        log.warning("%s does not load (%s); the resume's config is not compared with it", path, error)
        return None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _among(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in keys)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def length_changes(out: Path, saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """The length keys ``config`` changes against the ``saved`` run's config, {key: (saved, new)}; a
    ``CheckpointError`` naming the keys for any other change that matters, or a length the run cannot take."""
    old, new = _flat(saved.model_dump(mode="json")), _flat(config.model_dump(mode="json"))
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    meaning = [key for key in changed if not _among(key, OPERATIONAL + LENGTH)]
    if meaning:
        listed = ", ".join(f"{key} ({_shown(old.get(key))} -> {_shown(new.get(key))})" for key in meaning[:4])
        more = f" and {len(meaning) - 4} more" if len(meaning) > 4 else ""
        raise CheckpointError(
            f"--resume: {listed}{more} differ from the run in {out} ({CONFIG_FILE}); a resume continues that run as "
            "it was set up (only its length may change): drop these overrides, or start a new run in another "
            "output_dir"
        )
    changes = {key: (old[key], new[key]) for key in changed if _among(key, LENGTH)}
    if changes:
        _check_length(out, saved, config, ", ".join(f"{key}={new[key]}" for key in changes))
    return changes


def _check_length(out: Path, saved: Config, config: Config, asked: str) -> None:
    """Refuse a new length the run cannot be continued to (see the module's docstring)."""
    found = checkpoints(out)
    if not found:
        return  # nothing to continue: loading the checkpoint says so
    try:
        progress = json.loads((found[-1] / "progress.json").read_text())
        members = json.loads((found[-1] / "members.json").read_text())["members"]
    except (OSError, ValueError, KeyError):
        return  # loading the checkpoint says what is wrong with it
    rounds_done = int(progress.get("round", 0))
    steps_done = max((int(m["steps_done"]) for m in members.values()), default=0)
    was, now = saved.framework, config.framework
    local_was, local_now = was.steps_per_round(saved.train.steps), now.steps_per_round(config.train.steps)
    strategy = strategy_of(config)
    if strategy.keeps_length:
        raise CheckpointError(
            f"--resume with {asked}: framework.aggregation={strategy.name} runs keep their length; drop the "
            "override, or start a new run in another output_dir"
        )
    if local_now != local_was:
        one = was.rounds == now.rounds == 1 and (now.num_clients == 1 or not framework_of(config).split)
        if not one:
            raise CheckpointError(
                f"--resume with {asked}: the rounds done had {local_was} steps per client and would now have "
                f"{local_now}; to train on, add rounds of the same length (framework.rounds, with "
                f"framework.local_steps={local_was})"
            )
        if local_now < steps_done:
            raise CheckpointError(
                f"--resume with {asked}: the run has done {steps_done} steps already; ask for at least that many"
            )
    elif now.rounds < rounds_done:
        raise CheckpointError(
            f"--resume with {asked}: the run has done {rounds_done} rounds already; ask for at least that many"
        )
