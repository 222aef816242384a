"""What every attack shares: the recorded observations, the attacker's knowledge, a registry, scoring.

The attacker is an honest-but-curious server. It knows the public pretrained weights of the whole model
(not the client's fine-tuned adapters), public auxiliary text of the same kind as the client's, and
what it received during the run: ``Observation`` holds exactly what the server tap recorded. The true
tokens ride along for scoring only; an attack's ``invert`` never reads ``truth``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from splitlm.config import Config, load_config
from splitlm.data import Batch, collate, load_rows, split_rows, tokenize_rows
from splitlm.errors import PrivacyError
from splitlm.frameworks.loop import write_json
from splitlm.models import ModelSource, Stage, load_stage, resolve_model
from splitlm.models.split import SplitSpec
from splitlm.privacy.metrics import rouge_l, token_accuracy
from splitlm.privacy.tap import Key, read_records


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


class AttackContext:
    """The attacker's knowledge: the run's config, the pretrained parts, public auxiliary text, a cache."""

    def __init__(self, config: Config, source: ModelSource | None = None, device: str = "cpu") -> None:
        self.config = config
        self.source = source or resolve_model(config.model.name, config.model.revision)
        self.tokenizer = self.source.tokenizer()
        self.device = torch.device(device)
        self.spec = SplitSpec(config.split.mode, config.split.head_layers, config.split.tail_layers)
        self.cache: dict[Any, Any] = {}  # e.g. a trained SIP inverter, shared by BiSR(b)
        self._stages: dict[str, Stage] = {}

    @classmethod
    def from_run(cls, run_dir: Path, device: str = "cpu") -> AttackContext:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise PrivacyError(f"{run_dir} is not a run directory ({path} missing); give the output_dir of a run")
        return cls(load_config(path), device=device)

    def stage(self, role: str) -> Stage:
        """A pretrained part (public weights, no adapters), frozen and in eval mode, in float32."""
        if role == "tail" and self.spec.mode != "ushape":
            raise PrivacyError("this attack needs the client's tail, which only a ushape split has")
        if role not in self._stages:
            stage = load_stage(
                self.source, self.spec, role, "float32", self.device, self.config.model.attn_implementation
            )  # type: ignore[arg-type]
            self._stages[role] = stage.eval()
        return self._stages[role]

    def token_embeddings(self) -> torch.Tensor:
        return self.stage("head").token_embeddings().detach()  # (V, d)

    def aux_batches(self, rows: int, batch_size: int, name: str | None = None) -> list[Batch]:
        """Public text for the attacker: ``name`` (a data name), else rows of the run's dataset the client
        never trained on (those past ``data.max_rows``, or else its held-out rows)."""
        key = ("aux_batches", rows, batch_size, name)
        if key not in self.cache:  # SIP, the nn dictionary and FSHA read the same public text
            self.cache[key] = self._aux_batches(rows, batch_size, name)
        return self.cache[key]

    def _aux_batches(self, rows: int, batch_size: int, name: str | None) -> list[Batch]:
        data = self.config.data
        if name:
            pool = load_rows(data.model_copy(update={"name": name, "max_rows": None}))
        else:
            everything = load_rows(data.model_copy(update={"max_rows": None}))
            if data.max_rows is not None and len(everything) > data.max_rows:
                pool = everything[data.max_rows :]
            else:
                pool = split_rows(everything, data.eval_size, self.config.seed)[1]
        examples = tokenize_rows(pool[:rows], self.tokenizer, data, self.config.train.seq_len)
        if not examples:
            raise PrivacyError("no auxiliary text for the attacker: pass aux=<data name> with public text")
        pad = int(self.tokenizer.pad_token_id)
        return [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        return self.tokenizer.decode([int(t) for t in ids[mask.bool()]])


class Attack(Protocol):
    """An attack: built from its options, it guesses the (B, T) token ids behind one observation."""

    name: ClassVar[str]

    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor: ...


AttackFactory = Callable[[dict[str, str]], Attack]
ATTACKS: dict[str, AttackFactory] = {}


def register_attack(name: str) -> Callable[[AttackFactory], AttackFactory]:
    def wrap(factory: AttackFactory) -> AttackFactory:
        ATTACKS[name] = factory
        return factory

    return wrap


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
    from splitlm.privacy import attacks as _  # noqa: F401  (registers the built-in attacks)

    factory = ATTACKS.get(name)
    if factory is None:
        raise PrivacyError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return factory(options or {})


def observations(run_dir: Path, max_batches: int = 0) -> list[Observation]:
    """The tapped micro-batches of a run, newest last (the last ``max_batches`` of them when > 0)."""
    obs = [Observation.from_record(*record) for record in read_records(run_dir)]
    return obs[-max_batches:] if max_batches else obs


def score(ctx: AttackContext, name: str, attack: Attack, obs: list[Observation]) -> dict[str, Any]:
    """Run ``attack`` on every observation and score it against the truth."""
    started = time.perf_counter()
    rouges, accuracies = [], []
    example: dict[str, str] = {}
    torch.manual_seed(ctx.config.seed)
    for o in obs:
        guess = attack.invert(ctx, o).to("cpu")
        if o.truth is None:
            continue
        rouges.append(rouge_l(o.truth, guess, o.attention_mask))
        accuracies.append(token_accuracy(o.truth, guess, o.attention_mask))
        if not example:
            example = {
                "truth": ctx.decode(o.truth[0], o.attention_mask[0]),
                "guess": ctx.decode(guess[0], o.attention_mask[0]),
            }
    if not rouges:
        raise PrivacyError("the run has no truth records to score against (truth/ missing); re-run with the tap")
    return {
        "attack": name,
        "rouge_l": sum(rouges) / len(rouges),
        "token_accuracy": sum(accuracies) / len(accuracies),
        "batches": len(rouges),
        "seconds": time.perf_counter() - started,
        "example": example,
    }


def run_attack(
    run_dir: Path,
    name: str,
    options: dict[str, str] | None = None,
    max_batches: int = 0,
    ctx: AttackContext | None = None,
) -> dict[str, Any]:
    """``splitlm attack``: attack a recorded run; the result also goes to ``RUN_DIR/attacks/NAME.json``."""
    attack = make_attack(name, options)
    obs = observations(run_dir, max_batches)
    ctx = ctx or AttackContext.from_run(run_dir)
    result = {**score(ctx, name, attack, obs), "run_dir": str(run_dir), "options": dict(options or {})}
    folder = run_dir / "attacks"
    folder.mkdir(exist_ok=True)
    write_json(folder / f"{name}.json", result)  # atomic: an interrupted attack leaves the last result whole
    return result
