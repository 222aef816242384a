"""A learned bottleneck at the cut: ``split.bottleneck: K``, a layer of the model parts (no wire codec).

The part before a cut ends with a linear encoder E: d -> K (``Stage.wire_out``) and the part after it starts
with a linear decoder D: K -> d (``Stage.wire_in``), so (B, T, K) cross the wire at step 3 (head -> trunk)
and, in U-shape, at step 5 (trunk -> tail); the gradients at steps 7 and 9 are the gradients of those codes,
K-dimensional too. E and D are modules of the parts and train with them (``peft/lora.py``: peft's
``modules_to_save`` under LoRA, one copy per trunk adapter on the server); each party saves its half with its
adapters, and FedAvg averages the client's half (the head's encoder, the tail's decoder) like any client
tensor. E has no bias; D has one, starting at 0.

Initialisation: E = Q^T and D = Q for one (d, K) matrix Q with orthonormal columns, so that at step 0
D(E(h)) = Q Q^T h is the orthogonal projection of h on a K-dimensional subspace (h itself when K = d). Both
parties must compute the same Q without exchanging anything, from what both hold: the model's config and the
public checkpoint files (the server reads the one embedding tensor for this and drops it). Q selects the K
residual dimensions where the token embedding matrix has its largest |entry| (coordinate axes, ties to the
lower dimension; the same Q at both cuts, whatever the cut): pretrained LLMs carry a few "massive
activation" dimensions that dominate the hidden state's energy and that attention relies on, and the
embedding matrix already singles them out. Computed on the CPU in float64, once per process, model and K.

Measured on SmolLM2-135M (d = 576, cuts after block 2 and before the last 2 blocks, 32 held-out Rotten
Tomatoes reviews), perplexity at step 0 relative to the unsplit model, both cuts squeezed (K = 64 / 128 / 256):
these axes x57 / x31 / x11; random orthonormal Q x1.1e5 / x1.1e4 / x7.9e3; the top principal directions of the
embedding rows x5.8e5 / x5.8e5 / x4.7e4; the principal directions of the real hidden states (data the server
never sees, so not an option) x3.2 / x1.4 / x0.95. No data-free choice keeps the pretrained model intact at
K << d: a bottleneck run starts with a perplexity penalty that training has to remove.

This module is where the setting is read (``learned_rank``) and what it cannot go with is said (``problems``).
"""

from __future__ import annotations

import functools

import torch
from safetensors import safe_open
from torch import nn

from splitlm.config import Config
from splitlm.errors import ConfigError
from splitlm.models.families import family_for, get_module
from splitlm.models.sources import ModelSource
from splitlm.models.split import LOWRANK, Stage, _tensor_key


def learned_rank(config: Config) -> int | None:
    """K of the learned bottleneck at the cuts (``split.bottleneck``), None without one."""
    return config.split.bottleneck or None


def problems(config: Config, cuts: bool) -> list[str]:
    """What ``split.bottleneck`` cannot go with: a framework that does not cut the model (``cuts`` false), or
    clients cut at different blocks (``framework.clients``: the bottleneck is learned at one cut)."""
    if not config.split.bottleneck:
        return []
    if not cuts:
        return [
            f"split.bottleneck: a learned bottleneck at the cut; framework.name={config.framework.name} does not cut "
            "the model, so set split.bottleneck=0"
        ]
    clients = [config.for_client(i).split for i in range(config.framework.num_clients)]
    if len({(split.head_layers, split.tail_layers if split.mode == "ushape" else 0) for split in clients}) > 1:
        return [
            "split.bottleneck: a bottleneck is learned at one cut, but framework.clients gives the clients different "
            "cuts; set split.bottleneck=0 or drop split.head_layers/tail_layers from framework.clients"
        ]
    return []


