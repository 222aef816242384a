"""The asynchronous strategies on the virtual clock over gRPC: `splitlm serve` and three `splitlm client` processes
compute the in-process run to the last bit (sflv2 with async, gsfl with semi_async): the order the updates are applied
in, the versions each client trains from and their staleness follow from the config, not from which process
answered first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from network_support import serve_over_network

from splitlm.config import load_config
from splitlm.frameworks import run_framework

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
    serve_over_network(tmp_path, config, overrides, CLIENTS)
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
