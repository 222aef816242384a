"""Head -> trunk -> (tail) computes what the unsplit Hugging Face model computes, for every tiny architecture.

The reference is the unsplit model loaded by ``transformers`` itself (``load_full_model`` is a thin wrapper
around ``AutoModelForCausalLM.from_pretrained``), so the expected logits do not come from splitlm's code.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, T5Config

from splitlm.errors import ModelError
from splitlm.models import (
    TINY_MODELS,
    ModelSource,
    SplitSpec,
    family_for,
    load_full_model,
    load_stage,
    resolve_model,
)

PAD = 257  # the tiny byte tokenizer's pad id
LENGTHS = (12, 9, 5)  # > the sliding window (8) of tiny-qwen2 and tiny-gemma3, so the window matters

CUTS = [
    SplitSpec("ushape", 1, 1),
    SplitSpec("ushape", 0, 2),
    SplitSpec("ushape", 3, 0),
    SplitSpec("ushape", 2, 1),
    SplitSpec("vanilla", 1, 0),
    SplitSpec("vanilla", 3, 0),
]


def _cut_id(spec: SplitSpec) -> str:
    return f"{spec.mode}-{spec.head_layers}-{spec.tail_layers}"


@functools.cache
def _full(name: str) -> nn.Module:
    return load_full_model(resolve_model(name)).eval()


def _batch(padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and attention mask (B, T) of three sequences of different lengths."""
    generator = torch.Generator().manual_seed(7)
    length = max(LENGTHS)
    ids = torch.full((len(LENGTHS), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(LENGTHS), length), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, span] = torch.randint(0, 256, (n,), generator=generator)
        mask[row, span] = 1
    return ids, mask


def _split_logits(name: str, spec: SplitSpec, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    source = resolve_model(name)
    stages = {role: load_stage(source, spec, role).eval() for role in spec.roles()}
    with torch.no_grad():
        hidden = stages["head"](input_ids=ids, attention_mask=mask)  # (B, T, d)
        out = stages["trunk"](hidden_states=hidden, attention_mask=mask)  # (B, T, d) or (B, T, V)
        if "tail" in stages:
            out = stages["tail"](hidden_states=out, attention_mask=mask)  # (B, T, V)
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("spec", CUTS, ids=_cut_id)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_split_logits_equal_unsplit_model(name: str, spec: SplitSpec, padding_side: str) -> None:
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        expected = _full(name)(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    actual = _split_logits(name, spec, ids, mask)
    real = mask.bool()
    assert actual.shape == expected.shape
    assert torch.isfinite(expected[real]).all()
    # The split runs the same transformers modules (embeddings, masks, rotary tables, blocks, norm, LM head)
    # in the same order on the same float32 inputs, so every operation sees identical operands: the
    # logits agree to the last bit. A 1e-6 tolerance would still catch any real difference (a skipped
    # or repeated block, a wrong mask or position changes logits by ~1e-2 or more, see the test below).
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_comparison_is_sensitive_to_mask_and_cut(name: str) -> None:
    ids, mask = _batch("right")
    spec = SplitSpec("ushape", 1, 1)
    reference = _split_logits(name, spec, ids, mask)

    # Hiding one real token of row 0 must change that row's later logits.
    hidden_token = mask.clone()
    hidden_token[0, 2] = 0
    changed = _split_logits(name, spec, ids, hidden_token)
    assert (changed[0, 3:] - reference[0, 3:]).abs().max() > 1e-3

    # Running the trunk twice (an off-by-one cut would do something like it) must change the logits too.
    source = resolve_model(name)
    head, trunk, tail = (load_stage(source, spec, role).eval() for role in spec.roles())
    with torch.no_grad():
        hidden = head(input_ids=ids, attention_mask=mask)
        for _ in range(2):
            hidden = trunk(hidden_states=hidden, attention_mask=mask)
        twice = tail(hidden_states=hidden, attention_mask=mask)
    assert (twice[mask.bool()] - reference[mask.bool()]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (SplitSpec("ushape", 3, 3), r"impossible cut.*6 blocks"),
        (SplitSpec("ushape", 6, 0), r"impossible cut"),
        (SplitSpec("ushape", 0, 6), r"impossible cut"),
        (SplitSpec("vanilla", 6, 0), r"impossible cut"),
        (SplitSpec("ushape", 7, 1), r"impossible cut"),
        (SplitSpec("ushape", -1, 1), r">= 0"),
        (SplitSpec("ushape", 1, -1), r">= 0"),
        (SplitSpec("vanilla", -2, 0), r">= 0"),
    ],
    ids=lambda v: _cut_id(v) if isinstance(v, SplitSpec) else None,
)
@pytest.mark.parametrize("role", ["head", "trunk"])
def test_impossible_or_negative_cuts_raise_model_error(spec: SplitSpec, match: str, role: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_stage(resolve_model("tiny-llama"), spec, role)


def test_vanilla_split_has_no_tail() -> None:
    with pytest.raises(ModelError, match="vanilla split has no tail"):
        load_stage(resolve_model("tiny-llama"), SplitSpec("vanilla", 1, 0), "tail")


def _tiny_bert(folder: Path) -> Path:
    BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config", [BertConfig(num_hidden_layers=2), T5Config(num_layers=2)], ids=["bert", "t5"])
def test_family_for_unsupported_type_names_the_supported_ones(config) -> None:
    with pytest.raises(ModelError, match=rf"{config.model_type!r} is not supported.*supported: .*llama"):
        family_for(config)


def test_unsupported_architecture_on_disk_raises_model_error(tmp_path: Path) -> None:
    source = resolve_model(str(_tiny_bert(tmp_path / "bert")))
    assert isinstance(source, ModelSource)
    with pytest.raises(ModelError, match=r"'bert' is not supported for splitting; supported: .*gpt2"):
        load_stage(source, SplitSpec("ushape", 1, 0), "head")
    with pytest.raises(ModelError, match=r"'bert' is not supported"):
        load_full_model(source)


def test_directory_without_config_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_trunk_spread_over_several_devices_computes_the_same() -> None:
    """``model.server_device=cuda:0,cuda:1`` spreads the trunk's blocks; here over CPU "devices" (the code path
    that moves activations and masks between blocks runs; a GPU machine moves them for real)."""
    from splitlm.models.split import parse_devices

    source = resolve_model("tiny-qwen2")
    spec = SplitSpec("vanilla", 1, 0)
    one = load_stage(source, spec, "trunk").eval()
    spread = load_stage(source, spec, "trunk", device="cpu,cpu,cpu").eval()
    assert sorted(spread.block_devices) == [1, 2, 3, 4, 5] and not one.block_devices
    head = load_stage(source, spec, "head").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        hidden = head(input_ids=ids, attention_mask=mask)
        assert torch.equal(
            spread(hidden_states=hidden, attention_mask=mask), one(hidden_states=hidden, attention_mask=mask)
        )
    assert [d.type for d in parse_devices("cpu, cpu")] == ["cpu", "cpu"]
    with pytest.raises(ModelError, match="device 'gpu:0'"):
        parse_devices("gpu:0")
