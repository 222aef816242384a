"""Step 1's inputs for choosing a cut (survey §4.1): what each block of the real model costs, measured.

``profile_model`` loads the config's model once per distinct *setup* (a device, a dtype and the LoRA settings of
a part: the head, trunk and tail share one measurement when those agree, e.g. everything on one CPU), makes it
trainable as that part would be (``make_trainable`` with ``lora.<part>``), and runs ``plan.profile_batches`` random
batches of ``train.batch_size x train.seq_len`` tokens through it after a warm-up batch (the ends and the first
``WARM_BLOCKS`` blocks: every block is alike, and the first calls pay for kernels and memory). Each block runs on a
fresh leaf (its input detached), so its forward and its backward (to its input and its trainable weights, as in a
split part) are timed on their own; the ends are timed the same way: the embeddings, and the final norm + LM head +
loss (the LM head is a large share of a small model's step). The optimizer (``PartyOptimizer``: AdamW and its
gradient norm) is timed on the setup's trainable parameters and kept as seconds per trainable parameter. Every
time is a median over the batches.

Memory, per block and end, in bytes:

- parameters: counted from the modules (LoRA weights included);
- training state: trainable parameters x 3 x their element size (gradient + AdamW's two moments), computed;
- activations kept for backward: *measured*, as the bytes of the tensors autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters left out).

The wire side (what a message of each kind carries after ``transport.codec``, and what encoding and decoding it
costs) is measured by encoding random tensors of the cut's shape with the run's own ``CodecMod``, every token
real (packed data; unpacked batches are padded only to their longest row, so they cost less than predicted).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splitlm import progress
from splitlm.config import Config, ResolvedLora
from splitlm.frameworks.pipeline import codec_mod
from splitlm.frameworks.setup import load_source
from splitlm.models import ModelSource, family_for, load_full_model
from splitlm.models.families import Family, get_module
from splitlm.models.lowrank import learned_rank
from splitlm.models.split import DTYPES, Role, parse_devices
from splitlm.peft import make_trainable, trainable_parameters
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.optim import PartyOptimizer
from splitlm.transport import Message

log = logging.getLogger(__name__)

ADAM_STATES = 3  # per trainable parameter besides itself: its gradient and AdamW's exp_avg and exp_avg_sq
# The messages of one micro-batch, by what they carry (replies named after their requests).
WARM_BLOCKS = 2  # blocks in the warm-up batch (every block is alike; the ends are warmed up in full)
MESSAGE_KINDS = ("forward", "forward_reply", "backward", "backward_reply")


@dataclass(frozen=True)
class EndProfile:
    """The embeddings (before the first block) or the final norm + LM head + loss (after the last)."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    param_bytes: int = 0
    trainable: int = 0  # trainable parameters
    activation_bytes: int = 0


@dataclass(frozen=True)
class PartProfile:
    """Every block of the model measured in one setup, for one batch of ``Profile.batch_size`` rows."""

    device: str
    forward_s: tuple[float, ...]  # per block
    backward_s: tuple[float, ...]
    param_bytes: tuple[int, ...]
    trainable: tuple[int, ...]  # trainable parameters per block
    activation_bytes: tuple[int, ...]  # saved for backward, per block
    embed: EndProfile = field(default_factory=EndProfile)
    final: EndProfile = field(default_factory=EndProfile)
    optimizer_s_per_param: float = 0.0  # AdamW step + gradient norm, per trainable parameter
    state_bytes_per_trainable: int = ADAM_STATES * 4
    lm_head_bytes: int = 0  # the LM head's matrix, part of ``final`` (a tied one can be shared with the embeddings)

    def span(self, blocks: range) -> tuple[float, float, int, int, int]:
        """(forward s, backward s, parameter bytes, trainable parameters, activation bytes) of ``blocks``."""
        return (
            sum(self.forward_s[i] for i in blocks),
            sum(self.backward_s[i] for i in blocks),
            sum(self.param_bytes[i] for i in blocks),
            sum(self.trainable[i] for i in blocks),
            sum(self.activation_bytes[i] for i in blocks),
        )


