"""Held-out perplexity of each framework after the same token budget, IID and label-skewed.

    python benchmarks/frameworks.py [--model smollm2-135m-instruct] [--steps-per-client 8] [--rounds 2]

4 clients share Rotten Tomatoes (IID, or Dirichlet(0.3) over fresh/rotten). Training text is packed into
full blocks, so every step costs exactly batch x seq_len tokens: each client takes ``steps-per-client``
steps, and ``centralized`` (all data in one place) takes clients x steps-per-client steps. Prints JSON
``{"runs": [{"framework", "partition", "eval_ppl", "tokens", ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps-per-client", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frameworks", nargs="+", default=["centralized", "sl", "psl", "sflv1", "sflv2"])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet-0.3"])
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework

    base = [
        f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "train.batch_size=4", "train.seq_len=128", "train.lr=0.001", "train.warmup_steps=1", "train.eval_batches=10",
        "train.progress=false", "data.pack=true", "data.eval_size=100", "lora.dropout=0.0", *args.overrides,
    ]  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory(prefix="splitlm-bench-") as tmp:
        for partition in args.partitions:
            name, _, alpha = partition.partition("-")
            part = [f"data.partition={name}"] + ([f"data.alpha={alpha}"] if alpha else [])
            for framework in args.frameworks:
                if framework == "centralized":  # all clients' data in one place, the same number of tokens
                    extra = [f"train.steps={args.clients * args.steps_per_client}"]
                else:
                    extra = [
                        f"framework.num_clients={args.clients}", f"framework.rounds={args.rounds}",
                        f"train.steps={args.steps_per_client}", *part,
                    ]  # fmt: skip
                out = Path(tmp) / f"{framework}-{partition}"
                config = build_config({}, [*base, f"framework.name={framework}", *extra, f"output_dir={out}"])
                summary = run_framework(config)
                runs.append(
                    {
                        "framework": framework,
                        "partition": partition if framework != "centralized" else "all",
                        "eval_ppl": summary["eval_ppl_after"],
                        "eval_ppl_before": summary["eval_ppl_before"],
                        "tokens": summary["tokens"],
                        "bytes": summary["bytes_up"] + summary["bytes_down"],
                        "wall_seconds": summary["wall_seconds"],
                    }
                )
                print(json.dumps(runs[-1]), file=sys.stderr)
    # centralized does not depend on the partition: keep one row of it
    seen, unique = set(), []
    for run in runs:
        key = (run["framework"], run["partition"])
        if key not in seen:
            seen.add(key)
            unique.append(run)
    print(json.dumps({"model": args.model, "clients": args.clients, "runs": unique}, indent=2))


if __name__ == "__main__":
    main()
