"""How long the `splitlm` command takes to answer: a config typo, `--help`, and `splitlm config --keys`.

    python benchmarks/cli_latency.py [--runs 5] [--config configs/tiny.yaml]

Each command runs ``--runs`` times as a fresh process (``python -m splitlm.cli.main ...``: the wall time of the
whole process, interpreter start included, as a user waits for it). Prints one JSON line: the medians
``config_error_s`` (``train CONFIG train.stpes=5``: reported before torch is imported), ``help_s`` and
``config_keys_s`` (every key with its help: it imports every component's registry, and with them torch), each with
every run's seconds (``*_runs``), the exit codes seen, and the machine's Python and CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], runs: int) -> tuple[list[float], set[int]]:
    """Each run's wall seconds of ``splitlm ARGV`` in a fresh process, and the exit codes it gave."""
    seconds, codes = [], set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "splitlm.cli.main", *argv], capture_output=True, text=True, env=env, timeout=600
        )
        seconds.append(round(time.perf_counter() - start, 3))
        codes.add(done.returncode)
    return seconds, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (the median is reported)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="config given the typo")
    args = parser.parse_args()
    commands = {
        "config_error": ["train", args.config, "train.stpes=5"],  # exits 2: "did you mean 'steps'?"
        "help": ["--help"],
        "config_keys": ["config", "--keys"],
    }
    result: dict[str, object] = {}
    for name, argv in commands.items():
        seconds, codes = timed(argv, args.runs)
        result[f"{name}_s"] = round(statistics.median(seconds), 3)
        result[f"{name}_runs"] = seconds
        result[f"{name}_exit_codes"] = sorted(codes)
    result.update(runs=args.runs, python=platform.python_version(), cpus=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