@dataclass(frozen=True)
class Profile:
    """What the predictor needs: each part's setup measured, and the cut's messages (one batch of full rows)."""

    model: str
    layers: int
    mode: str  # vanilla or ushape
    batch_size: int
    seq_len: int
    parts: dict[str, PartProfile]  # head, trunk and (ushape) tail -> its setup (one object when setups agree)
    message_bytes: dict[str, int]  # MESSAGE_KINDS -> encoded payload bytes of one batch
    codec_s: dict[str, float] = field(default_factory=dict)  # MESSAGE_KINDS -> encode + decode seconds
    tied_bytes: int = 0  # the LM head's bytes a U-shaped client saves by sharing its embedding matrix
    setups: int = 1  # distinct setups measured
    seconds: float = 0.0  # what profiling took

    def summary(self) -> dict[str, Any]:
        """A short JSON-able account of the measurement (per-block times summed, per part)."""
        out: dict[str, Any] = {
            "model": self.model, "layers": self.layers, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "setups": self.setups, "seconds": round(self.seconds, 3), "message_bytes": dict(self.message_bytes),
        }  # fmt: skip
        for role, part in self.parts.items():
            out[role] = {
                "device": part.device,
                "block_forward_s": round(statistics.median(part.forward_s), 6),
                "block_backward_s": round(statistics.median(part.backward_s), 6),
                "final_s": round(part.final.forward_s + part.final.backward_s, 6),
                "optimizer_us_per_param": round(part.optimizer_s_per_param * 1e6, 6),
            }
        return out


# --- measuring -------------------------------------------------------------------------------------------


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.total = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[int]]:
        """Count within the block; yields a one-item list holding the bytes counted in it, filled on exit."""
        before, box = self.total, [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in self.exclude and pointer not in self.seen:
                self.seen.add(pointer)
                self.total += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield box
        box[0] = self.total - before


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    _synchronize(device)
    started = time.perf_counter()
    result = work()
    _synchronize(device)
    return result, time.perf_counter() - started


def _bytes(module: nn.Module | None) -> tuple[int, int]:
    """(parameter bytes, trainable parameters) of ``module``'s own parameters."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params if p.requires_grad)


@dataclass
class _Pass:
    """The times and saved bytes of one batch through every block and both ends."""

    forward: list[float]
    backward: list[float]
    activations: list[int]
    embed: tuple[float, float, int] = (0.0, 0.0, 0)
    final: tuple[float, float, int] = (0.0, 0.0, 0)


def _one_pass(
    model: nn.Module,
    family: Family,
    batch: tuple[torch.Tensor, ...],
    device: torch.device,
    blocks: int | None = None,
    tick: Callable[[], Any] = lambda: None,
) -> _Pass:
    """One batch through the embeddings, the first ``blocks`` blocks (default: all) and the final end; ``tick``
    after each block's backward pass (a progress bar's)."""
    config = model.config
    input_ids, mask, positions = batch
    layers = get_module(model, family.layers)
    indices = list(range(len(layers) if blocks is None else blocks))
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = _SavedBytes(exclude)
    with saved.counting() as embed_bytes:
        hidden, embed_fwd = _timed(device, lambda: family.embed(model, input_ids, positions))  # (B, T, d)
    kwargs = family.block_inputs(model, config, hidden, mask, positions, indices)
    inputs, outputs, forward, activations = [], [], [], []
    current = hidden
    for i in indices:
        leaf = current.detach().requires_grad_(True)
        with saved.counting() as box:
            out, seconds = _timed(device, lambda leaf=leaf, i=i: family.run_block(layers[i], leaf, kwargs[i]))
        inputs.append(leaf)
        outputs.append(out)
        forward.append(seconds)
        activations.append(box[0])
        current = out
    last = current.detach().requires_grad_(True)
    with saved.counting() as final_bytes:

        def finish() -> torch.Tensor:
            total, count = causal_lm_loss(family.finish(model, config, last), input_ids)  # logits (B, T, V)
            return total / max(count, 1)

        loss, final_fwd = _timed(device, finish)
    _, final_bwd = _timed(device, loss.backward)
    backward = [0.0] * len(indices)
    grad = last.grad
    for i in reversed(indices):
        _, backward[i] = _timed(device, lambda i=i, g=grad: outputs[i].backward(g))
        grad = inputs[i].grad
        tick()
    embed_bwd = 0.0
    if hidden.requires_grad:  # trainable embeddings (lora method full)
        _, embed_bwd = _timed(device, lambda: hidden.backward(grad))
    model.zero_grad(set_to_none=True)
    return _Pass(
        forward, backward, activations, (embed_fwd, embed_bwd, embed_bytes[0]), (final_fwd, final_bwd, final_bytes[0])
    )


def _end(passes: list[_Pass], name: str, modules: list[tuple[int, int]]) -> EndProfile:
    """An end's median times over the timed batches, its modules' bytes and the first batch's saved bytes."""
    times = [getattr(p, name) for p in passes]
    return EndProfile(
        forward_s=statistics.median(t[0] for t in times),
        backward_s=statistics.median(t[1] for t in times),
        param_bytes=sum(b for b, _ in modules),
        trainable=sum(t for _, t in modules),
        activation_bytes=times[0][2],
    )


