"""Split unlearning (survey §5.24): ``splitlm unlearn RUN_DIR --client ID`` takes one client's data back out of a
finished multi-client run, into a new run directory (the original run is never written to).

- A run trained with SplitWiper's isolation (``framework.aggregation=splitwiper``, ``aggregation/isolation.py``):
  only the client's shard is trained again, from its initial state, without the client; every other shard is taken
  as it is from the run's last checkpoint (its state never depended on the client). A shard the client was alone in
  is dropped from the ensemble, with no training at all.
- Any other run: exact unlearning. The last checkpoint taken before the round the client first took part in
  (``rounds.jsonl``'s ``participants``) is resumed with the client left out of every round (``framework.leave_out``).
  A run keeps only its last two checkpoints: where none is from before the client joined, the request is refused,
  and ``--full-retrain`` trains the run again from the start without the client.

Either way the new run computes what the original config computes with the client left out of every round, which is
what its ``config.yaml`` says (the tests check the two are equal tensor for tensor). ``unlearn.json`` in the new run
says how it was done and how long it took (``seconds``: the whole request, loading the model included; ``cpu_seconds``:
the CPU time of this process meanwhile, every thread's, which other processes on the machine do not inflate).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from splitlm.config import Config
from splitlm.errors import CheckpointError, ConfigError
from splitlm.files import write_json
from splitlm.frameworks.aggregation import strategy_of
from splitlm.frameworks.aggregation.isolation import SplitWiper, load_shards
from splitlm.frameworks.assemble import load_run_config
from splitlm.frameworks.checkpoint import CHECKPOINTS, checkpoints, prepare_output, save_checkpoint
from splitlm.frameworks.driver import drive, evaluate_round, run_framework, summarize
from splitlm.frameworks.federation import Federation, build_parties

RECORD = "unlearn.json"
RUN_FILES = ("metrics.jsonl", "rounds.jsonl")  # the logs a resumed checkpoint trims to itself


def unlearn(run_dir: Path, client: str, out: Path | None = None, full_retrain: bool = False) -> dict[str, Any]:
    """Take client ``client``'s data out of the finished run in ``run_dir`` into the new run ``out`` (default:
    ``RUN_DIR-unlearn-ID``); returns (and writes to ``out/unlearn.json``) what was done and how long it took."""
    started, cpu = time.perf_counter(), time.process_time()
    config = load_run_config(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise CheckpointError(
            f"{run_dir} has no summary.json: the run did not finish; finish it (splitlm train ... --resume) first"
        )
    fw = config.framework
    ids = [str(i) for i in range(fw.num_clients)]
    if client not in ids:
        raise ConfigError(f"--client {client}: the run in {run_dir} has clients {ids[0]}..{ids[-1]}; pick one of those")
    if fw.num_clients == 1:
        raise ConfigError(
            f"--client {client}: the run in {run_dir} has one client; without it nothing is trained: delete the run"
        )
    if all(client in (fw.leave_out or {}).get(r, []) for r in range(1, fw.rounds + 1)):
        raise ConfigError(f"--client {client}: the run in {run_dir} left it out of every round already; nothing to do")
    out = out if out is not None else run_dir.with_name(f"{run_dir.name}-unlearn-{client}")
    if out.resolve() == run_dir.resolve() or (out.exists() and any(out.iterdir())):
        raise CheckpointError(f"--out {out}: exists and is not empty; the unlearned run goes to a new folder")
    reference = forgetting(config, client, out)
    if full_retrain:
        record: dict[str, Any] = {"mode": "full_retrain", "retrained": "all"}
        summary = run_framework(reference, started=started)
    elif isinstance(strategy_of(config), SplitWiper):
        record, summary = _isolated(run_dir, config, reference, client, out, started)
    else:
        record, summary = _exact(run_dir, config, reference, client, out, started)
    record = {
        "client": client, "run": str(run_dir), "output_dir": str(out), **record,
        "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
        "train_seconds": summary["train_seconds"],
        "eval_loss_after": summary["eval_loss_after"], "accuracy_after": summary["accuracy_after"],
    }  # fmt: skip
    write_json(out / RECORD, record)
    return record


def forgetting(config: Config, client: str, out: Path) -> Config:
    """``config`` with ``client`` left out of every round, writing to ``out``: what the unlearned run computes."""
    fw = config.framework
    leave_out = {r: sorted({*(fw.leave_out or {}).get(r, []), client}) for r in range(1, fw.rounds + 1)}
    return config.model_copy(
        update={"output_dir": str(out), "framework": fw.model_copy(update={"leave_out": leave_out})}, deep=True
    )


def first_round(run_dir: Path, client: str) -> int | None:
    """The round (from 1) in which ``client`` first took part, as ``rounds.jsonl`` says; None: it never did."""
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no rounds.jsonl: it is not a finished run's output_dir")
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if client in (record.get("participants") or []):
            return int(record["round"])
    return None


def _progress(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def _exact(
    run_dir: Path, config: Config, reference: Config, client: str, out: Path, started: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume the last checkpoint before ``client`` joined with it left out of every round."""
    joined = first_round(run_dir, client)
    if joined is None:
        raise ConfigError(f"--client {client}: it took part in no round of the run in {run_dir}; nothing to unlearn")
    before = [(p.get("round", -1), p.get("steps", -1), f) for f in checkpoints(run_dir) if (p := _progress(f))]
    before = [item for item in before if 0 <= item[0] <= joined - 1]
    if not before:
        raise CheckpointError(
            f"{run_dir} keeps no checkpoint from before round {joined}, when client {client} first took part (a run "
            f"keeps its last two); retrain without it: splitlm unlearn {run_dir} --client {client} --full-retrain"
        )
    rounds_done, _, folder = max(before, key=lambda item: (item[0], item[1]))
    prepare_output(reference, resume=False)  # the new folder, with the reference config.yaml
    shutil.copytree(folder, out / CHECKPOINTS / folder.name)
    for name in RUN_FILES:  # trimmed back to the checkpoint as the run resumes
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    summary = drive(build_parties(reference), out, True, started)
    record = {"mode": "exact", "joined_round": joined, "from_checkpoint": folder.name, "rounds_retrained": (
        config.framework.rounds - int(rounds_done))}  # fmt: skip
    return record, summary


