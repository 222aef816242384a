"""The privacy frontier: what each attack recovers under each defense and threat model, and what the defense costs.

    python benchmarks/privacy.py [--quick] [--model smollm2-135m-instruct] [--data pii] [--out docs]

Every defense (``DEFENSES`` below) at three strengths (weakest first) and the combinations in ``COMBOS``, plus no
defense: a U-shaped split (head 2, tail 2) of the default model is fine-tuned with LoRA on the synthetic PII corpus
(``data.name=pii``: names, e-mail addresses, phone numbers, street addresses and account numbers in realistic
sentences) with the server tap on. Then every attack rebuilds the client's last ``--batches`` training
micro-batches from what the server received, under both threat models:

- ``public``: an honest-but-curious server with the public pretrained weights and public text of the same kind
  (rows with a disjoint pool of entities);
- ``inside``: the server also holds the client's current head and tail (it colludes with the fed server or a
  client in SFL, or with the next client in sequential SL).

The attacker knows the defense and its settings in both: its inverters train on outputs of the defended head
(noise included). Prints one JSON line

    {"frontier": [{"defense", "strength", "threat_model", "attack", "rouge_l", "token_accuracy",
                   "pii_recovered", "pii_by_type", "ppl_increase_pct", "epsilon", "settings"}, ...],
     "pareto": {threat_model: [[defense, strength], ...]}, "utility": [...], "noise": {...}, "seconds": ...}

(``pii_recovered``: the share of the inserted entities that appear verbatim in the attack's output; ``epsilon`` for
``privacy.delta``, null where the defense has no (epsilon, delta) guarantee; ``settings``: the cell's config
overrides, which ``splitlm audit``'s advice quotes) and writes ``privacy.json`` and the
frontier plot ``privacy_frontier.png`` (leakage against perplexity increase, Pareto points marked, one panel per
threat model) into ``--out``; ``--advice`` also writes the frontier beside ``splitlm audit`` (its advice line).

``--quick`` (about 90 minutes on 2 cores, measured in parts: about 9 minutes for a cell without a warm-up, 15-20
for each with dualguard's, which the public attacker imitates) keeps ``QUICK_DEFENSES`` at their middle strength and
dualguard+custext_sensitive at both of its (it leaves out nopeek, grad_noise, smashed_noise, mi_bottleneck and
text_obfuscator, the weakest and strongest strengths and every other combination) and the attacks sip and bisr_f (it
leaves out bisr_b, pidi, tag and nn_inversion). Each finished cell is written to ``privacy.json`` at once, so an
interrupted run keeps what it measured. ``--merge FILE`` keeps the cells of an earlier report of the same setting that
this run does not measure (e.g. ``--defenses dualguard --merge docs/privacy.json`` remeasures one defense), and
``--assemble --merge FILE`` measures nothing and rewrites the report, the plot and (``--advice``) the audit's copy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ATTACKS = ["sip", "bisr_f", "bisr_b", "pidi", "tag", "nn_inversion"]
QUICK_ATTACKS = ["sip", "bisr_f"]
THREAT_MODELS = ["public", "inside"]

# Each defense: (config key of its strength, three values from weakest to strongest, extra settings).
DEFENSES: dict[str, tuple[str, list[float], list[str]]] = {
    "dxp": ("privacy.defenses.dxp.epsilon", [50.0, 40.0, 30.0], []),
    "smashed_noise": (
        "privacy.defenses.smashed_noise.noise_multiplier",
        [0.01, 0.03, 0.06],
        ["privacy.defenses.smashed_noise.clip=100", "privacy.defenses.smashed_noise.mechanism=gaussian"],
    ),
    # NoPeek works by reshaping the head's output, which LoRA on q/v barely can in a short run (measured: no
    # change in any score at beta 1-32 over 10 steps): its rows train the head fully.
    "nopeek": ("privacy.defenses.nopeek.beta", [4.0, 16.0, 64.0], ["lora.head.method=full"]),
    "grad_noise": (
        "privacy.defenses.grad_noise.noise_multiplier",
        [0.05, 0.25, 1.0],
        ["privacy.defenses.grad_noise.clip=0.001", "privacy.defenses.grad_noise.mechanism=gaussian"],
    ),
    # The learned defenses. mi_bottleneck: noise std per dimension as a share of that dimension's std (its scales then
    # learn, with the KL weight beta). adversarial and dualguard reshape the head's output: like NoPeek they train the
    # head fully (LoRA on q/v barely moves it in 20 steps).
    "mi_bottleneck": (
        "privacy.defenses.mi_bottleneck.init_scale",
        [1.0, 2.0, 4.0],
        ["privacy.defenses.mi_bottleneck.beta=0.001"],
    ),
    "adversarial": ("privacy.defenses.adversarial.weight", [0.3, 1.0, 3.0], ["lora.head.method=full"]),
    # dualguard with the paper's local warm-up (60 steps of the client's own text through the public trunk, before
    # split training; the strength is the cosine distance from the public head it aims for): the 20 split steps alone
    # move a full head only 0.02-0.03 from the public one, which does nothing to SIP (measured at weight 1-10).
    "dualguard": (
        "privacy.defenses.dualguard.margin",
        [0.5, 0.75, 1.0],
        ["lora.head.method=full", "privacy.defenses.dualguard.weight=10", "privacy.defenses.dualguard.local_steps=60"],
    ),
    "text_obfuscator": (
        "privacy.defenses.text_obfuscator.mix",
        [0.3, 0.6, 0.9],
        ["privacy.defenses.text_obfuscator.clusters=1024", "privacy.defenses.text_obfuscator.noise=0.1"],
    ),
    # SanText+'s sensitive tokens with CusText's mechanism (epsilon 1: nearly uniform among a token's 20 nearest): the
    # strength is keep_share, the share of the client's text made of frequent types that pass as they are; numbers
    # (every digit token sensitive, drawn uniformly among digits) always.
    "custext_sensitive": (
        "privacy.defenses.custext.keep_share",
        [0.95, 0.9, 0.75],
        ["privacy.defenses.custext.epsilon=1.0", "privacy.defenses.custext.numbers=true"],
    ),
}
# Rows whose label is not the registered name of their defense: label -> the name privacy.defenses gives.
NAMES: dict[str, str] = {"custext_sensitive": "custext"}
# Combinations: each a name, the strength shown, and its settings (every defense's middle strength by default).
COMBOS: dict[str, list[str]] = {
    "adversarial+mi_bottleneck": ["adversarial", "mi_bottleneck"],
    "dualguard+dxp": ["dualguard", "dxp"],
    "dualguard+custext_sensitive": ["dualguard", "custext_sensitive"],
    "dualguard+mi_bottleneck": ["dualguard", "mi_bottleneck"],
    "dualguard+text_obfuscator": ["dualguard", "text_obfuscator"],
}
# A combination's settings that differ from its defenses' middle strengths: dxp beside dualguard at its weakest (the
# warm-up learns from substituted text; the middle strength, 40, costs +582% perplexity alone), dualguard at its
# strongest.
COMBO_SETTINGS: dict[str, list[str]] = {
    "dualguard+dxp": ["privacy.defenses.dualguard.margin=1.0", "privacy.defenses.dxp.epsilon=50.0"],
}
# A combination measured at several values of one setting (in --quick too), shown as its strength: dualguard beside
# custext_sensitive at the sensitive tokens' middle and strongest keep_share.
COMBO_STRENGTHS: dict[str, tuple[str, list[float]]] = {
    "dualguard+custext_sensitive": ("privacy.defenses.custext.keep_share", [0.9, 0.75]),
}
# --quick: the middle strength of these (a combination's COMBO_STRENGTHS), and the two forward attacks. It leaves out
# the defenses that no measurement put on the frontier (smashed_noise, mi_bottleneck, text_obfuscator: their rows in
# docs/privacy.json are from earlier quick runs), nopeek, grad_noise and every other combination.
QUICK_DEFENSES = ["none", "dxp", "adversarial", "dualguard", "custext_sensitive", "dualguard+custext_sensitive"]


def cells_for(defense: str, quick: bool) -> list[tuple[float | None, list[str]]]:
    """(strength, overrides) of each run of ``defense`` (a name of ``DEFENSES`` or ``COMBOS``, or none)."""
    if defense == "none":
        return [(None, [])]
    if defense in COMBOS:
        names, own = COMBOS[defense], COMBO_SETTINGS.get(defense, [])
        extra: list[str] = []
        for name in names:
            key, strengths, more = DEFENSES[name]
            extra += [f"{key}={strengths[1]}", *more]
        swept, values = COMBO_STRENGTHS.get(defense, ("", [None]))
        overridden = {o.split("=")[0] for o in own} | {swept}
        extra = [e for e in dict.fromkeys(extra) if e.split("=")[0] not in overridden]
        head = [f"privacy.defenses=[{','.join(NAMES.get(n, n) for n in names)}]", *extra, *own]
        return [(v, head if v is None else [*head, f"{swept}={v}"]) for v in values]
    key, strengths, more = DEFENSES[defense]
    picked = strengths[1:2] if quick else strengths
    return [(s, [f"privacy.defenses=[{NAMES.get(defense, defense)}]", f"{key}={s}", *more]) for s in picked]


def pareto(points: list[tuple[float, float, Any]]) -> list[Any]:
    """The labels of the points (cost, leakage, label) that no other point beats on both (lower is better)."""
    front = []
    for cost, leak, label in points:
        if not any(c <= cost and v <= leak and (c, v) != (cost, leak) for c, v, _ in points):
            front.append(label)
    return front


def worst_per_cell(rows: list[dict[str, Any]], threat: str) -> dict[tuple[str, Any], tuple[float, float]]:
    """(defense, strength) -> (ppl increase %, the worst ROUGE-L over the attacks) under ``threat``."""
    cells: dict[tuple[str, Any], tuple[float, float]] = {}
    for r in rows:
        if r["threat_model"] != threat:
            continue
        key = (r["defense"], r["strength"])
        cost, leak = cells.get(key, (r["ppl_increase_pct"], 0.0))
        cells[key] = (cost, max(leak, r["rouge_l"]))
    return cells


def frontier_plot(rows: list[dict[str, Any]], fronts: dict[str, list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fronts), figsize=(6.2 * len(fronts), 4.8), sharey=True, squeeze=False)
    for ax, (threat, front) in zip(axes[0], fronts.items(), strict=True):
        cells = worst_per_cell(rows, threat)
        for (defense, strength), (cost, leak) in cells.items():
            on_front = [defense, strength] in front
            ax.scatter(
                max(cost, 0.1), leak, s=60 if on_front else 25, marker="*" if on_front else "o",
                color="crimson" if on_front else "grey", zorder=3 if on_front else 2,
            )  # fmt: skip
            label = defense if strength is None else f"{defense} {strength:g}"
            ax.annotate(label, (max(cost, 0.1), leak), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ordered = sorted((cells[tuple(k)] for k in front), key=lambda cl: cl[0])  # type: ignore[arg-type]
        ax.plot([max(c, 0.1) for c, _ in ordered], [v for _, v in ordered], color="crimson", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("held-out perplexity increase over no defense (%; 0.1 = none or a decrease)")
        ax.set_title(f"threat model: {threat}")
        ax.axhline(0.5, color="black", lw=0.5, ls=":")
        ax.axvline(10, color="black", lw=0.5, ls=":")
    axes[0][0].set_ylabel("worst ROUGE-L over the attacks (lower is more private)")
    fig.suptitle("privacy frontier: Pareto points as red stars")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def earlier(path: Path, args: argparse.Namespace, measured: set[tuple[str, Any]]) -> tuple[list[Any], list[Any]]:
    """The rows and utility entries of ``path`` (an earlier report of the same model, data, steps and batch size)
    for the (defense, strength) cells this run does not measure (a kept ``none`` gives the perplexity baseline)."""
    report = json.loads(path.read_text())
    setting = {"model": args.model, "data": args.data, "steps": args.steps, "batch_size": args.batch_size}
    differs = {k: report.get(k) for k, v in setting.items() if report.get(k) != v}
    if differs:
        sys.exit(f"--merge {path}: measured with {differs}, not {setting}; merge only reports of the same setting")
    keep = [r for r in report["frontier"] if (r["defense"], r["strength"]) not in measured]
    return keep, [u for u in report["utility"] if (u["defense"], u["strength"]) not in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="pii", help="the client's data (default: the synthetic PII corpus)")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="recorded micro-batches each attack rebuilds")
    parser.add_argument("--quick", action="store_true", help="middle strengths, four attacks (see the docstring)")
    parser.add_argument("--defenses", nargs="+", default=None, help="default: none, every defense, the COMBOS")
    parser.add_argument("--attacks", nargs="+", default=None)
    parser.add_argument("--threat-models", nargs="+", default=THREAT_MODELS)
    parser.add_argument("--out", default=None, help="folder for privacy.json and privacy_frontier.png (default: temp)")
    parser.add_argument("--advice", action="store_true", help="also write the frontier for `splitlm audit`'s advice")
    parser.add_argument(
        "--merge",
        default=None,
        help="an earlier privacy.json of the same setting: its cells that this run does not measure are kept",
    )
    parser.add_argument("--assemble", action="store_true", help="measure nothing: rewrite --merge's cells")
    parser.add_argument("--attack-option", action="append", default=[], help="ATTACK:key=value, e.g. sip:steps=600")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides for every run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from splitlm.config import build_config
    from splitlm.frameworks import run_framework
    from splitlm.privacy.attacks import ATTACKS as REGISTERED
    from splitlm.privacy.attacks import AttackContext, make_attack, observations, score

    defenses = args.defenses or (QUICK_DEFENSES if args.quick else ["none", *DEFENSES, *COMBOS])
    if args.assemble:
        if not args.merge:
            sys.exit("--assemble rewrites the report from --merge FILE's cells; give --merge")
        defenses = []
    attacks = [a for a in (args.attacks or (QUICK_ATTACKS if args.quick else ATTACKS)) if a in REGISTERED]
    options: dict[str, dict[str, str]] = {}
    for text in args.attack_option:
        name, _, pair = text.partition(":")
        key, _, value = pair.partition("=")
        options.setdefault(name, {})[key] = value
    base = [
        f"model.name={args.model}", f"data.name={args.data}", "split.mode=ushape", "split.head_layers=2",
        "split.tail_layers=2", "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.seq_len=64", "train.lr=0.001", "train.warmup_steps=2",
        "train.eval_batches=10", "train.progress=false", "data.max_rows=4000", "data.eval_size=100",
        "privacy.tap.enabled=true", f"privacy.tap.max_batches={args.batches}", *args.overrides,
    ]  # fmt: skip
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="splitlm-privacy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    utility: list[dict[str, Any]] = []
    baseline: float | None = None
    measured = {(d, strength) for d in defenses for strength, _ in cells_for(d, args.quick)}
    kept_rows, kept_utility = earlier(Path(args.merge), args, measured) if args.merge else ([], [])
    baseline = next((u["eval_ppl"] for u in kept_utility if u["defense"] == "none"), None)  # unless none is rerun
    shared: dict[Any, Any] = {}

    def write(final: bool) -> dict[str, Any]:
        """The report so far, written to ``privacy.json`` and the plot (after every cell: a partial run keeps them)."""
        fronts = {}
        for threat in args.threat_models:
            cells = worst_per_cell([r for r in kept_rows + rows if r["ppl_increase_pct"] is not None], threat)
            fronts[threat] = [list(k) for k in pareto([(c, v, k) for k, (c, v) in cells.items()])]
        attacked = args.batches * args.batch_size
        report = {
            "model": args.model,
            "data": args.data,
            "split": "ushape head 2 / tail 2, LoRA r=8",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "batches_attacked": args.batches,
            "quick": args.quick,
            "complete": final,
            "frontier": kept_rows + rows,
            "pareto": fronts,
            "utility": kept_utility + utility,
            "noise": {
                "seeds": 1,
                "rows_attacked": attacked,
                "held_out_rows": 100,
                # A row's ROUGE-L lies in [0, 1], so the standard error of a mean over n rows is at most 0.5 / sqrt(n).
                "rouge_l_2se_bound": 1.0 / math.sqrt(attacked),
                "note": f"one seed; each score is a mean over {attacked} attacked rows, so two cells whose "
                f"ROUGE-L differ by less than {1.0 / math.sqrt(attacked):.2f} (two standard errors at most) may differ "
                "by chance",
            },
            "seconds": time.perf_counter() - started,
        }
        (out_dir / "privacy.json").write_text(json.dumps(report, indent=1) + "\n")
        frontier_plot(kept_rows + rows, fronts, out_dir / "privacy_frontier.png")
        if args.advice and final:
            from splitlm.privacy.audit import FRONTIER

            FRONTIER.write_text(json.dumps({"model": args.model, "frontier": kept_rows + rows}, indent=1) + "\n")
        return report

    with tempfile.TemporaryDirectory(prefix="splitlm-privacy-runs-") as tmp:
        for defense in defenses:
            for strength, extra in cells_for(defense, args.quick):
                run_dir = Path(tmp) / f"{defense}-{strength}"
                config = build_config({}, [*base, *extra, f"output_dir={run_dir}"])
                began = time.perf_counter()
                summary = run_framework(config)
                ppl = summary["eval_ppl_after"]
                baseline = ppl if defense == "none" else baseline
                increase = None if baseline is None else 100.0 * (ppl / baseline - 1.0)
                privacy = summary["privacy"]
                utility.append(
                    {
                        "defense": defense, "strength": strength, "eval_ppl": ppl,
                        "eval_ppl_before": summary["eval_ppl_before"], "ppl_increase_pct": increase,
                        "epsilon": privacy["epsilon"], "delta": privacy["delta"],
                        "defense_report": privacy.get("defenses"), "train_seconds": time.perf_counter() - began,
                    }
                )  # fmt: skip
                obs = observations(run_dir, args.batches)
                for threat in args.threat_models:
                    ctx = AttackContext.from_run(run_dir, threat_model=threat)
                    ctx.cache = shared  # public text and PII entities once; inverters are keyed by what they saw
                    for name in attacks:
                        if name == "bisr_b" and ctx.spec.mode != "ushape":
                            continue
                        result = score(ctx, name, make_attack(name, options.get(name)), obs, progress=False)
                        pii = result.get("pii_recovered") or {}
                        rows.append(
                            {
                                "defense": defense, "strength": strength, "threat_model": threat, "attack": name,
                                "rouge_l": result["rouge_l"], "token_accuracy": result["token_accuracy"],
                                "pii_recovered": pii.get("all"), "pii_by_type": pii,
                                "ppl_increase_pct": increase, "epsilon": privacy["epsilon"],
                                "seconds": result["seconds"], "settings": extra,
                            }
                        )  # fmt: skip
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                write(final=False)

    report = write(final=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
