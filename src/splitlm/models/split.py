"""Step 1 of the pipeline: cut a causal LM into head / trunk / (tail) and build each part on its own.

A part is built from a skeleton whose parameters live on the ``meta`` device (no memory), pruned to the
modules the part owns, and then filled with exactly those tensors read from the safetensors files. A
client of a 7B model therefore never holds the trunk's weights, not even briefly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

from splitlm import progress
from splitlm.errors import ModelError
from splitlm.models.families import Family, family_for, get_module
from splitlm.models.sources import ModelSource

Role = Literal["head", "trunk", "tail"]
SplitMode = Literal["vanilla", "ushape"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOWRANK = "lowrank"  # a Stage's learned bottleneck halves (split.bottleneck): lowrank.<i>.encoder / .decoder
# Held by whoever sets torch's global generator (``runtime.rng.seeded``, a checkpointed block's recomputation), so
# that two threads never draw from it at once.
RNG_LOCK = threading.RLock()


@dataclass(frozen=True)
class SplitSpec:
    """Where to cut. Vanilla: head | trunk (+ norm, LM head). U-shape: head | trunk | tail (+ norm, LM head)."""

    mode: SplitMode = "ushape"
    head_layers: int = 2
    tail_layers: int = 2

    def layers(self, role: Role, total: int) -> list[int]:
        tail = self.tail_layers if self.mode == "ushape" else 0
        if role == "head":
            return list(range(self.head_layers))
        if role == "trunk":
            return list(range(self.head_layers, total - tail))
        if self.mode != "ushape":
            raise ModelError("a vanilla split has no tail: use split.mode=ushape for a client-side tail")
        return list(range(total - tail, total))

    def roles(self) -> tuple[Role, ...]:
        return ("head", "trunk", "tail") if self.mode == "ushape" else ("head", "trunk")

    def client_roles(self) -> tuple[Role, ...]:
        return ("head", "tail") if self.mode == "ushape" else ("head",)

    def validate(self, config: PretrainedConfig) -> None:
        total = int(config.num_hidden_layers)
        tail = self.tail_layers if self.mode == "ushape" else 0
        if self.head_layers < 0 or tail < 0:
            raise ModelError("split.head_layers and split.tail_layers must be >= 0")
        if self.head_layers + tail >= total:
            raise ModelError(
                f"impossible cut: head_layers={self.head_layers} + tail_layers={tail} leaves no block for the "
                f"server, but {config.model_type} has {total} blocks; use at most {total - 1} client blocks"
            )


class Stage(nn.Module):
    """One part of a split model, holding only its own modules under the unsplit model's names.

    ``forward`` takes token ids (a head) or hidden states (trunk, tail) and returns hidden states, or
    logits for the part that ends with the LM head. ``blocks`` runs only that contiguous sub-range of the
    part's blocks (a server serving a client whose cut leaves it fewer blocks).

    With a learned bottleneck at the cuts (``split.bottleneck: K``, ``models/lowrank.py``),
    the part holds its halves in ``lowrank``: ``lowrank.<i>.decoder`` (K -> d; trunk and tail) runs on the
    hidden states it takes and ``lowrank.<i>.encoder`` (d -> K; head and U-shaped trunk) on those it returns,
    ``i`` being the first block after that cut: ``(B, T, K)`` cross the cut.
    """

    def __init__(
        self,
        role: Role,
        family: Family,
        config: PretrainedConfig,
        layer_indices: list[int],
        ends: bool,
        skeleton: nn.Module,
    ) -> None:
        super().__init__()
        for name, child in skeleton.named_children():
            self.add_module(name, child)
        self.role = role
        self.family = family
        self.config = config
        self.layer_indices = layer_indices
        self.starts = role == "head"
        self.ends = ends
        self.block_devices: dict[int, torch.device] = {}  # set when the blocks are spread over devices
        self.lowrank: nn.ModuleDict | None = None  # split.bottleneck: {"<i>": {"encoder" | "decoder": Linear}}
        self.wire_rank: int | None = None  # K when the part has a bottleneck
        # model.gradient_checkpointing: keep only each block's input for the backward pass and run the block again
        # there (less memory for activations, one more forward of the blocks)
        self.gradient_checkpointing = False

    @property
    def wire_in(self) -> nn.Module | None:
        """The bottleneck's decoder (B, T, K) -> (B, T, d) this part starts with, if any."""
        return self._wire("decoder")

    @property
    def wire_out(self) -> nn.Module | None:
        """The bottleneck's encoder (B, T, d) -> (B, T, K) this part ends with, if any."""
        return self._wire("encoder")

    def bottleneck_modules(self) -> list[str]:
        """The names of this part's learned-bottleneck halves (``lowrank.<i>.encoder``, ...), empty without any:
        they train whatever ``lora.<part>.method`` says (``peft.make_trainable``'s ``always``)."""
        return [f"{LOWRANK}.{index}.{half}" for index, cut in (self.lowrank or {}).items() for half in cut]

    def _wire(self, half: str) -> nn.Module | None:
        cuts = self.lowrank.values() if self.lowrank is not None else ()
        return next((cut[half] for cut in cuts if half in cut), None)

    @property
    def in_width(self) -> int:
        """The last dimension of the hidden states this part takes: d, or K behind a bottleneck."""
        rank = self.wire_rank if self.wire_in is not None else None
        return int(self.config.hidden_size if rank is None else rank)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def token_embeddings(self) -> torch.Tensor:
        """The head's (V, d) token vectors (what ``inputs_embeds`` holds for each id)."""
        if not self.starts:
            raise ValueError(f"the {self.role} has no token embeddings; only the head has")
        return self.family.token_embeddings(self)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The head's (B, T, d) token vectors of ``input_ids`` (rows of ``token_embeddings``, no positions)."""
        if not self.starts:
            raise ValueError(f"the {self.role} has no token embeddings; only the head has")
        return get_module(self, self.family.embeddings[0])(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        blocks: list[int] | None = None,
    ) -> torch.Tensor:
        indices = self.layer_indices if blocks is None else self._sub_range(blocks)
        if self.starts:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("the head takes input_ids or inputs_embeds (one of them)")
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        else:
            if hidden_states is None:
                raise ValueError(f"the {self.role} takes hidden_states")
            length = hidden_states.shape[1]
        device = self.device
        if position_ids is None:  # the unsplit model's default: 0..T-1 for every row
            position_ids = torch.arange(length, device=device).unsqueeze(0)
        if self.starts and inputs_embeds is not None:
            hidden_states = self.family.embed_vectors(self, inputs_embeds.to(device), position_ids)  # (B, T, d)
        elif self.starts:
            hidden_states = self.family.embed(self, input_ids, position_ids)  # (B, T, d)
        else:
            hidden_states = hidden_states.to(device=device, dtype=self.dtype)
            decoder = self.wire_in
            if decoder is not None:
                hidden_states = decoder(hidden_states)  # (B, T, K) -> (B, T, d)
        block_kwargs = self.family.block_inputs(self, self.config, hidden_states, attention_mask, position_ids, indices)
        modules = get_module(self, self.family.layers)
        for index in indices:
            kwargs = block_kwargs[index]
            target = self.block_devices.get(index)
            if target is not None and hidden_states.device != target:  # the next block lives on another device
                hidden_states, kwargs = hidden_states.to(target), _to_device(kwargs, target)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden_states = checkpoint_block(self.family.run_block, modules[str(index)], hidden_states, kwargs)
            else:
                hidden_states = self.family.run_block(modules[str(index)], hidden_states, kwargs)
        if self.ends:
            final = get_module(self, self.family.final[-1]).weight.device
            return self.family.finish(self, self.config, hidden_states.to(final))  # (B, T, V)
        encoder = self.wire_out
        if encoder is not None:
            return encoder(hidden_states.to(next(encoder.parameters()).device))  # (B, T, K)
        return hidden_states  # (B, T, d)

    def _sub_range(self, blocks: list[int]) -> list[int]:
        start = self.layer_indices.index(blocks[0]) if blocks and blocks[0] in self.layer_indices else -1
        if start < 0 or self.layer_indices[start : start + len(blocks)] != list(blocks):
            raise ModelError(
                f"blocks {blocks} are not a contiguous range of this {self.role}'s blocks {self.layer_indices}"
            )
        if (self.starts and start != 0) or (self.ends and start + len(blocks) != len(self.layer_indices)):
            raise ModelError(
                f"blocks {blocks}: a {self.role} that starts at the embeddings or ends at the LM head must keep its "
                "first or last block"
            )
        return list(blocks)


