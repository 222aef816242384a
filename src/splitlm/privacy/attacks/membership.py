"""Membership inference (survey §5.1.4): was this row among the client's training rows?

The attacker is the honest-but-curious server after training. It holds what it trained itself, its trunk adapter
(``RUN_DIR/adapters/trunk.safetensors``: ``PublicKnowledge.trained_trunk``), the public pretrained weights of the
whole model, public text of the same kind as the client's (``aux``) and, with the tap on, the smashed data it
received (``Observation``). It never holds the client's head or tail (under ``public``). Each attack gives every
candidate row (a tokenized ``Example``) a score, higher meaning "more likely a member":

- ``loss`` (likelihood ratio): the row's mean token loss under the attacker's copy of the client (its head, per
  the threat model, behind the run's defenses: ``AttackContext.simulate``) + the server's TRAINED trunk + the
  public tail (U-shape; a vanilla trunk ends with the LM head), minus the same with the PRETRAINED trunk as the
  reference model, negated: fine-tuning lowers a member's loss more than a non-member's, and the reference removes
  what makes a row easy or hard for the model anyway.
- ``ktmia`` (Yi et al., knowledge-transfer MIA): a pseudo-client, a head and tail initialised from the public
  weights with LoRA of the run's rank, is spliced onto the server's frozen trained trunk and fine-tuned on public
  text to align with it (``steps``); a second one is fine-tuned the same way on the pretrained trunk, the reference.
  The score is the same loss ratio through the two aligned models. Public text is not fed through the defenses:
  the pseudo-client is the attacker's own.
- ``observed``: what the server saw. The candidate is passed through the attacker's copy of the client and compared
  with every smashed row the tap recorded of the same length (mean cosine over its positions); the score is the
  best match. It needs the tap to have kept the rows (``privacy.tap.max_batches`` covering an epoch) and the data
  unpacked; it reads nothing of the trained trunk.

``calibrate``: a threshold from public rows alone (the score below which 99 % of public non-members fall), so the
attacker decides "member" without any labelled member. ``mia_metrics`` scores a set of members against non-members
(AUC and TPR at 1 % FPR, scikit-learn); ``auc_interval`` bootstraps the AUC. ``membership_scores(run_dir, examples)``
is the entry point for a finished run (``splitlm attack RUN_DIR mia_loss`` writes ``RUN_DIR/attacks/mia_loss.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitlm.data import IGNORE_INDEX, Batch, Example, collate
from splitlm.errors import PrivacyError
from splitlm.files import write_json
from splitlm.models import Stage
from splitlm.peft import load_trainable, make_trainable, save_trainable, trainable_parameters
from splitlm.privacy.attacks.base import AttackContext, bar, observations, parse_options, results_folder

MIA_ATTACKS = ("loss", "ktmia", "observed")


# --- metrics ---------------------------------------------------------------------------------------------------


def mia_metrics(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> dict[str, float]:
    """``{"auc", "tpr_at_1pct_fpr"}`` of telling members from non-members by score (higher = member): the ROC AUC
    (0.5: chance) and the largest true-positive rate among thresholds with at most 1 % false positives."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members, others = [float(s) for s in member_scores], [float(s) for s in nonmember_scores]
    if not members or not others:
        raise PrivacyError(
            f"membership metrics need members and non-members (got {len(members)} and {len(others)}); give both"
        )
    if any(not math.isfinite(s) for s in members + others):
        raise PrivacyError("membership scores must be finite numbers; a NaN or inf score came from a broken model")
    truth = [1] * len(members) + [0] * len(others)
    scores = members + others
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "tpr_at_1pct_fpr": float(max(t for f, t in zip(fpr, tpr, strict=True) if f <= 0.01)),
    }


