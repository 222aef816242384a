"""What every attack shares: the recorded observations, the attacker's knowledge, a registry, scoring.

The attacker is an honest-but-curious server. Under the ``public`` threat model it knows the public pretrained
weights of the whole model (not the client's fine-tuned adapters); under ``inside`` also the client's current
head and tail (``splitlm.privacy.knowledge``). Either way it knows public auxiliary text of the same kind as the
client's, the run's defenses and their settings (``AttackContext.simulate`` runs its own copy of the defended
client), and what it received during the run: ``Observation`` holds exactly what the server tap recorded. The
true tokens ride along for scoring only; an attack's ``invert`` never reads ``truth``.

``run_attack`` (``splitlm attack``) writes the scores to ``RUN_DIR/attacks/NAME.json`` (``inside``:
``RUN_DIR/attacks/inside/NAME.json``) and every rebuilt sequence, with its truth and its own scores, beside it
as ``NAME.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from splitlm.config.schema import as_mapping
from splitlm.data import known_entities
from splitlm.errors import DataError, PrivacyError
from splitlm.files import write_json, write_jsonl
from splitlm.models import Stage, load_stage
from splitlm.models.split import Role
from splitlm.peft import make_trainable, merged
from splitlm.privacy.defenses import DEFENSES, Defense, DefenseChain, DefenseContext, build_defenses, token_texts
from splitlm.privacy.knowledge import THREAT_MODELS, PublicKnowledge
from splitlm.privacy.metrics import pii_counts, pii_recovered, rouge_l, token_accuracy
from splitlm.privacy.tap import Key, read_records
from splitlm.registry import Registry
from splitlm.runtime.plugins import Plugins
from splitlm.runtime.rng import derive
from splitlm.transport import Message

T = TypeVar("T")
IMITATION_ROWS = 2000  # rows of public text the attacker imitates a defense's own training on (SIP's aux_rows)


@dataclass
class Observation:
    """One training micro-batch as the server saw it. Shapes: (B, T, d) tensors, (B, T) masks and ids."""

    key: Key
    smashed: torch.Tensor  # the head's output as received (after the client's defenses), step 3
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None  # vanilla split only: the labels as received
    trunk_out: torch.Tensor | None = None  # U-shape: the trunk output the server sent, step 5
    grad_trunk_out: torch.Tensor | None = None  # U-shape: the gradient the client sent for it, step 7
    grad_smashed: torch.Tensor | None = None  # the gradient the server sent for the smashed data, step 9
    truth: torch.Tensor | None = field(default=None, repr=False)  # scoring only

    @classmethod
    def from_record(cls, key: Key, tap: dict[str, torch.Tensor], truth: dict[str, torch.Tensor] | None) -> Observation:
        return cls(
            key=key,
            smashed=tap["smashed"].float(),
            attention_mask=tap["attention_mask"].long(),
            labels=tap.get("labels"),
            trunk_out=tap["trunk_out"].float() if "trunk_out" in tap else None,
            grad_trunk_out=tap["grad_trunk_out"].float() if "grad_trunk_out" in tap else None,
            grad_smashed=tap["grad_smashed"].float() if "grad_smashed" in tap else None,
            truth=None if truth is None else truth["input_ids"].long(),
        )


class AttackContext(PublicKnowledge):
    """The offline attacker's context: its knowledge (``PublicKnowledge``: config, parts per ``threat_model``,
    auxiliary text, ``cache``, ``run_dir``), its copy of the client's defenses (``simulate``) and whether its long
    loops show progress bars (``score`` sets ``progress``)."""

    progress: bool = True
    _chain: DefenseChain | None = None
    _simulated: int = 0

    def defenses_identity(self) -> dict[str, Any]:
        """The run's ``privacy.defenses`` (name -> every setting, defaults filled in, in order): what the
        attacker's copy is built from."""
        parsed = DEFENSES.parse(as_mapping(self.config.privacy.defenses))
        return {name: settings.model_dump(mode="json") for name, settings in parsed.items()}

    def threat_identity(self) -> dict[str, Any]:
        """What the attacker's simulated client is made of: the threat model, the defenses' settings and, under
        ``inside``, a hash of the client's adapter files. Part of every cache key of what is trained on it."""
        return {
            "threat_model": self.threat_model,
            "defenses": self.defenses_identity(),
            "client": self.client_fingerprint(),
        }

    def defenses(self) -> DefenseChain:
        """The attacker's copy of the client's defense chain (``privacy.defenses``), built once with the same
        ``DefenseContext`` as the client's (its pretrained token vectors, special ids, mode, seq_len) except the
        seed, which is the attacker's own: it knows the mechanism and its settings, not the client's draws. Under
        ``inside`` a defense with saved state (``load``) reads it from the client's adapters folder."""
        if self._chain is None:
            self._chain = build_defenses(self.config.privacy.defenses, self._defense_context())
            if self.threat_model == "inside":
                folder = self.adapters_dir()
                for defense in self._chain.defenses:
                    load = getattr(defense, "load", None)
                    if callable(load):
                        load(folder)
        return self._chain

    def _defense_context(self) -> DefenseContext:
        """The attacker's ``DefenseContext``: the client's (public token vectors, special ids, mode, seq_len) but
        with the attacker's own seed, and ``IMITATION_ROWS`` rows of its public text in place of the client's
        examples (where it has public text)."""
        try:
            examples = self.aux_examples(IMITATION_ROWS)
        except PrivacyError:
            examples = []  # a defense that needs examples says so itself
        return DefenseContext(
            token_embeddings=self.public_stage("head").token_embeddings().detach(),
            special_ids=frozenset(int(i) for i in self.tokenizer.all_special_ids),
            mode=self.config.split.mode,
            seq_len=self.config.train.seq_len,
            seed=derive(self.config.seed, "attacker") % 2**31,
            examples=examples,
            token_texts=token_texts(self.tokenizer),
        )

    def stage(self, role: Role) -> Stage:
        """As ``PublicKnowledge.stage``, except that under ``public`` the head is the attacker's imitation of the
        client's where a defense has a recipe of its own for it (``imitated_head``)."""
        if role == "head" and self.threat_model == "public":
            imitated = self.imitated_head()
            if imitated is not None:
                return imitated
        return super().stage(role)

    def imitated_head(self) -> Stage | None:
        """Under ``public``: the head a defense-aware attacker builds by running the client's defenses' own recipes
        (``Defense.imitate``, e.g. dualguard's local warm-up) from the public head on ``IMITATION_ROWS`` rows of its
        public text, with its own seed; ``None`` when no defense has one (then the head is the public one). Built
        once per defense settings, frozen, in eval mode, in float32."""
        key = ("imitated_head", json.dumps(self.defenses_identity(), sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self._imitate()
        return self.cache[key]

    def _imitate(self) -> Stage | None:
        chain = self.defenses()
        if all(type(d).imitate is Defense.imitate for d in chain.defenses):
            return None
        attn = self.config.model.attn_implementation
        stage = load_stage(self.source, self.spec, "head", "float32", self.device, attn)
        settings = self.config.lora.part("head")
        part = make_trainable(stage, settings, stage.family.lora_targets, self.config.seed, "head", [])
        parts = {"head": part, **({"tail": self.public_stage("tail")} if self.spec.mode == "ushape" else {})}
        context = dataclasses.replace(
            self._defense_context(),
            parts=parts,
            public_stage=self.public_stage,
            pad_id=int(self.tokenizer.pad_token_id),
            tokens=chain.tokens,
        )
        changed = [d.imitate(context) for d in chain.defenses]
        if not any(changed):
            return None
        plain = merged(part)
        if not isinstance(plain, Stage):
            raise PrivacyError(f"the imitated head did not merge into a stage (got {type(plain).__name__})")
        return plain.requires_grad_(False).eval()

    @torch.no_grad()
    def simulate(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attacker's copy of the client on public text: (B, T) ids and mask -> (B, T, d) smashed data, as
        the client would send it. The token defenses' ``tokens`` and ``embeddings`` hooks, the head per the threat
        model, then the message defenses' ``smashed`` hook (noise included, drawn from the attacker's own seed), in
        the client's order. With no defense it is exactly the head's output."""
        chain = self.defenses()
        self._simulated += 1
        key = ("attacker", self._simulated, 0)
        plugins = Plugins(chain.plugins)
        for plugin in chain.plugins:
            plugin.on_forward(key, True)
            ids = plugin.tokens(ids, mask)
        head = self.stage("head")
        if plugins.rewrites_embeddings:  # e.g. text_obfuscator: the head runs on the rewritten token vectors
            vectors = plugins.embeddings(head.embed_tokens(ids), ids, mask)
            hidden = head(inputs_embeds=vectors, attention_mask=mask).float()
        else:
            hidden = head(input_ids=ids, attention_mask=mask).float()  # (B, T, d)
        if chain.mods:
            message = Message("forward", *key, {"hidden": hidden, "attention_mask": mask})
            for mod in chain.mods:
                message = mod.on_request(message)
            hidden = message.tensors["hidden"].float()
        return hidden

    def cache_file(self, name: str) -> Path | None:
        """``RUN_DIR/attacks/cache/NAME``, where an attack keeps what it trained for later processes; ``None``
        when the context was not read from a run directory (then nothing is kept on disk)."""
        return None if self.run_dir is None else self.run_dir / "attacks" / "cache" / name


def bar(ctx: AttackContext, items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> tqdm[T]:
    """``items`` with a progress bar on stderr while ``ctx.progress`` is on (``leave=False``: inner loops)."""
    return tqdm(items, desc=desc, total=total, leave=leave, dynamic_ncols=True, disable=not ctx.progress)


class Attack(Protocol):
    """An attack: built from its options, it guesses the (B, T) token ids behind one observation."""

    name: ClassVar[str]

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor: ...


AttackFactory = Callable[[dict[str, str]], Attack]
# Attack modules register their factories by name; the first look-up imports the built-in ones.
ATTACKS = Registry[AttackFactory]("attack", error=PrivacyError, builtins=("splitlm.privacy.attacks",))


def register_attack(name: str) -> Callable[[AttackFactory], AttackFactory]:
    """Decorator registering an attack factory under ``name`` (``ATTACKS.register``)."""
    return ATTACKS.register(name)


def parse_options(kind: type, options: dict[str, str]) -> Any:
    """Build the options dataclass ``kind`` from ``key=value`` strings, converting by field type."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values: dict[str, Any] = {}
    for key, text in options.items():
        if key not in fields:
            raise PrivacyError(f"unknown option {key!r} for this attack; known: {', '.join(sorted(fields))}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                values[key] = text.lower() in ("true", "1")
            elif isinstance(default, int):
                values[key] = int(text)
            elif isinstance(default, float):
                values[key] = float(text)
            else:
                values[key] = None if text.lower() in ("none", "null", "") else text
        except ValueError:
            raise PrivacyError(f"option {key}={text!r}: expected a {type(default).__name__}") from None
    return kind(**values)


def make_attack(name: str, options: dict[str, str] | None = None) -> Attack:
    return ATTACKS.get(name)(options or {})


def observations(run_dir: Path, max_batches: int = 0, truth_dir: Path | None = None) -> list[Observation]:
    """The tapped micro-batches of a run, newest last (the last ``max_batches`` of them when > 0); ``truth_dir``: where
    ``truth/`` is when not in ``run_dir`` (a networked run: the client's output_dir)."""
    obs = [Observation.from_record(*record) for record in read_records(run_dir, truth_dir)]
    return obs[-max_batches:] if max_batches else obs


def score(
    ctx: AttackContext,
    name: str,
    attack: Attack,
    obs: list[Observation],
    sequences: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``attack`` on every observation and score it against the truth (means over micro-batches).

    ``sequences``: also write every rebuilt sequence there as JSON lines, one object per row of each
    micro-batch: ``client``, ``step``, ``micro``, ``row``, the decoded ``truth`` and ``guess`` text and that
    row's ``rouge_l`` and ``token_accuracy`` (``truth`` and the scores are null for a micro-batch recorded
    without its truth). ``progress``: show progress bars on stderr (kept on ``ctx.progress`` for the
    attack's own loops).

    When the run's data lists its PII (``data.name=pii``, or a JSON lines file with an ``entities`` column),
    the result also holds ``pii_recovered`` (``privacy.metrics.pii_recovered`` over every scored row: per
    entity type and ``"all"``, the fraction of the entities in the decoded truth that the decoded guess holds
    verbatim), and so does each sequence row (for that row alone).
    """
    started = time.perf_counter()
    ctx.progress = progress
    rouges, accuracies = [], []
    example: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    entities = run_entities(ctx)
    found: dict[str, int] = {}
    recovered: dict[str, int] = {}
    torch.manual_seed(ctx.config.seed)
    for o in bar(ctx, obs, f"{name}: micro-batches", leave=True):
        guess = attack.invert(ctx, o).to("cpu")  # (B, T)
        if sequences is not None:
            rows.extend(_sequences(ctx, o, guess, entities))
        if o.truth is None:
            continue
        rouges.append(rouge_l(o.truth, guess, o.attention_mask))
        accuracies.append(token_accuracy(o.truth, guess, o.attention_mask))
        if entities:
            truths = [ctx.decode(t, m) for t, m in zip(o.truth, o.attention_mask, strict=True)]
            guesses = [ctx.decode(g, m) for g, m in zip(guess, o.attention_mask, strict=True)]
            for total, counts in zip((found, recovered), pii_counts(truths, guesses, entities), strict=True):
                for kind, count in counts.items():
                    total[kind] = total.get(kind, 0) + count
        if not example:
            example = {
                "truth": ctx.decode(o.truth[0], o.attention_mask[0]),
                "guess": ctx.decode(guess[0], o.attention_mask[0]),
            }
    if not rouges:
        raise PrivacyError("the run has no truth records to score against (truth/ missing); re-run with the tap")
    result = {
        "attack": name,
        "threat_model": ctx.threat_model,
        "rouge_l": sum(rouges) / len(rouges),
        "token_accuracy": sum(accuracies) / len(accuracies),
        "batches": len(rouges),
        "seconds": time.perf_counter() - started,
        "example": example,
    }
    if entities:
        shares = {kind: recovered[kind] / found[kind] for kind in found}
        result["pii_recovered"] = {**shares, "all": sum(recovered.values()) / sum(found.values())} if found else {}
    if sequences is not None:
        write_jsonl(sequences, rows)  # atomic, like the result file
        result["sequences"] = str(sequences)
    return result


def run_entities(ctx: PublicKnowledge) -> list[tuple[str, str]]:
    """The ``(type, text)`` PII entities of the run's training data (``data.known_entities``, regenerated from
    the run's config and seed), ``[]`` when the data lists none or can no longer be read; kept in ``ctx.cache``."""
    if "pii_entities" not in ctx.cache:
        try:
            ctx.cache["pii_entities"] = known_entities(ctx.config.data, ctx.config.seed)
        except DataError:
            ctx.cache["pii_entities"] = []  # e.g. the run's data file moved: score without PII
    return ctx.cache["pii_entities"]


def _sequences(
    ctx: AttackContext, o: Observation, guess: torch.Tensor, entities: list[tuple[str, str]] | None = None
) -> list[dict[str, Any]]:
    """One record per row of the micro-batch ``o``: its key, the decoded truth and guess, the row's scores
    (``pii_recovered`` too when ``entities`` are known)."""
    client, step, micro = o.key
    records = []
    for row, mask in enumerate(o.attention_mask):
        truth = None if o.truth is None else o.truth[row : row + 1]  # (1, T)
        record = {
            "client": client,
            "step": step,
            "micro": micro,
            "row": row,
            "truth": None if truth is None else ctx.decode(truth[0], mask),
            "guess": ctx.decode(guess[row], mask),
            "rouge_l": None if truth is None else rouge_l(truth, guess[row : row + 1], mask[None]),
            "token_accuracy": None if truth is None else token_accuracy(truth, guess[row : row + 1], mask[None]),
        }
        if entities:
            text = record["truth"]
            record["pii_recovered"] = None if text is None else pii_recovered([text], [record["guess"]], entities)
        records.append(record)
    return records


def results_folder(run_dir: Path, threat_model: str = "public") -> Path:
    """Where ``splitlm attack`` writes an attack's results: ``RUN_DIR/attacks`` (public), ``RUN_DIR/attacks/inside``
    (inside), so the two threat models' results sit side by side and never overwrite each other."""
    if threat_model not in THREAT_MODELS:
        raise PrivacyError(f"unknown threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
    folder = run_dir / "attacks"
    return folder if threat_model == "public" else folder / threat_model


def run_attack(
    run_dir: Path,
    name: str,
    options: dict[str, str] | None = None,
    max_batches: int = 0,
    ctx: AttackContext | None = None,
    progress: bool = True,
    threat_model: str = "public",
    client_dir: Path | None = None,
) -> dict[str, Any]:
    """``splitlm attack``: attack a recorded run under ``threat_model`` (that of ``ctx`` when given). The result
    also goes to ``results_folder(run_dir, threat_model)/NAME.json`` (``RUN_DIR/attacks/NAME.json`` for public,
    ``RUN_DIR/attacks/inside/NAME.json`` for inside) and every rebuilt sequence beside it as ``NAME.jsonl`` (see
    ``score``); ``client_dir``: where the client's adapters are (inside; default the run's); ``progress``: show
    progress bars."""
    attack = make_attack(name, options)
    obs = observations(run_dir, max_batches)
    ctx = ctx or AttackContext.from_run(run_dir, threat_model=threat_model, client_dir=client_dir)
    folder = results_folder(run_dir, ctx.threat_model)
    folder.mkdir(parents=True, exist_ok=True)
    scored = score(ctx, name, attack, obs, sequences=folder / f"{name}.jsonl", progress=progress)
    result = {**scored, "run_dir": str(run_dir), "options": dict(options or {})}
    write_json(folder / f"{name}.json", result)  # atomic: an interrupted attack leaves the last result whole
    return result