def _optimizer_seconds(params: list[nn.Parameter], config: Config, repeats: int) -> float:
    """Median seconds of the gradient norm and an AdamW step over ``params``, per parameter."""
    count = sum(p.numel() for p in params)
    if not count:
        return 0.0
    optimizer = PartyOptimizer(params, config.train)
    device = params[0].device
    times = []
    for _ in range(repeats + 1):  # the first builds AdamW's state: a warm-up
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        _, seconds = _timed(device, lambda: optimizer.step(optimizer.clip_coefficient(optimizer.grad_sq_norm())))
        times.append(seconds)
    return statistics.median(times[1:]) / count


def measure_setup(
    source: ModelSource, config: Config, role: Role, lora: ResolvedLora, device: str, dtype: str
) -> PartProfile:
    """Every block of the model as part ``role`` would hold it (on ``device`` in ``dtype``, with ``lora``); a part
    spread over several devices is measured on its first."""
    first = parse_devices(device)[0]
    model = load_full_model(source, dtype, first, config.model.attn_implementation)
    family = family_for(model.config)
    model = make_trainable(model, lora, family.lora_targets, config.seed, role)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    where = next(base.parameters()).device
    train = config.train
    generator = torch.Generator().manual_seed(config.seed)
    vocab = int(base.config.vocab_size)

    def batch() -> tuple[torch.Tensor, ...]:
        ids = torch.randint(vocab, (train.batch_size, train.seq_len), generator=generator).to(where)
        return ids, torch.ones_like(ids), torch.arange(train.seq_len, device=where).unsqueeze(0)

    layers = get_module(base, family.layers)
    warm_blocks = min(WARM_BLOCKS, len(layers))
    total = warm_blocks + config.plan.profile_batches * len(layers)
    with progress.bar(total=total, desc=f"plan: profiling the {role}'s blocks", unit="block") as shown:
        _one_pass(base, family, batch(), where, warm_blocks, shown.update)  # first calls: kernels, allocator, ...
        passes = [
            _one_pass(base, family, batch(), where, tick=shown.update) for _ in range(config.plan.profile_batches)
        ]
    warm = passes[0]
    blocks = [_bytes(layers[i]) for i in range(len(layers))]
    embed = [_bytes(get_module(base, path)) for path in family.embeddings]
    final = [_bytes(get_module(base, path)) for path in family.final]

    def median(pick: Callable[[_Pass], float]) -> float:
        return statistics.median(pick(p) for p in passes)

    n = len(layers)
    return PartProfile(
        device=str(where),
        forward_s=tuple(median(lambda p, i=i: p.forward[i]) for i in range(n)),
        backward_s=tuple(median(lambda p, i=i: p.backward[i]) for i in range(n)),
        param_bytes=tuple(b for b, _ in blocks),
        trainable=tuple(t for _, t in blocks),
        activation_bytes=tuple(warm.activations),
        embed=_end(passes, "embed", embed),
        final=_end(passes, "final", final),
        optimizer_s_per_param=_optimizer_seconds(trainable_parameters(model), config, config.plan.profile_batches),
        state_bytes_per_trainable=ADAM_STATES * DTYPES[dtype].itemsize,
        lm_head_bytes=_bytes(get_module(base, family.final[-1]))[0],
    )


