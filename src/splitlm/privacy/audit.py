"""``splitlm audit RUN_DIR``: how much of a finished run's private text the server could rebuild, and what would help.

For a run trained with the server tap on (``privacy.tap.enabled=true``), the audit runs the attack suite on what
crossed the cut under both threat models (``privacy.attacks.base.THREAT_MODELS``):

- ``public``: an honest-but-curious server with the public pretrained weights and public text;
- ``inside``: the server also holds the client's current parts (head, and tail in U-shape), as it does when it
  colludes with the fed server or with one client in SFL, or with the next client in sequential SL.

Under both the attacker knows the run's defenses and their settings (``AttackContext.simulate``). The report gives
each attack's ROUGE-L and ``pii_recovered`` (on the synthetic PII corpus, ``data.name=pii``), the run's epsilon where
its defenses define one, and one line of advice read from the measured privacy frontier (``frontier.json`` beside
this module, written by ``benchmarks/privacy.py``): the defense that cut the leakage most within a perplexity
budget, and at what cost.

A networked run keeps what crossed the cut in the server's ``output_dir`` (its tap) and the truth and the client's
parts in the client's: ``splitlm audit SERVER_RUN --client-dir CLIENT_RUN``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitlm.errors import PrivacyError
from splitlm.files import write_json
from splitlm.privacy.attacks import AttackContext, make_attack, observations, score
from splitlm.privacy.attacks.base import ATTACKS, THREAT_MODELS

log = logging.getLogger(__name__)

# The suite, cheapest first; U-shape-only attacks are skipped on a vanilla split.
SUITE = ("sip", "bisr_f", "bisr_b", "pidi")
USHAPE_ONLY = frozenset({"bisr_b"})
FRONTIER = Path(__file__).with_name("frontier.json")
PPL_BUDGET_PCT = 50.0  # the advice's perplexity budget: a defense costing more is not advised
NOISE = 0.1  # a cut in ROUGE-L smaller than this is not worth advising (one seed, 8 sequences)


def audit(
    run_dir: Path,
    client_dir: Path | None = None,
    attacks: list[str] | None = None,
    batches: int = 2,
    threat_models: tuple[str, ...] = THREAT_MODELS,
    progress: bool = True,
    options: dict[str, dict[str, str]] | None = None,
    frontier: Path = FRONTIER,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Attack ``run_dir``'s tapped micro-batches (its last ``batches``; 0: all) under each threat model, print the
    report through ``say`` and write it to ``RUN_DIR/audit.json``; ``client_dir``: the client's ``output_dir`` of
    a networked run (its truth and its parts); ``options``: each attack's options by name (``splitlm attack``'s)."""
    unknown = [t for t in threat_models if t not in THREAT_MODELS]
    if unknown:
        raise PrivacyError(f"unknown threat model {unknown[0]!r}; choose from {', '.join(THREAT_MODELS)}")
    if client_dir is not None and not any((client_dir / name).is_dir() for name in ("truth", "adapters")):
        raise PrivacyError(
            f"--client-dir {client_dir} is not a client's output_dir (no truth/ or adapters/ in it); give the folder "
            "the client wrote to, trained with privacy.tap.enabled=true"
        )
    obs = observations(run_dir, batches, truth_dir=client_dir)
    if not any(o.truth is not None for o in obs):
        where = client_dir or run_dir
        raise PrivacyError(
            f"{where} has no truth/ for the tapped micro-batches; train the client with privacy.tap.enabled=true "
            "(networked runs: pass the client's output_dir with --client-dir)"
        )
    rows: list[dict[str, Any]] = []
    config = None
    for threat in threat_models:
        ctx = AttackContext.from_run(run_dir, threat_model=threat, client_dir=client_dir)
        config = ctx.config
        names = attacks or [a for a in SUITE if a in ATTACKS.names() and applies(a, ctx)]
        for name in names:
            result = score(ctx, name, make_attack(name, (options or {}).get(name)), obs, progress=progress)
            rows.append(
                {
                    "attack": name,
                    "threat_model": threat,
                    "rouge_l": result["rouge_l"],
                    "token_accuracy": result["token_accuracy"],
                    "pii_recovered": result.get("pii_recovered"),
                    "seconds": result["seconds"],
                }
            )
    assert config is not None
    defenses = list(config.privacy.defenses or {})
    report = {
        "run_dir": str(run_dir),
        "client_dir": None if client_dir is None else str(client_dir),
        "split": config.split.mode,
        "defenses": defenses,
        "epsilon": _epsilon(run_dir),
        "batches": len(obs),
        "attacks": rows,
        "advice": advice(rows, defenses, frontier),
    }
    write_json(run_dir / "audit.json", report)
    for line in render(report):
        say(line)
    return report


def applies(name: str, ctx: AttackContext) -> bool:
    """Whether attack ``name`` can run on ``ctx``'s split (the U-shape-only ones need a tail)."""
    return ctx.spec.mode == "ushape" or name not in USHAPE_ONLY


