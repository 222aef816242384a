"""Throughput of split training against the unsplit baseline, in one process, measured in one run.

    python benchmarks/overhead.py [--model smollm2-135m-instruct] [--steps 12] [--warmup 2]

Both learners are built once; their steps alternate (centralized, split, centralized, ...) on the same
batches so that machine noise hits both alike. Prints JSON with the median step time of each and
``ratio`` = split tokens/s / centralized tokens/s (target >= 0.95 with the in-process transport).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per learner")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per learner first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()

    from splitlm.config import build_config
    from splitlm.data import DataOrder, collate
    from splitlm.frameworks.federation import build_parties

    overrides = [
        f"model.name={args.model}",
        f"train.batch_size={args.batch_size}",
        f"train.seq_len={args.seq_len}",
        f"train.steps={args.steps + args.warmup}",
        "split.mode=ushape",
        "split.head_layers=2",
        "split.tail_layers=2",
        "data.eval_size=8",
        "data.pack=true",
        f"model.client_device={args.device}",
        f"model.server_device={args.device}",
        f"model.client_dtype={args.dtype}",
        f"model.server_dtype={args.dtype}",
        *args.overrides,
    ]
    config = build_config({}, overrides)
    torch.manual_seed(config.seed)
    central_fed = build_parties(build_config({}, [*overrides, "framework.name=centralized"]))
    split_fed = build_parties(config)
    central, split = central_fed.members[0].client, split_fed.members[0].client
    member = split_fed.members[0]  # the same packed examples as the centralized member's
    order = DataOrder(len(member.examples), config.train.batch_size, config.seed)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"centralized": [], "split": []}
    tokens: list[int] = []
    for step in range(args.warmup + args.steps):
        batch = collate([member.examples[i] for i in order.indices(step)], split_fed.pad_id)
        for name, learner in (("centralized", central), ("split", split)):
            sync()
            start = time.perf_counter()
            stats = learner.train_step(step, [batch])
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
        if step >= args.warmup:
            tokens.append(stats.tokens)
    tokens_per_step = statistics.mean(tokens)
    central_s = statistics.median(times["centralized"])
    split_s = statistics.median(times["split"])
    up, down = split.meter.snapshot()
    result = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps_measured": args.steps,
        "torch_threads": torch.get_num_threads(),
        "centralized_step_s": central_s,
        "split_step_s": split_s,
        "centralized_tokens_per_s": tokens_per_step / central_s,
        "split_tokens_per_s": tokens_per_step / split_s,
        "ratio": central_s / split_s,
        "split_bytes_per_step": (up + down) / (args.warmup + args.steps),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
