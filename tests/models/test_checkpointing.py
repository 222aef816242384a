"""``model.gradient_checkpointing`` and ``model.trust_remote_code``.

Checkpointing trades memory for a second forward pass of each block and changes nothing else: a run with it has
the plain run's losses (to 1e-6) for every framework shape, with LoRA dropout on (the recomputation draws the same
masks), and each part keeps fewer tensors for its backward pass. ``trust_remote_code`` reaches transformers' loaders:
a model folder that ships its own config class gets it only when the option is on, with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.frameworks import run_framework
from splitlm.frameworks.setup import build_part, load_source
from splitlm.models import resolve_model
from splitlm.runtime.rng import seeded

DROPOUT = ("lora.dropout=0.1", "train.steps=3")
SHAPES = {
    "ushape": [],
    "vanilla": ["split.mode=vanilla", "split.tail_layers=0"],
    "sflv2-two-clients": ["framework.name=sflv2", "framework.num_clients=2"],
    "centralized": ["framework.name=centralized"],
}


def _losses(run: Path) -> list[tuple[str, int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["client"], r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_checkpointing_keeps_the_losses(shape: str, fast_config: Any, tmp_path: Path) -> None:
    plain = run_framework(fast_config(tmp_path / "plain", *DROPOUT, *SHAPES[shape]))
    saved = run_framework(fast_config(tmp_path / "ckpt", *DROPOUT, *SHAPES[shape], "model.gradient_checkpointing=true"))
    expected, got = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert [key[:2] for key in got] == [key[:2] for key in expected] and len(got) >= 3
    for (_, _, want), (_, _, have) in zip(expected, got, strict=True):
        assert have == pytest.approx(want, abs=1e-6)
    assert saved["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], abs=1e-6)
    assert plain["eval_loss_after"] != plain["eval_loss_before"]  # it trained


def _saved_bytes(part: torch.nn.Module, stage: Any, inputs: dict[str, torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
    """Bytes the autograd graph keeps for the backward pass of one forward, and the trainable parameters' grads."""
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    part.train()
    with seeded(0, "test"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = part(**inputs)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in part.parameters() if p.requires_grad]
    part.zero_grad()
    return kept, grads


@pytest.mark.parametrize("role", ["head", "trunk", "tail"])
def test_each_part_keeps_less_for_backward_and_gets_the_same_gradients(
    role: str, fast_config: Any, tmp_path: Path
) -> None:
    config = fast_config(tmp_path / "run", "lora.dropout=0.1", "split.head_layers=2", "split.tail_layers=2")
    part, stage = build_part(config, load_source(config), role)
    torch.manual_seed(1)
    ids = torch.randint(0, 250, (2, 24))
    hidden = torch.randn(2, 24, stage.config.hidden_size)
    inputs = {"input_ids": ids} if role == "head" else {"hidden_states": hidden}
    plain_bytes, plain_grads = _saved_bytes(part, stage, inputs)
    stage.gradient_checkpointing = True
    kept_bytes, kept_grads = _saved_bytes(part, stage, inputs)
    assert kept_bytes < plain_bytes
    assert plain_grads and sum(float(g.abs().sum()) for g in plain_grads) > 0  # (LoRA's B starts at 0: A has none)
    for want, have in zip(plain_grads, kept_grads, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-6)


SHIPPED = {  # a model folder's own code: its config and model classes (what auto_map names)
    "configuration_shipped.py": """
from transformers import LlamaConfig


class ShippedConfig(LlamaConfig):
    shipped = True
""",
    "modeling_shipped.py": """
from transformers import LlamaForCausalLM

from .configuration_shipped import ShippedConfig


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
""",
}


def test_trust_remote_code_loads_the_models_own_code(
    fast_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shipped-model"
    shutil.copytree(resolve_model("tiny-llama").path, folder)
    for name, text in SHIPPED.items():
        (folder / name).write_text(text)
    meta = json.loads((folder / "config.json").read_text())
    meta["auto_map"] = {
        "AutoConfig": "configuration_shipped.ShippedConfig",
        "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(meta))
    assert not getattr(resolve_model(str(folder)).config(), "shipped", False)  # off: transformers' own class
    with caplog.at_level(logging.WARNING):
        source = resolve_model(str(folder), trust_remote_code=True)
    assert source.config().shipped is True
    assert any("trust_remote_code" in record.getMessage() for record in caplog.records)
    config = fast_config(tmp_path / "run", f"model.name={folder}", "model.trust_remote_code=true", "train.steps=1")
    assert load_source(config).trust_remote_code
    summary = run_framework(config)
    assert summary["steps"] == 1
