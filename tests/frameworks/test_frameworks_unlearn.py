"""Split unlearning (survey §5.24): SplitWiper's isolation and ``splitlm unlearn``.

An isolated run (``framework.aggregation=splitwiper`` on gsfl: each group of clients a shard of its own) confines a
client's influence to its shard: changing another shard's data leaves a shard bit-identical. Unlearning a client
retrains only its shard and gives exactly what training without the client gives; unlearning a run trained without
isolation resumes the last checkpoint before the client joined and gives exactly the ``framework.leave_out``
reference. Refusals are one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitlm.cli.main import main
from splitlm.data.partition import PARTITIONERS, register_partitioner
from splitlm.errors import CheckpointError, ConfigError
from splitlm.frameworks.driver import run_framework
from splitlm.frameworks.unlearn import unlearn

ISOLATED = (
    "framework.name=gsfl", "framework.num_clients=4", "framework.groups=[[0, 1], [2, 3]]", "framework.rounds=2",
    "framework.local_steps=2", "framework.aggregation={splitwiper: {warmup_rounds: 1}}", "train.warmup_steps=0",
)  # fmt: skip
SHIFTED = "test-shifted"  # clients 0 and 1 keep their rows; clients 2 and 3 get others
ROWS = 12


class Shifted:
    """Client i holds rows [i*ROWS, (i+1)*ROWS); with ``shift`` clients 2 and 3 hold rows further on instead."""

    shift = 0

    def __call__(self, labels, num_clients, seed, sources=None) -> list[list[int]]:
        return [
            list(range(i * ROWS + (self.shift if i >= 2 else 0), (i + 1) * ROWS + (self.shift if i >= 2 else 0)))
            for i in range(num_clients)
        ]


@pytest.fixture
def shifted() -> Iterator[str]:
    register_partitioner(SHIFTED)(Shifted)
    yield SHIFTED
    PARTITIONERS.remove(SHIFTED)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files under ``folder``, keyed by file and name."""
    return {
        f"{path.relative_to(folder)}:{k}": v for path in sorted(folder.rglob("*.safetensors")) for k, v in
        load_file(str(path)).items()
    }  # fmt: skip


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _train(make_config, name: str, *overrides: str) -> Path:
    config = make_config(name, *overrides)
    run_framework(config)
    return Path(config.output_dir)


