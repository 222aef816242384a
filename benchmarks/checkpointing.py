"""Peak memory of a training step with and without ``model.gradient_checkpointing``.

    python benchmarks/checkpointing.py [--model smollm2-135m-instruct] [--batch 8] [--seq-len 256] [--device cpu]

For each setting, a fresh process builds the three parts of a U-shaped split (head 2, trunk, tail 2; LoRA as the
defaults say) on ``--device`` and runs ``--steps`` forward and backward passes of each part on ``batch x seq_len``
tokens, as a client and the server do in one step. It reports the process's peak resident memory, the bytes the
autograd graphs keep for their backward passes (summed over the parts; what checkpointing saves), the CUDA peak
(on a GPU) and the seconds per step. Prints one JSON line: a row per setting and ``saved_ratio`` (kept for backward,
checkpointing over plain).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from typing import Any


def measure(model: str, checkpointing: bool, batch: int, seq_len: int, steps: int, device: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.frameworks.setup import build_part, load_source

    config = build_config(
        {},
        [
            f"model.name={model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"model.client_device={device}",
            f"model.server_device={device}",
        ],
    )  # fmt: skip
    source = load_source(config)
    parts = {role: build_part(config, source, role) for role in ("head", "trunk", "tail")}
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(0)
    ids = torch.randint(0, int(parts["head"][1].config.vocab_size), (batch, seq_len), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        kept = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            hidden = parts["head"][0](input_ids=ids)
            middle = parts["trunk"][0](hidden_states=hidden)
            logits = parts["tail"][0](hidden_states=middle)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        for part, _ in parts.values():
            part.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / steps
    row: dict[str, Any] = {
        "gradient_checkpointing": checkpointing,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kept_for_backward_mb": kept / 2**20,
        "seconds_per_step": seconds,
    }
    if device.startswith("cuda"):
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one == "checkpointing", args.batch, args.seq_len, args.steps,
                                 args.device)))  # fmt: skip
        return
    rows = []
    for one in ("plain", "checkpointing"):  # a fresh process each, so each peak is its own
        command = [sys.executable, __file__, "--one", one, "--model", args.model, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--device", args.device]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain, saved = rows
    result = {
        "benchmark": "checkpointing", "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
        "device": args.device, "rows": rows,
        "saved_ratio": saved["kept_for_backward_mb"] / plain["kept_for_backward_mb"],
        "peak_rss_saved_mb": plain["peak_rss_mb"] - saved["peak_rss_mb"],
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
