"""Each part holds exactly its own parameters, read from exactly its own tensors in the checkpoint."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

import splitlm.models.split as split_module
from splitlm.models import TINY_MODELS, SplitSpec, Stage, load_full_model, load_stage, resolve_model

# Attribute paths of the modules around the blocks, per tiny model (as in the Hugging Face classes).
LAYOUT = {
    "tiny-llama": ("model.layers.", ("model.embed_tokens.",), ("model.norm.", "lm_head.")),
    "tiny-qwen2": ("model.layers.", ("model.embed_tokens.",), ("model.norm.", "lm_head.")),
    "tiny-gemma3": ("model.layers.", ("model.embed_tokens.",), ("model.norm.", "lm_head.")),
    "tiny-gpt2": ("transformer.h.", ("transformer.wte.", "transformer.wpe."), ("transformer.ln_f.", "lm_head.")),
}
TIED = {"tiny-llama": True, "tiny-qwen2": False, "tiny-gemma3": True, "tiny-gpt2": True}
SPECS = [SplitSpec("ushape", 1, 1), SplitSpec("ushape", 0, 2), SplitSpec("vanilla", 2, 0)]


@functools.cache
def _full(name: str) -> nn.Module:
    return load_full_model(resolve_model(name))


def _names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters(remove_duplicate=False)}


def _layers_of(names: set[str], prefix: str) -> set[int]:
    return {int(n[len(prefix) :].split(".")[0]) for n in names if n.startswith(prefix)}


def _stages(name: str, spec: SplitSpec) -> dict[str, Stage]:
    return {role: load_stage(resolve_model(name), spec, role) for role in spec.roles()}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-{s.head_layers}-{s.tail_layers}")
@pytest.mark.parametrize("name", TINY_MODELS)
def test_parts_partition_the_full_model(name: str, spec: SplitSpec) -> None:
    layers, embeddings, final = LAYOUT[name]
    full = _full(name)
    stages = _stages(name, spec)
    names = {role: _names(stage) for role, stage in stages.items()}
    total = full.config.num_hidden_layers

    # Blocks: each part has exactly the blocks of its cut, under the unsplit model's names.
    for role, stage in stages.items():
        assert _layers_of(names[role], layers) == set(spec.layers(role, total)) == set(stage.layer_indices)
    assert _layers_of(names["trunk"], layers).isdisjoint(
        _layers_of(set().union(*(names[r] for r in spec.client_roles())), layers)
    )

    # Embeddings only in the head; final norm + LM head only in the part that ends the model.
    ends = "tail" if spec.mode == "ushape" else "trunk"
    for role in stages:
        has_embedding = any(n.startswith(embeddings) for n in names[role])
        has_final = {p for p in final if any(n.startswith(p) for n in names[role])}
        assert has_embedding == (role == "head"), role
        assert has_final == (set(final) if role == ends else set()), role

    # Together the parts hold every parameter of the full model exactly once (the tied LM head, which
    # the full model shares with the input embedding, is a separate copy in the part that ends it).
    full_names = _names(full)
    assert set().union(*names.values()) == full_names
    assert sum(len(n) for n in names.values()) == len(full_names)
    full_count = sum(p.numel() for p in full.parameters())  # counts a tied weight once
    split_count = sum(p.numel() for stage in stages.values() for p in stage.parameters())
    lm_head = full.get_output_embeddings().weight.numel()
    assert split_count == full_count + (lm_head if TIED[name] else 0)

    # Values: each parameter equals the full model's, and nothing is left on the meta device.
    reference = dict(full.named_parameters(remove_duplicate=False))
    for stage in stages.values():
        for param_name, param in stage.named_parameters():
            assert param.device.type == "cpu", param_name
            assert torch.equal(param, reference[param_name]), param_name
        for buffer_name, buffer in stage.named_buffers():
            assert buffer.device.type == "cpu", buffer_name


@pytest.mark.parametrize("name", TINY_MODELS)
def test_ushape_server_holds_no_embedding_norm_or_lm_head(name: str) -> None:
    layers, embeddings, final = LAYOUT[name]
    trunk = load_stage(resolve_model(name), SplitSpec("ushape", 1, 1), "trunk")
    names = _names(trunk)
    assert names, "the trunk holds its blocks"
    assert all(n.startswith(layers) for n in names), sorted(n for n in names if not n.startswith(layers))
    assert not any(n.startswith((*embeddings, *final)) for n in names)
    assert trunk.get_submodule(layers.rstrip(".")).keys() == {"1", "2", "3", "4"}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_vanilla_server_holds_final_norm_and_lm_head_but_no_embedding(name: str) -> None:
    layers, embeddings, final = LAYOUT[name]
    trunk = load_stage(resolve_model(name), SplitSpec("vanilla", 1, 0), "trunk")
    names = _names(trunk)
    assert not any(n.startswith(embeddings) for n in names)
    for prefix in final:
        assert any(n.startswith(prefix) for n in names), prefix
    assert _layers_of(names, layers) == {1, 2, 3, 4, 5}


class _SafeOpenSpy:
    """Wraps ``safe_open`` as used by ``load_stage`` and records every tensor key it reads."""

    def __init__(self, real: Any) -> None:
        self.read: list[str] = []
        self.real = real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spy = self

        class Handle:
            def __init__(self, handle: Any) -> None:
                self.handle = handle

            def __enter__(self) -> Handle:
                self.handle.__enter__()
                return self

            def __exit__(self, *exc: Any) -> None:
                self.handle.__exit__(*exc)

            def get_tensor(self, key: str) -> torch.Tensor:
                spy.read.append(key)
                return self.handle.get_tensor(key)

            def __getattr__(self, attr: str) -> Any:
                return getattr(self.handle, attr)

        return Handle(self.real(*args, **kwargs))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_load_stage_reads_only_its_own_tensors(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = LAYOUT[name][0]
    source = resolve_model(name)
    spec = SplitSpec("ushape", 1, 1)
    all_keys = set(source.weight_files)
    read: dict[str, list[str]] = {}
    real = split_module.safe_open
    for role in spec.roles():
        spy = _SafeOpenSpy(real)
        monkeypatch.setattr(split_module, "safe_open", spy)
        load_stage(source, spec, role)
        read[role] = spy.read

    def block_keys(indices: set[int]) -> set[str]:
        return {k for k in all_keys if k.startswith(layers) and int(k[len(layers) :].split(".")[0]) in indices}

    for role, keys in read.items():
        assert len(keys) == len(set(keys)), f"{role} read a tensor twice"
    assert set(read["trunk"]) == block_keys({1, 2, 3, 4})
    assert set(read["head"]) == block_keys({0}) | {"model.embed_tokens.weight"}
    # A tied LM head is filled from the embedding tensor; an untied one from its own.
    lm_head_key = "model.embed_tokens.weight" if TIED[name] else "lm_head.weight"
    assert set(read["tail"]) == block_keys({5}) | {"model.norm.weight", lm_head_key}
    # Every checkpoint tensor is read by exactly one part (the tied embedding by head and tail).
    assert set().union(*map(set, read.values())) == all_keys
