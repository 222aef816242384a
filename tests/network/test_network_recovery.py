"""A client killed mid-round and started again: the networked run still finishes every round.

The server leaves the vanished client out of the round it was in (its half-done work is dropped, not
applied), aggregates over the clients that finished, and gives the restarted process the current client side
before its next round; the restarted client continues its step count and schedule where the server saw it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitlm.transport.security import make_dev_certs

pytestmark = pytest.mark.slow  # processes killed and restarted: minutes

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "frameworks" / "sflv1.yaml"
OVERRIDES = [
    "framework.num_clients=3",
    "framework.rounds=3",
    "train.steps=24",  # 8 steps per round: long enough to kill a client in the middle of one
    "train.seq_len=32",
    "train.progress=false",
    "data.max_rows=300",
    "data.eval_size=16",
    "framework.min_clients=2",
]
METRICS = "metrics.jsonl"
LISTENING = re.compile(r"splitlm server listening on 127\.0\.0\.1:(\d+)")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _client(root: Path, certs: Path, port: int, index: int, log: str) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("client", str(CONFIG), *OVERRIDES, f"output_dir={root / f'client{index}'}",
             "--server", f"localhost:{port}", "--client-id", str(index), "--certs", str(certs)),
        stdout=open(root / log, "w"), stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_killed_client_restarts_and_the_run_finishes(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1", "2"])
    server_log = tmp_path / "server.log"
    server = subprocess.Popen(
        _cli("serve", str(CONFIG), *OVERRIDES, f"output_dir={tmp_path / 'server'}", "--certs", str(certs),
             "--address", "127.0.0.1:0"),
        stdout=open(server_log, "w"), stderr=subprocess.STDOUT, env=_env(),  # noqa: SIM115 (lives with the process)
    )  # fmt: skip
    processes = [server]
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            match = LISTENING.search(server_log.read_text())
            port = int(match.group(1)) if match else None
            time.sleep(0.1)
        assert port, server_log.read_text()
        clients = {i: _client(tmp_path, certs, port, i, f"client{i}.log") for i in range(3)}
        processes += clients.values()
        metrics = tmp_path / "server" / "metrics.jsonl"
        # Kill client 1 once it is in the middle of round 2 (it has logged a step there, and the round is not over).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # the server logs a client's steps when its round's work returns; wait for round 1 to be complete
            if len(_lines(tmp_path / "server" / "rounds.jsonl")) >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # now inside round 2
        clients[1].kill()
        clients[1].wait()
        restarted = _client(tmp_path, certs, port, 1, "client1-restarted.log")
        processes.append(restarted)
        assert server.wait(timeout=180) == 0, server_log.read_text()[-3000:]
        for process in (clients[0], clients[2], restarted):
            assert process.wait(timeout=60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    rounds = _lines(tmp_path / "server" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3], "no round lost"
    steps = [(r["client"], r["step"]) for r in _lines(metrics)]
    assert len(steps) == len(set(steps)), "no step logged (applied) twice"
    by_client = {c: sorted(s for cc, s in steps if cc == c) for c in ("0", "1", "2")}
    assert by_client["0"] == list(range(1, 25)) and by_client["2"] == list(range(1, 25))
    # Client 1 lost the round it was killed in (its half-done steps were rolled back with the round, which ran again
    # without it) and trained in the other two; the restarted process rejoined from its checkpoint of round 1.
    assert by_client["1"] == list(range(1, 17))
    # ... and rounds.jsonl does not list it among round 2's participants
    assert [r["participants"] for r in rounds] == [["0", "1", "2"], ["0", "2"], ["0", "1", "2"]]
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "client1" / "adapters" / "head.safetensors").is_file()


def _round_checkpoint(run: Path) -> Path | None:
    """The server's checkpoint at the end of round 1 (checkpoints are named by client steps), once written."""
    for folder in sorted((run / "checkpoints").glob("step-*")):
        progress = folder / "progress.json"
        if progress.is_file() and json.loads(progress.read_text())["round"] >= 1:
            return folder
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(root: Path, certs: Path, port: int, log: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("serve", str(CONFIG), *OVERRIDES, f"output_dir={root / 'server'}", "--certs", str(certs),
             "--address", f"127.0.0.1:{port}", *extra),
        stdout=open(root / log, "w"), stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_server_killed_after_a_round_resumes_to_the_same_result(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from splitlm.config import load_config
    from splitlm.frameworks import run_framework

    reference = load_config(CONFIG, [*OVERRIDES, f"output_dir={tmp_path / 'reference'}"])
    run_framework(reference)
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1", "2"])
    port = _free_port()
    server = _serve(tmp_path, certs, port, "server.log")
    processes = [server]
    try:
        clients = [_client(tmp_path, certs, port, i, f"client{i}.log") for i in range(3)]
        processes += clients
        deadline = time.monotonic() + 120
        while _round_checkpoint(tmp_path / "server") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _round_checkpoint(tmp_path / "server") is not None, (tmp_path / "server.log").read_text()[-3000:]
        server.kill()
        server.wait()
        resumed = _serve(tmp_path, certs, port, "server-resumed.log", "--resume")
        processes.append(resumed)
        assert resumed.wait(timeout=200) == 0, (tmp_path / "server-resumed.log").read_text()[-3000:]
        for client in clients:
            assert client.wait(timeout=60) == 0, "a client did not survive the server restart"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    ours = _lines(tmp_path / "server" / "rounds.jsonl")
    theirs = _lines(tmp_path / "reference" / "rounds.jsonl")
    assert [r["round"] for r in ours] == [1, 2, 3]
    assert [r["eval_loss"] for r in ours] == [r["eval_loss"] for r in theirs]
    trunk = load_file(str(tmp_path / "server" / "adapters" / "trunk.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "adapters" / "trunk.safetensors"))
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in trunk)
    head = load_file(str(tmp_path / "client0" / "adapters" / "head.safetensors"))
    expected_head = load_file(str(tmp_path / "reference" / "adapters" / "head.safetensors"))
    assert all(torch.equal(head[k], expected_head[k]) for k in head)


@pytest.mark.timeout(300)
def test_everything_killed_after_a_round_resumes_to_the_same_result(tmp_path: Path) -> None:
    """Server and clients all killed (SIGKILL) after round 1; all started again, the server with --resume:
    each client restores its own round checkpoint from its output_dir, and the run ends as if uninterrupted."""
    from splitlm.config import load_config
    from splitlm.frameworks import run_framework

    run_framework(load_config(CONFIG, [*OVERRIDES, f"output_dir={tmp_path / 'reference'}"]))
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1", "2"])
    port = _free_port()
    processes = [_serve(tmp_path, certs, port, "server.log")]
    processes += [_client(tmp_path, certs, port, i, f"client{i}.log") for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        while _round_checkpoint(tmp_path / "server") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _round_checkpoint(tmp_path / "server") is not None, (tmp_path / "server.log").read_text()[-3000:]
        for process in processes:
            process.kill()
            process.wait()
        resumed = _serve(tmp_path, certs, port, "server-resumed.log", "--resume")
        clients = [_client(tmp_path, certs, port, i, f"client{i}-again.log") for i in range(3)]
        processes += [resumed, *clients]
        assert resumed.wait(timeout=200) == 0, (tmp_path / "server-resumed.log").read_text()[-3000:]
        for client in clients:
            assert client.wait(timeout=60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    ours = [r["eval_loss"] for r in _lines(tmp_path / "server" / "rounds.jsonl")]
    assert ours == [r["eval_loss"] for r in _lines(tmp_path / "reference" / "rounds.jsonl")]
    assert len(ours) == 3
