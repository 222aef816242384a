"""Per-architecture knowledge: where the blocks live and how to run a slice of them.

A ``Family`` names the modules of a Hugging Face causal LM by their attribute paths, so a ``Stage`` can keep
exactly the modules it owns under the *same* names as the unsplit model (its state-dict keys and LoRA keys
are a subset of the full model's). The family also runs what the HF model's ``forward`` does around the
blocks — embeddings, attention masks, rotary position embeddings, final norm and LM head — using the same
transformers functions, so a split model computes what the unsplit one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from splitlm.errors import ModelError

MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass(frozen=True)
class Family:
    """How one architecture is laid out. Paths are dotted attribute paths from the ``*ForCausalLM`` module."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # the ModuleList of blocks
    embeddings: tuple[str, ...]  # modules the head needs before the first block
    final: tuple[str, ...]  # modules after the last block (final norm, LM head), applied in order
    shared: tuple[str, ...]  # weightless modules every part needs (rotary embeddings)
    lora_targets: tuple[str, ...]  # default LoRA target modules
    uses_rotary: bool

    def layer_type(self, config: PretrainedConfig, index: int) -> str:
        types = getattr(config, "layer_types", None)
        return types[index] if types else "full_attention"

    def embed(self, stage: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, d) entering the first block."""
        return self.embed_vectors(stage, get_module(stage, self.embeddings[0])(input_ids), position_ids)

    def embed_vectors(self, stage: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token vectors (B, T, d), as the token embedding gives them -> hidden states entering the first block
        (GPT-2 adds its learned positions here; the others use rotary positions inside the blocks)."""
        if self.name == "gpt2":
            hidden = inputs_embeds + get_module(stage, "transformer.wpe")(position_ids).to(inputs_embeds.device)
            return get_module(stage, "transformer.drop")(hidden)
        return inputs_embeds

    def token_embeddings(self, stage: nn.Module) -> torch.Tensor:
        """The (V, d) vectors the token embedding gives each id, scale included (Gemma 3 scales by sqrt(d))."""
        module = get_module(stage, self.embeddings[0])
        scale = getattr(module, "embed_scale", None)
        weight = module.weight
        if scale is None:
            return weight  # no copy: most families use the matrix as it is
        return weight * (scale.to(weight.dtype) if torch.is_tensor(scale) else scale)

    def block_inputs(
        self,
        stage: nn.Module,
        config: PretrainedConfig,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        layer_indices: list[int],
    ) -> dict[int, dict[str, Any]]:
        """Keyword arguments for each block of the stage: its attention mask and position embeddings."""
        kinds = {self.layer_type(config, i) for i in layer_indices}
        masks: dict[str, Any] = {}
        for kind in kinds:
            builder = MASK_BUILDERS.get(kind)
            if builder is None:
                raise ModelError(f"{config.model_type}: attention type {kind!r} is not supported by splitlm yet")
            masks[kind] = builder(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
            )
        rotary: dict[str, Any] = {}
        if self.uses_rotary:
            module = get_module(stage, self.shared[0])
            for kind in kinds:
                if hasattr(module, "layer_types"):  # Gemma3: one rotary table per attention type
                    rotary[kind] = module(hidden, position_ids, kind)
                else:
                    rotary[kind] = module(hidden, position_ids=position_ids)
        out: dict[int, dict[str, Any]] = {}
        for i in layer_indices:
            kind = self.layer_type(config, i)
            kwargs: dict[str, Any] = {"attention_mask": masks[kind], "position_ids": position_ids}
            if self.uses_rotary:
                kwargs["position_embeddings"] = rotary[kind]
            out[i] = kwargs
        return out

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, stage: nn.Module, config: PretrainedConfig, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last block (B, T, d) -> logits (B, T, V)."""
        for path in self.final:
            hidden = get_module(stage, path)(hidden)
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap is not None:
            hidden = torch.tanh(hidden / softcap) * softcap
        return hidden


_LLAMA_LIKE = dict(
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final=("model.norm", "lm_head"),
    shared=("model.rotary_emb",),
    lora_targets=("q_proj", "v_proj"),
    uses_rotary=True,
)

FAMILIES: tuple[Family, ...] = (
    Family(name="llama", model_types=("llama", "mistral"), **_LLAMA_LIKE),
    Family(name="qwen2", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE),
    Family(name="gemma3", model_types=("gemma3_text",), **_LLAMA_LIKE),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe", "transformer.drop"),
        final=("transformer.ln_f", "lm_head"),
        shared=(),
        lora_targets=("c_attn",),
        uses_rotary=False,
    ),
)


def family_for(config: PretrainedConfig) -> Family:
    """The family of a model config, or a ``ModelError`` listing the supported model types."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            if getattr(config, "use_bidirectional_attention", False):
                raise ModelError(f"{config.model_type} with bidirectional attention is not a causal LM split")
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ModelError(
        f"model type {config.model_type!r} is not supported for splitting; supported: {', '.join(supported)}"
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
