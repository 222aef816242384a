"""``framework.merge`` (MiniBatch-SFL / SCALA, survey §3.1.2) in whole runs.

psl: merging the clients' smashed data into one trunk batch changes how the server computes a step, not what it
computes: per-client losses, client sides and the trunk adapter agree with the unmerged run to float32 round-off
(a merged batch sums in other orders than one client's batch; Adam's first steps, about lr x sign(gradient), keep
such differences at round-off size). sflv2: merge=K trains the shuffled order K clients at a time, one trunk step
per step of the K from their mean gradient. With K identical clients (same data, same start) that mean is one
client's gradient, so 4 identical clients merged 2 at a time must train exactly as 2 of them one at a time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splitlm.frameworks import run_framework
from splitlm.runtime.server.handlers import Handlers
from splitlm.runtime.server.merge import MergedPasses

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
PSL = ("framework.name=psl", "framework.num_clients=3", "train.steps=2")
PADDED = ("train.seq_len=256", "train.batch_size=2")  # rows of other lengths: every client's batch has its own T
PIPELINED = ("train.pipeline.micro_batches=2", "train.pipeline.overlap=true", "server.max_pending=1")


@pytest.fixture
def trunk_passes(monkeypatch) -> list[list[tuple[int, int]]]:
    """(rows, tokens) of each client's forward in every training trunk pass the run's server makes."""
    passes: list[list[tuple[int, int]]] = []
    merged, plain = MergedPasses._merged_inputs, Handlers.trunk_forward

    def spy_merged(self: MergedPasses, part: list[Any]) -> Any:
        passes.append([tuple(h.hidden.shape[:2]) for h in part])
        return merged(self, part)

    def spy_plain(self: Handlers, message: Any) -> Any:
        passes.append([tuple(message.tensors["hidden"].shape[:2])])
        return plain(self, message)

    monkeypatch.setattr(MergedPasses, "_merged_inputs", spy_merged)
    monkeypatch.setattr(Handlers, "trunk_forward", spy_plain)
    return passes


def _losses(run_files, out: Path) -> dict[tuple[str, int], float]:
    return {(r["client"], r["step"]): r["loss"] for r in run_files.metrics(out)}


def _final(out: Path) -> dict[str, torch.Tensor]:
    """Every client side and the trunk adapter of the run's last checkpoint."""
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    return {
        f"{path.parent.name}/{path.stem}/{key}": value
        for path in sorted(last.glob("*/*.safetensors"))
        if path.stem in ("head", "tail", "trunk")
        for key, value in load_file(str(path)).items()
    }


def _assert_close_runs(run_files, reference: Path, merged: Path) -> None:
    expected, actual = _losses(run_files, reference), _losses(run_files, merged)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-5), key
    expected_state, actual_state = _final(reference), _final(merged)
    assert expected_state.keys() == actual_state.keys()
    assert any(k.startswith("server/") for k in expected_state)
    for key in expected_state:
        torch.testing.assert_close(actual_state[key], expected_state[key], **TOLERANCE, msg=key)


@pytest.mark.parametrize(
    ("overrides", "passes"),
    [
        ((), [3, 3]),  # one pass of the three clients per step
        (PADDED, [3, 3]),  # ... padded to the longest
        (("split.mode=vanilla",), [3, 3]),  # the server's loss: the three losses summed, one backward
        (("framework.merge_max_tokens=256",), [2, 1, 2, 1]),  # 4 x 32 tokens each: two fit under the cap
        (("framework.merge=2",), [2, 1, 2, 1]),  # K = 2 of the barrier's 3
        (PIPELINED, [3] * 4),  # one merge per micro-batch, both sent before either reply comes
    ],
    ids=["merge3", "padded", "vanilla", "token-cap", "merge2", "pipelined"],
)
def test_psl_merged_steps_equal_unmerged_ones(
    make_config, run_files, trunk_passes, overrides: tuple[str, ...], passes: list[int]
) -> None:
    data = tuple(o for o in overrides if o.startswith(("train.", "split.", "server.")))
    reference = make_config("plain", *PSL, *data)
    run_framework(reference)
    plain = list(trunk_passes)
    trunk_passes.clear()
    merged = make_config("merged", *PSL, "framework.merge=3", *overrides)
    run_framework(merged)
    _assert_close_runs(run_files, Path(reference.output_dir), Path(merged.output_dir))
    assert [len(p) for p in plain] == [1] * sum(passes)  # unmerged: one pass per client forward
    assert [len(p) for p in trunk_passes] == passes
    if overrides == PADDED:  # the merged batches did mix lengths
        assert all(len({t for _, t in p}) > 1 for p in trunk_passes)


def test_sflv2_merges_clients_k_at_a_time(make_config, run_files, trunk_passes) -> None:
    config = make_config("run", "framework.name=sflv2", "framework.num_clients=4", "framework.merge=2",
                         "framework.rounds=2", "train.steps=4")  # fmt: skip
    summary = run_framework(config)
    out = Path(config.output_dir)
    # every trunk pass merges the two clients of a chunk: 2 chunks x 2 local steps x 2 rounds
    assert [len(p) for p in trunk_passes] == [2] * 8
    records = run_files.metrics(out)
    assert len(records) == 4 * 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    by_round: dict[int, list[str]] = defaultdict(list)
    for record in records:
        by_round[record["round"]].append(record["client"])
    for clients in by_round.values():  # two at a time: a chunk's two clients step together before the next two
        chunks = [set(clients[:4]), set(clients[4:])]
        assert all(len(chunk) == 2 for chunk in chunks) and not chunks[0] & chunks[1]
    trunk = run_files.adapters(out, "trunk")
    assert any(v.abs().sum() > 0 for k, v in trunk.items() if "lora_B" in k)  # the trunk trained
    assert summary["num_clients"] == 4


def test_sflv2_four_identical_clients_merged_two_at_a_time_are_two_clients(
    everyone, make_config, run_files, trunk_passes
) -> None:
    common = ("framework.name=sflv2", "framework.rounds=1", "train.steps=3", f"data.partition={everyone}")
    two = make_config("two", *common, "framework.num_clients=2")
    run_framework(two)
    assert [len(p) for p in trunk_passes] == [1] * 6
    trunk_passes.clear()
    four = make_config("four", *common, "framework.num_clients=4", "framework.merge=2")
    run_framework(four)
    assert [len(p) for p in trunk_passes] == [2] * 6  # as many trunk steps (and as long a schedule) as with two
    # each chunk of two identical clients steps as one client did: every loss twice
    losses = sorted(r["loss"] for r in run_files.metrics(Path(two.output_dir)))
    merged = sorted(r["loss"] for r in run_files.metrics(Path(four.output_dir)))
    assert merged == pytest.approx(sorted(losses * 2), rel=1e-5)
    expected = run_files.adapters(Path(two.output_dir), "head", "tail", "trunk")
    actual = run_files.adapters(Path(four.output_dir), "head", "tail", "trunk")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)
