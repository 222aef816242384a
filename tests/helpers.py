"""Test harnesses shared across test modules: a run stopped by Ctrl-C (or a hard stop) at a chosen step, the
gradients an optimizer steps on, and a served run with its client in threads of the test's process."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.config import Config
from splitlm.errors import Interrupted
from splitlm.frameworks import run_framework
from splitlm.runtime.client import SplitClient
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.tracking import scalars


def interrupt_run(
    config: Config,
    step: int,
    client_id: str | None = None,
    hard: bool = False,
    match: str | None = None,
    client_class: type = SplitClient,
) -> None:
    """Run ``config`` and stop it when client ``client_id`` (any client, if None) starts its 0-based ``step``:
    Ctrl-C (SIGINT: the run finishes that step, checkpoints and raises ``Interrupted``, whose message must match
    ``match``), or ``hard`` (``KeyboardInterrupt`` mid-step: a resume goes back to the last checkpoint)."""
    real_step = client_class.train_step

    def interrupted(self, at: int, micro_batches):
        if at == step and (client_id is None or self.client_id == client_id):
            if hard:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, at, micro_batches)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_class, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt if hard else Interrupted, match=match):
            run_framework(config)


def capture_grads(optimizer: PartyOptimizer, into: list[torch.Tensor | None]) -> None:
    """Record into ``into`` the gradients ``optimizer`` steps on (before clipping), every step."""
    original = optimizer.step

    def step(coefficient: float) -> None:
        into.extend(None if p.grad is None else p.grad.clone() for p in optimizer.params)
        original(coefficient)

    optimizer.step = step  # type: ignore[method-assign]


def serve_one_client_in_threads(server_config: Config, client_config: Config, root: Path) -> dict[str, Any]:
    """`splitlm serve` of ``server_config`` in a thread and its one client (id 0) of ``client_config`` in this one,
    over gRPC on loopback (no TLS, a token): returns the server's summary (an error the server raised is raised)."""
    from splitlm.deploy.agent import run_client
    from splitlm.deploy.serve import serve

    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"t0": "0"}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    served: dict[str, Any] = {}

    def server() -> None:
        try:
            served["summary"] = serve(server_config, address, None, tokens, connect_timeout=60.0)
        except BaseException as error:  # raised in the test's thread below
            served["error"] = error

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    run_client(client_config, "0", address, "t0", None, connect_timeout=60.0)
    thread.join(timeout=120)
    if "error" in served:
        raise served["error"]
    assert "summary" in served, "the server did not finish within 120 s of its client"
    return served["summary"]


# --- train.report_to: what a run's trackers must hold -------------------------------------------------


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_events(folder: Path) -> Any:
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return accumulator


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """What a tracker must hold: every number of metrics.jsonl (under client<ID>/, at the client's step) and
    of rounds.jsonl (under round/, at the round)."""
    wanted: dict[str, dict[int, float]] = {}
    for record in jsonl_lines(run / "metrics.jsonl"):
        for key, value in scalars(record, ("step", "client")).items():
            wanted.setdefault(f"client{record['client']}/{key}", {})[record["step"]] = value
    rounds = run / "rounds.jsonl"  # a networked client writes none
    for record in jsonl_lines(rounds) if rounds.is_file() else []:
        for key, value in scalars(record, ("round",)).items():
            wanted.setdefault(f"round/{key}", {})[record["round"]] = value
    return wanted


def assert_events_hold(run: Path, wanted: dict[str, dict[int, float]]) -> Any:
    """``run/tb``'s TensorBoard event files, read back by TensorBoard's reader, hold exactly ``wanted``."""
    events = read_events(run / "tb")
    assert set(events.Tags()["scalars"]) == set(wanted)
    for tag, points in wanted.items():
        logged = {event.step: event.value for event in events.Scalars(tag)}
        assert logged == pytest.approx(points, rel=1e-6, abs=1e-30), tag  # event files hold float32
    return events
