"""Step time of split training in-process vs over gRPC with TLS and a bearer token, on loopback.

    python benchmarks/transport.py [--model smollm2-135m-instruct] [--steps 8] [--warmup 2]

Two identical U-shaped setups (head 2, tail 2) train on the same batches, their steps alternating: one
client talks to its server through the in-process transport, the other through a real gRPC stream over
127.0.0.1 (TLS from a throw-away development CA, a bearer token, frames of raw bytes). Prints JSON with the
median step times and ``ratio`` = gRPC / in-process (target <= 1.15).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.data import DataOrder, collate
    from splitlm.frameworks.federation import build_parties
    from splitlm.transport import server_chain
    from splitlm.transport.grpc_client import GrpcConnection
    from splitlm.transport.grpc_server import GrpcServer
    from splitlm.transport.security import make_dev_certs, token_for

    config = build_config(
        {},
        [
            f"model.name={args.model}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
            f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "data.pack=true",
            "data.eval_size=8", f"train.steps={args.steps + args.warmup}", *args.overrides,
        ],
    )  # fmt: skip
    local_fed, remote_fed = build_parties(config), build_parties(config)
    member = local_fed.members[0]
    order = DataOrder(len(member.examples), config.train.batch_size, config.seed)
    local, remote = member.client, remote_fed.members[0].client
    with tempfile.TemporaryDirectory(prefix="splitlm-transport-") as tmp:
        certs = Path(tmp) / "certs"
        make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0"])
        split_server = remote_fed.server
        handler = server_chain(remote_fed.server_mods, split_server.submit)  # the server's own mods, over gRPC
        server = GrpcServer(handler, {token_for(certs / "tokens.json", "0"): "0"}, "127.0.0.1:0", certs)
        server.start()
        connection = GrpcConnection(
            f"localhost:{server.port}", "0", token_for(certs / "tokens.json", "0"), certs / "ca.pem"
        )
        remote.channel.transport = connection  # the same mods, over gRPC + TLS + token
        times: dict[str, list[float]] = {"inprocess": [], "grpc_tls": []}
        try:
            for step in range(args.warmup + args.steps):
                batch = collate([member.examples[i] for i in order.indices(step)], local_fed.pad_id)
                for name, learner in (("inprocess", local), ("grpc_tls", remote)):
                    start = time.perf_counter()
                    learner.train_step(step, [batch])
                    if step >= args.warmup:
                        times[name].append(time.perf_counter() - start)
        finally:
            connection.close()
            server.stop()
    inprocess, grpc_tls = statistics.median(times["inprocess"]), statistics.median(times["grpc_tls"])
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps_measured": args.steps,
        "inprocess_step_s": inprocess,
        "grpc_tls_step_s": grpc_tls,
        "ratio": grpc_tls / inprocess,
        "wire_bytes_per_step": (connection.meter.up + connection.meter.down) / (args.warmup + args.steps),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
