"""An interrupted run resumed from its checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.errors import CheckpointError
from splitlm.frameworks import run_framework
from splitlm.frameworks.centralized import CentralizedLearner
from splitlm.frameworks.sl import SplitLearner

STEPS, SAVE_EVERY, INTERRUPT_AT = 6, 3, 4  # checkpoint after step 3; interrupted while running step 5


def _config(fast_config, out: Path, *extra: str):
    # The whole schedule (warmup 1, linear decay over 6 steps) is fixed by train.steps, so both runs use 6.
    return fast_config(out, f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", *extra)


CASES = {
    "sl-ushape": (SplitLearner, ("split.mode=ushape", "split.tail_layers=1"), ("head", "trunk", "tail")),
    "sl-vanilla": (SplitLearner, ("split.mode=vanilla", "split.tail_layers=0"), ("head", "trunk")),
    "centralized": (CentralizedLearner, ("framework.name=centralized",), ("model",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_uninterrupted_run(
    tmp_path: Path, fast_config, run_files, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    learner_class, extra, parts = CASES[case]
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(_config(fast_config, a, *extra))

    real_step = learner_class.train_step

    def interrupted(self, step, micro_batches):
        if step == INTERRUPT_AT:  # 0-based: steps 1-4 are done and logged, step 3 is checkpointed
            raise KeyboardInterrupt
        return real_step(self, step, micro_batches)

    with monkeypatch.context() as patch:
        patch.setattr(learner_class, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_framework(_config(fast_config, b, *extra))
    assert [r["step"] for r in run_files.metrics(b)] == [1, 2, 3, 4]
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-000003"]
    assert not (b / "summary.json").exists()

    run_framework(_config(fast_config, b, *extra), resume=True)

    metrics_a, metrics_b = run_files.metrics(a), run_files.metrics(b)
    # Step 4 ran after the checkpoint, so its line is replaced by the resumed run's own step 4.
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
