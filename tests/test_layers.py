"""The layer rules in pyproject.toml hold, and would catch an import that breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_contracts_name_the_layers_top_down() -> None:
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    order = [name.strip() for layer in layers for name in layer.split("|")]
    expected = ["cli", "deploy", "frameworks", "privacy", "runtime", "models", "data", "peft", "transport"]
    positions = {name.removeprefix("splitlm."): index for index, name in enumerate(order)}
    assert [positions[n] for n in expected] == sorted(positions[n] for n in expected)
    forbidden = {tuple(c["forbidden_modules"]) for c in _contracts() if c["type"] == "forbidden"}
    assert ("splitlm.privacy.attacks",) in forbidden and ("splitlm.deploy",) in forbidden


def test_lint_imports_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_lint_imports_breaks_on_a_forbidden_import(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "src" / "splitlm", tmp_path / "src" / "splitlm", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    client = tmp_path / "src" / "splitlm" / "runtime" / "client.py"
    client.write_text(client.read_text() + "\nfrom splitlm.privacy.attacks import sip  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "splitlm.runtime.client -> splitlm.privacy.attacks" in result.stdout


def _attack_contract() -> dict:
    """The contract that keeps every attack, FSHA included, out of the training code."""
    training = {"splitlm.frameworks", "splitlm.runtime", "splitlm.transport"}
    (contract,) = [
        c
        for c in _contracts()
        if c["type"] == "forbidden"
        and c["forbidden_modules"] == ["splitlm.privacy.attacks"]
        and training <= set(c["source_modules"])
    ]
    return contract


def test_fsha_is_an_attack_that_training_installs_by_name_only() -> None:
    assert (ROOT / "src" / "splitlm" / "privacy" / "attacks" / "fsha.py").is_file()
    assert not (ROOT / "src" / "splitlm" / "privacy" / "hijack.py").exists()
    assert _attack_contract()["name"]


def test_lint_imports_breaks_when_training_imports_fsha(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "src" / "splitlm", tmp_path / "src" / "splitlm", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    mods = tmp_path / "src" / "splitlm" / "transport" / "mods.py"
    mods.write_text(mods.read_text() + "\nfrom splitlm.privacy.attacks.fsha import Fsha  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    name = " ".join(_attack_contract()["name"].split())
    report = " ".join(result.stdout.split())  # import-linter wraps long contract names
    assert f"{name} BROKEN" in report
    assert "splitlm.transport.mods -> splitlm.privacy.attacks.fsha" in result.stdout
