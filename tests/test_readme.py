"""Every command line README.md shows works when pasted: it parses, its config is valid, its files exist; the
quick ones (tiny models) run verbatim in a scratch folder (slow)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from splitlm.cli.main import _load, parse_args

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SPLITLM = [sys.executable, "-m", "splitlm.cli.main"]


def readme_commands() -> list[str]:
    """The command lines of README.md's ```bash blocks (continuations joined, comments dropped)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append((pending + line).strip())
            pending = ""
    return commands


COMMANDS = readme_commands()
SPLITLM_LINES = [c for c in COMMANDS if c.startswith("splitlm ")]


def test_the_readme_shows_commands() -> None:
    assert len(SPLITLM_LINES) >= 10
    assert "bash scripts/demo.sh" in " ".join(COMMANDS) and "bash scripts/test.sh" in " ".join(COMMANDS)
    assert {c.split()[0] for c in COMMANDS} <= {"splitlm", "bash", "python", ".venv/bin/python"}


@pytest.mark.parametrize("line", SPLITLM_LINES)
def test_each_splitlm_line_parses_and_its_config_is_valid(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    args = parse_args(shlex.split(line, comments=True)[1:])  # argparse exits on anything it does not accept
    if getattr(args, "config", None):
        assert (ROOT / args.config).is_file(), args.config
        _load(args)  # every key and every plugin name known


@pytest.mark.parametrize("line", [c for c in COMMANDS if not c.startswith("splitlm ")])
def test_each_script_line_names_a_script_that_accepts_its_arguments(line: str) -> None:
    words = shlex.split(line, comments=True)
    script = ROOT / words[1]
    assert script.is_file(), script
    if script.suffix == ".py":  # a benchmark: its options parse (--help exits 0 without running it)
        flags = [w for w in words[2:] if w.startswith("--")]
        result = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        for flag in flags:
            assert flag in result.stdout, f"{script.name} has no {flag}"


# The README lines that train tiny models: run verbatim in a scratch folder that sees the repository's configs.
QUICK = [c for c in SPLITLM_LINES if "configs/tiny.yaml" in c and "fsha" not in c] + [
    c
    for c in SPLITLM_LINES
    if c.startswith(
        ("splitlm train configs/frameworks/sflv1.yaml", "splitlm train configs/clients.yaml", "splitlm config ")
    )
]


@pytest.mark.slow
def test_quick_readme_lines_run_verbatim(tmp_path: Path) -> None:
    assert len(QUICK) >= 4
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the plugins a README line names
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for line in QUICK:
        words = shlex.split(line, comments=True)
        result = subprocess.run(
            SPLITLM + words[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    losses = [
        [json_line["loss"] for json_line in map(_json, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
        for run in ("runs/A", "runs/B", "runs/C")
    ]
    # what the README promises for these three runs (bit for bit is asserted in tests/runtime)
    for split in losses[1:]:
        assert split == pytest.approx(losses[0], rel=1e-6, abs=0)


def _json(line: str) -> dict:
    import json

    return json.loads(line)
