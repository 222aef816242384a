"""The privacy table: what each attack recovers under each defense, and what each defense costs.

    python benchmarks/privacy.py [--model smollm2-135m-instruct] [--steps 20] [--batches 2] [--out DIR]

For every defense at three strengths (weakest first), plus no defense, a U-shaped split (head 2, tail 2)
of the default model is fine-tuned with LoRA on Rotten Tomatoes with the server tap on; then each attack,
as an honest-but-curious server holding the public pretrained weights and public text from the same
source (rows the client never loaded), rebuilds the client's last ``--batches`` training micro-batches
from what the server received. Prints JSON

    {"cells": [{"attack", "defense", "strength", "rouge_l", "token_accuracy"}, ...],
     "utility": [{"defense", "strength", "eval_ppl", "epsilon"}, ...], ...}

(``epsilon`` for ``privacy.delta``, null where the defense has no (epsilon, delta) guarantee), and writes
``privacy.json`` and the ROUGE-L table as a heat map ``privacy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ATTACKS = ["sip", "bisr_b", "bisr_f", "tag", "nn_inversion"]

# Each defense: (config key of its strength, three values from weakest to strongest, extra settings).
DEFENSES: dict[str, tuple[str, list[float], list[str]]] = {
    "dxp": ("privacy.defenses.dxp.epsilon", [50.0, 40.0, 30.0], []),
    "smashed_noise": (
        "privacy.defenses.smashed_noise.noise_multiplier",
        [0.01, 0.03, 0.06],
        ["privacy.defenses.smashed_noise.clip=100", "privacy.defenses.smashed_noise.mechanism=gaussian"],
    ),
    # NoPeek works by reshaping the head's output, which LoRA on q/v barely can in a short run (measured: no
    # change in any score at beta 1-32 over 10 steps): its rows train the head fully.
    "nopeek": ("privacy.defenses.nopeek.beta", [4.0, 16.0, 64.0], ["lora.head.method=full"]),
    "grad_noise": (
        "privacy.defenses.grad_noise.noise_multiplier",
        [0.05, 0.25, 1.0],
        ["privacy.defenses.grad_noise.clip=0.001", "privacy.defenses.grad_noise.mechanism=gaussian"],
    ),
}


def cells_for(defense: str) -> list[tuple[float | None, list[str]]]:
    if defense == "none":
        return [(None, [])]
    key, strengths, extra = DEFENSES[defense]
    return [(s, [f"privacy.defenses=[{defense}]", f"{key}={s}", *extra]) for s in strengths]


def heat_map(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys((c["defense"], c["strength"]) for c in cells))
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    value = {(c["defense"], c["strength"], c["attack"]): c["rouge_l"] for c in cells}
    grid = [[value.get((d, s, a), float("nan")) for a in attacks] for d, s in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(attacks) + 2.5, 0.42 * len(rows) + 1.4))
    image = ax.imshow(grid, cmap="magma_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_yticks(range(len(rows)), [d if s is None else f"{d} @ {s:g}" for d, s in rows])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.5 else "black", fontsize=8)
    ax.set_title("ROUGE-L F1 of the text each attack rebuilds (lower is more private)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="recorded micro-batches each attack rebuilds")
    parser.add_argument("--defenses", nargs="+", default=["none", *DEFENSES])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--out", default=None, help="folder for privacy.json and privacy.png (default: a temp dir)")
    parser.add_argument("--attack-option", action="append", default=[], help="ATTACK:key=value, e.g. sip:steps=600")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides for every run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework
    from splitlm.privacy.attacks import AttackContext, make_attack, observations, score

    options: dict[str, dict[str, str]] = {}
    for text in args.attack_option:
        name, _, pair = text.partition(":")
        key, _, value = pair.partition("=")
        options.setdefault(name, {})[key] = value
    base = [
        f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.seq_len=64", "train.lr=0.001", "train.warmup_steps=2",
        "train.eval_batches=10", "train.progress=false", "data.max_rows=4000", "data.eval_size=100",
        "privacy.tap.enabled=true", f"privacy.tap.max_batches={args.batches}", *args.overrides,
    ]  # fmt: skip
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="splitlm-privacy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    utility: list[dict[str, Any]] = []
    ctx = None
    with tempfile.TemporaryDirectory(prefix="splitlm-privacy-runs-") as tmp:
        for defense in args.defenses:
            for strength, extra in cells_for(defense):
                run_dir = Path(tmp) / f"{defense}-{strength}"
                config = build_config({}, [*base, *extra, f"output_dir={run_dir}"])
                summary = run_framework(config)
                privacy = summary["privacy"]
                utility.append(
                    {
                        "defense": defense,
                        "strength": strength,
                        "eval_ppl": summary["eval_ppl_after"],
                        "eval_ppl_before": summary["eval_ppl_before"],
                        "epsilon": privacy["epsilon"],
                        "delta": privacy["delta"],
                    }
                )
                ctx = ctx or AttackContext(config)  # the same public model and text for every run
                obs = observations(run_dir, args.batches)
                for name in args.attacks:
                    result = score(ctx, name, make_attack(name, options.get(name)), obs)
                    cells.append(
                        {
                            "attack": name,
                            "defense": defense,
                            "strength": strength,
                            "rouge_l": result["rouge_l"],
                            "token_accuracy": result["token_accuracy"],
                            "seconds": result["seconds"],
                        }
                    )
                    print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    report = {
        "model": args.model,
        "split": "ushape head 2 / tail 2",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "batches_attacked": args.batches,
        "cells": cells,
        "utility": utility,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "privacy.json").write_text(json.dumps(report, indent=1) + "\n")
    heat_map(cells, out_dir / "privacy.png")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
