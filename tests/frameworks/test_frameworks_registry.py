"""Frameworks are objects in a registry: one can be added from anywhere, and nothing else compares names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from splitlm.config import build_config
from splitlm.errors import ConfigError
from splitlm.frameworks import FRAMEWORKS, Framework, config_problems, register, run_framework
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.sl import train_in_sequence

SRC = Path(__file__).resolve().parents[2] / "src" / "splitlm"


def test_a_framework_registered_in_a_test_module_runs(make_config, run_files) -> None:
    rounds_seen: list[int] = []

    def reverse_sl(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
        """Sequential SL with the clients in reverse order."""
        rounds_seen.append(round_index)
        finished = train_in_sequence(fed, round_index, list(reversed(members)))
        fed.broadcast(fed.carry or {})
        return finished[-1:]

    register(Framework("reverse_sl_test", reverse_sl, "sl, clients in reverse order"))
    try:
        config = make_config(
            "run", "framework.name=reverse_sl_test", "framework.num_clients=2", "framework.rounds=2", "train.steps=4"
        )
        summary = run_framework(config)
    finally:
        FRAMEWORKS.remove("reverse_sl_test")
    assert rounds_seen == [0, 1]
    assert summary["framework"] == "reverse_sl_test" and summary["eval_loss_after"] < summary["eval_loss_before"]
    clients = [r["client"] for r in run_files.metrics(Path(config.output_dir))]
    assert clients == ["1", "1", "0", "0", "1", "1", "0", "0"]
    assert "reverse_sl_test" not in FRAMEWORKS


def test_an_unknown_framework_is_reported_with_the_other_config_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({}, ["framework.name=sflv3", "train.steps=0"], checks=[config_problems])
    message = str(caught.value)
    assert "framework.name: unknown framework 'sflv3'" in message and "did you mean 'sflv" in message
    assert "train.steps" in message


def test_every_framework_says_how_the_server_lays_out_its_adapters() -> None:
    layouts = {name: (FRAMEWORKS.get(name).trunk_adapters, FRAMEWORKS.get(name).barrier) for name in FRAMEWORKS}
    assert layouts["sl"] == layouts["sflv2"] == ("shared", False)
    assert layouts["psl"] == ("shared", True)
    assert layouts["sflv1"] == ("client", False) and layouts["gsfl"] == ("group", False)
    assert not FRAMEWORKS.get("centralized").split


def test_no_code_outside_a_framework_module_compares_framework_names() -> None:
    own = {"sl.py", "psl.py", "sflv1.py", "sflv2.py", "gsfl.py", "centralized.py"}
    pattern = re.compile(r'framework\.name ==|== "(sl|psl|sflv1|sflv2|gsfl|centralized)"')
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if not (path.parent.name == "frameworks" and path.name in own)
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_git_grep_from_the_issue_finds_nothing_outside_the_framework_modules() -> None:
    root = SRC.parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(
        ["git", "grep", "-n", r'framework.name ==\|== "sl"\|== "psl"\|== "sflv', "src/"],
        cwd=root, capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    assert all(line.split(":")[0].startswith("src/splitlm/frameworks/") for line in found.splitlines()), found
