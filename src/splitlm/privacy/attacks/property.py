"""Property inference (survey §5.1.5): a client's label mix, read off the smashed data it sent.

The honest-but-curious server wants the share of one class in a client's data (``value``, e.g. the share of
"rotten" reviews in Rotten Tomatoes), a property of the data set rather than of any row. It holds public labelled
text of the same kind (``aux``) and the public head: it passes the public rows through its copy of the client
(``AttackContext.simulate``: the head per the threat model, the run's defenses included), mean-pools each row's
smashed vectors over its real positions, and fits a logistic regression (scikit-learn) telling ``value`` from the
rest. Then it pools each client's smashed rows the tap recorded (``privacy.tap.enabled``; ``max_batches`` sets how
many) and estimates the share three ways (``ESTIMATORS``):

- ``prob``: the mean predicted probability of ``value``;
- ``cc`` (classify and count): the share of rows classified as ``value``;
- ``acc`` (adjusted classify and count): ``(cc - fpr) / (tpr - fpr)``, clipped to [0, 1], with the classifier's
  true- and false-positive rates measured on public rows held back from its training (``val_share``); it undoes
  the classifier's bias towards the public mix.

``run_property`` (``splitlm attack RUN_DIR property``) scores each estimate against the truth of the run's
``summary.json`` (each client's label histogram, which the attacker never reads) as the absolute error, next to
the error of guessing the public share for everyone (``prior``), and writes ``RUN_DIR/attacks/property.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitlm.data import collate
from splitlm.errors import PrivacyError
from splitlm.files import write_json
from splitlm.privacy.attacks.base import AttackContext, Observation, bar, observations, parse_options, results_folder

ESTIMATORS = ("prob", "cc", "acc")


@dataclass(frozen=True)
class PropertyOptions:
    value: str = "rotten"  # the class whose share in each client's data is inferred
    aux_rows: int = 400  # public labelled rows the classifier learns from
    aux: str | None = None  # a data name for the public text (default: the run's unseen rows)
    val_share: float = 0.25  # of them, held back to measure the classifier's rates (for acc)
    batch_size: int = 16

    def check(self) -> None:
        if self.aux_rows < 4 or not 0 < self.val_share < 1 or self.batch_size < 1:
            raise PrivacyError("property options: aux_rows >= 4, 0 < val_share < 1 and batch_size >= 1")


def pooled(smashed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, d) mean of each row's (B, T, d) smashed vectors over its real positions."""
    weights = mask.to(smashed.dtype).unsqueeze(-1)  # (B, T, 1)
    return (smashed * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass
class PropertyClassifier:
    """The server's classifier of ``value`` on pooled smashed data, with its rates on held-back public rows."""

    model: Any  # a scikit-learn pipeline: scaler + logistic regression
    tpr: float
    fpr: float
    accuracy: float
    public_share: float  # the share of ``value`` in the public rows

    def estimates(self, features: torch.Tensor) -> dict[str, float]:
        """``prob``, ``cc`` and ``acc`` share estimates for the rows ``features`` (N, d) of one client."""
        probs = self.model.predict_proba(features.numpy())[:, 1]
        prob, cc = float(probs.mean()), float((probs > 0.5).mean())
        gap = self.tpr - self.fpr
        acc = min(1.0, max(0.0, (cc - self.fpr) / gap)) if gap > 0.05 else cc
        return {"prob": prob, "cc": cc, "acc": acc}


def train_classifier(ctx: AttackContext, options: PropertyOptions) -> PropertyClassifier:
    """Fit the classifier on public labelled rows through the attacker's copy of the client (defenses included)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    examples = ctx.aux_examples(options.aux_rows, options.aux)
    labels = [e.label for e in examples]
    if all(label is None for label in labels):
        raise PrivacyError(
            "property inference needs class labels in the public text, and it has none: use data with a label "
            "column (data.label_field) or pass aux=<a labelled data name>"
        )
    known = sorted({str(label) for label in labels if label is not None})
    if options.value not in known:
        raise PrivacyError(f"property option value={options.value!r} is not a label of the public text; one of {known}")
    rows = [e for e in examples if e.label is not None]
    targets = torch.tensor([int(e.label == options.value) for e in rows])
    if int(targets.sum()) in (0, len(rows)):
        raise PrivacyError(f"the public text holds only one class ({known}); the classifier needs both sides")
    features = []
    pad = int(ctx.tokenizer.pad_token_id)
    torch.manual_seed(ctx.config.seed)  # the simulated defenses' draws
    for start in bar(ctx, range(0, len(rows), options.batch_size), "property: public rows through the head"):
        batch = collate(rows[start : start + options.batch_size], pad).to(ctx.device)
        features.append(pooled(ctx.simulate(batch.input_ids, batch.attention_mask), batch.attention_mask).cpu())
    x = torch.cat(features)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(ctx.config.seed))
    held = order[: max(2, int(len(rows) * options.val_share))]
    fit = order[len(held) :]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    model.fit(x[fit].numpy(), targets[fit].numpy())
    predicted = torch.from_numpy(model.predict(x[held].numpy()))
    truth = targets[held]
    positives, negatives = int(truth.sum()), int((1 - truth).sum())
    tpr = float(((predicted == 1) & (truth == 1)).sum()) / max(positives, 1)
    fpr = float(((predicted == 1) & (truth == 0)).sum()) / max(negatives, 1)
    model.fit(x.numpy(), targets.numpy())  # the rates measured, the final classifier learns from every public row
    return PropertyClassifier(
        model, tpr, fpr, float((predicted == truth).float().mean()), float(targets.float().mean())
    )


def infer_properties(
    ctx: AttackContext, obs: list[Observation], options: PropertyOptions | None = None
) -> dict[str, Any]:
    """Each client's estimated share of ``options.value`` from its recorded smashed rows:
    ``{"estimates": {client: {"prob", "cc", "acc", "rows"}}, "classifier": {...}}``."""
    options = options or PropertyOptions()
    if not obs:
        raise PrivacyError("property inference needs the tap's records of the clients' smashed data; none were kept")
    classifier = train_classifier(ctx, options)
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    for o in obs:
        rows[o.key[0]].append(pooled(o.smashed.float(), o.attention_mask))
    estimates = {}
    for client, parts in sorted(rows.items()):
        features = torch.cat(parts)
        estimates[client] = {**classifier.estimates(features), "rows": len(features)}
    return {
        "estimates": estimates,
        "classifier": {
            "val_accuracy": classifier.accuracy,
            "tpr": classifier.tpr,
            "fpr": classifier.fpr,
            "public_share": classifier.public_share,
            "public_rows": options.aux_rows,
        },
    }


def true_shares(run_dir: Path, value: str) -> dict[str, float]:
    """Each client's true share of ``value`` among its training rows, from ``summary.json`` (scoring only)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise PrivacyError(f"{path} missing: the run did not finish, so there is no truth to score against")
    shares = {}
    for client in json.loads(path.read_text()).get("clients", []):
        histogram = client.get("label_histogram") or {}
        total = sum(histogram.values())
        if total:
            shares[str(client["client"])] = histogram.get(value, 0) / total
    if not shares:
        raise PrivacyError(f"{path} lists no client's labels: the run's data has no class labels to infer")
    return shares


def run_property(
    run_dir: Path, options: dict[str, str] | None = None, progress: bool = True, threat_model: str = "public"
) -> dict[str, Any]:
    """``splitlm attack RUN_DIR property``: infer each client's share of ``value`` and score it (see the module's
    docstring); the result also goes to ``results_folder(run_dir, threat_model)/property.json``."""
    parsed = parse_options(PropertyOptions, options or {})
    parsed.check()
    ctx = AttackContext.from_run(run_dir, threat_model=threat_model)
    ctx.progress = progress
    inferred = infer_properties(ctx, observations(run_dir), parsed)
    truth = true_shares(run_dir, parsed.value)
    clients = [c for c in inferred["estimates"] if c in truth]
    if not clients:
        raise PrivacyError("no recorded client has a known label mix in summary.json; nothing to score")
    prior = inferred["classifier"]["public_share"]
    error = {
        name: sum(abs(inferred["estimates"][c][name] - truth[c]) for c in clients) / len(clients) for name in ESTIMATORS
    }
    error["prior"] = sum(abs(prior - truth[c]) for c in clients) / len(clients)
    result = {
        "attack": "property",
        "threat_model": ctx.threat_model,
        "value": parsed.value,
        "error": error,
        "truth": {c: truth[c] for c in clients},
        **inferred,
        "run_dir": str(run_dir),
        "options": dict(options or {}),
    }
    folder = results_folder(run_dir, ctx.threat_model)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "property.json", result)
    return result