def auc_interval(
    member_scores: Sequence[float], nonmember_scores: Sequence[float], rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The 95 % bootstrap interval of the AUC (both sets resampled with replacement, ``rounds`` times)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    members, others = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    rng = np.random.default_rng(seed)
    truth = np.r_[np.ones(len(members)), np.zeros(len(others))]
    aucs = []
    for _ in range(rounds):
        a = members[rng.integers(0, len(members), len(members))]
        b = others[rng.integers(0, len(others), len(others))]
        aucs.append(roc_auc_score(truth, np.r_[a, b]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


# --- models made of parts ----------------------------------------------------------------------------------------


def forward_parts(parts: Sequence[nn.Module], batch: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits of ``batch`` through ``parts`` (head, trunk[, tail]); ``hidden``: the head's (B, T, d)
    output already computed (then ``parts`` starts after the head)."""
    mask = batch.attention_mask
    if hidden is None:
        hidden = parts[0](input_ids=batch.input_ids, attention_mask=mask)
        parts = parts[1:]
    for part in parts:
        hidden = part(hidden_states=hidden, attention_mask=mask)
    return hidden


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token loss of each row over its loss positions (``labels`` (B, T), IGNORE_INDEX elsewhere)."""
    shifted = labels[:, 1:]
    predicted = logits[:, :-1].float().transpose(1, 2)  # (B, V, T-1)
    losses = F.cross_entropy(predicted, shifted, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (shifted != IGNORE_INDEX).sum(1).clamp_min(1)
    return losses.sum(1) / counts  # (B,)


def batches_of(ctx: AttackContext, examples: Sequence[Example], batch_size: int) -> list[Batch]:
    if not examples:
        raise PrivacyError("no candidate rows to score: give at least one example")
    pad = int(ctx.tokenizer.pad_token_id)
    seq_len = ctx.config.train.seq_len
    rows = [e if len(e.input_ids) <= seq_len else Example(e.input_ids[:seq_len], e.labels[:seq_len], e.label)
            for e in examples]  # fmt: skip
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


# --- the attacks -----------------------------------------------------------------------------------------------


class MembershipAttack(Protocol):
    name: ClassVar[str]

    def scores(self, ctx: AttackContext, batches: list[Batch]) -> list[float]: ...


@dataclass(frozen=True)
class LossOptions:
    batch_size: int = 8  # rows per forward pass
    trunk: str | None = None  # the server's trunk adapter file (default: RUN_DIR/adapters/trunk.safetensors)
    calib_rows: int = 100  # public rows for the threshold (``calibrate``)
    aux: str | None = None  # a data name for the public text (default: the run's unseen rows)

    def check(self) -> None:
        if self.batch_size < 1 or self.calib_rows < 1:
            raise PrivacyError("membership options: batch_size and calib_rows must be >= 1")


@dataclass
class LossRatio:
    """``loss``: the reference model's loss minus the trained trunk's, both behind the attacker's copy of the
    client (see the module's docstring)."""

    name: ClassVar[str] = "loss"
    options: LossOptions = LossOptions()

    def pairs(self, ctx: AttackContext) -> tuple[list[nn.Module], list[nn.Module]]:
        """(the parts after the head with the trained trunk, the same with the pretrained trunk)."""
        trunk = ctx.trained_trunk(Path(self.options.trunk) if self.options.trunk else None)
        tail = [ctx.stage("tail")] if ctx.spec.mode == "ushape" else []
        return [trunk, *tail], [ctx.public_stage("trunk"), *tail]

    @torch.no_grad()
    def scores(self, ctx: AttackContext, batches: list[Batch]) -> list[float]:
        trained, reference = self.pairs(ctx)
        out: list[float] = []
        for batch in bar(ctx, batches, "mia loss: scoring"):
            batch = batch.to(ctx.device)
            hidden = ctx.simulate(batch.input_ids, batch.attention_mask)  # (B, T, d): the same for both models
            target = row_losses(forward_parts(trained, batch, hidden), batch.labels)
            ref = row_losses(forward_parts(reference, batch, hidden), batch.labels)
            out.extend((ref - target).tolist())
        return out


@dataclass(frozen=True)
class KtmiaOptions:
    steps: int = 40  # AdamW steps of each pseudo-client on public text
    lr: float = 0.001  # their learning rate
    batch_size: int = 8
    aux_rows: int = 200  # public rows the pseudo-clients fine-tune on
    calib_rows: int = 100  # further public rows for the threshold (``calibrate``)
    rank: int = 0  # LoRA rank of the pseudo-client (0: the run's lora.rank)
    trunk: str | None = None  # the server's trunk adapter file (default: RUN_DIR/adapters/trunk.safetensors)
    aux: str | None = None  # a data name for the public text (default: the run's unseen rows)

    def check(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or self.aux_rows < 1 or self.calib_rows < 1:
            raise PrivacyError("ktmia options: steps >= 0, lr > 0, batch_size, aux_rows and calib_rows >= 1")
        if self.rank < 0:
            raise PrivacyError(f"ktmia option rank={self.rank}: expected >= 0 (0: the run's lora.rank)")


@dataclass
class Ktmia:
    """``ktmia``: two pseudo-clients from public weights, each aligned on public text with one trunk (the server's
    trained one, the pretrained one) frozen; the score is the loss ratio through the two aligned models."""

    name: ClassVar[str] = "ktmia"
    options: KtmiaOptions = KtmiaOptions()

    def trunks(self, ctx: AttackContext) -> tuple[Stage, Stage]:
        return ctx.trained_trunk(Path(self.options.trunk) if self.options.trunk else None), ctx.public_stage("trunk")

    def pseudo_client(self, ctx: AttackContext, trunk: Stage, which: str) -> list[nn.Module]:
        """The pseudo-client's parts (head[, tail]) aligned with ``trunk`` on public text, frozen; cached in
        ``ctx.cache`` and, for a context read from a run, in ``RUN_DIR/attacks/cache/ktmia-<which>-<hash>/``."""
        key = ("ktmia", which, json.dumps(asdict(self.options), sort_keys=True))
        if key in ctx.cache:
            return ctx.cache[key]
        from splitlm.models import load_stage

        config = ctx.config
        roles = ("head", "tail") if ctx.spec.mode == "ushape" else ("head",)
        settings = config.lora.part("head").model_copy(update={"method": "lora"})
        if self.options.rank:
            settings = settings.model_copy(update={"rank": self.options.rank, "alpha": 2.0 * self.options.rank})
        parts: dict[str, nn.Module] = {}
        for role in roles:
            stage = load_stage(ctx.source, ctx.spec, role, "float32", ctx.device, config.model.attn_implementation)
            parts[role] = make_trainable(stage, settings, stage.family.lora_targets, config.seed, role)
        digest = hashlib.sha256(json.dumps([key[2], which, self._trunk_identity(ctx)]).encode()).hexdigest()[:16]
        folder = ctx.cache_file(f"ktmia-{which}-{digest}")
        if folder is not None and all((folder / f"{r}.safetensors").is_file() for r in roles):
            for role in roles:
                load_trainable(parts[role], folder / f"{role}.safetensors")
        else:
            self._align(ctx, parts, trunk, which)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                for role in roles:
                    save_trainable(parts[role], folder / f"{role}.safetensors")
        for part in parts.values():
            part.requires_grad_(False)
            part.eval()
        ordered = [parts["head"], trunk, *([parts["tail"]] if "tail" in parts else [])]
        ctx.cache[key] = ordered
        return ordered

    def _trunk_identity(self, ctx: AttackContext) -> str:
        """A hash of the trunk adapter file the attack reads (so a cached pseudo-client follows the trunk)."""
        path = Path(self.options.trunk) if self.options.trunk else None
        if path is None and ctx.run_dir is not None:
            path = ctx.run_dir / "adapters" / "trunk.safetensors"
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else ""

    @torch.enable_grad()
    def _align(self, ctx: AttackContext, parts: dict[str, nn.Module], trunk: Stage, which: str) -> None:
        batches = ctx.aux_batches(self.options.aux_rows, self.options.batch_size, self.options.aux)
        params = [p for part in parts.values() for p in trainable_parameters(part)]
        optimizer = torch.optim.AdamW(params, lr=self.options.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(ctx.config.seed)
        for part in parts.values():
            part.train()
        ordered = [parts["head"], trunk, *([parts["tail"]] if "tail" in parts else [])]
        for _ in bar(ctx, range(self.options.steps), f"ktmia: aligning the pseudo-client with the {which} trunk"):
            batch = batches[int(torch.randint(len(batches), (1,), generator=generator))].to(ctx.device)
            loss = row_losses(forward_parts(ordered, batch), batch.labels).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def scores(self, ctx: AttackContext, batches: list[Batch]) -> list[float]:
        if ctx.threat_model != "public":
            raise PrivacyError(
                "ktmia builds its own pseudo-client from public weights: run it under the public threat model"
            )
        trained, pretrained = self.trunks(ctx)
        target = self.pseudo_client(ctx, trained, "trained")
        reference = self.pseudo_client(ctx, pretrained, "pretrained")
        out: list[float] = []
        for batch in bar(ctx, batches, "ktmia: scoring"):
            batch = batch.to(ctx.device)
            a = row_losses(forward_parts(target, batch), batch.labels)
            b = row_losses(forward_parts(reference, batch), batch.labels)
            out.extend((b - a).tolist())
        return out


@dataclass(frozen=True)
class ObservedOptions:
    batch_size: int = 8
    calib_rows: int = 100
    aux: str | None = None

    def check(self) -> None:
        if self.batch_size < 1 or self.calib_rows < 1:
            raise PrivacyError("observed options: batch_size and calib_rows must be >= 1")


@dataclass
class Observed:
    """``observed``: the best mean cosine match between the candidate's simulated smashed data and a recorded
    smashed row of the same length (see the module's docstring)."""

    name: ClassVar[str] = "observed"
    options: ObservedOptions = ObservedOptions()

    def recorded(self, ctx: AttackContext) -> dict[int, torch.Tensor]:
        """Recorded smashed rows by length: length -> (N, L, d) unit vectors."""
        if "mia_observed" not in ctx.cache:
            if ctx.run_dir is None:
                raise PrivacyError("the observed attack reads the server tap: read the context from a run (from_run)")
            by_length: dict[int, list[torch.Tensor]] = {}
            for obs in observations(ctx.run_dir):
                for row, mask in zip(obs.smashed, obs.attention_mask, strict=True):
                    real = mask.bool()
                    by_length.setdefault(int(real.sum()), []).append(F.normalize(row[real].float(), dim=-1))
            ctx.cache["mia_observed"] = {n: torch.stack(rows) for n, rows in by_length.items()}
        return ctx.cache["mia_observed"]

    @torch.no_grad()
    def scores(self, ctx: AttackContext, batches: list[Batch]) -> list[float]:
        table = self.recorded(ctx)
        out: list[float] = []
        for batch in bar(ctx, batches, "mia observed: matching"):
            batch = batch.to(ctx.device)
            hidden = ctx.simulate(batch.input_ids, batch.attention_mask)  # (B, T, d)
            for row, mask in zip(hidden, batch.attention_mask, strict=True):
                real = mask.bool()
                rows = table.get(int(real.sum()))
                if rows is None or rows.shape[-1] != row.shape[-1]:
                    out.append(-1.0)  # nothing of this length was seen: the least member-like score
                    continue
                mine = F.normalize(row[real].float(), dim=-1)  # (L, d)
                out.append(float(torch.einsum("ld,nld->nl", mine, rows.to(mine.device)).mean(1).max()))
        return out


Options = LossOptions | KtmiaOptions | ObservedOptions
FACTORIES: dict[str, tuple[type, Callable[[Any], MembershipAttack]]] = {
    "loss": (LossOptions, LossRatio),
    "ktmia": (KtmiaOptions, Ktmia),
    "observed": (ObservedOptions, Observed),
}


def make_membership_attack(name: str, options: dict[str, str] | None = None) -> MembershipAttack:
    if name not in FACTORIES:
        raise PrivacyError(f"unknown membership attack {name!r}; choose one of {', '.join(MIA_ATTACKS)}")
    kind, factory = FACTORIES[name]
    parsed = parse_options(kind, options or {})
    parsed.check()
    return factory(parsed)


def _attack(ctx: AttackContext, name: str, options: dict[str, str] | None) -> MembershipAttack:
    """The attack, kept in ``ctx.cache`` so that later calls with the same context reuse what it built."""
    key = ("membership", name, json.dumps(options or {}, sort_keys=True))
    if key not in ctx.cache:
        ctx.cache[key] = make_membership_attack(name, options)
    return ctx.cache[key]


def membership_scores(
    run_dir: Path | None,
    examples: Sequence[Example],
    attack: str = "loss",
    options: dict[str, str] | None = None,
    ctx: AttackContext | None = None,
    progress: bool = False,
    threat_model: str = "public",
) -> list[float]:
    """One score per row of ``examples`` (tokenized as the run tokenizes; longer ones are cut to ``train.seq_len``),
    higher = more likely a member of the client's training rows, by ``attack`` (``MIA_ATTACKS``) on the finished
    run ``run_dir``: its config, its server's trunk adapter (``adapters/trunk.safetensors``) and, for ``observed``,
    its tap. ``ctx``: an attacker context to reuse (what an attack built, e.g. ktmia's pseudo-clients, stays in it:
    score members and non-members with the same one); ``options``: the attack's options as ``key=value`` strings."""
    if ctx is None:
        if run_dir is None:
            raise PrivacyError("membership_scores needs a run directory or an attacker context")
        ctx = AttackContext.from_run(run_dir, threat_model=threat_model)
    ctx.progress = progress
    chosen = _attack(ctx, attack, options)
    batch_size = int(getattr(getattr(chosen, "options", None), "batch_size", 8))
    torch.manual_seed(ctx.config.seed)  # the simulated defenses' draws: the same rows, the same scores
    return chosen.scores(ctx, batches_of(ctx, examples, batch_size))


def calibrate(
    ctx: AttackContext, attack: str = "loss", options: dict[str, str] | None = None, fpr: float = 0.01
) -> dict[str, float]:
    """The attacker's threshold from public text alone: it scores ``calib_rows`` public rows it knows are not
    members (past those ktmia fine-tunes on) and takes the ``1 - fpr`` quantile; ``{"threshold", "public_rows"}``."""
    chosen = _attack(ctx, attack, options)
    opts = chosen.options  # type: ignore[attr-defined]
    skip = getattr(opts, "aux_rows", 0)
    public = ctx.aux_examples(skip + opts.calib_rows, opts.aux)[skip:]
    if not public:
        raise PrivacyError(f"no public rows left to calibrate on past the first {skip}; lower aux_rows or pass aux=")
    torch.manual_seed(ctx.config.seed)
    scores = sorted(chosen.scores(ctx, batches_of(ctx, public, opts.batch_size)))
    index = min(len(scores) - 1, math.ceil((1 - fpr) * len(scores)) - 1)
    return {"threshold": scores[max(index, 0)], "public_rows": float(len(scores))}


def run_membership(
    run_dir: Path,
    attack: str,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    options: dict[str, str] | None = None,
    threat_model: str = "public",
    progress: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """``splitlm attack RUN_DIR mia_<attack>``: score ``members`` (the client's training rows) and ``nonmembers``
    (held-out rows of the same source), with the attacker's own public threshold, and write the result to
    ``results_folder(run_dir, threat_model)/<name>.json`` (default ``mia_<attack>``)."""
    ctx = AttackContext.from_run(run_dir, threat_model=threat_model)
    chosen = _attack(ctx, attack, options)
    opts = chosen.options  # type: ignore[attr-defined]
    public = {tuple(e.input_ids) for e in ctx.aux_examples(getattr(opts, "aux_rows", 0) + opts.calib_rows, opts.aux)}
    if public & {tuple(e.input_ids) for e in nonmembers}:
        raise PrivacyError(
            "the attacker's public text holds some of the non-members (the run trained on every row but its held-out "
            "ones, which are then the public text too): train with data.max_rows below the data's size, or pass "
            "aux=<data name>"
        )
    inside = membership_scores(None, members, attack, options, ctx=ctx, progress=progress)
    outside = membership_scores(None, nonmembers, attack, options, ctx=ctx, progress=progress)
    low, high = auc_interval(inside, outside, seed=ctx.config.seed)
    calibration = calibrate(ctx, attack, options)
    threshold = calibration["threshold"]
    result = {
        "attack": f"mia_{attack}",
        "threat_model": ctx.threat_model,
        **mia_metrics(inside, outside),
        "auc_95ci": [low, high],
        "members": len(inside),
        "nonmembers": len(outside),
        "threshold": threshold,
        "public_rows": int(calibration["public_rows"]),
        "tpr_at_threshold": sum(s > threshold for s in inside) / len(inside),
        "fpr_at_threshold": sum(s > threshold for s in outside) / len(outside),
        "member_score_mean": sum(inside) / len(inside),
        "nonmember_score_mean": sum(outside) / len(outside),
        "run_dir": str(run_dir),
        "options": dict(options or {}),
    }
    folder = results_folder(run_dir, ctx.threat_model)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name or 'mia_' + attack}.json", result)
    return result
