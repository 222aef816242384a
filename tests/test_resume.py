"""An interrupted run resumed from its checkpoint ends exactly where an uninterrupted run ends.

Two interruptions: Ctrl-C (SIGINT), after which the run finishes the step it is in and checkpoints it; and a
hard stop in the middle of a step (an exception), after which ``--resume`` goes back to the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import interrupt_run
from splitlm.errors import CheckpointError
from splitlm.frameworks import run_framework
from splitlm.frameworks.centralized import CentralizedClient
from splitlm.runtime.client import SplitClient

STEPS, SAVE_EVERY, INTERRUPT_AT = 6, 3, 4  # checkpoint after step 3; interrupted while running step 5


def _config(fast_config, out: Path, *extra: str):
    # The whole schedule (warmup 1, linear decay over 6 steps) is fixed by train.steps, so both runs use 6.
    return fast_config(out, f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", *extra)


CASES = {
    "sl-ushape": (SplitClient, ("split.mode=ushape", "split.tail_layers=1"), ("head", "trunk", "tail")),
    "sl-vanilla": (SplitClient, ("split.mode=vanilla", "split.tail_layers=0"), ("head", "trunk")),
    "centralized": (CentralizedClient, ("framework.name=centralized",), ("model",)),
    # a defense with trained state (noise scales, their Adam moments, the prior) resumes from the checkpoint too
    "sl-ushape-mi_bottleneck": (
        SplitClient,
        ("split.mode=ushape", "split.tail_layers=1", "privacy.defenses.mi_bottleneck.lr=0.05"),
        ("head", "trunk", "tail"),
    ),
}
# (how the run is interrupted while step 5 runs, metric lines left, checkpoints left)
STOPS = {
    "ctrl-c": ("sigint", [1, 2, 3, 4, 5], ["step-000003", "step-000005"]),
    "hard": ("raise", [1, 2, 3, 4], ["step-000000", "step-000003"]),
}


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, fast_config, run_files, case: str, stop: str) -> None:
    client_class, extra, parts = CASES[case]
    how, lines, kept = STOPS[stop]
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(_config(fast_config, a, *extra))

    # 0-based: steps 1-4 are done and logged, step 3 is checkpointed; Ctrl-C while step 5 runs: it finishes, then
    # the run stops (a hard stop: it stops mid-step)
    interrupt_run(_config(fast_config, b, *extra), INTERRUPT_AT, hard=how == "raise", client_class=client_class)
    assert [r["step"] for r in run_files.metrics(b)] == lines
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == kept
    assert not (b / "summary.json").exists()

    run_framework(_config(fast_config, b, *extra), resume=True)

    metrics_a, metrics_b = run_files.metrics(a), run_files.metrics(b)
    # A step that ran after the last checkpoint has its line replaced by the resumed run's own.
    assert [r["step"] for r in metrics_b] == list(range(1, STEPS + 1))
    # The resumed process restores adapters, optimizer moments, schedule position and RNG state, and
    # replays the same data order: every number is the same computation, so equality is exact.
    for key in ("loss", "lr", "grad_norm", "tokens", "bytes_up", "bytes_down"):
        assert [r[key] for r in metrics_b] == [r[key] for r in metrics_a], key
    assert len({r["loss"] for r in metrics_a}) == STEPS  # the runs really train

    adapters_a, adapters_b = run_files.adapters(a, *parts), run_files.adapters(b, *parts)
    assert sorted(adapters_a) == sorted(adapters_b)
    for key, value in adapters_a.items():
        assert torch.equal(adapters_b[key], value), key

    summary_a, summary_b = run_files.summary(a), run_files.summary(b)
    for key in ("eval_loss_before", "eval_loss_after", "bytes_up", "bytes_down", "tokens", "steps"):
        assert summary_b[key] == summary_a[key], key


def test_resume_without_checkpoint_is_a_checkpoint_error(tmp_path: Path, fast_config) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoints/step-\* folder; start the run without --resume"):
        run_framework(_config(fast_config, tmp_path / "fresh"), resume=True)


def test_ctrl_c_without_save_every_resumes(tmp_path: Path, fast_config, run_files) -> None:
    """No train.save_every: Ctrl-C still leaves a checkpoint of the last finished step, and --resume works."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(fast_config(a, f"train.steps={STEPS}"))
    interrupt_run(fast_config(b, f"train.steps={STEPS}"), 1, match="interrupted after step 2; checkpoint written")
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-000000", "step-000002"]
    run_framework(fast_config(b, f"train.steps={STEPS}"), resume=True)
    assert [r["loss"] for r in run_files.metrics(b)] == [r["loss"] for r in run_files.metrics(a)]
    assert run_files.summary(b)["eval_loss_after"] == run_files.summary(a)["eval_loss_after"]


@pytest.mark.parametrize("framework", ["psl", "sflv2"])
def test_ctrl_c_in_a_multi_client_round_stops_cleanly_and_resumes(
    tmp_path: Path, fast_config, run_files, framework: str
) -> None:
    """Clients on threads (psl: waiting at a step barrier) stop without hanging; the run resumes from its last
    round and ends as an uninterrupted run does (psl sums the clients' trunk gradients in arrival order)."""
    common = (f"framework.name={framework}", "framework.num_clients=2", "framework.rounds=2", "train.steps=4")
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(fast_config(a, *common))
    interrupt_run(fast_config(b, *common), 2, "1", match="continues from the checkpoint of round 1")
    assert [r["round"] for r in run_files.rounds(b)] == [1]
    run_framework(fast_config(b, *common), resume=True)
    ours, theirs = run_files.rounds(b), run_files.rounds(a)
    assert [r["round"] for r in ours] == [1, 2]
    tolerance = 1e-6 if framework == "psl" else 0.0
    assert ours[-1]["eval_loss"] == pytest.approx(theirs[-1]["eval_loss"], rel=tolerance, abs=0)


