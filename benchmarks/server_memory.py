"""Server memory as clients are added: one frozen base trunk, one LoRA adapter + optimizer state per client,
at most ``--max-resident`` of them in memory (Menos: the others wait on disk).

    python benchmarks/server_memory.py [--model smollm2-135m-instruct] [--clients 1 4 16 64 128] [--max-resident 4]

For each client count, a fresh process builds the U-shaped server (head 2, tail 2) with ``max_resident_adapters``
adapters resident and a temporary offload directory, gives every client its own trunk adapter (as SFL-V1 does),
runs ``--rounds`` training steps per client through the server (forward, backward, optimizer step on batch x
seq_len hidden states; from the second round on, each client's adapter and optimizer come back from disk), and
reports its peak resident memory. The batch defaults to 1 x 32 tokens: what grows with the clients is adapters and
optimizer states, not activations, and a small batch keeps the one-client baseline small (a stricter ratio) and
the 213 client steps of the default counts within minutes on a CPU. Prints JSON with ``server_peak_rss_mb`` per
count, ``growth_per_client_mb`` (least-squares slope), ``resident_adapters`` (in memory at the end, per count)
and ``ratio_max_to_min_clients``; target: 128 clients cost at most 1.5x the memory of 1 (``within_target``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

TARGET_RATIO = 1.5  # peak memory with the most clients over that with the fewest


def measure(
    model: str, clients: int, batch: int, seq_len: int, head: int, tail: int, max_resident: int, rounds: int
) -> dict[str, float]:
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
    offload = tempfile.TemporaryDirectory(prefix="splitlm-offload-")
    server = SplitServer(
        trunk, stage, "ushape", lambda p: PartyOptimizer(p, config.train), config.seed,
        max_resident_adapters=max_resident, offload_dir=Path(offload.name),
    )  # fmt: skip
    hidden_size = int(stage.config.hidden_size)
    torch.manual_seed(0)
    for step in range(rounds):
        for index in range(clients):
            client = str(index)
            if step == 0:
                server.assign(client, f"client-{index}")
            hidden = torch.randn(batch, seq_len, hidden_size)
            mask = torch.ones(batch, seq_len, dtype=torch.long)
            reply = server.handle(Message("forward", client, step, 0, {"hidden": hidden, "attention_mask": mask}))
            grad = torch.randn_like(reply.tensors["hidden"]) * 1e-3
            server.handle(Message("backward", client, step, 0, {"grad": grad}))
            server.handle(Message("step", client, step, 0, {}, {"grad_sq_norm": 0.0}))
    adapter_params = sum(t.numel() for t in server.adapter_state("client-0").values())
    resident = len(server.bank.resident) if server.bank else 0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    offload.cleanup()
    return {
        "clients": clients,
        "peak_rss_mb": peak_kb / 1024,
        "adapter_params_per_client": adapter_params,
        "resident_adapters": resident,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--max-resident", type=int, default=4, help="trunk adapters kept in memory (0: all)")
    parser.add_argument("--rounds", type=int, default=1, help="training steps per client")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--head", type=int, default=2, help="client blocks before the trunk")
    parser.add_argument("--tail", type=int, default=2, help="client blocks after the trunk")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        sizes = (args.batch_size, args.seq_len, args.head, args.tail, args.max_resident, args.rounds)
        print(json.dumps(measure(args.model, args.worker, *sizes)))
        return
    results = []
    for count in args.clients:  # a fresh process each, so peaks do not carry over
        command = [sys.executable, __file__, "--worker", str(count), "--model", args.model,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--head", str(args.head), "--tail", str(args.tail),
                   "--max-resident", str(args.max_resident), "--rounds", str(args.rounds)]  # fmt: skip
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
        "max_resident_adapters": args.max_resident,
        "rounds": args.rounds,
        "resident_adapters": [r["resident_adapters"] for r in results],
        "target_ratio": TARGET_RATIO,
        "within_target": peaks[-1] <= TARGET_RATIO * peaks[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
