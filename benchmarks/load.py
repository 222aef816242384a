"""Many concurrent gRPC clients against one server, on loopback: does every step get through?

    python benchmarks/load.py [--clients 16] [--steps 8] [--model tiny-llama]

One server (TLS, a bearer token per client, each client its own trunk adapter as in SFL-V1) and N clients,
each on its own thread with its own gRPC stream, train ``steps`` steps at once. Prints JSON with ``clients``,
``steps_completed``, ``steps_lost`` (must be 0) and ``errors``, plus throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from splitlm.config import build_config
    from splitlm.frameworks.base import framework_of
    from splitlm.frameworks.federation import build_parties, host
    from splitlm.frameworks.setup import load_source
    from splitlm.transport.grpc_client import GrpcConnection
    from splitlm.transport.grpc_server import GrpcServer
    from splitlm.transport.security import load_tokens, make_dev_certs, token_for

    config = build_config(
        {},
        [
            f"model.name={args.model}", "framework.name=sflv1", f"framework.num_clients={args.clients}",
            f"train.steps={args.steps}", "train.seq_len=32", "train.batch_size=4", "data.max_rows=1200",
            "data.eval_size=16", "split.head_layers=1", "split.tail_layers=1", *args.overrides,
        ],
    )  # fmt: skip
    source = load_source(config)
    hosted = host(config, framework_of(config), source, [], range(args.clients))  # the server's half of a run
    server = hosted.server
    server.start()
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="splitlm-load-") as tmp:
        certs = Path(tmp) / "certs"
        ids = [str(i) for i in range(args.clients)]
        make_dev_certs(certs, ["localhost", "127.0.0.1"], ids)
        grpc_server = GrpcServer(hosted.handler, load_tokens(certs / "tokens.json"), "127.0.0.1:0", certs)
        grpc_server.start()
        feds, connections = [], []  # each client as a `splitlm client` process holds it: a federation of one
        for index, client_id in enumerate(ids):
            connection = GrpcConnection(
                f"localhost:{grpc_server.port}",
                client_id,
                token_for(certs / "tokens.json", client_id),
                certs / "ca.pem",
            )
            connections.append(connection)
            feds.append(build_parties(config, "agent", client=index, transport=connection, source=source))
        members = [fed.members[0] for fed in feds]

        def work(fed) -> None:
            member = fed.members[0]
            try:
                member.train_round(fed, 0)
            except Exception as error:  # counted, not raised: the benchmark reports every failure
                errors.append(f"client {member.client_id}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=work, args=(fed,)) for fed in feds]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        for connection in connections:
            connection.close()
        grpc_server.stop()
    server.stop()
    completed = sum(m.steps_done for m in members)
    result = {
        "model": args.model,
        "clients": args.clients,
        "steps_per_client": args.steps,
        "steps_completed": completed,
        "steps_lost": args.clients * args.steps - completed,
        "errors": errors,
        "wall_seconds": wall,
        "steps_per_s": completed / wall if wall else 0.0,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