def checkpoint_block(
    run: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor],
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """``run(block, hidden, kwargs)`` under gradient checkpointing: nothing inside the block is kept for the backward
    pass, which runs the block again first. The recomputation draws the same dropout masks (LoRA's, attention's):
    it starts torch's generator from the state the forward pass had, under ``RNG_LOCK``. Non-reentrant, so the
    gradients reach the block's (LoRA) parameters whether or not ``hidden`` requires grad."""
    cuda = [hidden.device.index or 0] if hidden.device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(index) for index in cuda]

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        with RNG_LOCK, torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(cpu_state)
            for index, state in zip(cuda, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, index)
            yield

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return run(block, hidden_states, kwargs)

    out = torch.utils.checkpoint.checkpoint(
        forward, hidden, use_reentrant=False, preserve_rng_state=False,
        context_fn=lambda: (contextlib.nullcontext(), replay()),
    )  # fmt: skip
    return out  # type: ignore[no-any-return]


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def parse_devices(device: str | torch.device) -> list[torch.device]:
    """``"cuda:0"`` -> one device; ``"cuda:0,cuda:1"`` -> blocks spread over both; ``"auto"`` -> every GPU."""
    if isinstance(device, torch.device):
        return [device]
    if device == "auto":
        count = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
    names = [d.strip() for d in device.split(",") if d.strip()]
    try:
        return [torch.device(name) for name in names]
    except RuntimeError as error:
        raise ModelError(f"device {device!r}: {error}; use e.g. cpu, cuda:0, cuda:0,cuda:1 or auto") from None


