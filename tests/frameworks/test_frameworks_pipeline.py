"""Micro-batch pipelining (PiPar) computes the same steps as gradient accumulation over the same micro-batches.

``train.pipeline.micro_batches=N`` cuts each batch into N micro-batches; ``overlap=false`` runs them one after
another (the serial schedule), ``overlap=true`` pipelines them. The head's and the trunk's gradients accumulate
over the micro-batches in the same order either way, so losses and adapters agree (to float summation
tolerance; here they agree exactly).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import split_rows

CASES = {
    "sl-ushape": ["split.mode=ushape"],
    "sl-vanilla": ["split.mode=vanilla"],
    "sflv2-ushape": ["split.mode=ushape", "framework.name=sflv2", "framework.num_clients=3", "framework.rounds=2"],
    "sflv2-vanilla": ["split.mode=vanilla", "framework.name=sflv2", "framework.num_clients=3", "framework.rounds=2"],
}


def _run(make_config, name: str, *overrides: str) -> Path:
    config = make_config(name, "train.steps=4", "train.pipeline.micro_batches=2", *overrides)
    run_framework(config)
    return Path(config.output_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_equals_unpipelined(case: str, make_config, run_files) -> None:
    serial = _run(make_config, "serial", "train.pipeline.overlap=false", *CASES[case])
    piped = _run(make_config, "piped", *CASES[case])
    expected, actual = run_files.metrics(serial), run_files.metrics(piped)
    assert [(r["client"], r["step"]) for r in actual] == [(r["client"], r["step"]) for r in expected]
    assert [r["loss"] for r in actual] == pytest.approx([r["loss"] for r in expected], rel=1e-6, abs=1e-7)
    assert [r["bytes_up"] for r in actual] == [r["bytes_up"] for r in expected]
    parts = ["head", "trunk"] + (["tail"] if "ushape" in case else [])
    reference, adapters = run_files.adapters(serial, *parts), run_files.adapters(piped, *parts)
    assert set(adapters) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(adapters[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize(("rows", "parts", "expected"), [
    (list(range(4)), 2, [[0, 1], [2, 3]]),
    (list(range(5)), 2, [[0, 1, 2], [3, 4]]),
    (list(range(3)), 4, [[0], [1], [2]]),  # never an empty micro-batch
    (list(range(4)), 1, [[0, 1, 2, 3]]),
])  # fmt: skip
def test_split_rows_cuts_contiguous_even_micro_batches(rows, parts, expected) -> None:
    assert split_rows(rows, parts) == expected


def test_more_micro_batches_than_rows_is_a_config_error(make_config) -> None:
    from splitlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.pipeline\.micro_batches"):
        make_config("bad", "train.pipeline.micro_batches=8")