def _isolated(
    run_dir: Path, config: Config, reference: Config, client: str, out: Path, started: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``client``'s shard again without it (the other shards as the run left them), or drop the shard."""
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint: the run's shards are gone; use --full-retrain")
    last = found[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    groups: list[list[int]] = summary.get("groups") or []
    shard = next((g for g, group in enumerate(groups) if int(client) in group), None)
    if shard is None:
        raise CheckpointError(f"{run_dir}/summary.json names no shard of client {client}; use --full-retrain")
    kept = {g: state for g, state in load_shards(last).items() if g != shard}
    fw = reference.framework
    left = {r: set(fw.leave_out.get(r, [])) if fw.leave_out else set() for r in range(1, fw.rounds + 1)}
    retrained = [str(i) for i in groups[shard] if any(str(i) not in left[r] for r in left)]
    others = [str(i) for g, group in enumerate(groups) if g != shard for i in group]
    # Only the shard is trained: the other shards' clients sit out every round (their shards come from the run).
    training = reference.model_copy(
        update={"framework": fw.model_copy(update={"leave_out": {r: sorted(left[r] | set(others)) for r in left}})},
        deep=True,
    )
    if not retrained and not kept:
        raise ConfigError(f"--client {client}: no client of the run is left to train a model; delete the run")
    prepare_output(reference, resume=False)  # the new folder, with the reference config.yaml
    fed = build_parties(training)
    strategy = fed.strategy
    strategy.groups = [list(g) for g in fed.groups]
    for g, state in kept.items():  # the kept shards: client side and trunk adapter as the run ended
        strategy.shards[g] = state
        adapter = fed.server.adapter_of(str(groups[g][0]))
        fed.server.load_adapter_state(adapter, load_file(str(last / "server" / f"trunk-{adapter}.safetensors")))
    summary = drive(fed, out, False, started) if retrained else _finish(fed, out, started)
    record = {
        "mode": "isolated", "shard": shard, "retrained": retrained, "kept_shards": sorted(kept),
        "from_checkpoint": last.name,
    }  # fmt: skip
    return record, summary


def _finish(fed: Federation, out: Path, started: float) -> dict[str, Any]:
    """The run's end without training (a dropped shard): evaluate the kept shards' ensemble, write its adapters, a
    checkpoint (so a later request can unlearn another client) and ``summary.json``."""
    config = fed.config
    progress: dict[str, Any] = {
        "round": config.framework.rounds, "train_seconds": 0.0, "wall_seconds": 0.0, "bytes_up": 0, "bytes_down": 0,
        "eval_bytes_up": 0, "eval_bytes_down": 0, "eval_loss_before": None, "accuracy_before": None,
    }  # fmt: skip
    holder = fed.strategy.global_member(fed)
    fed.server.start()
    try:
        evaluate_round(fed, [holder], config.framework.rounds - 1, progress)
        adapters = out / "adapters"
        adapters.mkdir(exist_ok=True)
        holder.client.save(adapters, with_optimizer=False)
        write_json(adapters / "client.json", {"client": holder.index})
        fed.server.export_adapter(fed.server.adapter_of(holder.client_id), adapters / "trunk.safetensors")
    finally:
        fed.server.stop()
    progress["wall_seconds"] = time.perf_counter() - started
    save_checkpoint(out, fed, 0, progress)
    summary = summarize(fed, progress)
    write_json(out / "summary.json", summary)
    return summary
