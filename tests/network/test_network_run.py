"""`splitlm serve` and three `splitlm client` processes over gRPC with TLS and tokens compute the in-process run.

Both runs use the same config, seed and one CPU thread, and the networked run moves tensors as raw bytes: the
per-step losses and round evaluations are equal to the last bit, not within a tolerance, with LoRA dropout on
(every random draw is seeded by seed, client, step, micro-batch and part, not by process-global state), and two
networked runs are equal to each other.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splitlm.config import load_config
from splitlm.frameworks import run_framework
from splitlm.transport.security import make_dev_certs

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "frameworks" / "sflv2.yaml"
CLIENTS = 3
OVERRIDES = [
    f"framework.num_clients={CLIENTS}",
    "framework.rounds=2",
    "train.steps=4",
    "train.seq_len=32",
    "train.progress=false",
    "data.max_rows=300",
    "data.eval_size=16",
    "lora.dropout=0.05",
]
LISTENING = re.compile(r"splitlm server listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0
RUN_TIMEOUT = 150.0


@dataclass
class NetworkRun:
    root: Path
    server_rc: int | None = None
    client_rcs: dict[str, int | None] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    def server_dir(self) -> Path:
        return self.root / "server"

    def client_dir(self, client: str) -> Path:
        return self.root / f"client{client}"

    def explain(self) -> str:
        return "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in self.logs.items())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", *args]


def _env() -> dict[str, str]:
    # os.environ carries the session's SPLITLM_CACHE (tests/conftest.py), so the processes share its tiny models.
    assert os.environ.get("SPLITLM_CACHE"), "the session fixture should have set SPLITLM_CACHE"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _pump(stream, lines: queue.Queue[str | None], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        lines.put(line)
    lines.put(None)


def _wait_for_port(server: subprocess.Popen, lines: queue.Queue[str | None]) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        found = LISTENING.search(line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"the server printed no port (exit code {server.poll()})")


def _run_over_network(root: Path) -> NetworkRun:
    run = NetworkRun(root)
    certs = root / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], [str(i) for i in range(CLIENTS)])
    env = _env()
    procs: dict[str, subprocess.Popen] = {}
    errs: dict[str, Any] = {}
    server_out: list[str] = []
    try:
        errs["server"] = (root / "server.err").open("w")
        server = procs["server"] = subprocess.Popen(
            _cli("serve", str(CONFIG), *OVERRIDES, f"output_dir={run.server_dir()}",
                 "--certs", str(certs), "--address", "127.0.0.1:0"),
            stdout=subprocess.PIPE, stderr=errs["server"], text=True, env=env, cwd=root,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(server.stdout, lines, server_out), daemon=True)
        pump.start()
        try:
            port = _wait_for_port(server, lines)
        except AssertionError:
            server.kill()
            server.wait()
            run.logs["server"] = "".join(server_out) + (root / "server.err").read_text()
            raise AssertionError(run.explain()) from None
        for client in map(str, range(CLIENTS)):
            errs[client] = (root / f"client{client}.log").open("w")
            procs[client] = subprocess.Popen(
                _cli("client", str(CONFIG), *OVERRIDES, f"output_dir={run.client_dir(client)}",
                     "--server", f"127.0.0.1:{port}", "--client-id", client, "--certs", str(certs)),
                stdout=errs[client], stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
            )  # fmt: skip
        deadline = time.monotonic() + RUN_TIMEOUT
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            if name == "server":
                run.server_rc = rc
            else:
                run.client_rcs[name] = rc
        pump.join(timeout=10)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for handle in errs.values():
            handle.close()
    run.logs["server"] = "".join(server_out) + (root / "server.err").read_text()
    for client in map(str, range(CLIENTS)):
        run.logs[f"client {client}"] = (root / f"client{client}.log").read_text()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NetworkRun]:
    """The in-process run (first: it also fills the model cache) and the networked run of the same config."""
    root = tmp_path_factory.mktemp("network-run")
    inproc = root / "inproc"
    run_framework(load_config(CONFIG, [*OVERRIDES, f"output_dir={inproc}"]))
    return inproc, _run_over_network(root)


@pytest.fixture(scope="module")
def second_run(runs, tmp_path_factory: pytest.TempPathFactory) -> NetworkRun:
    return _run_over_network(tmp_path_factory.mktemp("network-run-again"))


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[tuple[int, str, int, float, int]]:
    records = _records(run_dir / "metrics.jsonl")
    return sorted((r["round"], r["client"], r["step"], r["loss"], r["tokens"]) for r in records)


@pytest.mark.timeout(180)
def test_server_and_clients_exit_zero(runs) -> None:
    _, net = runs
    assert net.server_rc == 0, net.explain()
    assert net.client_rcs == {str(i): 0 for i in range(CLIENTS)}, net.explain()
    for client in map(str, range(CLIENTS)):
        assert f"client {client}: 4 steps" in net.logs[f"client {client}"], net.explain()
        assert re.search(r"traffic up [\d.]+ \w+, down [\d.]+ \w+; [\d.]+ s", net.logs[f"client {client}"])
    assert re.search(r"traffic up [\d.]+ \w+, down [\d.]+ \w+; [\d.]+ s training, [\d.]+ s in all", net.logs["server"])


@pytest.mark.timeout(180)
def test_per_step_losses_equal_the_in_process_run(runs) -> None:
    inproc, net = runs
    expected = _steps(inproc)
    assert len(expected) == 2 * 2 * CLIENTS  # rounds x local steps x clients
    assert _steps(net.server_dir()) == expected, net.explain()


@pytest.mark.timeout(180)
def test_two_networked_runs_with_dropout_are_identical(runs, second_run) -> None:
    _, net = runs
    assert second_run.server_rc == 0, second_run.explain()
    assert _steps(second_run.server_dir()) == _steps(net.server_dir())
    fields = ("eval_loss", "participants")
    assert [{k: r[k] for k in fields} for r in _records(second_run.server_dir() / "rounds.jsonl")] == [
        {k: r[k] for k in fields} for r in _records(net.server_dir() / "rounds.jsonl")
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", [str(i) for i in range(CLIENTS)])
def test_each_client_writes_its_own_metrics_and_summary(runs, client) -> None:
    # the client's output_dir has its own steps (the same records the server logged for it) and a summary
    _, net = runs
    server_records = [r for r in _records(net.server_dir() / "metrics.jsonl") if r["client"] == client]
    own = _records(net.client_dir(client) / "metrics.jsonl")
    fields = ("round", "step", "loss", "tokens")
    assert [{k: r[k] for k in fields} for r in own] == [{k: r[k] for k in fields} for r in server_records]
    summary = json.loads((net.client_dir(client) / "summary.json").read_text())
    assert summary["client"] == client and summary["steps"] == 4
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0 and summary["wall_seconds"] > 0


@pytest.mark.timeout(180)
def test_round_evaluations_equal_the_in_process_run(runs) -> None:
    inproc, net = runs
    fields = ("round", "participants", "eval_loss", "eval_ppl")
    expected = [{k: r[k] for k in fields} for r in _records(inproc / "rounds.jsonl")]
    assert len(expected) == 2
    assert [{k: r[k] for k in fields} for r in _records(net.server_dir() / "rounds.jsonl")] == expected


@pytest.mark.timeout(180)
def test_server_wrote_the_in_process_trunk_adapter(runs) -> None:
    inproc, net = runs
    expected = load_file(str(inproc / "adapters" / "trunk.safetensors"))
    actual = load_file(str(net.server_dir() / "adapters" / "trunk.safetensors"))
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", [str(i) for i in range(CLIENTS)])
def test_each_client_wrote_its_adapters(runs, client) -> None:
    # After the last round's FedAvg every client holds the global client side: the in-process run's head/tail.
    inproc, net = runs
    for part in ("head", "tail"):
        path = net.client_dir(client) / "adapters" / f"{part}.safetensors"
        assert path.is_file(), f"client {client} wrote no {path.name}; its output_dir holds {_listing(net, client)}"
        expected = load_file(str(inproc / "adapters" / f"{part}.safetensors"))
        actual = load_file(str(path))
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected)


def _listing(net: NetworkRun, client: str) -> list[str]:
    folder = net.client_dir(client)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.timeout(180)
def test_evaluation_traffic_is_counted_apart_as_in_process(runs) -> None:
    # The server's figures for its remote clients: training traffic (activations, gradients and their replies)
    # and evaluation traffic (the held-out set's activations up, the trunk's outputs down) apart, each equal to the
    # in-process run's, per client and in all; the commands that drive the clients are neither.
    inproc, net = runs
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (net.server_dir(), inproc))
    keys = ("bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down")
    assert theirs["eval_bytes_up"] > 0 and theirs["eval_bytes_down"] > 0
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    assert [(c["bytes_up"], c["bytes_down"]) for c in ours["clients"]] == [
        (c["bytes_up"], c["bytes_down"]) for c in theirs["clients"]
    ]
    # the client sides FedAvg gathers and sends back travel as commands: counted, as control traffic
    assert ours["control_bytes_up"] > 0 and ours["control_bytes_down"] > 0
    assert theirs["control_bytes_up"] == theirs["control_bytes_down"] == 0
