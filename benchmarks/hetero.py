"""Heterogeneous clients: time to accuracy under server scheduling policies and aggregation modes.

    python benchmarks/hetero.py [--model tiny-llama] [--rounds 8] [--local-steps 4] [--base-speed 4] [--repeats 3]
                                 [--keep DIR]

Eight sflv1 clients with the same number of samples (iid) and simulated devices (``framework.clients``):
speeds 1, 1, 1, 1, 2, 2, 4, 8 (a compute slowdown: each client sleeps (speed - 1) x the time its own
computation took) and emulated links from 1000 down to 10 Mbit/s (log-spaced, 5 ms one-way latency).

The speeds are relative to a base slowdown, ``--base-speed`` (default 4: the simulated devices are 4, 4, 4, 4, 8,
8, 16, 32 times slower than this machine). All eight clients and the server run in one Python process, which
gets about one core's worth of work done (the interpreter's lock; measured: CPU time / wall time 0.99). At base
speed 1 the clients' own computation is as fast as this machine and all of it competes for that one core, so
every round is bound by the simulating machine, not by the slowest device, and no policy or aggregation mode
can change that (measured: best row 0.95x of fifo+sync). With base 4 the devices' simulated time, which costs no
CPU, is what bounds a round, as it is when every client is a device of its own. The learning rate (0.002) is
low enough that held-out perplexity keeps falling over the run, so reaching the final value takes the whole
sync run rather than its first two rounds. Rows:

- ``fifo``, ``straggler_first``, ``longest_backward_first`` (``server.policy``) with ``sync`` aggregation;
- ``async`` and ``semi_async`` (``framework.aggregation``) with the fifo server; semi_async's window is a
  quarter of the fifo+sync run's mean round time.

Each row is one ``splitlm train`` process (one torch thread). ``time_to_target_s`` is the training time
(``rounds.jsonl`` ``train_seconds``) at which the held-out perplexity of the global model first reaches the final
perplexity of the fifo+sync run (time to accuracy); for fifo+sync it is that run's own training time. Every
client does the same work in every row (rounds x local steps), so the slowest client bounds the time to finish
whatever the policy; time to accuracy is what asynchronous aggregation shortens. ``server_idle_pct`` is the
server worker's idle share (``summary.json`` ``server.idle_fraction``).

Every row runs ``--repeats`` times (default 3; all rows of a repeat, then the next repeat), since timings on a
shared machine differ from run to run: each figure is the mean over repeats with a 95 % Student-t interval
(``*_ci``) and its values per repeat, and ``over_fifo_sync`` is each repeat's row over the same repeat's
fifo+sync. Prints one JSON line ``{"rows": [{"policy", "aggregation", "time_to_target_s", "over_fifo_sync",
"server_idle_pct", "final_eval_ppl", ...}], "best_over_fifo_sync", "best_over_fifo_sync_ci", ...}`` and writes
``docs/hetero.png`` (held-out perplexity over training time, one line per row, the first repeat). Target: the
best row's time_to_target_s <= 0.6 x fifo+sync's, with the interval below 0.6.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEEDS = [1, 1, 1, 1, 2, 2, 4, 8]
ROWS = [
    ("fifo", "sync"),
    ("straggler_first", "sync"),
    ("longest_backward_first", "sync"),
    ("fifo", "async"),
    ("fifo", "semi_async"),
]


def links(count: int, high: float = 1000.0, low: float = 10.0) -> list[float]:
    """``count`` bandwidths from ``high`` down to ``low`` Mbit/s, evenly spaced on a log scale."""
    ratio = (low / high) ** (1 / max(count - 1, 1))
    return [round(high * ratio**i, 1) for i in range(count)]


def base_overrides(model: str, rounds: int, local_steps: int, base_speed: float = 1.0, lr: float = 0.005) -> list[str]:
    clients = [
        {"speed": speed * base_speed, "link": {"bandwidth_mbps": mbps, "latency_ms": 5.0}}
        for speed, mbps in zip(SPEEDS, links(len(SPEEDS)), strict=True)
    ]
    return [
        f"model.name={model}", "split.mode=ushape", "split.head_layers=1", "split.tail_layers=1",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj,o_proj]",
        f"train.steps={rounds * local_steps}", "train.batch_size=4", "train.seq_len=64", f"train.lr={lr}",
        "train.warmup_steps=0", "train.progress=false", "train.eval_batches=4",
        "data.name=rotten_tomatoes", "data.max_rows=2400", "data.eval_size=64",
        "framework.name=sflv1", f"framework.num_clients={len(SPEEDS)}", f"framework.rounds={rounds}",
        f"framework.local_steps={local_steps}", f"framework.clients={json.dumps(clients)}",
        "seed=0",
    ]  # fmt: skip


def run_row(root: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    out = root / name
    config = root / "empty.yaml"  # every setting is an override
    config.write_text("{}\n")
    command = [sys.executable, "-m", "splitlm.cli.main", "train", str(config), *overrides, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"row {name} failed:\n{done.stderr[-3000:]}")
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    return {"rounds": rounds, "summary": summary}


def time_to(rounds: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation whose perplexity is at most ``target``."""
    return next((r["train_seconds"] for r in rounds if r["eval_ppl"] <= target * (1 + 1e-9)), None)


