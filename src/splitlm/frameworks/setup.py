"""Building what a run needs from its config: data, the split parties, the unsplit baseline."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from splitlm.config import Config
from splitlm.data import (
    IGNORE_INDEX,
    Batch,
    Example,
    eval_batches,
    load_rows,
    pack_examples,
    split_rows,
    tokenize_rows,
)
from splitlm.errors import ConfigError
from splitlm.models import (
    ModelSource,
    SplitSpec,
    Stage,
    family_for,
    load_full_model,
    load_stage,
    lowrank,
    resolve_model,
)
from splitlm.models.split import Role
from splitlm.peft import make_trainable, trainable_parameters

log = logging.getLogger(__name__)


MAX_CHOICES = 10  # instruction data whose responses take at most this many values is classification-style


@dataclass
class RunData:
    train: list[Example]
    eval: list[Batch]
    pad_id: int
    sources: list[str | None] | None = None  # per training example, for the by_source partitioner
    choices: list[tuple[list[Example], int]] = field(default_factory=list)  # (candidates, index of the truth)
    # classification-style data: each candidate response's token ids (as ``choices`` scores them), so that any
    # held-out example, e.g. a client's own (``Member.choices``), can be turned into a choice (``choice_of``)
    responses: list[list[int]] = field(default_factory=list)


Choice = tuple[list[Example], int]  # the candidate examples (one per response) and the index of the true one


def spec_of(config: Config) -> SplitSpec:
    tail = config.split.tail_layers if config.split.mode == "ushape" else 0
    return SplitSpec(config.split.mode, config.split.head_layers, tail)


def client_specs(config: Config) -> list[SplitSpec]:
    """Each client's cut (``framework.clients`` overrides the run's)."""
    return [spec_of(config.for_client(i)) for i in range(config.framework.num_clients)]


def server_spec(config: Config) -> SplitSpec:
    """The trunk the server holds: every block some client leaves to it (the shallowest head and tail), once."""
    specs = client_specs(config) or [spec_of(config)]
    problems = lowrank.problems(config, cuts=True)
    if problems:
        raise ConfigError(problems[0])
    heads, tails = [s.head_layers for s in specs], [s.tail_layers for s in specs]
    return SplitSpec(config.split.mode, min(heads), min(tails))


def mixed_clients(config: Config) -> bool:
    """Whether ``framework.clients`` gives some client another cut or LoRA rank than the rest."""
    if not config.framework.clients:
        return False
    own = [config.for_client(i) for i in range(config.framework.num_clients)]
    return any(spec_of(c) != spec_of(own[0]) or c.lora != own[0].lora for c in own)


def same_cut_and_rank(why: str) -> Callable[[Config], None]:
    """A framework check (``Framework.checks``): every client must have the same cut and LoRA rank, because ``why``."""

    def check(config: Config) -> None:
        if mixed_clients(config):
            raise ConfigError(
                f"framework.clients: framework.name={config.framework.name} {why}, so every client needs the same "
                "cut and LoRA rank; drop split and lora from framework.clients, or use sflv1, sflv2 or psl"
            )

    return check


@dataclass(frozen=True)
class BlockLayout:
    """Where a model's blocks are (their ``ModuleList``'s name in the unsplit model) and how many there are."""

    layers: str  # e.g. model.layers
    total: int

    def block_of(self, key: str) -> int | None:
        """The block a tensor (unsplit-model name) belongs to, None outside the blocks."""
        if not key.startswith(self.layers + "."):
            return None
        return int(key[len(self.layers) + 1 :].split(".", 1)[0])

    def trunk_blocks(self, config: Config, index: int) -> list[int]:
        """The blocks client ``index``'s cut leaves to the server."""
        return spec_of(config.for_client(index)).layers("trunk", self.total)


def block_layout(config: Config) -> BlockLayout:
    return _layout(config.model.name, config.model.revision, config.model.trust_remote_code)


@functools.lru_cache(maxsize=8)
def _layout(name: str, revision: str | None, trust_remote_code: bool = False) -> BlockLayout:
    model = resolve_model(name, revision, trust_remote_code).config()
    return BlockLayout(family_for(model).layers, int(model.num_hidden_layers))


def _load_all_rows(config: Config) -> list[dict[str, Any]]:
    if config.data.partition != "by_source":
        return load_rows(config.data, config.seed)
    if not config.data.sources:
        raise ConfigError("data.partition=by_source needs data.sources: one data name per client")
    rows = []
    for name in config.data.sources:
        for row in load_rows(config.data.model_copy(update={"name": name}), config.seed):
            rows.append({**row, "_source": name})
    return rows


