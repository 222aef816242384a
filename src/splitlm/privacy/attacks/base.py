"""What every attack shares: the recorded observations, the attacker's knowledge, a registry, scoring.

The attacker is an honest-but-curious server. It knows the public pretrained weights of the whole model
(not the client's fine-tuned adapters), public auxiliary text of the same kind as the client's
(``splitlm.privacy.knowledge``), and what it received during the run: ``Observation`` holds exactly what
the server tap recorded. The true tokens ride along for scoring only; an attack's ``invert`` never reads
``truth``.

``run_attack`` (``splitlm attack``) writes the scores to ``RUN_DIR/attacks/NAME.json`` and every rebuilt
sequence, with its truth and its own scores, to ``RUN_DIR/attacks/NAME.jsonl``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from splitlm.errors import PrivacyError
from splitlm.files import write_json, write_jsonl
from splitlm.privacy.knowledge import PublicKnowledge
from splitlm.privacy.metrics import rouge_l, token_accuracy
from splitlm.privacy.tap import Key, read_records
from splitlm.registry import Registry

T = TypeVar("T")
THREAT_MODELS = ("public", "inside")  # what the attacker holds: see ``AttackContext``


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
    """The offline attacker's context: its public knowledge (``PublicKnowledge``: config, pretrained parts,
    auxiliary text, ``cache``, ``run_dir``) and whether its long loops show progress bars (``score`` sets
    ``progress``)."""

    progress: bool = True

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
    """
    started = time.perf_counter()
    ctx.progress = progress
    rouges, accuracies = [], []
    example: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    torch.manual_seed(ctx.config.seed)
    for o in bar(ctx, obs, f"{name}: micro-batches", leave=True):
        guess = attack.invert(ctx, o).to("cpu")  # (B, T)
        if sequences is not None:
            rows.extend(_sequences(ctx, o, guess))
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
    result = {
        "attack": name,
        "rouge_l": sum(rouges) / len(rouges),
        "token_accuracy": sum(accuracies) / len(accuracies),
        "batches": len(rouges),
        "seconds": time.perf_counter() - started,
        "example": example,
    }
    if sequences is not None:
        write_jsonl(sequences, rows)  # atomic, like the result file
        result["sequences"] = str(sequences)
    return result


def _sequences(ctx: AttackContext, o: Observation, guess: torch.Tensor) -> list[dict[str, Any]]:
    """One record per row of the micro-batch ``o``: its key, the decoded truth and guess, the row's scores."""
    client, step, micro = o.key
    records = []
    for row, mask in enumerate(o.attention_mask):
        truth = None if o.truth is None else o.truth[row : row + 1]  # (1, T)
        records.append(
            {
                "client": client,
                "step": step,
                "micro": micro,
                "row": row,
                "truth": None if truth is None else ctx.decode(truth[0], mask),
                "guess": ctx.decode(guess[row], mask),
                "rouge_l": None if truth is None else rouge_l(truth, guess[row : row + 1], mask[None]),
                "token_accuracy": None if truth is None else token_accuracy(truth, guess[row : row + 1], mask[None]),
            }
        )
    return records


def run_attack(
    run_dir: Path,
    name: str,
    options: dict[str, str] | None = None,
    max_batches: int = 0,
    ctx: AttackContext | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``splitlm attack``: attack a recorded run. The result also goes to ``RUN_DIR/attacks/NAME.json`` and every
    rebuilt sequence to ``RUN_DIR/attacks/NAME.jsonl`` (see ``score``); ``progress``: show progress bars."""
    attack = make_attack(name, options)
    obs = observations(run_dir, max_batches)
    ctx = ctx or AttackContext.from_run(run_dir)
    folder = run_dir / "attacks"
    folder.mkdir(exist_ok=True)
    scored = score(ctx, name, attack, obs, sequences=folder / f"{name}.jsonl", progress=progress)
    result = {**scored, "run_dir": str(run_dir), "options": dict(options or {})}
    write_json(folder / f"{name}.json", result)  # atomic: an interrupted attack leaves the last result whole
    return result
