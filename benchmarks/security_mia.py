"""Inference attacks of an honest-but-curious server: membership (survey §5.1.4) and property inference (§5.1.5).

    python benchmarks/security_mia.py [--quick] [--out runs/bench-security] [--model smollm2-135m-instruct]

The default model, U-shaped (head 2, tail 2), LoRA r=8 on q_proj and v_proj of every part, Rotten Tomatoes reviews
(plain language modelling: the review text only), sflv2 with 4 clients whose label mixes differ
(``data.partition=label_mix``, alpha 1). Each client holds ``--rows`` reviews and sees them ``--epochs`` times (one
epoch a round, FedAvg of the client sides between rounds): a small member set trained on for several epochs, as
fine-tuning on a small private set does. The server tap keeps the last round (every client's last epoch).

Two runs: no defense, and the best defense of the privacy table (``docs/privacy.json``, ``BEST_DEFENSE``):
``adversarial`` at weight 1, the Pareto point with the lowest worst-case ROUGE-L under the public threat model
(0.40 at +130 % perplexity; dxp 40 leaks more, 0.67, at +582 %) with its head fully fine-tuned as there.

- ``mia``: per attack (``loss``: likelihood ratio of the server's trained trunk against the pretrained one behind
  the public head and tail; ``ktmia``: the same through pseudo-clients aligned on public text; ``observed``: the
  best match of the candidate's smashed data among those the tap kept), undefended and defended: AUC and TPR at
  1 % FPR on members (every client's training rows) against non-members (the run's held-out rows, the same corpus,
  disjoint), the AUC's 95 % bootstrap interval, the attacker's own threshold calibrated on public rows (TPR/FPR
  there), and whether the defense's change of AUC exceeds the noise (a paired bootstrap over the rows).
- ``property``: each client's share of "rotten" reviews, estimated from its tapped smashed data by a classifier
  trained on public labelled reviews through the public head (with the defense simulated); mean absolute error
  per estimator (``prob``, ``cc``, ``acc``) against the truth, and ``prior``: the error of guessing the public share.

``--quick`` keeps 16 rows per client (64 members, 64 non-members), aligns ktmia's pseudo-clients for 30 steps and
runs ktmia on the undefended run only (its defended cell is null); the full run takes 32 rows per client (128
members, 128 non-members), 60 ktmia steps and every attack on both runs. Measured on 2 cores shared with four other
jobs (load 9-10), --quick took about 75 minutes (the runs' 64 training steps 7 and 13 minutes, the loss attack 8-10
per run, ktmia 25 with its two 30-step alignments, observed and property a few); on 2 free cores expect a quarter.
Both run one seed: the intervals are over rows, not seeds. Runs and scores are kept under ``--out``
(``mia-[quick-]<defense>/``), so a rerun only trains and attacks again what is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CLIENTS = 4
ATTACKS = ("loss", "ktmia", "observed")
BEST_DEFENSE = ("adversarial", ["privacy.defenses=[adversarial]", "privacy.defenses.adversarial.weight=1.0",
                                "lora.head.method=full"])  # fmt: skip
DEFENSES: dict[str, list[str]] = {"none": [], BEST_DEFENSE[0]: BEST_DEFENSE[1]}


def settings(quick: bool) -> dict[str, int]:
    return {"rows": 16 if quick else 32, "epochs": 8, "batch": 8, "ktmia_steps": 30 if quick else 60}


def overrides(model: str, s: dict[str, int], defense: str, out: Path) -> list[str]:
    members = s["rows"] * CLIENTS
    steps = s["rows"] // s["batch"]  # one epoch a round
    return [
        f"model.name={model}", "data.name=rotten_tomatoes", f"data.max_rows={2 * members}", f"data.eval_size={members}",
        "data.partition=label_mix", "data.alpha=1.0", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "framework.name=sflv2", f"framework.num_clients={CLIENTS}",
        f"framework.rounds={s['epochs']}", f"framework.local_steps={steps}", f"train.steps={s['epochs'] * steps}",
        f"train.batch_size={s['batch']}", "train.seq_len=64", "train.lr=0.002", "train.warmup_steps=2",
        "train.eval_before=false", "train.eval_each_round=false", "train.eval_batches=4", "train.progress=false",
        "privacy.tap.enabled=true", f"privacy.tap.max_batches={CLIENTS * steps}", *DEFENSES[defense],
        f"output_dir={out}",
    ]  # fmt: skip


def train(model: str, s: dict[str, int], defense: str, out: Path) -> Path:
    """The run of ``defense``, trained once: a run directory with a summary is reused."""
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework

    run_dir = out / f"mia-{'quick-' if s['rows'] == 16 else ''}{defense}"
    config = build_config({}, overrides(model, s, defense, run_dir))
    identity = config.model_dump(mode="json")
    saved = run_dir / "bench.json"
    if (run_dir / "summary.json").is_file() and saved.is_file() and json.loads(saved.read_text()) == identity:
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # another model or an interrupted run: train afresh
    run_framework(config)
    saved.write_text(json.dumps(identity))
    return run_dir


def bootstrap_diff(
    a: tuple[list[float], list[float]], b: tuple[list[float], list[float]], rounds: int = 1000
) -> list[float]:
    """95 % interval of AUC(b) - AUC(a) over the same rows resampled together (both score the same rows)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    ma, na, mb, nb = (np.asarray(x, float) for x in (*a, *b))
    truth = np.r_[np.ones(len(ma)), np.zeros(len(na))]
    diffs = []
    for _ in range(rounds):
        i, j = rng.integers(0, len(ma), len(ma)), rng.integers(0, len(na), len(na))
        diffs.append(roc_auc_score(truth, np.r_[mb[i], nb[j]]) - roc_auc_score(truth, np.r_[ma[i], na[j]]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return [float(low), float(high)]


def attacks_of(defense: str, quick: bool) -> tuple[str, ...]:
    """--quick runs ktmia, the slowest attack, on the undefended run only."""
    return tuple(a for a in ATTACKS if not (quick and a == "ktmia" and defense != "none"))


def attack_run(run_dir: Path, s: dict[str, int], attacks: tuple[str, ...]) -> dict[str, Any]:
    """Every membership attack's scores on members and non-members (cached in ``bench-scores.json``) and the
    property inference of the run."""
    from splitlm.config import load_config
    from splitlm.frameworks.rows import client_examples, held_out_examples
    from splitlm.privacy.attacks import AttackContext
    from splitlm.privacy.attacks.membership import calibrate, membership_scores
    from splitlm.privacy.attacks.property import run_property

    cache = run_dir / "bench-scores.json"
    done: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    config = load_config(run_dir / "config.yaml")
    members = [e for i in range(CLIENTS) for e in client_examples(config, i)]
    nonmembers = held_out_examples(config)
    ctx = AttackContext.from_run(run_dir)
    options = {"ktmia": {"steps": str(s["ktmia_steps"]), "aux_rows": "200", "calib_rows": "100"}}
    for attack in attacks:
        if attack in done:
            continue
        started = time.perf_counter()
        opts = options.get(attack, {"calib_rows": "100"})
        inside = membership_scores(None, members, attack, opts, ctx=ctx)
        outside = membership_scores(None, nonmembers, attack, opts, ctx=ctx)
        threshold = calibrate(ctx, attack, opts)["threshold"]
        done[attack] = {"members": inside, "nonmembers": outside, "threshold": threshold,
                        "seconds": time.perf_counter() - started}  # fmt: skip
        cache.write_text(json.dumps(done))
    if "property" not in done:
        started = time.perf_counter()
        result = run_property(run_dir, {"value": "rotten", "aux_rows": "400"}, progress=False)
        done["property"] = {**result, "seconds": time.perf_counter() - started}
        cache.write_text(json.dumps(done))
    return done


def run(quick: bool, out: Path, model: str = MODEL) -> dict[str, Any]:
    """``{"mia": ..., "property": ...}`` (see the module's docstring)."""
    warnings.filterwarnings("ignore")
    import transformers

    from splitlm.privacy.attacks.membership import auc_interval, mia_metrics

    transformers.utils.logging.set_verbosity_error()
    started = time.perf_counter()
    s = settings(quick)
    out.mkdir(parents=True, exist_ok=True)
    scored: dict[str, dict[str, Any]] = {}
    summaries: dict[str, Any] = {}
    for defense in DEFENSES:
        run_dir = train(model, s, defense, out)
        scored[defense] = attack_run(run_dir, s, attacks_of(defense, quick))
        summary = json.loads((run_dir / "summary.json").read_text())
        summaries[defense] = {k: summary.get(k) for k in ("eval_loss_after", "eval_ppl_after", "train_seconds")}
    mia: dict[str, Any] = {}
    for attack in ATTACKS:
        row: dict[str, Any] = {}
        for defense in DEFENSES:
            got = scored[defense].get(attack)
            if got is None:
                row[defense] = None  # --quick: not run
                continue
            inside, outside, threshold = got["members"], got["nonmembers"], got["threshold"]
            low, high = auc_interval(inside, outside)
            row[defense] = {
                **{k: round(v, 4) for k, v in mia_metrics(inside, outside).items()},
                "auc_95ci": [round(low, 4), round(high, 4)],
                "auc_above_chance": low > 0.5,
                "calibrated_tpr": round(sum(x > threshold for x in inside) / len(inside), 4),
                "calibrated_fpr": round(sum(x > threshold for x in outside) / len(outside), 4),
                "seconds": round(got["seconds"], 1),
            }
        base, best = scored["none"].get(attack), scored[BEST_DEFENSE[0]].get(attack)
        if base is not None and best is not None:
            diff = bootstrap_diff((base["members"], base["nonmembers"]), (best["members"], best["nonmembers"]))
            row["defense_auc_change_95ci"] = [round(x, 4) for x in diff]
            row["defense_change_exceeds_noise"] = diff[1] < 0 or diff[0] > 0
        mia[attack] = row
    prop: dict[str, Any] = {}
    for defense in DEFENSES:
        got = scored[defense]["property"]
        prop[defense] = {
            "error": {k: round(v, 4) for k, v in got["error"].items()},
            "truth": {c: round(v, 4) for c, v in got["truth"].items()},
            "estimate_acc": {c: round(e["acc"], 4) for c, e in got["estimates"].items()},
            "rows_per_client": {c: e["rows"] for c, e in got["estimates"].items()},
            "classifier_val_accuracy": round(got["classifier"]["val_accuracy"], 4),
        }
    n = s["rows"] * CLIENTS
    mia["settings"] = {
        "model": model, "members": n, "nonmembers": n, "clients": CLIENTS, "epochs": s["epochs"], "seeds": 1,
        "best_defense": "adversarial weight 1 (docs/privacy.json: the lowest worst-case ROUGE-L of the public front)",
        "ktmia_steps": s["ktmia_steps"], "public_calibration_rows": 100, "runs": summaries,
        "noise": "AUC intervals: 1000 bootstrap resamples of the rows; one seed, so training noise is not covered",
    }  # fmt: skip
    prop["settings"] = {
        "value": "rotten", "public_rows": 400, "clients": CLIENTS,
        "note": "error: mean |estimate - truth| over the clients; prior: guessing the public share for everyone",
    }  # fmt: skip
    mia["settings"]["seconds"] = round(time.perf_counter() - started, 1)
    return {"mia": mia, "property": prop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 rows per client, 30 ktmia steps (see the docstring)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-security"), help="where runs and scores are kept")
    parser.add_argument("--model", default=MODEL)
    args = parser.parse_args()
    print(json.dumps(run(args.quick, Path(args.out), args.model)))


if __name__ == "__main__":
    sys.exit(main())
