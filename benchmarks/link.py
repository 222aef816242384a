"""Step time on slow links: plain, pipelined, the best codec, both, and a local loss, across processes.

    python benchmarks/link.py [--steps 6] [--bandwidths 1000 100 10] [--latency-ms 20] [--keep DIR]

Each row runs `splitlm serve` and one `splitlm client` as separate processes (one torch thread each: they
stand for two machines) over gRPC with TLS and a token on loopback, with the client's link emulated by
splitlm (``transport.link``: the bandwidth each way, 20 ms one-way latency; the server's replies cross it
too). The model is the default one (SmolLM2-135M-Instruct), U-shape 2/2, LoRA r=8 on q/v, batch 4 x 128
packed tokens of Rotten Tomatoes (full rows: what the fp32 traffic of a step is quoted for), the same steps and
data in every row. Modes:

- ``plain``: fp32 activations and gradients, one micro-batch per step;
- ``pipelined``: ``train.pipeline.micro_batches=4`` (PiPar);
- ``best_codec``: the codecs of ``--activations`` / ``--gradients`` (the best chain of benchmarks/comm.py:
  ``unpadded+int4:o32`` / ``unpadded+int4``);
- ``best_codec+pipelined``: both;
- ``local_loss``: ``remedies=[local_loss]`` (the client never waits for step 9).

``step_s`` is the median of the client's step times (its metrics.jsonl ``seconds``) after the first step.
Prints one JSON line ``{"rows": [{"bandwidth_mbps", "mode", "step_s", "comm_s", "bytes_per_step"}],
"speedup_pipeline_100mbit", "speedup_best_100mbit", "speedup_best_10mbit", ...}`` (each speedup: plain step time
over that mode's at the same link, measured in this run; ``best`` is the best codec with pipelining, the fastest
combination; ``speedup_codec_only_*`` is the codec alone) and writes ``docs/link.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "model.name=smollm2-135m-instruct", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
    "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
    "train.batch_size=4", "train.seq_len=128", "train.lr=0.001", "train.warmup_steps=0", "train.progress=false",
    "train.eval_batches=1", "data.name=rotten_tomatoes", "data.max_rows=2000", "data.eval_size=4", "data.pack=true",
    "framework.name=sl", "framework.wait_for_clients_s=300", "seed=0",
]  # fmt: skip
TIMEOUT = 1200.0


def modes(activations: str, gradients: str) -> dict[str, list[str]]:
    codec = [f"transport.codec.activations={activations}", f"transport.codec.gradients={gradients}"]
    pipeline = ["train.pipeline.micro_batches=4"]
    return {
        "plain": [],
        "pipelined": pipeline,
        "best_codec": codec,
        "best_codec+pipelined": [*codec, *pipeline],
        "local_loss": ["remedies=[local_loss]"],
    }


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", *args]


def run_row(root: Path, certs: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """One networked run; the client's step records."""
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = root / "config.yaml"
    config.write_text("{}\n")
    server_log, client_log = (root / "server.log").open("wb"), (root / "client.log").open("wb")
    server = subprocess.Popen(
        _cli("serve", str(config), *overrides, f"output_dir={root / 'server'}", "--certs", str(certs),
             "--address", f"127.0.0.1:{port}"),
        stdout=server_log, stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip
    client = subprocess.Popen(
        _cli("client", str(config), *overrides, f"output_dir={root / 'client'}", "--server", f"127.0.0.1:{port}",
             "--client-id", "0", "--certs", str(certs), "--connect-timeout", "300"),
        stdout=client_log, stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip
    try:
        for process, name in ((client, "client"), (server, "server")):
            rc = process.wait(timeout=TIMEOUT)
            if rc != 0:
                log = (root / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited {rc} in {root}:\n{log}")
    finally:
        for process in (client, server):
            if process.poll() is None:
                process.kill()
                process.wait()
    lines = (root / "client" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["mode"] for r in rows))
    bandwidths = sorted({r["bandwidth_mbps"] for r in rows}, reverse=True)
    figure, axis = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next(r["step_s"] for r in rows if r["mode"] == name and r["bandwidth_mbps"] == b) for b in bandwidths]
        axis.bar([j + i * width for j in range(len(bandwidths))], values, width, label=name)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(bandwidths))], [f"{b:g} Mbit/s" for b in bandwidths])
    axis.set_ylabel("seconds per step (median)")
    axis.set_title("SmolLM2-135M U-shape 2/2, batch 4x128, 20 ms latency, client and server processes")
    axis.title.set_fontsize(9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[1000.0, 100.0, 10.0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--activations", default="unpadded+int4:o32", help="the best codec's activations setting")
    parser.add_argument("--gradients", default="unpadded+int4", help="the best codec's gradients setting")
    parser.add_argument("--modes", nargs="+", default=None)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "link.png"))
    parser.add_argument("--keep", default=None, help="keep the runs' folders here")
    args = parser.parse_args()
    from splitlm.transport.security import make_dev_certs

    started = time.perf_counter()
    table = modes(args.activations, args.gradients)
    chosen = args.modes or list(table)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitlm-link-"))
    certs = root / "certs"
    make_dev_certs(certs, ["127.0.0.1"], ["0"])
    rows: list[dict[str, Any]] = []
    for bandwidth in args.bandwidths:
        link = [f"transport.link.bandwidth_mbps={bandwidth}", f"transport.link.latency_ms={args.latency_ms}"]
        for mode in chosen:
            overrides = [*BASE, f"train.steps={args.steps}", *link, *table[mode]]
            records = run_row(root / f"{bandwidth:g}-{mode}", certs, overrides)
            timed = records[1:] or records
            rows.append(
                {
                    "bandwidth_mbps": bandwidth,
                    "mode": mode,
                    "step_s": statistics.median(r["seconds"] for r in timed),
                    "comm_s": statistics.median(r.get("comm_seconds", 0.0) for r in timed),
                    "bytes_per_step": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in timed),
                    "losses": [r["loss"] for r in records],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    def speedup(mode: str, bandwidth: float) -> float | None:
        plain = [r["step_s"] for r in rows if r["mode"] == "plain" and r["bandwidth_mbps"] == bandwidth]
        other = [r["step_s"] for r in rows if r["mode"] == mode and r["bandwidth_mbps"] == bandwidth]
        return plain[0] / other[0] if plain and other else None

    report = {
        "rows": rows,
        "speedup_pipeline_100mbit": speedup("pipelined", 100.0),
        "speedup_best_100mbit": speedup("best_codec+pipelined", 100.0),
        "speedup_best_10mbit": speedup("best_codec+pipelined", 10.0),
        "speedup_codec_only_10mbit": speedup("best_codec", 10.0),
        "speedup_local_loss_10mbit": speedup("local_loss", 10.0),
        "best_codec": {"activations": args.activations, "gradients": args.gradients},
        "latency_ms": args.latency_ms,
        "steps": args.steps,
        "setup": "splitlm serve + splitlm client processes, 1 torch thread each, gRPC+TLS on loopback, "
        "link emulated by splitlm",
        "seconds": time.perf_counter() - started,
    }
    plot(rows, Path(args.plot))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