def _prune(skeleton: nn.Module, family: Family, keep_layers: list[int], keep: set[str]) -> None:
    """Replace the block list by a dict of kept blocks (keys = original indices) and drop unowned modules."""
    parent_path, _, attr = family.layers.rpartition(".")
    parent = get_module(skeleton, parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleDict({str(i): blocks[i] for i in keep_layers}))
    for path in (*family.embeddings, *family.final):
        if path not in keep:
            owner_path, _, name = path.rpartition(".")
            owner = get_module(skeleton, owner_path) if owner_path else skeleton
            setattr(owner, name, None)


def _tensor_key(name: str, source: ModelSource, family: Family, config: PretrainedConfig) -> str:
    files = source.weight_files
    if name in files:
        return name
    # Checkpoints sometimes prefix keys (e.g. transformer.wte vs wte for GPT-2); try the bare name.
    bare = name.split(".", 1)[1] if "." in name else name
    if bare in files:
        return bare
    if name.endswith(("lm_head.weight",)) and getattr(config, "tie_word_embeddings", False):
        return _tensor_key(f"{family.embeddings[0]}.weight", source, family, config)
    raise ModelError(f"{source.path} has no tensor {name!r}: the checkpoint does not match its config.json")


def build_config(source: ModelSource, attn_implementation: str = "sdpa") -> PretrainedConfig:
    config = source.config()
    config._attn_implementation = attn_implementation
    return config


def load_stage(
    source: ModelSource,
    spec: SplitSpec,
    role: Role,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> Stage:
    """Build one part with only its own weights read from disk."""
    config = build_config(source, attn_implementation)
    family = family_for(config)
    spec.validate(config)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    layers = spec.layers(role, int(config.num_hidden_layers))
    ends = role == "tail" or (role == "trunk" and spec.mode == "vanilla")
    keep = set(family.embeddings if role == "head" else ()) | set(family.final if ends else ())
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, trust_remote_code=source.trust_remote_code
        )
    _prune(skeleton, family, layers, keep)
    stage = Stage(role, family, config, layers, ends, skeleton)
    names = [name for name, _ in stage.named_parameters(remove_duplicate=False)]
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        key = _tensor_key(name, source, family, config)
        by_file.setdefault(str(source.weight_files[key]), []).append((name, key))
    devices = parse_devices(device)
    first = devices[0]
    for file, pairs in by_file.items():
        with safe_open(file, "pt", device="cpu") as handle:
            for name, key in pairs:
                value = handle.get_tensor(key).to(torch_dtype)
                set_module_tensor_to_device(stage, name, first, value=value)
    stage.to(first)  # buffers (rotary tables, embedding scales) were built on the CPU
    if len(devices) > 1:  # spread the blocks contiguously over the devices; the end goes with the last block
        blocks = get_module(stage, family.layers)
        for position, index in enumerate(layers):
            target = devices[position * len(devices) // len(layers)]
            blocks[str(index)].to(target)
            stage.block_devices[index] = target
        for path in family.final if ends else ():
            get_module(stage, path).to(devices[-1])
    stage.requires_grad_(False)
    return stage


def load_full_model(
    source: ModelSource,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """The unsplit model (the centralized baseline and the reference in tests)."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    family_for(source.config())  # same support check as for a split
    quiet = not progress.shown() and hf_logging.is_progress_bar_enabled()  # train.progress=false: no loading bar
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=source.trust_remote_code,
        )  # fmt: skip
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    model.to(device)
    model.requires_grad_(False)
    return model


def share_tied_embeddings(head: Stage, tail: Stage) -> bool:
    """Let a client's tail reuse its head's embedding matrix as the LM head when the model ties them.

    Only while neither copy trains (LoRA does not touch them): then they are equal and stay equal, and the
    client holds one matrix instead of two. Returns whether the weights are now shared.
    """
    if not getattr(head.config, "tie_word_embeddings", False) or not tail.ends:
        return False
    embedding = get_module(head, head.family.embeddings[0])
    lm_head = get_module(tail, "lm_head")
    if embedding.weight.requires_grad or lm_head.weight.requires_grad:
        return False
    if embedding.weight.shape != lm_head.weight.shape or embedding.weight.device != lm_head.weight.device:
        return False
    if embedding.weight.dtype != lm_head.weight.dtype or not torch.equal(embedding.weight, lm_head.weight):
        return False
    lm_head.weight = embedding.weight
    return True