def plot(results: dict[str, dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, result in results.items():
        rounds = result["rounds"]
        times = [0.0] + [r["train_seconds"] for r in rounds]
        ppls = [result["summary"]["eval_ppl_before"]] + [r["eval_ppl"] for r in rounds]
        axes.plot(times, ppls, marker="o", label=name)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (fifo+sync final)")
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("held-out perplexity (global model)")
    axes.set_ylim(target - 1.5, target + 25)  # the approach to the target; the first evaluations are above it
    axes.set_title("sflv1, 8 clients: relative speeds 1-8, links 1000-10 Mbit/s")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def one_repeat(root: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], float, float]:
    """Every row once: (rows, results, target perplexity, semi_async window)."""
    base = base_overrides(args.model, args.rounds, args.local_steps, args.base_speed, args.lr)
    results: dict[str, dict[str, Any]] = {}
    window = None
    for policy, aggregation in ROWS:
        extra = [f"server.policy={policy}"]
        if aggregation == "async":
            extra.append("framework.aggregation.async.max_staleness=64")
        elif aggregation == "semi_async":
            extra.append(f"framework.aggregation.semi_async.round_window_s={window}")
        else:
            extra.append(f"framework.aggregation={aggregation}")
        results[f"{policy}+{aggregation}"] = run_row(root, f"{policy}-{aggregation}", [*base, *extra])
        if (policy, aggregation) == ("fifo", "sync"):
            reference = results["fifo+sync"]
            window = round(reference["summary"]["train_seconds"] / args.rounds / 4, 3)
    reference = results["fifo+sync"]
    target = reference["summary"]["eval_ppl_after"]
    rows = []
    for (policy, aggregation), result in zip(ROWS, results.values(), strict=True):
        summary = result["summary"]
        reached = summary["train_seconds"] if result is reference else time_to(result["rounds"], target)
        server = summary.get("server") or {}
        rows.append({
            "policy": policy, "aggregation": aggregation,
            "time_to_target_s": round(reached, 2) if reached is not None else None,
            "server_idle_pct": round(100 * server.get("idle_fraction", math.nan), 1),
            "final_eval_ppl": round(summary["eval_ppl_after"], 3),
            "train_s": round(summary["train_seconds"], 2),
        })  # fmt: skip
    fifo = rows[0]["time_to_target_s"]
    for row in rows:
        reached = row["time_to_target_s"]
        row["over_fifo_sync"] = round(reached / fifo, 3) if reached is not None and fifo else None
    return rows, results, target, window or 0.0


def mean_ci(values: list[float]) -> tuple[float | None, list[float | None]]:
    """The mean and its 95 % Student-t interval over repeats ([None, None] with fewer than two)."""
    from scipy.stats import t as student_t

    if not values:
        return None, [None, None]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return round(mean, 3), [None, None]
    half = float(student_t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return round(mean, 3), [round(mean - half, 3), round(mean + half, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--base-speed", type=float, default=4.0, help="slowdown of every simulated device")
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--repeats", type=int, default=3, help="every row this many times, one repeat after another")
    parser.add_argument("--keep", help="keep the runs in this directory")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "hetero.png"))
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitlm-hetero-"))
    root.mkdir(parents=True, exist_ok=True)
    repeats = []
    for repeat in range(args.repeats):  # repeat-major: a slow minute of the machine falls on every row alike
        (root / f"repeat{repeat}").mkdir(exist_ok=True)
        repeats.append(one_repeat(root / f"repeat{repeat}", args))
        print(json.dumps({"repeat": repeat, "rows": repeats[-1][0]}), file=sys.stderr, flush=True)
    rows = []
    for index, (policy, aggregation) in enumerate(ROWS):
        mine = [rows_[index] for rows_, *_ in repeats]
        row: dict[str, Any] = {"policy": policy, "aggregation": aggregation}
        for key in ("time_to_target_s", "over_fifo_sync", "server_idle_pct", "final_eval_ppl", "train_s"):
            values = [r[key] for r in mine if r[key] is not None and math.isfinite(r[key])]
            row[key], row[f"{key}_ci"] = mean_ci(values)
            row[f"{key}_per_repeat"] = [r[key] for r in mine]
        rows.append(row)
    _, results, target, window = repeats[0]
    plot(results, target, Path(args.plot))
    best = min((r for r in rows[1:] if r["over_fifo_sync"] is not None), key=lambda r: r["over_fifo_sync"])
    report = {
        "rows": rows,
        "target_ppl": round(target, 3),
        "target_ppl_per_repeat": [round(t, 3) for _, _, t, _ in repeats],
        "best_over_fifo_sync": best["over_fifo_sync"],
        "best_over_fifo_sync_ci": best["over_fifo_sync_ci"],
        "best_row": f"{best['policy']}+{best['aggregation']}",
        "repeats": args.repeats,
        "semi_async_window_s": window,
        "setup": f"sflv1, 8 clients, speeds {SPEEDS} x base {args.base_speed}, links {links(len(SPEEDS))} Mbit/s "
        f"+ 5 ms, model {args.model}, lr {args.lr}, {args.rounds} rounds x {args.local_steps} local steps, "
        "one splitlm train process per row, 1 torch thread; every figure the mean of the repeats with a 95% "
        "Student-t interval (over_fifo_sync: each repeat's row over that repeat's fifo+sync)",
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