def _epsilon(run_dir: Path) -> float | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        privacy = json.loads(path.read_text()).get("privacy") or {}
    except ValueError:
        return None
    value = privacy.get("epsilon")
    return float(value) if isinstance(value, int | float) else None


def _worst(rows: list[dict[str, Any]], threat: str) -> float | None:
    values = [r["rouge_l"] for r in rows if r["threat_model"] == threat and r["rouge_l"] is not None]
    return max(values) if values else None


def _named(settings: list[str]) -> set[str]:
    """The defenses a frontier cell's ``privacy.defenses=[a,b]`` setting names (empty when it has none)."""
    for setting in settings:
        key, _, value = setting.partition("=")
        if key == "privacy.defenses":
            return {n.strip() for n in value.strip("[]").split(",") if n.strip()}
    return set()


def advice(rows: list[dict[str, Any]], defenses: list[str], frontier: Path = FRONTIER) -> str:
    """One line: the frontier's defense with the lowest worst-case ROUGE-L (over attacks and threat models) within
    ``PPL_BUDGET_PCT`` held-out perplexity increase, against what this run leaked."""
    leaked = {t: _worst(rows, t) for t in THREAT_MODELS}
    seen = ", ".join(f"{t} {v:.2f}" for t, v in leaked.items() if v is not None)
    if not frontier.is_file():
        return f"worst ROUGE-L {seen}; no measured frontier here: run `python benchmarks/privacy.py` to measure one"
    try:
        points = json.loads(frontier.read_text())["frontier"]
        cells: dict[tuple[str, Any], dict[str, Any]] = {}
        for p in points:
            cell = cells.setdefault(
                (p["defense"], p["strength"]),
                {"ppl": p["ppl_increase_pct"], "worst": {}, "settings": list(p.get("settings") or [])},
            )
            worst = cell["worst"]
            worst[p["threat_model"]] = max(worst.get(p["threat_model"], 0.0), float(p["rouge_l"]))
    except (ValueError, KeyError, TypeError) as error:
        return f"worst ROUGE-L {seen}; {frontier} is not a frontier file ({error}): re-run benchmarks/privacy.py"
    candidates = [(k, c) for k, c in cells.items() if k[0] != "none"]
    if not candidates:
        return f"worst ROUGE-L {seen}; the frontier in {frontier} measured no defense"

    def described(key: tuple[str, Any], cell: dict[str, Any]) -> str:
        name, strength = key
        label = name if strength is None else f"{name} {strength:g}"
        after = ", ".join(f"{t} {v:.2f}" for t, v in cell["worst"].items())
        used = _named(cell["settings"]) or set(name.split("+"))
        mine = " (this run already uses it)" if used <= set(defenses) else ""
        how = f" ({' '.join(cell['settings'])})" if cell["settings"] else ""
        return f"privacy.defenses {label}{how}{mine} cut it to {after} at {cell['ppl']:+.0f}% held-out perplexity"

    def worst(kc: tuple[tuple[str, Any], dict[str, Any]]) -> float:
        return max(kc[1]["worst"].values())

    affordable = [kc for kc in candidates if kc[1]["ppl"] <= PPL_BUDGET_PCT]
    overall = min(candidates, key=worst)
    mine = max((v for v in leaked.values() if v is not None), default=1.0)
    source = "(default model, docs/privacy.json)"
    if affordable and worst(min(affordable, key=worst)) < mine - NOISE:
        return f"worst ROUGE-L {seen}; on the measured frontier, {described(*min(affordable, key=worst))} {source}"
    return (
        f"worst ROUGE-L {seen}; no measured defense within +{PPL_BUDGET_PCT:.0f}% perplexity cuts it by more than "
        f"{NOISE:.2f}; at any cost, {described(*overall)} {source}"
    )


def render(report: dict[str, Any]) -> list[str]:
    """The printed report: a header, one line per attack (each threat model's ROUGE-L and PII recovered), advice."""
    eps = report["epsilon"]
    header = (
        f"audit of {report['run_dir']} ({report['split']}; defenses: {', '.join(report['defenses']) or 'none'}; "
        f"epsilon: {'n/a' if eps is None else f'{eps:.3g}'}; {report['batches']} micro-batches)"
    )
    lines = [header, f"{'attack':<8} {'threat':<7} {'ROUGE-L':>7} {'tokens':>7}  pii recovered"]
    for row in report["attacks"]:
        pii = row["pii_recovered"]
        shown = "n/a (not the PII corpus)" if not pii else ", ".join(f"{k} {v:.2f}" for k, v in pii.items())
        lines.append(
            f"{row['attack']:<8} {row['threat_model']:<7} {row['rouge_l']:>7.3f} {row['token_accuracy']:>7.3f}  {shown}"
        )
    lines.append(f"advice: {report['advice']}")
    return lines