def add_bottleneck(stage: Stage, source: ModelSource, rank: int) -> None:
    """Give ``stage`` its halves of the rank-``rank`` bottlenecks at its cuts, initialised as a pair with the
    other side's (``basis``): the head an encoder, the trunk a decoder (and in U-shape an encoder), the tail a
    decoder; each under ``lowrank.<i>``, ``i`` the first block after the cut."""
    d = int(stage.config.hidden_size)
    if not 1 <= rank <= d:
        raise ConfigError(f"split.bottleneck={rank} needs 1 <= K <= the hidden size {d} of {source.name}; lower it")
    q = basis(source, stage, rank)  # (d, K) float64
    total = int(stage.config.num_hidden_layers)
    halves: dict[str, dict[str, nn.Module]] = {}
    if not stage.starts:  # trunk and tail: a decoder in front of the first block
        decoder = nn.Linear(rank, d, bias=True)
        with torch.no_grad():
            decoder.weight.copy_(q)
            decoder.bias.zero_()
        first = str(stage.layer_indices[0] if stage.layer_indices else total)
        halves[first] = {"decoder": decoder.to(device=stage.device, dtype=stage.dtype)}
    if not stage.ends:  # head and U-shaped trunk: an encoder after the last block
        encoder = nn.Linear(d, rank, bias=False)
        with torch.no_grad():
            encoder.weight.copy_(q.T)
        after = str(stage.layer_indices[-1] + 1 if stage.layer_indices else 0)
        last = stage.block_devices.get(stage.layer_indices[-1], stage.device) if stage.layer_indices else stage.device
        halves.setdefault(after, {})["encoder"] = encoder.to(device=last, dtype=stage.dtype)
    stage.lowrank = nn.ModuleDict({index: nn.ModuleDict(pair) for index, pair in halves.items()})
    stage.wire_rank = rank


def basis(source: ModelSource, stage: Stage, rank: int) -> torch.Tensor:
    """The (d, K) float64 matrix with orthonormal columns both sides of a cut start from: the K coordinate axes
    where the token embedding matrix has its largest entries (module docstring)."""
    key = _tensor_key(f"{stage.family.embeddings[0]}.weight", source, stage.family, stage.config)
    return _basis(str(source.weight_files[key]), key, rank).clone()


@functools.lru_cache(maxsize=4)
def _basis(file: str, key: str, rank: int) -> torch.Tensor:
    with safe_open(file, "pt", device="cpu") as handle:
        weight = handle.get_tensor(key)  # (V, d)
    peak = torch.zeros(weight.shape[1], dtype=torch.float64)
    for start in range(0, weight.shape[0], 8192):  # in chunks: no float64 copy of a large vocabulary at once
        peak = torch.maximum(peak, weight[start : start + 8192].to(torch.float64).abs().amax(dim=0))
    axes = torch.argsort(peak, descending=True, stable=True)[:rank]  # ties: the lower dimension first
    return torch.eye(weight.shape[1], dtype=torch.float64)[:, axes]


class _Cut(nn.Module):
    """The bottleneck at one cut of an assembled model: decoder(encoder(h))."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(hidden))


def fold_into(model: nn.Module, parts: dict[str, Stage]) -> None:
    """Put the trained bottlenecks of the merged ``parts`` (role -> stage) into the unsplit ``model``, for
    generation: the hidden states entering the first block after each cut go through that cut's encoder and
    decoder (forward pre-hooks, so generation with a KV cache works; the final norm for a U-shaped tail without
    blocks). The result is no plain Hugging Face model any more: ``splitlm export`` refuses a bottleneck run."""
    halves: dict[str, dict[str, nn.Module]] = {}
    for stage in parts.values():
        for index, cut in (stage.lowrank or {}).items():
            halves.setdefault(index, {}).update(dict(cut.items()))
    first = next(model.parameters())
    holder = nn.ModuleDict({index: _Cut(pair["encoder"], pair["decoder"]) for index, pair in halves.items()})
    model.add_module(LOWRANK, holder.to(device=first.device, dtype=first.dtype))
    family = family_for(model.config)
    blocks = get_module(model, family.layers)
    for index, cut in holder.items():

        def squeeze(module: nn.Module, args: tuple, kwargs: dict, cut: nn.Module = cut) -> tuple[tuple, dict]:
            if args:
                return (cut(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cut(kwargs["hidden_states"])}

        target = blocks[int(index)] if int(index) < len(blocks) else get_module(model, family.final[0])
        target.register_forward_pre_hook(squeeze, with_kwargs=True)