def prepare_data(config: Config, tokenizer: PreTrainedTokenizerBase, pack: bool = True) -> RunData:
    """Tokenized training examples, held-out batches and accuracy choices. ``pack=False`` leaves packing
    (``data.pack``) to the caller, e.g. to pack each client's share after partitioning by label."""
    rows = _load_all_rows(config)
    train_rows, eval_rows = split_rows(rows, config.data.eval_size, config.seed)
    train: list[Example] = []
    sources: list[str | None] = []
    for source in dict.fromkeys(row.get("_source") for row in train_rows):  # one pass per source, in order
        group = [row for row in train_rows if row.get("_source") == source]
        if config.data.pack:  # tokenize whole rows, then cut the stream into full blocks (here or per client)
            examples = tokenize_rows(group, tokenizer, config.data, 1 << 30)
            examples = pack_examples(examples, config.train.seq_len) if pack else examples
        else:
            examples = tokenize_rows(group, tokenizer, config.data, config.train.seq_len)
        train.extend(examples)
        sources.extend([source] * len(examples))
    held_out = tokenize_rows(eval_rows, tokenizer, config.data, config.train.seq_len)
    pad_id = int(tokenizer.pad_token_id)
    batches = eval_batches(held_out, config.train.batch_size, pad_id, config.train.eval_batches)
    limit = config.train.eval_batches * config.train.batch_size or len(eval_rows)
    choices, responses = classification_choices(train_rows, eval_rows[:limit], tokenizer, config)
    log.info("data: %d training and %d held-out sequences", len(train), len(held_out))
    by_source = sources if config.data.partition == "by_source" else None
    return RunData(train, batches, pad_id, by_source, choices, responses)


def classification_choices(
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
) -> tuple[list[Choice], list[list[int]]]:
    """Classification-style instruction data (few distinct responses): each held-out prompt with every
    candidate response, for accuracy by lowest response loss; and each candidate's response token ids."""
    if config.data.format != "instruction":
        return [], []
    field_name = config.data.response_field
    candidates = sorted({str(row[field_name]) for row in train_rows})
    if not 2 <= len(candidates) <= MAX_CHOICES:
        return [], []
    choices = []
    for row in eval_rows:
        truth = str(row[field_name])
        if truth not in candidates:
            continue
        options = [{**row, field_name: c} for c in candidates]
        examples = tokenize_rows(options, tokenizer, config.data, config.train.seq_len)
        if len(examples) == len(candidates):
            choices.append((examples, candidates.index(truth)))
    # a response's ids as tokenize_rows appends them (tokenized alone, then the EOS token where data.add_eos)
    probe = tokenize_rows(
        [{config.data.prompt_field: "", field_name: c} for c in candidates], tokenizer, config.data, 1 << 30
    )
    responses = [[t for t, label in zip(e.input_ids, e.labels, strict=True) if label != IGNORE_INDEX] for e in probe]
    return choices, responses if len(responses) == len(candidates) else []


def choice_of(example: Example, responses: list[list[int]], seq_len: int) -> Choice | None:
    """``example`` (a prompt and one of ``responses``) as a choice among all of them: its prompt with each
    response, cut to ``seq_len`` from the prompt's start like ``tokenize_rows``; None if its response is none of
    them (or was cut)."""
    prompt_len = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    prompt, response = example.input_ids[:prompt_len], example.input_ids[prompt_len:]
    if response not in responses or not prompt:
        return None
    candidates = []
    for option in responses:
        kept = prompt[max(len(prompt) - max(seq_len - len(option), 1), 0) :]
        reply = option[: seq_len - len(kept)]
        candidates.append(Example(kept + reply, [IGNORE_INDEX] * len(kept) + reply, example.label))
    return candidates, responses.index(response)


def load_source(config: Config) -> ModelSource:
    source = resolve_model(config.model.name, config.model.revision, config.model.trust_remote_code)
    family_for(source.config())
    return source


def build_part(config: Config, source: ModelSource, role: Role) -> tuple[nn.Module, Stage]:
    """One trainable part: the stage with its own weights only (and its halves of a ``split.bottleneck`` at its
    cuts), made trainable as ``lora.<role>`` says. A client's part follows ``config``'s cut (pass
    ``config.for_client(i)``); the trunk covers every client's trunk blocks (``server_spec``)."""
    on_client = role != "trunk"
    stage = load_stage(
        source,
        spec_of(config) if on_client else server_spec(config),
        role,
        dtype=config.model.client_dtype if on_client else config.model.server_dtype,
        device=config.model.client_device if on_client else config.model.server_device,
        attn_implementation=config.model.attn_implementation,
    )
    stage.gradient_checkpointing = config.model.gradient_checkpointing
    rank = lowrank.learned_rank(config)
    if rank is not None:
        lowrank.add_bottleneck(stage, source, rank)
    always = stage.bottleneck_modules()
    part = make_trainable(stage, config.lora.part(role), stage.family.lora_targets, config.seed, role, always)
    return part, stage


def build_centralized(config: Config, source: ModelSource) -> nn.Module:
    overrides = [r for r in ("head", "trunk", "tail") if getattr(config.lora, r).model_fields_set]
    if overrides:
        log.warning(
            "centralized uses the lora defaults for the whole model; ignoring lora.%s",
            ", lora.".join(overrides),
        )
    model = load_full_model(
        source, config.model.client_dtype, config.model.client_device, config.model.attn_implementation
    )
    family = family_for(model.config)
    if config.model.gradient_checkpointing:  # non-reentrant: LoRA's gradients need no inputs that require grad
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = make_trainable(model, config.lora.part("model"), family.lora_targets, config.seed, "model")
    if not trainable_parameters(model):
        raise ConfigError("nothing to train: the lora settings leave the whole model frozen")
    return model


def count_parameters(*modules: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