def wire(config: Config, hidden_size: int, repeats: int = 3) -> tuple[dict[str, int], dict[str, float]]:
    """Encoded payload bytes and encode + decode seconds of each message of one batch, with the run's codecs."""
    train = config.train
    rows, tokens = train.batch_size, train.seq_len
    width = learned_rank(config) or hidden_size  # a learned bottleneck at the cut sends K per token
    dtype = DTYPES[config.model.client_dtype]
    mod = codec_mod(config)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)

    def tensor() -> torch.Tensor:
        return torch.randn(rows, tokens, width, generator=generator).to(dtype)  # (B, T, d)

    vanilla = config.split.mode == "vanilla"
    request = {"hidden": tensor(), "attention_mask": mask, **({"labels": mask.clone()} if vanilla else {})}
    messages = {
        "forward": Message("forward", "0", 0, 0, request),
        "forward_reply": Message("loss", "0", 0, 0, {"grad": tensor()})
        if vanilla
        else Message("activations", "0", 0, 0, {"hidden": tensor()}),
        "backward": Message("backward", "0", 0, 0, {} if vanilla else {"grad": tensor()}),
        "backward_reply": Message("gradients", "0", 0, 0, {} if vanilla else {"grad": tensor()}),
    }  # fmt: skip
    sizes: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for kind, message in messages.items():
        times = []
        for _ in range(repeats if mod else 1):
            started = time.perf_counter()
            encoded = mod.encode(message, mask)
            mod.decode(encoded)
            times.append(time.perf_counter() - started)
        sizes[kind] = encoded.payload_bytes()
        seconds[kind] = statistics.median(times) if mod else 0.0
    return sizes, seconds


def profile_model(config: Config, source: ModelSource | None = None) -> Profile:
    """Measure the config's model for the planner (see the module docstring); one load per distinct setup."""
    started = time.perf_counter()
    progress.show(config.train.progress)
    source = source or load_source(config)
    model_config = source.config()
    roles: tuple[Role, ...] = ("head", "trunk", "tail") if config.split.mode == "ushape" else ("head", "trunk")
    setups: dict[tuple[Any, ...], PartProfile] = {}
    parts: dict[str, PartProfile] = {}
    for role in roles:
        on_client = role != "trunk"
        device = config.model.client_device if on_client else config.model.server_device
        dtype = config.model.client_dtype if on_client else config.model.server_dtype
        lora = config.lora.part(role)
        key = (device, dtype, lora.model_dump_json())
        if key not in setups:
            log.info("plan: profiling the %s's setup (%s, %s, lora %s)", role, device, dtype, lora.method)
            setups[key] = measure_setup(source, config, role, lora, device, dtype)
        parts[role] = setups[key]
    sizes, codec_seconds = wire(config, int(model_config.hidden_size), config.plan.profile_batches)
    ends, head = parts[roles[-1]], parts["head"]
    # A U-shaped client holds one matrix for its embeddings and LM head when they are tied and neither trains.
    shares = (
        config.split.mode == "ushape" and getattr(model_config, "tie_word_embeddings", False)
        and head is ends and not head.embed.trainable and not head.final.trainable
    )  # fmt: skip
    return Profile(
        model=config.model.name,
        layers=int(model_config.num_hidden_layers),
        mode=config.split.mode,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        parts=parts,
        message_bytes=sizes,
        codec_s=codec_seconds,
        tied_bytes=ends.lm_head_bytes if shares else 0,
        setups=len(setups),
        seconds=time.perf_counter() - started,
    )
