"""Three sflv1 clients with the same data, seed and initialisation are three copies of one client.

Every client owns every example (a test partitioner), so each does exactly the same arithmetic on its own
head/tail and its own server adapter; nothing one client does may leak into another's numbers. Their
losses, client states and server adapters must then be bit-identical at every step, FedAvg of three equal
states is that state (x * (1/3) summed three times in float64 rounds back to float32 x), and the whole run
equals a one-client sflv1 run on the same data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from partitioners import EVERYONE, EveryoneGetsAll
from splitlm.data import partition
from splitlm.data.partition import PARTITIONERS, register_partitioner
from splitlm.frameworks import aggregate, run_framework


def _equal_states(states: list[dict[str, torch.Tensor]]) -> None:
    first = states[0]
    assert first
    for other in states[1:]:
        assert set(other) == set(first)
        for key in first:
            assert torch.equal(other[key], first[key]), key


def test_identical_clients_stay_identical(everyone, make_config, run_files, monkeypatch) -> None:
    # Prepare: record what each FedAvg call averages (client states, then trunk adapters, per round).
    calls: list[tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = []
    real = aggregate.fedavg

    def spy(states, weights):
        inputs = [{k: v.clone() for k, v in s.items()} for s in states]
        result = real(states, weights)
        calls.append((inputs, result))
        return result

    monkeypatch.setattr(aggregate, "fedavg", spy)  # what the sync strategy averages with
    overrides = ("framework.name=sflv1", "framework.rounds=2", "train.steps=4", f"data.partition={everyone}")
    config = make_config("three", "framework.num_clients=3", *overrides)
    # Execute
    summary = run_framework(config)
    # Assert: every client saw all the data and logged the same loss at every (round, step).
    out = Path(config.output_dir)
    assert all(c["examples"] == summary["clients"][0]["examples"] for c in summary["clients"])
    by_step: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for record in run_files.metrics(out):
        by_step[record["round"], record["step"]][record["client"]] = record["loss"]
    assert sorted(by_step) == [(1, 1), (1, 2), (2, 3), (2, 4)]
    for key, losses in by_step.items():
        assert set(losses) == {"0", "1", "2"}, key
        assert len(set(losses.values())) == 1, (key, losses)
    # Two FedAvg calls per round; each averaged three equal states, and the average is that state.
    assert len(calls) == 4
    for inputs, result in calls:
        assert len(inputs) == 3
        _equal_states([*inputs, result])
    # The server's per-client adapters are equal after the last round (final checkpoint).
    last = sorted((out / "checkpoints").glob("step-*"))[-1] / "server"
    server = [load_file(str(last / f"trunk-client-{i}.safetensors")) for i in range(3)]
    _equal_states(server)
    assert any(v.abs().sum() > 0 for k, v in server[0].items() if "lora_B" in k)  # it did train

    # ...and three copies are one: a single client on the same data gives the same losses and adapters.
    monkeypatch.setattr(aggregate, "fedavg", real)
    single = make_config("one", "framework.num_clients=1", *overrides)
    run_framework(single)
    one = run_files.metrics(Path(single.output_dir))
    assert [r["loss"] for r in one] == [by_step[r["round"], r["step"]]["0"] for r in one]
    ours = run_files.adapters(out, "head", "tail", "trunk")
    theirs = run_files.adapters(Path(single.output_dir), "head", "tail", "trunk")
    _equal_states([ours, theirs])


def test_the_test_partitioner_is_removed_again() -> None:
    register_partitioner(EVERYONE)(EveryoneGetsAll)
    try:
        assert partition.make_partitioner(EVERYONE)(["a", "b"], 3, 0) == [[0, 1]] * 3
    finally:
        PARTITIONERS.remove(EVERYONE)
    assert EVERYONE not in PARTITIONERS
