"""Training hijacking by a malicious server against the client's detectors: the ``hijack`` rows of
``benchmarks/security.py``.

    python benchmarks/security_hijack.py [--quick] [--out runs/bench-security] [--model smollm2-135m-instruct]

One client (FSHA and SplitSpy are simulated for one in-process client) fine-tunes the default model (U-shaped 2/2
cut, LoRA r=8 on q_proj and v_proj) on Rotten Tomatoes reviews as plain text (``data.format=lm``: the loss on every
token, so every token's gradient answers to a label; the reviews are what FSHA would read back) with sequential split
learning,
against a server that is honest (``none``), runs FSHA (``privacy.server_attack: fsha``: forged gradients that pull the
client's head towards the attacker's invertible feature space) or SplitSpy (``splitspy``: FSHA with a shadow of the
public model that spots SplitGuard's random-label probe rows and answers them with the honest gradient). The client
runs the three detectors at once, each only recording its alarm (``stop: false``), so one run gives each detector's
verdict on the same training:

- ``splitguard``: active: every 4th step is a probe with random labels (it does not train the client);
- ``gradients_scrutinizer``: passive: same-label against different-label similarity of the returned token gradients;
- ``splitout``: passive: LOF on the returned token gradients, fitted on honest ones the client computes with the
  public pretrained trunk for the first steps.

Row ``{attack, detector, mode, runs, detected_runs, detected, alarm_steps, first_alarm_step, false_alarm_runs,
false_alarm_rate_95_upper}``: ``alarm_steps`` per run (seed order, null: no alarm; steps count from 1 as
``metrics.jsonl`` does); ``detected`` is true when every attacked run alarmed. On the honest rows (``attack: none``)
every alarm is a false one: ``false_alarm_runs`` counts them and ``false_alarm_rate_95_upper`` is the one-sided 95 %
Clopper-Pearson upper bound of the false-alarm rate over those runs (0 of 3 runs still allows up to 63 %: a handful of
honest runs can show a detector is not wildly trigger-happy, not that it is quiet). Rows with ``attack: splitspy``
also give ``probe_rows_flagged``: the share of SplitGuard's probe rows SplitSpy's shadow took for probes, and
``real_rows_flagged``: the share of the real rows it took for probes (ground truth from SplitGuard's schedule).

Each run's summary is cached under ``OUT/hijack/<settings hash>/`` (a rerun only runs what is missing).

Noise: detection is a yes/no per run; ``runs`` says how many seeds each row rests on (the seed draws the data order,
the LoRA initialisation, SplitGuard's fake labels and the attacker's networks).

``--quick`` (4 runs of 16 steps; about 8 minutes alone on 2 idle cores, far longer on a busy machine): U-shape only,
honest seeds 0 and 1, each attack seed 0 (SplitGuard, probing every 4th step, can alarm from step 12 on). It leaves out
the vanilla split, the third honest seed and the second attacked one. The full mode (9 runs of 24 steps, about 25
minutes): honest seeds 0-2 and each attack seeds 0-1 in U-shape, and the honest server and SplitSpy (seed 0) in a
vanilla split (the server takes the loss and sees the labels).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("none", "fsha", "splitspy")
DETECTORS = ("splitguard", "gradients_scrutinizer", "splitout")
PROBE_EVERY = 4


def settings_of(quick: bool, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "steps": 16 if quick else 24,
        "batch_size": 4,
        "seq_len": 64,
        "lr": 1e-3,
        "runs": {  # (mode, attack) -> seeds
            "ushape": {"none": [0, 1] if quick else [0, 1, 2], "fsha": [0] if quick else [0, 1],
                       "splitspy": [0] if quick else [0, 1]},
            **({} if quick else {"vanilla": {"none": [0], "splitspy": [0]}}),
        },
        "probe_every": PROBE_EVERY,
    }  # fmt: skip


def overrides(s: dict[str, Any], mode: str, attack: str, seed: int) -> list[str]:
    base = [
        f"model.name={s['model']}", f"split.mode={mode}", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        "data.name=rotten_tomatoes", "data.format=lm", "data.pack=false",
        f"data.max_rows={s['steps'] * s['batch_size'] + 64}", "data.eval_size=16",
        f"train.batch_size={s['batch_size']}", f"train.seq_len={s['seq_len']}", f"train.lr={s['lr']}",
        "train.warmup_steps=2", f"train.steps={s['steps']}", "train.progress=false", "train.eval_batches=1",
        "train.eval_before=false", "train.eval_each_round=false", "framework.name=sl", "framework.num_clients=1",
        "transport.name=inprocess", f"seed={seed}",
        f"privacy.detectors.splitguard.probe_every={s['probe_every']}", "privacy.detectors.splitguard.stop=false",
        "privacy.detectors.gradients_scrutinizer.stop=false", "privacy.detectors.splitout.stop=false",
    ]  # fmt: skip
    return base + ([] if attack == "none" else [f"privacy.server_attack={attack}"])


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clopper_pearson_upper(failures: int, runs: int, confidence: float = 0.95) -> float | None:
    """One-sided upper bound of a rate seen ``failures`` times in ``runs``."""
    if runs == 0:
        return None
    if failures >= runs:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, failures + 1, runs - failures))


def one_run(s: dict[str, Any], cache: Path, mode: str, attack: str, seed: int) -> dict[str, Any]:
    """The ``privacy`` part of one run's summary (cached)."""
    path = cache / f"{mode}-{attack}-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework

    run_dir = cache / "runs" / f"{mode}-{attack}-{seed}"
    if run_dir.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(run_dir)
    config = build_config({}, [*overrides(s, mode, attack, seed), f"output_dir={run_dir}"])
    began = time.perf_counter()
    summary = run_framework(config)
    privacy = summary["privacy"]
    record = {"detectors": privacy["detectors"], "server_attacks": privacy.get("server_attacks", {}),
              "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
    path.write_text(json.dumps(record))
    gc.collect()
    return record


def spy_rates(s: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The share of SplitGuard's probe rows SplitSpy took for probes, and of the real rows (SplitGuard's schedule:
    every probe_every-th step, 0-based step probe_every - 1 first, is a probe; its rows all have random labels)."""
    counts = {True: [0, 0], False: [0, 0]}  # probe step? -> [flagged, judged]
    for record in records:
        for step, (flagged, judged) in record["server_attacks"].get("splitspy", {}).get("flagged_by_step", {}).items():
            probe = (int(step) - 1) % s["probe_every"] == s["probe_every"] - 1
            counts[probe][0] += flagged
            counts[probe][1] += judged
    return {
        "probe_rows_flagged": counts[True][0] / counts[True][1] if counts[True][1] else None,
        "real_rows_flagged": counts[False][0] / counts[False][1] if counts[False][1] else None,
        "rows_judged": counts[True][1] + counts[False][1],
    }


def run(quick: bool, out: Path, model: str = "smollm2-135m-instruct") -> dict[str, Any]:
    """The ``hijack`` rows (and the settings and noise they were measured with)."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    started = time.perf_counter()
    s = settings_of(quick, model)
    cache = out / "hijack" / key_of(overrides(s, "ushape", "none", 0), s["runs"])
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for mode, attacks in s["runs"].items():
        for attack in [a for a in ATTACKS if a in attacks]:
            seeds = attacks[attack]
            records = [one_run(s, cache, mode, attack, seed) for seed in seeds]
            for seed, record in zip(seeds, records, strict=True):
                seconds[f"{mode}-{attack}-{seed}"] = record["seconds"]
            for detector in DETECTORS:
                steps = [r["detectors"].get(detector, {}).get("alarm_step") for r in records]
                alarmed = sum(step is not None for step in steps)
                row: dict[str, Any] = {
                    "attack": attack, "detector": detector, "mode": mode, "seeds": seeds, "runs": len(seeds),
                    "alarm_steps": steps,
                    "first_alarm_step": min((x for x in steps if x is not None), default=None),
                }  # fmt: skip
                if attack == "none":
                    row.update(detected=None, detected_runs=None, false_alarm_runs=alarmed,
                               false_alarm_rate_95_upper=clopper_pearson_upper(alarmed, len(seeds)))  # fmt: skip
                else:
                    row.update(detected=alarmed == len(seeds), detected_runs=alarmed, false_alarm_runs=None,
                               false_alarm_rate_95_upper=None)  # fmt: skip
                if attack == "splitspy":
                    row.update(spy_rates(s, records))
                rows.append(row)
    noise = {
        "runs_per_row": {mode: {a: len(seeds) for a, seeds in attacks.items()} for mode, attacks in s["runs"].items()},
        "note": "detection is yes/no per run; false_alarm_rate_95_upper bounds each detector's false-alarm rate over "
        "the honest runs (one-sided Clopper-Pearson): few runs bound it loosely",
    }
    return {
        "hijack": rows,
        "hijack_settings": {**s, "noise": noise, "run_seconds": seconds,
                            "seconds": round(time.perf_counter() - started, 1)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-security"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    print(json.dumps(run(args.quick, Path(args.out), args.model)))


if __name__ == "__main__":
    main()
