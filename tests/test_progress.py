"""Progress on stderr for loading, evaluating and profiling (per block), and none of it under train.progress=false."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from splitlm import progress
from splitlm.frameworks import run_framework
from splitlm.models import resolve_model
from splitlm.planning.profile import profile_model

SHORT = ("train.steps=1", "train.eval_batches=2")


@pytest.fixture(autouse=True)
def _restore() -> Any:
    yield
    progress.show(True)


def test_a_run_says_what_it_loads_and_evaluates(fast_config: Any, tmp_path: Path, capsys: Any) -> None:
    run_framework(fast_config(tmp_path / "on", *SHORT, "train.progress=true"))
    err = capsys.readouterr().err
    assert "splitlm: loading the model tiny-llama and the data rotten_tomatoes ..." in err
    assert "splitlm: building the parts: done in" in err
    assert "client 0 evaluating" in err


def test_plan_profiles_block_by_block(fast_config: Any, tmp_path: Path, capsys: Any) -> None:
    profile_model(fast_config(tmp_path / "plan", "plan.profile_batches=1", "train.progress=true"))
    err = capsys.readouterr().err
    assert "plan: profiling the head's blocks" in err and "/8 [" in err  # of 2 warm-up blocks, then 6


def test_quiet_under_progress_false(fast_config: Any, tmp_path: Path, capsys: Any) -> None:
    resolve_model("tiny-llama")  # the session's model cache, built once (transformers' own bar when it writes it)
    capsys.readouterr()
    run_framework(fast_config(tmp_path / "off", *SHORT, "train.progress=false"))
    profile_model(fast_config(tmp_path / "plan", "plan.profile_batches=1", "train.progress=false"))
    assert capsys.readouterr().err == ""
