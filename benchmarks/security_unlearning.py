"""Split unlearning (issue 23; survey §5.24): SplitWiper's isolation and ``splitlm unlearn`` on the default model.

    python benchmarks/security_unlearning.py [--quick] [--out runs/bench-security] [--seed 0]

Eight clients hold rows of the synthetic PII corpus (``data.name=pii``, plain text: e-mails, tickets and bank notes,
each with its own name, e-mail address, phone number...; ``data.format=lm``, so the loss is on every token of a row,
one row per example), 128 rows each. The default model (SmolLM2-135M-Instruct, U-shaped 2/2 cut, LoRA r=8 on q_proj
and v_proj) trains with gsfl and ``framework.aggregation=splitwiper``: one shard per client (``framework.groups``),
every shard its own trunk adapter and client side, heads frozen after the first of two rounds. Each client takes 80
steps of 8 rows over its 128 rows (every row seen 5 times), so its shard remembers them: the unique names and
addresses are what a model memorises and a held-out row does not share. Then client 0 asks to be forgotten:
``splitlm unlearn`` drops its shard from the ensemble (it was alone in it: nothing is trained) and keeps the others.
(With shards of several clients, unlearning trains the client's shard again without it; the tests cover both.)

- ``mia_auc_before`` / ``mia_auc_after``: the likelihood-ratio membership attack (``privacy/attacks/membership.py``,
  ``loss``, threat model ``inside``: a shard's head, trunk adapter and tail, with the pretrained model as the
  reference; a row's score is its mean loss over all its tokens) on client 0's training rows against held-out rows
  B, on the run's ``adapters/`` model: before, shard 0 (the shard that held the rows: the strongest place to look);
  after, the unlearned run's first shard (shard 0 is gone).
- ``mia_auc_nonmembers``: the same attack on held-out rows A against B under the unlearned model: what chance looks
  like with these sample sizes. The target is ``|after - nonmembers| <= 0.05``.
- ``retained_metric``: the PII corpus has no answer to classify, so this is the held-out perplexity (lower is
  better) of the unlearned run's global model (the shards' ensemble: exp of the mean of the shards' per-token
  losses) on ``eval_rows`` held-out rows; ``retained_metric_before``: the trained run's (``retained_metric_kind``
  says so in the JSON).
- ``seconds``: wall time of the unlearning request (loading the model included; its in-run evaluation is one batch);
  ``retrain_seconds``: the same for ``--full-retrain`` (every other client's shard trained again), the cost without
  isolation's shortcut. The target is ``seconds < retrain_seconds / 4``. Wall time on a shared machine depends on
  what else runs: ``cpu_seconds`` / ``retrain_cpu_seconds`` give the CPU time of each (every thread's), which the
  other processes do not inflate (null for a run kept from before they were recorded).

Noise: one seed (``--seed``); each AUC comes with a 95 % bootstrap interval (``*_ci``) and the sample sizes
(``members``, ``nonmembers``); ``after_minus_nonmembers_ci`` bootstraps the difference the target is about (the three
row sets resampled together). ``score_drop_auc``: paired by row, the AUC of how much unlearning lowered the
forgotten rows' scores against how much it lowered the non-members' (a row's own ease cancels out; above 0.5: the
forgotten rows lost what the model had of them). ``exceeds_noise``: whether before's interval lies above the
non-members' AUC, and whether after's difference from the non-members' is outside its interval's noise. The
unlearned model provably never saw the forgotten rows (``tests/frameworks/test_frameworks_unlearn.py``: it equals a
run without the client tensor for tensor), so an ``after`` away from ``nonmembers`` is noise or something the client's
few rows share (the same rows score alike under any model), not a leak. The target's 0.05 is about the noise of the
sample sizes: with 16 forgotten rows (the first version of this benchmark) an AUC's interval was about ±0.15 and the
point estimate missed the target by chance; with 96 forgotten rows and 192 non-members per set the difference's
interval is about ±0.065, and ``exceeds_noise`` says whether a miss is more than the noise.

``--quick`` (about 20 minutes on 2 cores shared with one other benchmark, 11 of them training): four clients (four
shards) instead of eight, each with 96 rows seen 5 times (60 steps), 192 held-out rows per non-member set instead of
256, perplexity on 32 held-out rows instead of 96, and no full retrain: its time is estimated as the trained run's
wall (and CPU) time x 3/4 (the same work less one client's share, model loading included; ``retrain_estimated``:
true).
Runs are kept under ``--out`` (default ``runs/bench-security``) and reused when the same settings run again.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORGET = "0"  # who asks to be forgotten: alone in shard 0, the shard the run's adapters/ holds


def settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"clients": 4, "rows": 96, "steps": 60, "nonmembers": 192, "eval_rows": 32}
    return {"clients": 8, "rows": 128, "steps": 80, "nonmembers": 256, "eval_rows": 96}


def overrides(quick: bool, seed: int, out: Path, model: str = "smollm2-135m-instruct") -> list[str]:
    s = settings(quick)
    clients = s["clients"]
    groups = "[" + ",".join(f"[{i}]" for i in range(clients)) + "]"  # one shard per client
    held = 2 * s["nonmembers"] + 8  # non-member sets A and B, and the in-run evaluation's batch
    held = max(held, s["eval_rows"])
    return [
        f"model.name={model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        "train.batch_size=8", "train.seq_len=64", "train.lr=0.004", "train.warmup_steps=0", "train.progress=false",
        "train.eval_batches=1", "train.eval_each_round=false", "train.eval_before=false",
        "data.name=pii", "data.format=lm", "data.pack=false", f"data.eval_size={held}",
        f"data.max_rows={held + clients * s['rows']}",
        "framework.name=gsfl", f"framework.num_clients={clients}", f"framework.groups={groups}", "framework.rounds=2",
        f"framework.local_steps={s['steps'] // 2}", f"train.steps={s['steps']}",
        "framework.aggregation={splitwiper: {warmup_rounds: 1}}", f"seed={seed}", f"output_dir={out}",
    ]  # fmt: skip


def train(config: Any) -> dict[str, float]:
    """Train ``config`` unless its run is there already; its wall (``seconds``) and CPU (``cpu_seconds``) time."""
    from splitlm.frameworks.driver import run_framework

    out = Path(config.output_dir)
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        started, cpu = time.perf_counter(), time.process_time()
        run_framework(config, started=started)
        took = {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
        (out / "bench_seconds.json").write_text(json.dumps(took))
    return json.loads((out / "bench_seconds.json").read_text())


def unlearned(run: Path, out: Path, full_retrain: bool) -> dict[str, Any]:
    from splitlm.frameworks.unlearn import unlearn

    if not (out / "unlearn.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        unlearn(run, FORGET, out, full_retrain=full_retrain)
    return json.loads((out / "unlearn.json").read_text())


def ensemble_perplexity(run: Path, rows: int) -> float:
    """Held-out perplexity of ``run``'s global model (the trained shards' ensemble, from its last checkpoint: exp of
    the mean of the shards' per-token losses) on its first ``rows`` held-out rows."""
    from splitlm.frameworks.assemble import load_run_config
    from splitlm.frameworks.checkpoint import checkpoints
    from splitlm.frameworks.federation import build_parties

    config = load_run_config(run)
    config = config.model_copy(update={"train": config.train.model_copy(update={"eval_batches": rows // 8})})
    fed = build_parties(config)
    fed.load(checkpoints(run)[-1])
    holder = fed.strategy.global_member(fed)
    fed.server.start()
    try:
        loss = holder.evaluate(fed).loss
    finally:
        fed.server.stop()
    return round(math.exp(loss), 3)


def auc(members: list[float], others: list[float]) -> dict[str, Any]:
    from splitlm.privacy.attacks.membership import auc_interval, mia_metrics

    metrics = mia_metrics(members, others)
    low, high = auc_interval(members, others)
    return {"auc": round(metrics["auc"], 4), "ci": [round(low, 4), round(high, 4)],
            "tpr_at_1pct_fpr": round(metrics["tpr_at_1pct_fpr"], 4)}  # fmt: skip


def _rounded(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


def difference_interval(
    members: list[float], set_a: list[float], set_b: list[float], rounds: int = 1000, seed: int = 0
) -> list[float]:
    """95 % bootstrap interval of AUC(members vs B) - AUC(A vs B), the three sets resampled together."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    m, a, b = (np.asarray(x, float) for x in (members, set_a, set_b))
    diffs = []
    for _ in range(rounds):
        rm, ra, rb = (x[rng.integers(0, len(x), len(x))] for x in (m, a, b))
        first = roc_auc_score(np.r_[np.ones(len(rm)), np.zeros(len(rb))], np.r_[rm, rb])
        second = roc_auc_score(np.r_[np.ones(len(ra)), np.zeros(len(rb))], np.r_[ra, rb])
        diffs.append(first - second)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def run(quick: bool, out: Path, seed: int = 0, model: str = "smollm2-135m-instruct") -> dict[str, Any]:
    from splitlm.config import build_config
    from splitlm.frameworks.assemble import load_run_config
    from splitlm.frameworks.rows import client_examples, held_out_examples
    from splitlm.privacy.attacks.base import AttackContext
    from splitlm.privacy.attacks.membership import membership_scores

    s = settings(quick)
    root = out / "unlearning" / f"{model}-{'quick' if quick else 'full'}-seed{seed}"
    trained = root / "trained"
    config = build_config({}, overrides(quick, seed, trained, model))
    took = train(config)
    train_seconds, train_cpu = float(took["seconds"]), took.get("cpu_seconds")
    record = unlearned(trained, root / f"unlearned-{FORGET}", full_retrain=False)
    if quick:
        share = (s["clients"] - 1) / s["clients"]
        retrain_seconds, estimated = train_seconds * share, True
        retrain_cpu = None if train_cpu is None else train_cpu * share
    else:
        retrained = unlearned(trained, root / f"retrained-{FORGET}", full_retrain=True)
        retrain_seconds, estimated = float(retrained["seconds"]), False
        retrain_cpu = retrained.get("cpu_seconds")

    config = load_run_config(trained)
    members = client_examples(config, int(FORGET))
    held = held_out_examples(config)[8:]  # past the in-run evaluation's batch
    set_a, set_b = held[0 : 2 * s["nonmembers"] : 2], held[1 : 2 * s["nonmembers"] : 2]

    def scores(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
        ctx = AttackContext.from_run(run_dir, threat_model="inside")  # one attacker, every row scored by it
        return tuple(membership_scores(None, rows, "loss", ctx=ctx) for rows in (members, set_a, set_b))  # type: ignore[return-value]

    before_m, before_a, before_b = scores(trained)
    after_m, after_a, after_b = scores(root / f"unlearned-{FORGET}")
    before, after, chance = auc(before_m, before_b), auc(after_m, after_b), auc(after_a, after_b)
    gap = difference_interval(after_m, after_a, after_b)
    # paired by row: how much unlearning lowered each forgotten row's score, against the same for non-members (a
    # row's own ease or difficulty cancels out; 0.5: the forgotten rows lost nothing the others did not)
    drop = auc([b - a for b, a in zip(before_m, after_m, strict=True)],
               [b - a for b, a in zip(before_b + before_a, after_b + after_a, strict=True)])  # fmt: skip
    retained = ensemble_perplexity(root / f"unlearned-{FORGET}", s["eval_rows"])
    retained_before = ensemble_perplexity(trained, s["eval_rows"])
    seconds = float(record["seconds"])
    result = {
        "mia_auc_before": before["auc"], "mia_auc_after": after["auc"], "mia_auc_nonmembers": chance["auc"],
        "retained_metric": retained, "seconds": round(seconds, 1), "retrain_seconds": round(retrain_seconds, 1),
        "mia_auc_before_ci": before["ci"], "mia_auc_after_ci": after["ci"], "mia_auc_nonmembers_ci": chance["ci"],
        "tpr_at_1pct_fpr_before": before["tpr_at_1pct_fpr"], "tpr_at_1pct_fpr_after": after["tpr_at_1pct_fpr"],
        "retained_metric_before": retained_before, "retained_metric_rows": s["eval_rows"],
        "retained_metric_kind": "held-out perplexity of the shards' ensemble (lower is better)",
        "cpu_seconds": _rounded(record.get("cpu_seconds")), "retrain_cpu_seconds": _rounded(retrain_cpu),
        "retrain_estimated": estimated, "trained_seconds": round(train_seconds, 1),
        "speedup": round(retrain_seconds / seconds, 2) if seconds else None,
        "targets": {
            "after_within_0.05_of_nonmembers": abs(after["auc"] - chance["auc"]) <= 0.05,
            "under_a_quarter_of_a_retrain": seconds < retrain_seconds / 4,
        },
        "score_drop_auc": drop["auc"], "score_drop_auc_ci": drop["ci"],
        "after_minus_nonmembers": round(after["auc"] - chance["auc"], 4), "after_minus_nonmembers_ci": gap,
        "exceeds_noise": {
            "before_above_nonmembers": before["ci"][0] > chance["auc"],
            "after_differs_from_nonmembers": gap[0] > 0 or gap[1] < 0,
        },
        "attack": "loss (likelihood ratio against the pretrained model, mean over a row's tokens), threat model "
                  "inside, on adapters/ (before: shard 0, the forgotten client's; after: the first shard kept)",
        "members": len(members), "nonmembers": len(set_b), "seed": seed, "clients": s["clients"],
        "shards": s["clients"], "data": "pii",
        "forgotten_client": FORGET, "unlearn_mode": record["mode"], "retrained_clients": record.get("retrained"),
    }  # fmt: skip
    return {"unlearning": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four clients, the full retrain estimated")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-security"), help="where the runs are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="e.g. tiny-llama for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(run(args.quick, Path(args.out), args.seed, args.model)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
