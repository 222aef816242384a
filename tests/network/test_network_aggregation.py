"""The asynchronous strategies on the virtual clock over gRPC: `splitlm serve` and three `splitlm client` processes
compute the in-process run to the last bit (sflv2 with async, gsfl with semi_async): the order the updates are applied
in, the versions each client trains from and their staleness follow from the config, not from which process
answered first."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from splitlm.config import load_config
from splitlm.frameworks import run_framework
from splitlm.transport.security import make_dev_certs

CLIENTS = 3
COMMON = [
    f"framework.num_clients={CLIENTS}", "framework.rounds=2", "train.steps=4", "data.partition=iid",
    "train.progress=false",
]  # fmt: skip
CASES = {
    "sflv2-async": [
        "framework.name=sflv2", "framework.clients=[{speed: 1}, {speed: 1}, {speed: 2}]",
        "framework.aggregation.async.clock=steps",
    ],
    "gsfl-semi_async": [
        "framework.name=gsfl", "framework.groups=[[0, 1], [2]]", "framework.aggregation.semi_async.clock=steps",
    ],
}  # fmt: skip
LISTENING = re.compile(r"splitlm server listening on 127\.0\.0\.1:(\d+)")
TIMEOUT = 200.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", *args]


def _pump(stream: Any, lines: queue.Queue[str | None], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        lines.put(line)
    lines.put(None)


def _over_network(root: Path, config: Path, overrides: list[str]) -> None:
    """Serve ``config`` to three client processes into ``root/server``; raise with their logs if any fails."""
    certs = root / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], [str(i) for i in range(CLIENTS)])
    assert os.environ.get("SPLITLM_CACHE"), "the session fixture should have set SPLITLM_CACHE"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out: list[str] = []
    server = subprocess.Popen(
        _cli("serve", str(config), *overrides, f"output_dir={root / 'server'}", "--certs", str(certs),
             "--address", "127.0.0.1:0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
    )  # fmt: skip
    clients: list[subprocess.Popen] = []
    logs = [(root / f"client{i}.log").open("w") for i in range(CLIENTS)]
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(server.stdout, lines, out), daemon=True).start()
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            found = LISTENING.search(line)
            port = int(found.group(1)) if found else None
        assert port is not None, "".join(out)
        for i in range(CLIENTS):
            command = _cli(
                "client", str(config), *overrides, f"output_dir={root / f'client{i}'}", "--server", f"127.0.0.1:{port}",
                "--client-id", str(i), "--certs", str(certs),
            )  # fmt: skip
            clients.append(subprocess.Popen(command, stdout=logs[i], stderr=subprocess.STDOUT, text=True, env=env))
        rcs = [proc.wait(timeout=TIMEOUT) for proc in (server, *clients)]
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for handle in logs:
            handle.close()
    said = "".join(out) + "".join((root / f"client{i}.log").read_text()[-2000:] for i in range(CLIENTS))
    assert rcs == [0] * (CLIENTS + 1), said


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(CASES))
def test_the_clocked_strategies_over_grpc_compute_the_in_process_run(case: str, write_config, tmp_path: Path) -> None:
    overrides = [*COMMON, *CASES[case]]
    config = write_config(tmp_path / "config.yaml", tmp_path / "unused")
    local = tmp_path / "local"
    run_framework(load_config(config, [*overrides, f"output_dir={local}"]))
    _over_network(tmp_path, config, overrides)
    served = tmp_path / "server"
    steps = [
        sorted((r["round"], r["client"], r["step"], r["loss"]) for r in _lines(d / "metrics.jsonl"))
        for d in (local, served)
    ]
    assert steps[0] == steps[1] and len(steps[0]) == CLIENTS * 4
    rounds = [[r["eval_loss"] for r in _lines(d / "rounds.jsonl")] for d in (local, served)]
    assert rounds[0] == rounds[1] and len(rounds[0]) == 2
    summaries = [json.loads((d / "summary.json").read_text())["aggregation"] for d in (local, served)]
    assert summaries[0] == summaries[1] and summaries[0]["clock"] == "steps"
