"""``train.report_to`` over gRPC: a networked client (`splitlm client`) writes its own event files, with every number
of its own metrics.jsonl, and the server's hold every client's steps and the rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from network_support import serve_over_network

from helpers import assert_events_hold, expected_scalars, serve_one_client_in_threads

SETTINGS = ("train.report_to=[tensorboard]", "train.steps=3", "framework.rounds=1")


def test_a_networked_client_writes_its_own_event_files(fast_config: Any, tmp_path: Path) -> None:
    serve_one_client_in_threads(
        fast_config(tmp_path / "server", *SETTINGS), fast_config(tmp_path / "client0", *SETTINGS), tmp_path
    )
    client = expected_scalars(tmp_path / "client0")  # the client writes no rounds.jsonl: its steps only
    assert set(client) >= {"client0/loss", "client0/grad_norm"} and len(client["client0/loss"]) == 3
    assert_events_hold(tmp_path / "client0", client)
    server = expected_scalars(tmp_path / "server")
    assert server["client0/loss"] == client["client0/loss"] and "round/eval_loss" in server
    assert_events_hold(tmp_path / "server", server)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_client_processes_write_their_own_event_files(write_config: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "unused")
    overrides = [
        "train.report_to=[tensorboard]", "framework.name=sflv2", "framework.num_clients=2", "framework.rounds=2",
        "train.steps=4", "train.progress=false",
    ]  # fmt: skip
    serve_over_network(tmp_path, config, overrides, 2)
    for client in ("0", "1"):
        own = expected_scalars(tmp_path / f"client{client}")
        assert set(own) >= {f"client{client}/loss"} and len(own[f"client{client}/loss"]) == 4
        assert_events_hold(tmp_path / f"client{client}", own)
    served = expected_scalars(tmp_path / "server")
    assert {"client0/loss", "client1/loss", "round/eval_loss"} <= set(served)
    assert_events_hold(tmp_path / "server", served)
