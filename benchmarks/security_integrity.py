"""Integrity attacks by a malicious client against robust aggregation and SafeSplit: the ``integrity`` rows of
``benchmarks/security.py``.

    python benchmarks/security_integrity.py [--quick] [--out runs/bench-security] [--framework sflv2|sflv1]
        [--rounds 1] [--boost 12] [--defenses ...] [--attacks ...] [--model smollm2-135m-instruct]

One malicious client of eight (client 7) fine-tunes the default model (U-shaped 2/2 cut, LoRA r=8 on q_proj and
v_proj) on Rotten Tomatoes in instruction format ("Review: ...\\nSentiment:" -> " fresh" / " rotten") with seven honest
ones, one round of ``local_steps`` steps per client (``--rounds``: more), in split-federated learning V2 (``sflv2``,
the default: the server serves one client after another in a seeded random order, on one shared trunk adapter; the
client sides are averaged at the end of the round; client 7 is served seventh of eight with seed 0) or V1
(``--framework sflv1``: each client its own trunk adapter, client sides and trunk adapters averaged). The attacks
(``privacy.client_attack``):

- ``label_flip``: every one of the client's rows gets the other class;
- ``smash_poison``: gradient-ascent steps of its smashed data along the server's historical gradient (eps 2, Wu et
  al.), with its labels flipped too (the combination Wu et al. found strongest);
- ``backdoor``: the trigger " mn" at the end of the review, before "\\nSentiment:" (``position: before_cue``), in half
  of its rows, whose answer becomes " rotten". Where the trigger goes was measured: just before the answer
  (``position: end``) any token breaks the "Sentiment:" format and the trigger alone turned 73 % of an honest sflv1
  model's right fresh reviews to " rotten" (86 % for " cf"), so no defense could bring the asr near 0; at the start
  of the prompt the boosted backdoor was not learned in one round; before the cue the trigger alone turns 1-5 %.

Each attacker also boosts its update (``boost``, default factor 12 = 1.5 x the number of clients: model replacement,
Bagdasaryan et al., with the honest clients' drift outweighed), so that an undefended average takes its client side
whole; without it one client of eight moves the average by an eighth. Boost reaches the client's own side only: its
share of the trunk adapter is what the server trained on its smashed data. The defenses: ``none`` (FedAvg,
``framework.aggregation=sync``), each robust strategy (``median``, ``trimmed_mean`` beta 0.2 (one of eight trimmed
at each end), ``krum`` f=1, ``multi_krum`` f=1 m=7: every client but the most outlying one; in sflv1 Krum keeps the
same clients' client sides and trunk adapters), ``safesplit`` (``privacy.guards: {safesplit: {}}``: the server
checks each client's change to the trunk adapter and to its client side, and a flagged client's round is rolled back
and run again without it) and ``safesplit_trunk`` (``{safesplit: {parts: [trunk]}}``, the paper's view: the trunk
adapter alone; full mode or ``--defenses``). In sflv2 the robust strategies average the client sides only: the
shared trunk adapter, which each client trains in turn, is no average at all.

Row ``{attack, defense, asr, clean_metric, detected_round, false_positive_rounds}``:

- ``clean_metric``: the global model's accuracy (a fraction) on the held-out reviews (lowest response loss among the
  two classes), without any trigger;
- ``asr``: backdoor: of the held-out reviews whose true class is not " rotten" and that the global model classifies
  right without the trigger, the share it calls " rotten" once the trigger is in them
  (``privacy.attacks.backdoor.backdoor_success``): what the trigger does, not the model's own errors. ``asr_all``:
  the share of all the reviews not of the target class it calls " rotten" with the trigger (its own errors into
  " rotten" included; ``clean_correct`` and ``rows`` are the two sets' sizes). label_flip and smash_poison are
  untargeted, so their ``asr`` is the accuracy they cost: the honest run's ``clean_metric`` under the same defense
  minus the attacked run's (negative: the attacked run scored higher, within noise);
- ``detected_round``: SafeSplit's first round that flagged the malicious client (null: never, or a defense that
  flags nothing), and ``detected_part`` the part that gave it away (trunk or client_side); ``false_positive_rounds``:
  the rounds in which SafeSplit flagged an honest client (null for the robust strategies, which flag nobody);
- ``asr_without_attack`` / ``asr_all_without_attack`` (backdoor rows): the same measured on the honest run's model
  under the same defense, what the trigger alone does (an asr near it is no backdoor at all);
- rows with ``attack: none`` are the honest runs: their ``clean_metric`` is what each defense costs, and SafeSplit's
  ``false_positive_rounds`` there are its false alarms.

How it is computed. sflv1: the clients of a round train independently (each against its own trunk adapter), so
the seven honest clients train exactly alike whichever client is malicious and whatever the aggregation (the test
``tests/frameworks/test_robust_aggregation.py`` checks this): the honest run's eight client sides and trunk adapters
are trained once, each attacker's client once, and every robust strategy's one-round result is that strategy's
average of them, as ``sflv1_round`` computes it. sflv2: the clients after the attacker train on a trunk it changed,
so each attack's round is trained whole, in the server's serving order (``frameworks.sflv2.serving_order``), and
every robust strategy's result is its average of that round's client sides with the round's trunk adapter (the same
test file checks that this equals a run). SafeSplit rolls rounds back and reruns them, and a round after the first
starts from the defended model, so SafeSplit's rows and every row of ``--rounds`` above 1 are real runs
(``build_federation`` and the driver). Finished client states and rows are cached under ``OUT/integrity/`` (keyed
by the settings), so a rerun only computes what is missing.

Noise: one seed (0); the accuracies are over ``eval_rows`` held-out reviews (2 standard errors at most
1/sqrt(n): 0.07 for 200 rows, 0.05 for 400), the ASR over the held-out reviews of the other class (about half).
``settings.noise`` gives both; a difference below them is not a result.

``--quick``: 24 local steps, 200 held-out reviews, every defense but ``safesplit_trunk`` (the full mode or
``--defenses`` runs it). The full mode: 32 local steps, 400 held-out reviews, every defense against every attack. Every
row trains with SCALA's logit adjustment (``remedies: {logit_adjustment: {tau: 1}}``): without it one round of short
training learns the label prior and forgets the model's zero-shot sentiment (accuracy 0.675 untrained, 0.56-0.59 after 6
or 16 local steps in sflv1), so clean accuracy would measure nothing; with it the honest FedAvg model reaches 0.875 in
sflv2 (0.70 in sflv1). Measured on 2 cores shared with the test suite and other jobs: the sflv2 quick rows take about 75
minutes (each attack's round of eight clients 4, each evaluated global model 1-2, each SafeSplit row, a real run, 7-8;
10 when it catches the attacker and reruns the round). ``--defenses`` and ``--attacks`` run some only (the rest are
listed as left out).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
MALICIOUS = 7
TRIGGER, TARGET, POSITION = " mn", "rotten", "before_cue"
BOOST_FACTOR = 12.0  # 1.5 x the number of clients (model replacement, with the honest clients' drift outweighed)
ATTACKS: dict[str, str] = {
    "label_flip": f"label_flip: {{clients: [{MALICIOUS}]}}",
    "smash_poison": f"smash_poison: {{clients: [{MALICIOUS}], eps: 2.0, label_flip: true}}",
    "backdoor": f"backdoor: {{clients: [{MALICIOUS}], trigger: '{TRIGGER}', target: {TARGET}, fraction: 0.5, "
    f"position: {POSITION}}}",
}
BACKDOOR = {"clients": [MALICIOUS], "trigger": TRIGGER, "target": TARGET, "fraction": 0.5, "position": POSITION}
FRAMEWORKS = ("sflv2", "sflv1")
FRESH_ROWS = 800  # reviews past data.max_rows (never loaded by a run) for the guard rows' paired clean check
# defense -> its aggregation strategy (framework.aggregation)
STRATEGY_DEFENSES: dict[str, dict[str, dict[str, float]]] = {
    "none": {"sync": {}},
    "median": {"median": {}},
    "trimmed_mean": {"trimmed_mean": {"beta": 0.2}},
    "krum": {"krum": {"f": 1}},
    "multi_krum": {"krum": {"f": 1, "m": CLIENTS - 1}},  # every state but the most outlying one (m = n - f)
}
# defense -> its server guards (privacy.guards): real runs, a flagged client's round rolled back and run again
GUARD_DEFENSES: dict[str, dict[str, dict[str, Any]]] = {
    "safesplit": {"safesplit": {}},  # the trunk adapter and the client side
    "safesplit_trunk": {"safesplit": {"parts": ["trunk"]}},  # the paper's view: the trunk adapter alone
}
DEFENSES = [*STRATEGY_DEFENSES, *GUARD_DEFENSES]
QUICK_LEAVES_OUT = {"safesplit_trunk": "the paper's trunk-only SafeSplit runs in the full mode (or --defenses)"}


def settings_of(
    quick: bool, model: str, framework: str = FRAMEWORKS[0], rounds: int = 1, boost: float = BOOST_FACTOR
) -> dict[str, Any]:
    return {
        "model": model,
        "framework": framework,
        "clients": CLIENTS,
        "malicious": MALICIOUS,
        "boost": boost,
        "rounds": rounds,
        "local_steps": 24 if quick else 32,
        "batch_size": 4,
        "seq_len": 64,
        "lr": 0.003,
        "logit_adjustment": 1.0,
        "eval_rows": 200 if quick else 400,
        "seed": 0,
        "defenses": [d for d in DEFENSES if not quick or d not in QUICK_LEAVES_OUT],
        "safesplit_attacks": list(ATTACKS),
    }


def base_overrides(s: dict[str, Any]) -> list[str]:
    return [
        f"model.name={s['model']}", "split.mode=ushape", "split.head_layers=2", "split.tail_layers=2",
        "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        "data.name=rotten_tomatoes", "data.format=instruction", "data.pack=false",
        f"data.max_rows={CLIENTS * s['local_steps'] * s['batch_size'] * 2 + s['eval_rows']}",
        f"data.eval_size={s['eval_rows']}", "data.partition=iid",
        f"train.batch_size={s['batch_size']}", f"train.seq_len={s['seq_len']}", f"train.lr={s['lr']}",
        "train.warmup_steps=0", f"train.steps={s['rounds'] * s['local_steps']}", "train.progress=false",
        "train.eval_batches=0", "train.eval_before=false", "train.eval_each_round=false",
        f"framework.name={s['framework']}", f"framework.num_clients={CLIENTS}", f"framework.rounds={s['rounds']}",
        f"remedies={{logit_adjustment: {{tau: {s['logit_adjustment']}}}}}", f"seed={s['seed']}",
    ]  # fmt: skip


def attack_override(attack: str, boost: float = BOOST_FACTOR) -> list[str]:
    """The config override of ``attack`` by client 7, with its update boosted by ``boost``."""
    if attack == "none":
        return []
    return [f"privacy.client_attack={{{ATTACKS[attack]}, boost: {{clients: [{MALICIOUS}], factor: {boost:g}}}}}"]


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stderr(p: float | None, n: int) -> float | None:
    return None if p is None or n == 0 else math.sqrt(max(p * (1 - p), 0.0) / n)


class Bench:
    """The runs of one setting, cached under ``out/integrity``."""

    def __init__(
        self, quick: bool, out: Path, model: str, framework: str = FRAMEWORKS[0], rounds: int = 1,
        boost: float = BOOST_FACTOR,
    ) -> None:  # fmt: skip
        self.s = settings_of(quick, model, framework, rounds, boost)
        self.sequential = framework == "sflv2"  # one shared trunk adapter, trained by one client after another
        self.base = base_overrides(self.s)
        self.cache = out / "integrity" / key_of(self.base)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.evaluator: Any = None  # the honest federation: the global models are loaded into it and evaluated
        self.fresh: list[Any] | None = None  # the paired clean check's choices, built at its first model

    def override(self, attack: str) -> list[str]:
        return attack_override(attack, self.s["boost"])

    def real_run(self, defense: str) -> bool:
        """Whether ``defense``'s rows are real runs: a guard's (SafeSplit rolls rounds back), and every row of
        several rounds (a later round starts from the defended model)."""
        return defense in GUARD_DEFENSES or self.s["rounds"] > 1

    def baseline_path(self, defense: str) -> Path:
        return self.cache / "rows" / f"baseline-{key_of(BACKDOOR)}-{defense}.json"

    def config(self, name: str, *extra: str) -> Any:
        from splitlm.config import build_config

        return build_config({}, [*self.base, *extra, f"output_dir={self.cache / 'runs' / name}"])

    # --- client states of one round, trained once -----------------------------------------------------------

    def states(self, attack: str) -> list[tuple[dict[str, Any], dict[str, Any], float]]:
        """Each client's (client side, trunk adapter, weight) after the round; ``attack``: client 7 runs it. sflv1:
        each client's own trunk adapter, and the honest clients' states are the honest run's; sflv2: the one shared
        trunk adapter as the round left it, the same in every tuple (the round is trained whole for each attack)."""
        from safetensors.torch import load_file, save_file

        from splitlm.frameworks.sflv2 import serving_order

        honest = attack == "none"
        wanted = range(CLIENTS) if honest or self.sequential else [MALICIOUS]
        folder = self.cache / "states" / f"{attack}-{key_of(self.override(attack))}"
        done = folder / "weights.json"
        if not done.is_file():
            fed = self.build(attack)
            members = [fed.members[i] for i in wanted]
            if self.sequential:  # in the order the server serves them, each on the trunk the previous ones left
                members = serving_order(fed.config, 0, members)
            fed.server.start()
            try:
                fed.train_clients(members, 0, parallel=False)  # sflv1's clients are independent: one at a time
            finally:
                fed.server.stop()
            folder.mkdir(parents=True, exist_ok=True)
            for m in members:
                save_file(m.client.state(), str(folder / f"client-{m.index}.safetensors"))
                if not self.sequential or m is members[-1]:  # sflv2: the one shared adapter, once
                    trunk = fed.server.adapter_state(fed.server.adapter_of(m.client_id))
                    save_file(trunk, str(folder / f"trunk-{'shared' if self.sequential else m.index}.safetensors"))
            done.write_text(json.dumps({m.index: float(m.num_examples) for m in members}))
            if honest:
                self.evaluator = evaluator(fed)
            else:
                del fed
                gc.collect()
        weights = {int(k): v for k, v in json.loads(done.read_text()).items()}
        shared = load_file(str(folder / "trunk-shared.safetensors")) if self.sequential else None
        own = {
            i: (load_file(str(folder / f"client-{i}.safetensors")),
                shared if shared is not None else load_file(str(folder / f"trunk-{i}.safetensors")), weights[i])
            for i in wanted
        }  # fmt: skip
        if honest or self.sequential:
            return [own[i] for i in range(CLIENTS)]
        base = self.states("none")
        return [own[i] if i == MALICIOUS else base[i] for i in range(CLIENTS)]

    def build(self, attack: str) -> Any:
        from splitlm.frameworks.federation import build_federation

        return build_federation(self.config(f"{attack}-states", *self.override(attack)))

    # --- evaluating a global model ------------------------------------------------------------------------------

    def scores(self, fed: Any, attack: str) -> dict[str, Any]:
        """``clean_metric`` (accuracy) of the global model ``fed.members[0]`` holds and, for the backdoor, its
        ``asr`` and ``asr_all`` (``privacy.attacks.backdoor.backdoor_success``; None for the other attacks)."""
        from splitlm.privacy.attacks.backdoor import backdoor_success

        member = fed.members[0]
        if attack != "backdoor":
            return {"clean_metric": float(member.accuracy(fed)), "asr": None}
        measured = backdoor_success(member, fed, BACKDOOR)
        return {"clean_metric": measured.pop("clean_accuracy"), **measured}

    def trigger_baseline(self, defense: str) -> dict[str, Any] | None:
        """The backdoor's ``asr`` and ``asr_all`` measured on the honest run's global model under ``defense``: how
        often the trigger alone turns a review into the target class without any poisoning (the floor an attack's
        asr starts from)."""
        path = self.baseline_path(defense)
        if path.is_file():
            return json.loads(path.read_text())
        if self.real_run(defense):  # its final model, from its adapters/
            if not self.load_run(self.cache / "runs" / f"{defense}-none"):
                return None
        else:
            self.load_global("none", defense)
        return self.save_baseline(defense, self.scores(self.evaluator, "backdoor"))

    def save_baseline(self, defense: str, measured: dict[str, Any]) -> dict[str, Any]:
        """Keep the backdoor's ``asr`` and ``asr_all`` ``measured`` on the honest model under ``defense``."""
        baseline = {"asr": measured["asr"], "asr_all": measured["asr_all"]}
        path = self.baseline_path(defense)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(baseline))
        return baseline

    def load_global(self, attack: str, defense: str) -> None:
        """The one-round global model of ``attack`` under ``defense``'s strategy, loaded into the evaluator."""
        from splitlm.frameworks.aggregation import STRATEGIES

        states = self.states(attack)
        (strategy,) = STRATEGIES.build(STRATEGY_DEFENSES[defense])
        weights = [w for _, _, w in states]
        if self.sequential:  # sflv2 averages the client sides only; the trunk adapter is the round's shared one
            (client,) = strategy.average_parts([[c for c, _, _ in states]], weights)
            trunk = states[0][1]
        else:
            client, trunk = strategy.average_parts([[c for c, _, _ in states], [t for _, t, _ in states]], weights)
        self.holder().client.load_state(client)
        self.load_trunk(trunk)

    def holder(self) -> Any:
        """The evaluator's member that holds the global model (the evaluator built first when the honest states
        came from the cache)."""
        if self.evaluator is None:
            self.evaluator = evaluator(self.build("none"))
        return self.evaluator.members[0]

    def load_trunk(self, trunk: dict[str, Any]) -> None:
        server = self.evaluator.server
        server.load_adapter_state(server.adapter_of(self.holder().client_id), trunk)

    def load_run(self, run: Path) -> bool:
        """The final global model of the finished run ``run`` (its ``adapters/``) loaded into the evaluator; False
        when there is none."""
        from safetensors.torch import load_file

        from splitlm.peft.lora import load_trainable

        adapters = run / "adapters"
        if not (adapters / "trunk.safetensors").is_file():
            return False
        for name, part in self.holder().client.parts.items():
            if (adapters / f"{name}.safetensors").is_file():
                load_trainable(part, adapters / f"{name}.safetensors")
        self.load_trunk(load_file(str(adapters / "trunk.safetensors")))
        return True

    # --- the guard rows' paired clean check --------------------------------------------------------------------

    def fresh_choices(self) -> list[Any]:
        """The held-out reviews' choices and those of ``FRESH_ROWS`` reviews no run loaded (past data.max_rows),
        built once."""
        if self.fresh is not None:
            return self.fresh
        from splitlm.data.load import load_rows
        from splitlm.frameworks.setup import classification_choices
        from splitlm.models import resolve_model

        self.holder()
        config = self.evaluator.config
        rows = load_rows(config.data.model_copy(update={"max_rows": None}), config.seed)
        used, fresh = rows[: config.data.max_rows], rows[config.data.max_rows : config.data.max_rows + FRESH_ROWS]
        tokenizer = resolve_model(config.model.name, config.model.revision, config.model.trust_remote_code).tokenizer()
        choices, _ = classification_choices(used, fresh, tokenizer, config)
        self.fresh = [*self.evaluator.data.choices, *choices]
        return self.fresh

    def correct(self, run: str) -> list[int] | None:
        """Whether the finished run ``run``'s final model gets each of ``fresh_choices`` right (1) or not (0),
        cached; None when the run has no final model."""
        path = self.cache / "rows" / f"correct-{run}-{FRESH_ROWS}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if not self.load_run(self.cache / "runs" / run):
            return None
        choices = self.fresh_choices()
        picks = self.holder().predictions(self.evaluator, choices)
        found = [int(pick == truth) for pick, (_, truth) in zip(picks, choices, strict=True)]
        path.write_text(json.dumps(found))
        return found

    def paired_clean(self, attack: str, defense: str) -> dict[str, Any] | None:
        """A guard row's clean accuracy against its honest run's, on the same held-out and fresh reviews: the mean
        and two paired standard errors of the difference (None without both runs' final models)."""
        honest, attacked = self.correct(f"{defense}-none"), self.correct(f"{defense}-{attack}")
        if honest is None or attacked is None:
            return None
        diffs = [b - a for a, b in zip(honest, attacked, strict=True)]
        n = len(diffs)
        return {
            "rows": n, "honest": statistics.fmean(honest), "attacked": statistics.fmean(attacked),
            "difference": statistics.fmean(diffs), "difference_2se": 2 * statistics.stdev(diffs) / math.sqrt(n),
        }  # fmt: skip

    def aggregated(self, attack: str, defense: str) -> dict[str, Any]:
        self.load_global(attack, defense)
        return {**self.scores(self.evaluator, attack), "detected_round": None, "false_positive_rounds": None}

    def real(self, attack: str, defense: str) -> dict[str, Any]:
        """A real run (``build_federation`` and the driver) of ``attack`` under ``defense``: SafeSplit's rows, and
        every row of a run of several rounds (whose later rounds start from the defended global model)."""
        from splitlm.frameworks.checkpoint import prepare_output
        from splitlm.frameworks.driver import drive
        from splitlm.frameworks.federation import build_federation

        guards = GUARD_DEFENSES.get(defense)
        chosen = (
            f"privacy.guards={json.dumps(guards)}" if guards
            else f"framework.aggregation={json.dumps(STRATEGY_DEFENSES[defense])}"
        )  # fmt: skip
        config = self.config(f"{defense}-{attack}", chosen, *self.override(attack))
        shutil.rmtree(config.output_dir, ignore_errors=True)  # an interrupted attempt's run: its row is not cached
        fed = build_federation(config)
        summary = drive(fed, prepare_output(config, False), False, time.perf_counter())
        if attack == "none":  # its accuracy, and what the trigger alone does to this honest run's model
            measured = self.scores(fed, "backdoor")
            scores = {"clean_metric": measured["clean_metric"], "asr": None}
            self.save_baseline(defense, measured)
        else:
            scores = self.scores(fed, attack)
        del fed
        gc.collect()
        if not guards:
            return {**scores, "detected_round": None, "false_positive_rounds": None}
        reports = ((summary.get("privacy") or {}).get("guards") or {}).values()
        flags = [f for report in reports for f in (report or {}).get("flags") or []]
        caught = [f for f in flags if str(f["client"]) == str(MALICIOUS) and attack != "none"]
        false = sorted({int(f["round"]) for f in flags if str(f["client"]) != str(MALICIOUS) or attack == "none"})
        first = min(caught, key=lambda f: int(f["round"])) if caught else None
        return {
            **scores, "detected_round": int(first["round"]) if first else None,
            "detected_part": first.get("part") if first else None, "false_positive_rounds": false,
        }  # fmt: skip

    def row(self, attack: str, defense: str) -> dict[str, Any]:
        path = self.cache / "rows" / f"{attack}-{key_of(self.override(attack))}-{defense}.json"
        if path.is_file():
            return json.loads(path.read_text())
        started = time.perf_counter()
        result = self.real(attack, defense) if self.real_run(defense) else self.aggregated(attack, defense)
        row = {"attack": attack, "defense": defense, **result, "seconds": round(time.perf_counter() - started, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
        return row


def evaluator(fed: Any) -> Any:
    """``fed`` scoring 16 sequences at a time (8 reviews x 2 classes) instead of the training batch's 4."""
    train = fed.config.train.model_copy(update={"batch_size": 16})
    fed.config = fed.config.model_copy(update={"train": train})
    return fed


def run(
    quick: bool,
    out: Path,
    model: str = "smollm2-135m-instruct",
    threads: int = 1,
    only: list[str] | None = None,
    framework: str = FRAMEWORKS[0],
    rounds: int = 1,
    attacks: list[str] | None = None,
    boost: float = BOOST_FACTOR,
) -> dict[str, Any]:
    """The ``integrity`` rows (and the settings and noise they were measured with); ``threads``: torch's intra-op
    threads (one: on a small shared machine, OpenMP workers spinning for a busy core slow a run down many times);
    ``only``: these defenses alone (default: all of the mode's); ``framework``: sflv2 or sflv1; ``rounds``: more
    than one makes every row a real run; ``attacks``: these attacks alone (and the honest run)."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    bench = Bench(quick, out, model, framework, rounds, boost)
    s = bench.s
    wanted = only or s["defenses"]
    defenses = [d for d in DEFENSES if d in wanted]
    rows: list[dict[str, Any]] = []
    for defense in defenses:
        for attack in ("none", *(a for a in ATTACKS if not attacks or a in attacks)):
            if defense in GUARD_DEFENSES and attack not in ("none", *s["safesplit_attacks"]):
                continue
            rows.append(bench.row(attack, defense))
    for r in rows:  # the backdoor's asr on the honest model under the same defense: what the trigger alone does
        if r["attack"] == "backdoor":
            baseline = bench.trigger_baseline(r["defense"]) or {}
            r["asr_without_attack"] = baseline.get("asr")
            r["asr_all_without_attack"] = baseline.get("asr_all")
    for r in rows:  # a guard row's clean cost measured on five times the reviews, paired with its honest run
        if r["defense"] in GUARD_DEFENSES and r["attack"] != "none":
            r["clean_paired"] = bench.paired_clean(r["attack"], r["defense"])
    honest = {r["defense"]: r["clean_metric"] for r in rows if r["attack"] == "none"}
    for r in rows:
        if r["attack"] in ("label_flip", "smash_poison") and r["clean_metric"] is not None:
            r["asr"] = round(honest[r["defense"]] - r["clean_metric"], 4)  # the accuracy the attack cost
    n = s["eval_rows"]
    for r in rows:
        r["clean_stderr"] = stderr(r["clean_metric"], n)
    noise = {
        "seeds": [s["seed"]],
        "held_out_rows": n,
        "accuracy_2se_max": 2 * 0.5 / math.sqrt(n),
        "asr_rows_about": n // 2,
        "asr_2se_max": 2 * 0.5 / math.sqrt(max(n // 2, 1)),
        "note": "one seed: differences below these bounds are within noise",
    }
    left_out = [f"{d}: not asked for (--defenses)" for d in s["defenses"] if only and d not in only]
    left_out += [f"{d}: {why}" for d, why in QUICK_LEAVES_OUT.items() if d not in defenses and d not in s["defenses"]]
    left_out += [f"{a}: not asked for (--attacks)" for a in ATTACKS if attacks and a not in attacks]
    return {
        "integrity": rows,
        "integrity_settings": {**s, "defenses": defenses, "left_out": left_out, "noise": noise,
                               "seconds": round(time.perf_counter() - started, 1)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-security"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--defenses", nargs="+", choices=DEFENSES, help="these defenses alone")
    parser.add_argument("--framework", choices=FRAMEWORKS, default=FRAMEWORKS[0], help="sflv2 (default) or sflv1")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (above 1: every row is a real run)")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), help="these attacks alone")
    parser.add_argument("--boost", type=float, default=BOOST_FACTOR, help="the malicious client's boost factor")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    print(
        json.dumps(
            run(
                args.quick,
                Path(args.out),
                args.model,
                args.threads,
                args.defenses,
                args.framework,
                args.rounds,
                args.attacks,
                args.boost,
            )
        )
    )


if __name__ == "__main__":
    main()
