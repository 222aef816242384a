"""What each wire codec saves, costs, and leaks: bytes, perplexity, loss drift and the SIP attack, side by side.

    python benchmarks/comm.py [--steps 30] [--rows identity int8 ...] [--out DIR]

Every row fine-tunes the default model (SmolLM2-135M-Instruct), U-shape 2/2, LoRA r=8 on q/v, batch 4 x 128
tokens of Rotten Tomatoes, with the same seed, steps and data, in-process (the codecs run in the same message
pipeline as over gRPC), with the server tap on. A row's codec encodes the activations (steps 3 and 5) and the
cut gradients (steps 7 and 9) alike, except the rows that name both settings (``activations | gradients``);
``bottleneck:K`` rows learn a rank-K bottleneck at each cut (``split.bottleneck=K``, a model option: K features
a token cross the wire, under the row's codec). Per row:

- ``bytes_per_step``: mean training bytes per step, up plus down, as encoded on the wire;
- ``reduction``: the identity row's bytes over this row's;
- ``eval_ppl`` / ``ppl_increase_pct``: held-out perplexity after training (evaluation crosses the same codec)
  and its increase over the identity row's, in percent;
- ``max_loss_diff``: the largest per-step training-loss difference from the identity row;
- ``sip_rouge_l``: ROUGE-L F1 of the SIP attack on the smashed data the server tap recorded under this codec
  (what the server decoded: an honest-but-curious server has the decoder; behind a bottleneck it applies its own
  trained decoder half to the codes, since that is the input it feeds its trunk).

Prints one JSON line ``{"codecs": [{"codec", "bytes_per_step", "reduction", "eval_ppl", "ppl_increase_pct",
"max_loss_diff", "sip_rouge_l"}], ...}`` and writes ``comm.json`` into ``--out`` (default: a temp dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# name -> (activations, gradients, extra settings)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "identity": ("none", "none", []),
    "fp16": ("fp16", "fp16", []),
    "int8": ("int8", "int8", []),
    "int4": ("int4", "int4", []),
    "topk:0.1": ("topk:0.1", "topk:0.1", []),
    "randtopk:0.1": ("randtopk:0.1", "randtopk:0.1", []),
    "unpadded": ("unpadded", "unpadded", []),
    "unpadded+int8": ("unpadded+int8", "unpadded+int8", []),
    "unpadded+int4": ("unpadded+int4", "unpadded+int4", []),
    "bottleneck:64": ("none", "none", ["split.bottleneck=64"]),
    # chains that treat the two channels differently: activations | gradients
    "unpadded+int8 | unpadded+int4": ("unpadded+int8", "unpadded+int4", []),
    "unpadded+int8 | unpadded+int4 +ef": ("unpadded+int8", "unpadded+int4", ["transport.codec.error_feedback=true"]),
    "unpadded+int8 | unpadded+topk:0.1+int8": ("unpadded+int8", "unpadded+topk:0.1+int8", []),
    "unpadded+int8 | unpadded+topk:0.1+int8 +ef": (
        "unpadded+int8",
        "unpadded+topk:0.1+int8",
        ["transport.codec.error_feedback=true"],
    ),
    "int8 +bottleneck:64": ("int8", "int8", ["split.bottleneck=64"]),
    # int4 with each token's 8 largest entries sent exactly (LLM hidden states have a few huge ones)
    "unpadded+int4:o8": ("unpadded+int4:o8", "unpadded+int4:o8", []),
    "unpadded+int4:o8 | unpadded+int4": ("unpadded+int4:o8", "unpadded+int4", []),
    "unpadded+int4:o16 | unpadded+int4": ("unpadded+int4:o16", "unpadded+int4", []),
    "unpadded+int4:o32 | unpadded+int4": ("unpadded+int4:o32", "unpadded+int4", []),
}


BEST = "unpadded+int4:o32 | unpadded+int4"  # the best chain found: >= 8x fewer bytes within 2% perplexity
DEFAULT_ROWS = [
    "identity", "fp16", "int8", "int4", "topk:0.1", "randtopk:0.1", "unpadded", "unpadded+int8", "unpadded+int4",
    "bottleneck:64", BEST,
]  # fmt: skip


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, default=2, help="recorded micro-batches the attack rebuilds")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"rows to run, of {list(ROWS)}")
    parser.add_argument("--out", default=None, help="folder for comm.json (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides for every run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework
    from splitlm.privacy.attacks import AttackContext, make_attack, observations, score

    base = [
        f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        f"train.steps={args.steps}", "train.batch_size=4", "train.seq_len=128", "train.lr=0.001",
        "train.warmup_steps=2", "train.eval_batches=25", "train.progress=false", "data.max_rows=4000",
        "data.eval_size=100", "privacy.tap.enabled=true", f"privacy.tap.max_batches={args.batches}",
        *args.overrides,
    ]  # fmt: skip
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="splitlm-comm-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    ctx = None
    sip = make_attack("sip")
    names = ["identity", *[n for n in args.rows if n != "identity"]]
    with tempfile.TemporaryDirectory(prefix="splitlm-comm-runs-") as tmp:
        for name in names:
            activations, gradients, extra = ROWS[name]
            run_dir = Path(tmp) / "".join(c if c.isalnum() else "_" for c in name)
            config = build_config(
                {},
                [*base, f"transport.codec.activations={activations}", f"transport.codec.gradients={gradients}",
                 *extra, f"output_dir={run_dir}"],
            )  # fmt: skip
            summary = run_framework(config)
            records = _records(run_dir)
            losses = [r["loss"] for r in records]
            row: dict[str, Any] = {
                "codec": name,
                "activations": activations,
                "gradients": gradients,
                "settings": extra,
                "bytes_per_step": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in records),
                "eval_ppl": summary["eval_ppl_after"],
                "eval_ppl_before": summary["eval_ppl_before"],
            }
            if reference is None:
                reference = {"bytes": row["bytes_per_step"], "ppl": row["eval_ppl"], "losses": losses}
            row["reduction"] = reference["bytes"] / row["bytes_per_step"]
            row["ppl_increase_pct"] = 100.0 * (row["eval_ppl"] - reference["ppl"]) / reference["ppl"]
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses, reference["losses"], strict=True))
            ctx = ctx or AttackContext(config)  # the same public model and text for every row
            obs = observations(run_dir, args.batches)
            if config.split.bottleneck:
                obs = decoded(run_dir, obs)
            row["sip_rouge_l"] = score(ctx, "sip", sip, obs, progress=False)["rouge_l"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    best = max(
        (r for r in rows if r["ppl_increase_pct"] <= 2.0), key=lambda r: r["reduction"], default=None
    )  # the largest reduction within 2% perplexity
    report = {
        "codecs": rows,
        "best": None if best is None else best["codec"],
        "model": args.model,
        "split": "ushape head 2 / tail 2",
        "steps": args.steps,
        "batch": "4 x 128",
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "comm.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


def decoded(run_dir: Path, obs: list[Any]) -> list[Any]:
    """The bottleneck's codes the tap recorded (B, T, K), through the server's own trained decoder of the head's cut
    (``lowrank.<head_layers>.decoder`` in its trunk adapter): the (B, T, d) input its trunk runs on."""
    import dataclasses

    from safetensors.torch import load_file

    state = load_file(str(run_dir / "adapters" / "trunk.safetensors"))
    first = min(int(k.split(".")[1]) for k in state if k.startswith("lowrank.") and ".decoder." in k)
    weight, bias = state[f"lowrank.{first}.decoder.weight"], state[f"lowrank.{first}.decoder.bias"]
    return [dataclasses.replace(o, smashed=o.smashed @ weight.T.float() + bias.float()) for o in obs]


if __name__ == "__main__":
    main()