def test_a_shard_does_not_depend_on_the_other_shards_data(
    make_config, shifted: str, run_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _train(make_config, "first", *ISOLATED, f"data.partition={shifted}")
    monkeypatch.setattr(Shifted, "shift", 2 * ROWS)
    other = _train(make_config, "other", *ISOLATED, f"data.partition={shifted}")
    shard = "adapters/shards/shard-{}"
    assert _same(_tensors(first / shard.format(0)), _tensors(other / shard.format(0)))  # bit for bit
    assert not _same(_tensors(first / shard.format(1)), _tensors(other / shard.format(1)))  # its data changed
    summary = run_files.summary(first)
    assert summary["aggregation"]["shards"] == [["0", "1"], ["2", "3"]]
    assert summary["aggregation"]["trained_shards"] == [0, 1]


def test_heads_freeze_after_the_warm_up_and_the_tail_trains_on(make_config) -> None:
    run = _train(make_config, "frozen", *ISOLATED, "framework.rounds=3")
    second, third = (load_file(str(f / "isolation" / "shard-0.safetensors")) for f in sorted(run.glob("checkpoints/*")))
    heads = load_file(str(run / "adapters/shards/shard-0/head.safetensors"))
    assert set(heads) < set(third)
    assert any(bool(v.abs().sum()) for k, v in heads.items() if "lora_B" in k)  # the warm-up trained the head
    assert all(torch.equal(second[k], third[k]) for k in heads)  # frozen in rounds 2 and 3
    assert not all(torch.equal(second[k], third[k]) for k in third if k not in heads)  # the tail still learns


@pytest.mark.parametrize(
    ("mode", "groups", "client", "retrained"),
    [
        ("ushape", "[[0, 1], [2, 3]]", "1", ["0"]),
        ("vanilla", "[[0, 1], [2, 3]]", "2", ["3"]),  # after the warm-up the clients only send (one way)
        ("ushape", "[[0], [1, 2, 3]]", "0", []),
    ],
    ids=["retrain-shard", "retrain-shard-vanilla", "drop-shard"],
)
def test_unlearning_an_isolated_run_equals_training_without_the_client(
    make_config, run_files, tmp_path: Path, mode: str, groups: str, client: str, retrained: list[str]
) -> None:
    options = (*ISOLATED, f"framework.groups={groups}", f"split.mode={mode}")
    run = _train(make_config, "run", *options)
    before = _tensors(run)
    record = unlearn(run, client, tmp_path / "unlearned")
    reference = _train(make_config, "reference", *options, f"framework.leave_out={{1: ['{client}'], 2: ['{client}']}}")
    out = tmp_path / "unlearned"
    assert record["mode"] == "isolated" and record["retrained"] == retrained
    assert _same(_tensors(out / "adapters"), _tensors(reference / "adapters"))
    ours, theirs = run_files.summary(out), run_files.summary(reference)
    assert ours["eval_loss_after"] == theirs["eval_loss_after"]
    assert ours["aggregation"]["trained_shards"] == theirs["aggregation"]["trained_shards"]
    assert json.loads((out / "unlearn.json").read_text())["seconds"] > 0
    assert _same(_tensors(run), before)  # the original run is untouched


def test_exact_unlearning_resumes_before_the_client_joined(make_config, run_files, tmp_path: Path) -> None:
    common = ("framework.name=sflv1", "framework.num_clients=3", "framework.rounds=3", "framework.local_steps=1")
    run = _train(make_config, "run", *common, "framework.leave_out={1: ['2'], 2: ['2']}")  # client 2 joins in round 3
    record = unlearn(run, "2", tmp_path / "unlearned")
    reference = _train(make_config, "reference", *common, "framework.leave_out={1: ['2'], 2: ['2'], 3: ['2']}")
    out = tmp_path / "unlearned"
    assert record["mode"] == "exact" and record["joined_round"] == 3 and record["rounds_retrained"] == 1
    assert _same(_tensors(out / "adapters"), _tensors(reference / "adapters"))
    assert not _same(_tensors(out / "adapters"), _tensors(run / "adapters"))  # the client had changed the model
    assert [r["participants"] for r in run_files.rounds(out)] == [["0", "1"]] * 3
    assert run_files.summary(out)["eval_loss_after"] == run_files.summary(reference)["eval_loss_after"]


def test_unlearning_refuses_in_one_line(make_config, tmp_path: Path) -> None:
    run = _train(make_config, "run", "framework.name=sflv2", "framework.num_clients=2", "framework.rounds=3",
                 "framework.local_steps=1")  # fmt: skip
    refusals = [
        (lambda: unlearn(run, "7", tmp_path / "a"), ConfigError, "clients 0..1"),
        (lambda: unlearn(run, "1", tmp_path / "b"), CheckpointError, "--full-retrain"),  # joined in round 1
        (lambda: unlearn(tmp_path / "empty", "0", tmp_path / "c"), CheckpointError, "no config.yaml"),
        (lambda: unlearn(run, "0", run), CheckpointError, "new folder"),
    ]
    (tmp_path / "empty").mkdir()
    for call, error, said in refusals:
        with pytest.raises(error, match=said) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written for a refused request


def test_the_cli_unlearns_into_a_new_folder(make_config, tmp_path: Path, capsys) -> None:
    run = _train(make_config, "run", "framework.name=sflv2", "framework.num_clients=2", "framework.rounds=3",
                 "framework.local_steps=1")  # fmt: skip
    assert main(["unlearn", str(run), "--client", "1"]) == 5
    assert "--full-retrain" in capsys.readouterr().err
    out = tmp_path / "forgotten"
    assert main(["unlearn", str(run), "--client", "1", "--full-retrain", "--out", str(out)]) == 0
    record = json.loads((out / "unlearn.json").read_text())
    assert record["mode"] == "full_retrain" and record["client"] == "1"
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["mode"] == "full_retrain"


def test_isolation_needs_shards(make_config) -> None:
    config = make_config("bad", "framework.name=sflv1", "framework.num_clients=2", "framework.aggregation=splitwiper")
    with pytest.raises(ConfigError, match=r"framework\.name=gsfl") as caught:
        run_framework(config)
    assert "\n" not in str(caught.value)
