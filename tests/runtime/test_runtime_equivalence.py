"""One-client split learning reproduces the centralized (unsplit) run: same losses, same trained adapters.

The centralized baseline runs the unsplit Hugging Face model with peft LoRA; the ``sl`` runs exchange
messages between a client (head [+ tail]) and a server (trunk). LoRA adapters are seeded per module name,
so the two start from identical weights and, with the same data order, must take the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.frameworks import run_framework

CASES = {
    # Gradient accumulation over two micro-batches and a clip norm far below the gradient norm (~0.3):
    # each party scales its gradients by the coefficient computed from the *global* norm.
    "llama-accum-clip": ("model.name=tiny-llama", "train.grad_accum=2", "train.max_grad_norm=0.01"),
    # GPT-2: Conv1D layers (fused c_attn), learned positions, and dropout inside the model (0.1): the baseline
    # reseeds its random stream where the split's parts begin, so it draws the split run's dropout masks.
    "gpt2": ("model.name=tiny-gpt2", "lora.target_modules=[c_attn]", "train.steps=6"),
    # Qwen2: an untied LM head and sliding-window layers.
    "qwen2": ("model.name=tiny-qwen2", "split.head_layers=2", "lora.target_modules=[q_proj, v_proj]"),
}
FRAMEWORKS = {
    # the baseline is told the cut it is compared with (it draws dropout where each part begins)
    "centralized": ("framework.name=centralized", "split.mode=ushape", "split.tail_layers=1"),
    "centralized-vanilla": ("framework.name=centralized", "split.mode=vanilla", "split.tail_layers=0"),
    "ushape": ("framework.name=sl", "split.mode=ushape", "split.tail_layers=1"),
    "vanilla": ("framework.name=sl", "split.mode=vanilla", "split.tail_layers=0"),
}
BASELINE = {"ushape": "centralized", "vanilla": "centralized-vanilla"}
PARTS = {"ushape": ("head", "trunk", "tail"), "vanilla": ("head", "trunk")}

# Losses: the forward passes are bit-identical (see test_split_forward), so the first step's loss is equal
# to the last bit, and without clipping every step is (0 difference measured). With clipping, the split
# run sums the squared gradient norm per party (client + server), in a different order than the
# centralized sum: the clip coefficient differs by ~1e-8 relative and later losses by <= 3e-7 (measured),
# far below 1e-5. A real divergence (a missed gradient, a wrong scale or clip) moves a loss by > 1e-4.
LOSS_ATOL = 1e-5
# Adapters: the same rounding noise, carried through AdamW over the steps; measured <= 6e-8 with
# clipping, 0 without, while trained lora_B entries are ~1e-2.
ADAPTER_ATOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fast_config, run_files) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("equivalence")
    done: dict[tuple[str, str], Path] = {}
    for case, overrides in CASES.items():
        for framework, extra in FRAMEWORKS.items():
            out = root / f"{case}-{framework}"
            run_framework(fast_config(out, *overrides, *extra))
            done[case, framework] = out
    return done


def _losses(run_files, out: Path) -> list[float]:
    return [record["loss"] for record in run_files.metrics(out)]


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_losses_equal_centralized(runs, run_files, case: str, mode: str) -> None:
    expected = _losses(run_files, runs[case, BASELINE[mode]])
    actual = _losses(run_files, runs[case, mode])
    assert len(expected) >= 5
    assert len(actual) == len(expected)
    assert actual[0] == expected[0]
    assert actual == pytest.approx(expected, rel=0, abs=LOSS_ATOL)
    # The runs train: the losses are not all the same number.
    assert max(expected) - min(expected) > 1e-3


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_adapters_equal_centralized(runs, run_files, case: str, mode: str) -> None:
    expected = run_files.adapters(runs[case, BASELINE[mode]], "model")
    actual = run_files.adapters(runs[case, mode], *PARTS[mode])
    assert sorted(actual) == sorted(expected)
    lora_b = [key for key in expected if "lora_B" in key]
    assert lora_b and all(expected[key].abs().max() > 1e-4 for key in lora_b), "training moved every adapter"
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=ADAPTER_ATOL, msg=lambda m, k=key: f"{k}: {m}")


def test_clipping_and_accumulation_were_active(runs, run_files) -> None:
    records: list[dict[str, Any]] = run_files.metrics(runs["llama-accum-clip", "centralized"])
    assert all(r["grad_norm"] > 10 * 0.01 for r in records), "the clip norm must bind on every step"
    split = run_files.metrics(runs["llama-accum-clip", "ushape"])
    # Two micro-batches of 4 sequences per step: about twice the tokens of one micro-batch.
    single = run_files.metrics(runs["qwen2", "ushape"])
    assert [r["tokens"] for r in split] == [r["tokens"] for r in records]
    assert min(r["tokens"] for r in split) > max(r["tokens"] for r in single) * 1.2
    for a, b in zip(split, records, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["lr"] == b["lr"]
