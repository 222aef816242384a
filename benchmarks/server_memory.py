"""Server memory as clients are added: one frozen base trunk, one LoRA adapter + optimizer state per client.

    python benchmarks/server_memory.py [--model smollm2-135m-instruct] [--clients 1 4 16]

For each client count, a fresh process builds the U-shaped server (head 2, tail 2), gives every client its
own trunk adapter (as SFL-V1 does), runs one training step per client through the server (forward, backward,
optimizer step on batch x seq_len hidden states), and reports its peak resident memory. Prints JSON with
``server_peak_rss_mb`` per count and ``growth_per_client_mb`` (least-squares slope); target: 16 clients cost
at most 1.2x the memory of 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings


def measure(model: str, clients: int, batch: int, seq_len: int, head: int, tail: int) -> dict[str, float]:
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.frameworks.setup import build_part, load_source
    from splitlm.runtime.optim import PartyOptimizer
    from splitlm.runtime.server import SplitServer
    from splitlm.transport import Message

    config = build_config(
        {}, [f"model.name={model}", "split.mode=ushape", f"split.head_layers={head}", f"split.tail_layers={tail}"]
    )
    source = load_source(config)
    trunk, stage = build_part(config, source, "trunk")
    server = SplitServer(trunk, stage, "ushape", lambda p: PartyOptimizer(p, config.train), config.seed)
    hidden_size = int(stage.config.hidden_size)
    torch.manual_seed(0)
    for index in range(clients):
        client = str(index)
        server.assign(client, f"client-{index}")
        hidden = torch.randn(batch, seq_len, hidden_size)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        reply = server.handle(Message("forward", client, 0, 0, {"hidden": hidden, "attention_mask": mask}))
        grad = torch.randn_like(reply.tensors["hidden"]) * 1e-3
        server.handle(Message("backward", client, 0, 0, {"grad": grad}))
        server.handle(Message("step", client, 0, 0, {}, {"grad_sq_norm": 0.0}))
    adapter_params = sum(p.numel() for p in server.bank.parameters("client-0")) if server.bank else 0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"clients": clients, "peak_rss_mb": peak_kb / 1024, "adapter_params_per_client": adapter_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--head", type=int, default=2, help="client blocks before the trunk")
    parser.add_argument("--tail", type=int, default=2, help="client blocks after the trunk")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.model, args.worker, args.batch_size, args.seq_len, args.head, args.tail)))
        return
    results = []
    for count in args.clients:  # a fresh process each, so peaks do not carry over
        command = [sys.executable, __file__, "--worker", str(count), "--model", args.model,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--head", str(args.head), "--tail", str(args.tail)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"worker for {count} clients failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    counts = [r["clients"] for r in results]
    peaks = [r["peak_rss_mb"] for r in results]
    mean_c, mean_p = sum(counts) / len(counts), sum(peaks) / len(peaks)
    slope = sum((c - mean_c) * (p - mean_p) for c, p in zip(counts, peaks, strict=True)) / max(
        sum((c - mean_c) ** 2 for c in counts), 1e-9
    )
    report = {
        "model": args.model,
        "clients": counts,
        "server_peak_rss_mb": [round(p, 1) for p in peaks],
        "growth_per_client_mb": round(slope, 2),
        "ratio_max_to_min_clients": round(peaks[-1] / peaks[0], 3),
        "adapter_params_per_client": results[0]["adapter_params_per_client"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
