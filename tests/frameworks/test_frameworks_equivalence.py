"""With one client there is nothing to parallelise or average: every framework is sequential split learning.

The reference is the single-client ``sl`` path (``train`` in loop.py), itself checked against the unsplit
model elsewhere. With one client, psl's barrier is 1 (one trunk update per step, as in sl), sflv1's one
server adapter ``client-0`` is initialised like sl's (same seed) and FedAvg of one state with any weight
returns it unchanged (x * w / w in float64, rounded back to float32, is x). The data order and each
party's learning-rate schedule span the same steps. No operation differs, so losses agree bit for bit:
the comparison is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.frameworks import run_framework


def _losses(run_files, run_dir: Path) -> list[float]:
    return [record["loss"] for record in run_files.metrics(run_dir)]


# adapters/trunk.safetensors holds the trunk adapter the final client side was trained with (for sflv1, the
# one client's own adapter ``client-0``).
TRUNK = {"sl": "trunk", "psl": "trunk", "sflv1": "trunk"}


@pytest.fixture(scope="module")
def reference_run(fast_config, tmp_path_factory, run_files) -> Path:
    """Single-client sl (the single-client path), 4 steps."""
    out = tmp_path_factory.mktemp("reference")
    run_framework(fast_config(out, "framework.name=sl", "train.steps=4"))
    assert len(run_files.metrics(out)) == 4
    return out


@pytest.fixture(scope="module")
def reference(reference_run, run_files) -> list[float]:
    return _losses(run_files, reference_run)


def _assert_same_adapters(run_files, reference_run: Path, run: Path, name: str) -> None:
    expected = run_files.adapters(reference_run, "head", "tail", "trunk")
    actual = run_files.adapters(run, "head", "tail", TRUNK[name])
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("name", ["sflv1", "psl"])
def test_one_client_one_round_matches_sl(name, make_config, run_files, reference, reference_run) -> None:
    config = make_config(name, f"framework.name={name}", "framework.num_clients=1", "train.steps=4")
    summary = run_framework(config)
    metrics = run_files.metrics(Path(config.output_dir))
    assert [r["loss"] for r in metrics] == reference
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert {r["client"] for r in metrics} == {"0"}
    assert {r["round"] for r in metrics} == {1}
    assert summary["num_clients"] == 1 and summary["rounds"] == 1
    _assert_same_adapters(run_files, reference_run, Path(config.output_dir), name)


@pytest.mark.parametrize("name", ["sl", "sflv1", "psl"])
def test_one_client_two_rounds_matches_sl(name, make_config, run_files, reference, reference_run) -> None:
    # sl with rounds=2 takes the multi-client path; two rounds of 2 local steps are the same 4 steps.
    config = make_config(
        name, f"framework.name={name}", "framework.num_clients=1", "framework.rounds=2", "train.steps=4"
    )
    run_framework(config)
    metrics = run_files.metrics(Path(config.output_dir))
    assert [r["loss"] for r in metrics] == reference
    assert [r["round"] for r in metrics] == [1, 1, 2, 2]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    _assert_same_adapters(run_files, reference_run, Path(config.output_dir), name)
