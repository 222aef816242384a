"""Make a part trainable: LoRA through the ``peft`` library, full fine-tuning, or frozen.

LoRA weights are initialised from a generator seeded by (run seed, module name in the unsplit model), so a
module starts from the same adapter whether it sits in a head, a trunk, a tail or the whole model. That is
what lets a split run reproduce the centralized run step by step.

The modules a caller names in ``always`` (a part's learned bottleneck at the cut, ``models/lowrank.py``) always
train: with LoRA they are peft's ``modules_to_save`` (a trained copy per adapter, saved with the adapter's
tensors), with ``full`` more trainable weights, and a ``frozen`` part still trains them (they are new and only
initialised, so the part's pretrained weights stay frozen and they alone learn).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from splitlm.config import ResolvedLora
from splitlm.errors import CheckpointError, ConfigError

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def canonical_name(name: str) -> str:
    """A module or tensor name as it is in the unsplit Hugging Face model."""
    return name.removeprefix(PEFT_PREFIX)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{canonical_name(name)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def seeded_init(model: nn.Module, seed: int, adapter: str) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        generator = _generator(seed, name)
        if adapter in module.lora_A:
            weight = module.lora_A[adapter].weight
            fresh = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                weight.copy_(fresh)
                module.lora_B[adapter].weight.zero_()
        if adapter in module.lora_embedding_A:
            b = module.lora_embedding_B[adapter]
            fresh = torch.empty(b.shape, dtype=torch.float32).normal_(generator=generator)
            with torch.no_grad():
                module.lora_embedding_A[adapter].zero_()
                b.copy_(fresh)


def peft_config(
    settings: ResolvedLora, default_targets: tuple[str, ...], modules_to_save: list[str] | None = None
) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or default_targets),
        bias="none",
        modules_to_save=modules_to_save or None,
    )


def make_trainable(
    module: nn.Module,
    settings: ResolvedLora,
    default_targets: tuple[str, ...],
    seed: int,
    part: str,
    always: Sequence[str] = (),
) -> nn.Module:
    """Return the part ready to train: a ``PeftModel`` (lora), the module itself (full, frozen). The submodules
    named in ``always`` train whatever the method (see the module's docstring)."""
    module.requires_grad_(False)
    wires = list(always)
    if settings.method == "frozen":
        for name in wires:
            module.get_submodule(name).requires_grad_(True)
        return module
    if settings.method == "full":
        module.requires_grad_(True)
        return module
    targets = list(settings.target_modules or default_targets)
    apart = {name.split(".", 1)[0] for name in wires}  # not the part's own modules: no LoRA target among them
    own = [(name, m) for name, m in module.named_modules() if name and name.split(".", 1)[0] not in apart]
    leaves = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in own}
    if not any(target in leaves for target in targets):
        linear = sorted(n for n, kind in leaves.items() if kind in ("Linear", "Conv1D"))
        raise ConfigError(
            f"lora.{part}.target_modules: none of {targets} is a module of this part; choose from {linear}"
        )
    model = get_peft_model(module, peft_config(settings, default_targets, wires))
    seeded_init(model, seed, ADAPTER)
    return model


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed, under unsplit-model names: LoRA weights, or every weight of a full part."""
    if isinstance(module, PeftModel):
        state = get_peft_model_state_dict(module)
    else:
        state = {name: p for name, p in module.named_parameters() if p.requires_grad}
    return {canonical_name(k): v.detach().cpu().clone() for k, v in state.items()}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Inverse of ``trainable_state``; every expected tensor must be there with the right shape."""
    expected = trainable_state(module)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: adapter tensors do not match this part (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "was it saved with the same split and lora settings?"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    if isinstance(module, PeftModel):
        result = set_peft_model_state_dict(module, {PEFT_PREFIX + k: v for k, v in state.items()})
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{what}: peft rejected {result.unexpected_keys[:3]}")
    else:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)


def save_trainable(module: nn.Module, path: Path) -> None:
    """Write the trainable state as safetensors through a temporary file and an atomic rename."""
    state = trainable_state(module)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def load_trainable(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run directory is incomplete")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    load_trainable_state(module, state, str(path))


def adapters_client(adapters: Path) -> int:
    """The client whose side an ``adapters/`` folder holds (its ``client.json``; 0 for runs written before it)."""
    path = adapters / "client.json"
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text())["client"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f'{path} is unreadable ({error}); it should hold {{"client": N}}') from None


def merged(module: nn.Module) -> nn.Module:
    """The plain module with LoRA folded into its weights (peft's merge), for export and generation."""
    if isinstance(module, PeftModel):
        return module.merge_and_unload()
    return module
