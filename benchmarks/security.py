"""Security beyond reconstruction: inference, integrity, hijacking and unlearning, measured on the default model.

    python benchmarks/security.py [--quick] [--only mia integrity ...] [--out runs/bench-security] [--write FILE]

Runs the four sections below, each a module of its own beside this file (its docstring says what it runs, its noise
and what its ``--quick`` leaves out), and prints one JSON line with their keys:

- ``mia`` and ``property`` (``security_mia.py``): membership inference (AUC, TPR at 1 % FPR) per attack, undefended
  and under the best defense of the privacy frontier; property inference (error against the truth) per attack;
- ``integrity`` (``security_integrity.py``): label flipping, smash poisoning and a backdoor by one malicious client
  of 8, against no defense, SafeSplit and each robust aggregation strategy: ``{attack, defense, asr, clean_metric,
  detected_round, false_positive_rounds}``;
- ``hijack`` (``security_hijack.py``): FSHA and SplitSpy against SplitGuard, Gradients Scrutinizer and SplitOut:
  detected or not, at which step, and false alarms on honest runs;
- ``unlearning`` (``security_unlearning.py``): ``splitlm unlearn`` with SplitWiper's isolation: MIA AUC on the
  forgotten client's rows before and after, on non-members, the retained quality (``retained_metric_kind`` names it:
  the shards' ensemble's held-out perplexity on the PII corpus that section trains on, a loss on every token), and
  seconds against a full retrain.

Each section's result is kept in ``--out`` (``SECTION.json``, with whether it ran ``--quick``), so a second run only
reassembles what is there (``--fresh`` runs every section again) and an interrupted run keeps the finished sections;
with ``--quick`` a kept full-mode result is used as it is (``modes`` in the JSON says which mode each section's
figures come from). Every section runs the real default model (SmolLM2-135M-Instruct) on this machine's CPUs, on
Rotten Tomatoes except the unlearning section. Measured on 2 cores shared with other jobs: with ``--quick``, mia
about 75 minutes (load about 8), hijack 29, unlearning 20, integrity about 75 (sflv2; its parts timed beside the test
suite and other runs); the full unlearning section about 75 minutes (31 training, 33 the real full retrain); not timed
on idle cores. The other full modes (more seeds, ktmia under the defense, the vanilla split, the paper's trunk-only
SafeSplit against every attack) take longer still and were not run; ``--only`` runs a subset.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# section -> the module beside this file that runs it (its ``run(quick, out)`` returns the section's keys)
SECTIONS: dict[str, str] = {
    "mia": "security_mia",  # also gives "property"
    "integrity": "security_integrity",
    "hijack": "security_hijack",
    "unlearning": "security_unlearning",
}


def run_section(name: str, quick: bool, out: Path, fresh: bool) -> tuple[dict[str, Any], bool]:
    """The keys ``name``'s module returns, and whether they come from its quick mode: from ``out/NAME.json`` when it
    holds a run of the same mode (with ``quick``: or of the full mode, which measures more)."""
    cached = out / f"{name}.json"
    if not fresh and cached.exists():
        kept = json.loads(cached.read_text())
        if kept.get("quick") == quick or (quick and kept.get("quick") is False):
            return kept["result"], bool(kept["quick"])
    module = importlib.import_module(SECTIONS[name])
    started = time.perf_counter()
    result = module.run(quick=quick, out=out / name)
    result = {**result, f"{name}_seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"quick": quick, "result": result}, indent=1))
    return result, quick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each section's quick mode (see its docstring)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default="runs/bench-security", help="runs and each section's result are kept here")
    parser.add_argument("--fresh", action="store_true", help="run every section again instead of reusing its result")
    parser.add_argument("--write", default=None, help="also write the JSON line to this file (e.g. docs/security.json)")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "modes": {}}
    for name in args.only:
        section, quick = run_section(name, args.quick, out, args.fresh)
        result.update(section)
        result["modes"][name] = "quick" if quick else "full"
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
