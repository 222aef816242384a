"""Put a finished run back together: base weights + each part's trained adapters, merged by peft.

``splitlm generate`` and ``splitlm export`` use this. Each part is rebuilt exactly as in training, its
adapter loaded and merged into its weights; the merged parts' tensors (named as in the unsplit model) then
fill one ordinary Hugging Face model. A ``split.bottleneck`` run's learned bottlenecks at the cuts are part of its
model: ``generate`` runs them inside the assembled model (hooks at the cuts), ``export`` refuses such a run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitlm.config import Config, build_config
from splitlm.errors import CheckpointError
from splitlm.frameworks.base import framework_of
from splitlm.frameworks.setup import build_centralized, build_part, load_source, spec_of
from splitlm.models import load_full_model
from splitlm.models.lowrank import fold_into, learned_rank
from splitlm.models.split import LOWRANK, Stage
from splitlm.peft import adapters_client, load_trainable, merged, trainable_parameters


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml): pass the output_dir of a train run")
    return build_config(yaml.safe_load(path.read_text()))


def assemble(run_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Config]:
    config = load_run_config(run_dir)
    adapters = run_dir / "adapters"
    if not adapters.is_dir():
        raise CheckpointError(f"{run_dir} has no adapters/ folder: the run did not finish; resume it with --resume")
    source = load_source(config)
    framework = framework_of(config)  # a finished run: no federation is built
    if not framework.split:
        model = build_centralized(config, source)
        load_trainable(model, adapters / "model.safetensors")
        full = merged(model)
    else:
        full = load_full_model(
            source, config.model.client_dtype, config.model.client_device, config.model.attn_implementation
        )
        state: dict[str, torch.Tensor] = {}
        plain: dict[str, Stage] = {}
        # adapters/ holds one client's side (``client.json`` says whose; runs before it: client 0's) and the trunk
        # adapter it trained with (its own rank where each client has its own trunk adapter). The trunk covers
        # every client's trunk blocks: it goes first, and the client's head and tail then replace the blocks it
        # runs itself.
        first = config.for_client(adapters_client(adapters))
        trunk_config = first if framework.trunk_adapters == "client" else config
        for role in ("trunk", *spec_of(first).client_roles()):
            part, _ = build_part(trunk_config if role == "trunk" else first, source, role)
            if trainable_parameters(part):
                load_trainable(part, adapters / f"{role}.safetensors")
            plain[role] = merged(part)
            own = plain[role].state_dict().items()
            state.update({k: v.to(full.device) for k, v in own if k.split(".", 1)[0] != LOWRANK})
        _load_into(full, state)
        if learned_rank(config) is not None:
            fold_into(full, plain)
    full.eval()
    return full, source.tokenizer(), config


def _load_into(full: nn.Module, state: dict[str, torch.Tensor]) -> None:
    embed_key = next((k for k in state if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")), None)
    head_key = "lm_head.weight"
    tied = getattr(full.config, "tie_word_embeddings", False)
    if tied and embed_key and head_key in state and not torch.equal(state[embed_key], state[head_key]):
        # Both ends were fully fine-tuned on their own copies: the exported model can no longer tie them.
        full.config.tie_word_embeddings = False
        full.lm_head.weight = nn.Parameter(state[head_key].clone())
    result = full.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"merged parts hold tensors the model lacks: {result.unexpected_keys[:3]}")


def export(run_dir: Path, out: Path, force: bool = False) -> Path:
    """Write a merged model that ``AutoModelForCausalLM.from_pretrained(out)`` loads."""
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty: choose a new folder or pass --force")
    rank = learned_rank(load_run_config(run_dir))
    if rank is not None:
        raise CheckpointError(
            f"{run_dir} trained a learned rank-{rank} bottleneck at the cut, which is part of its model and has no "
            "place in a plain Hugging Face model: it cannot be exported (splitlm generate runs it)"
        )
    model, tokenizer, _ = assemble(run_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