# --- a resume that changes the run's length, or something else -------------------------------------------------


def test_a_finished_run_resumed_with_more_steps_trains_on_with_the_new_schedule(
    tmp_path: Path, fast_config, run_files, capsys
) -> None:
    """As a Hugging Face Trainer resumed with a larger max_steps: the run goes on to the new total; from the
    checkpoint on, every step's learning rate is what a fresh run of the new length has at that step; config.yaml
    changes in train.steps only, and a line says so."""
    a, fresh = tmp_path / "a", tmp_path / "fresh"
    run_framework(_config(fast_config, a))
    saved = yaml.safe_load((a / "config.yaml").read_text())
    before = run_files.metrics(a)
    run_framework(fast_config(fresh, "train.steps=9"))
    capsys.readouterr()

    summary = run_framework(fast_config(a, "train.steps=9", f"train.save_every={SAVE_EVERY}"), resume=True)

    err = capsys.readouterr().err
    assert "splitlm: resume: train.steps 6 -> 9 (config.yaml updated)" in err, err
    metrics = run_files.metrics(a)
    assert [r["step"] for r in metrics] == list(range(1, 10))  # trained on, not nothing
    assert metrics[:STEPS] == before  # the steps done stay as they were
    theirs = run_files.metrics(fresh)
    assert [r["lr"] for r in metrics[STEPS:]] == [r["lr"] for r in theirs[STEPS:]]
    assert [r["lr"] for r in metrics[STEPS:]] != [0.0] * 3  # not the old schedule, which ended at 0 on step 6
    assert (summary["steps"], summary["local_steps"], summary["rounds"]) == (9, 9, 1)
    assert run_files.summary(a)["steps"] == 9
    assert [r["round"] for r in run_files.rounds(a)] == [1]  # the one round, now of 9 steps
    assert yaml.safe_load((a / "config.yaml").read_text()) == {**saved, "train": {**saved["train"], "steps": 9}}


def test_a_multi_round_run_extends_by_rounds_of_the_same_length(tmp_path: Path, fast_config, run_files, capsys) -> None:
    common = ("framework.name=sflv2", "framework.num_clients=2")
    a, fresh = tmp_path / "a", tmp_path / "fresh"
    run_framework(fast_config(a, *common, "framework.rounds=2", "train.steps=4"))  # 2 rounds of 2 steps
    saved_config = (a / "config.yaml").read_bytes()

    # fewer steps per round would change the rounds already done; fewer rounds than done cannot be
    for wrong, said in (
        (("framework.rounds=3",), "the rounds done had 2 steps per client and would now have 1"),
        (("framework.rounds=1", "train.steps=2"), "the run has done 2 rounds already"),
    ):
        with pytest.raises(CheckpointError, match=said):
            run_framework(fast_config(a, *common, *wrong), resume=True)
        assert (a / "config.yaml").read_bytes() == saved_config

    run_framework(fast_config(a, *common, "framework.rounds=3", "train.steps=6"), resume=True)
    assert "splitlm: resume: framework.rounds 2 -> 3, train.steps 4 -> 6" in capsys.readouterr().err
    assert [r["round"] for r in run_files.rounds(a)] == [1, 2, 3]
    run_framework(fast_config(fresh, *common, "framework.rounds=3", "train.steps=6"))
    ours, theirs = run_files.metrics(a), run_files.metrics(fresh)
    key = lambda r: (r["client"], r["step"])  # noqa: E731
    assert sorted((key(r), r["lr"]) for r in ours if r["round"] == 3) == sorted(
        (key(r), r["lr"]) for r in theirs if r["round"] == 3
    )
    assert run_files.summary(a)["steps"] == 2 * 6


def test_a_resume_that_would_change_the_run_is_refused_naming_the_keys(tmp_path: Path, fast_config, run_files) -> None:
    a = tmp_path / "a"
    run_framework(_config(fast_config, a))
    kept = {name: (a / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    with pytest.raises(CheckpointError) as refused:
        run_framework(_config(fast_config, a, "lora.rank=8", "data.max_rows=100", "train.steps=9"), resume=True)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("--resume: data.max_rows (200 -> 100), lora.rank (4 -> 8) differ from the run in")
    assert "train.steps" not in line  # a length change alone would be taken
    # where and how it runs may change: taken, and not written into the run's config
    run_framework(_config(fast_config, a, "train.eval_every=2"), resume=True)
    assert {name: (a / name).read_bytes() for name in kept if name != "summary.json"} == {
        name: value for name, value in kept.items() if name != "summary.json"
    }
    assert run_files.summary(a)["steps"] == STEPS


def test_serve_refuses_the_same_changes_before_it_listens(tmp_path: Path, fast_config) -> None:
    """The networked server prepares its output_dir with the same code: refused before a port is opened."""
    from splitlm.deploy.serve import serve

    common = ("framework.name=sflv2", "framework.num_clients=2", "framework.rounds=2", "train.steps=4")
    a = tmp_path / "a"
    run_framework(fast_config(a, *common))
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"t0": "0", "t1": "1"}))
    with pytest.raises(CheckpointError, match=r"--resume: split\.head_layers \(1 -> 2\) differ"):
        serve(fast_config(a, *common, "split.head_layers=2"), "127.0.0.1:0", None, tokens, resume=True)
