"""Detection with rollback across processes: `splitlm serve` with SafeSplit (``privacy.guards``) and four `splitlm
client` processes over gRPC with TLS, one of them malicious: in sflv1 a client attack that sends the server the
opposite of the trunk output's gradients (its trunk adapter change gives it away), in sflv2 a client that boosts its
update (its client side, which the server asks of the process, gives it away). The server flags it, rolls each
round it was flagged in back (the malicious process rolls back its own client side) and runs the round again
without it; the run ends bit for bit as the in-process run that leaves that client out of those rounds
(``framework.leave_out``), and logs every client step once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from network_support import serve_over_network
from safetensors.torch import load_file

from splitlm.config import load_config
from splitlm.frameworks import run_framework

pytestmark = pytest.mark.slow  # a server and four client processes: about a minute each

PLUGIN = Path(__file__).resolve().parents[1] / "privacy" / "guard_plugin.py"  # the client attack flip_grad
RUN = [
    "framework.num_clients=4", "framework.rounds=3", "train.steps=6", "train.warmup_steps=0", "lora.dropout=0.05",
    f"plugins=[{PLUGIN}]",
]  # fmt: skip
# framework -> (the malicious client's attack, the part SafeSplit first catches it by)
ATTACKS = {
    "sflv1": ("flip_grad", "trunk"),
    "sflv2": ("boost", "client_side"),
}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("framework", list(ATTACKS))
def test_a_malicious_client_process_is_caught_rolled_back_and_the_run_equals_its_leave_out_reference(
    framework: str, tmp_path: Path, write_config: Any
) -> None:
    attack, part = ATTACKS[framework]
    run = [*RUN, f"framework.name={framework}", f"privacy.client_attack={{{attack}: {{clients: [1]}}}}"]
    config = write_config(tmp_path / "config.yaml", tmp_path / "unused")
    serve_over_network(tmp_path, config, [*run, "privacy.guards=[safesplit]"], 4)
    server = tmp_path / "server"
    summary = json.loads((server / "summary.json").read_text())
    report = summary["privacy"]["guards"]["safesplit"]
    flagged = sorted({flag["round"] for flag in report["flags"]})
    assert flagged and {flag["client"] for flag in report["flags"]} == {"1"}, report
    assert report["flags"][0]["part"] == part, report
    malicious = json.loads((tmp_path / "client1" / "summary.json").read_text())
    assert attack in malicious["privacy"]["client_attacks"]  # the process that attacked is the one caught

    left_out = "framework.leave_out={" + ", ".join(f"{r}: ['1']" for r in flagged) + "}"
    reference = load_config(config, [*run, left_out, f"output_dir={tmp_path / 'reference'}"])
    run_framework(reference)
    ref = tmp_path / "reference"

    ours, theirs = lines(server / "metrics.jsonl"), lines(ref / "metrics.jsonl")
    logged = Counter((r["client"], r["step"]) for r in ours)
    assert max(logged.values()) == 1, "a rolled-back step was logged twice"
    key = lambda r: (r["round"], r["client"], r["step"])  # noqa: E731
    assert sorted((key(r), r["loss"]) for r in ours) == sorted((key(r), r["loss"]) for r in theirs)
    rounds = [(r["eval_loss"], r["participants"]) for r in lines(server / "rounds.jsonl")]
    assert rounds == [(r["eval_loss"], r["participants"]) for r in lines(ref / "rounds.jsonl")]
    assert all("1" not in rounds[r - 1][1] for r in flagged)  # the flagged rounds ran without it
    trunk, trunk_ref = (load_file(str(p / "adapters" / "trunk.safetensors")) for p in (server, ref))
    assert trunk.keys() == trunk_ref.keys() and all(torch.equal(trunk[k], trunk_ref[k]) for k in trunk)
