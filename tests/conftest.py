"""Shared fixtures: an isolated model cache and small, fast run configs built from tiny random models."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from splitlm.config import Config, build_config

# A run that takes about a second on one CPU core: tiny model, few short rows, 5 steps, no progress bar.
FAST_RUN: dict[str, Any] = {
    "model": {"name": "tiny-llama"},
    "split": {"mode": "ushape", "head_layers": 1, "tail_layers": 1},
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    "train": {
        "steps": 5,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 0.005,
        "warmup_steps": 1,
        "progress": False,
    },
    "data": {"name": "rotten_tomatoes", "max_rows": 200, "eval_size": 16},
    "framework": {"name": "sl"},
    "seed": 0,
}

MakeConfig = Callable[..., Config]

# The tiny models gain nothing from intra-op threads, and on a small shared machine OpenMP workers that
# spin-wait for a busy core make a one-second run take tens of seconds. One thread keeps runs fast and
# their timing stable; every comparison in these tests is between runs in the same process.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def splitlm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the tiny models once per session in a private cache, unless CI already points at a shared one."""
    if os.environ.get("SPLITLM_CACHE"):
        yield Path(os.environ["SPLITLM_CACHE"])
        return
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("splitlm-cache")
    patch.setenv("SPLITLM_CACHE", str(path))
    try:
        yield path
    finally:
        patch.undo()


def fast_tree(output_dir: Path | str) -> dict[str, Any]:
    """A copy of ``FAST_RUN`` writing to ``output_dir`` (a plain dict, e.g. to dump as a YAML file)."""
    tree = json.loads(json.dumps(FAST_RUN))
    tree["output_dir"] = str(output_dir)
    return tree


def make_fast_config(output_dir: Path | str, *overrides: str) -> Config:
    """A validated fast config writing to ``output_dir``, with dotted ``key=value`` overrides applied."""
    return build_config(fast_tree(output_dir), list(overrides))


@pytest.fixture(scope="session")
def fast_config() -> MakeConfig:
    """``fast_config(output_dir, "split.mode=vanilla", ...)``: a fast run config (usable by module fixtures)."""
    return make_fast_config


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """``make_config("run-a", "split.mode=vanilla", ...)``: a fast config writing to ``tmp_path/run-a``."""

    def make(name: str = "run", *overrides: str) -> Config:
        return make_fast_config(tmp_path / name, *overrides)

    return make


def write_config_file(path: Path, output_dir: Path, **sections: Any) -> Path:
    """Write a fast config as YAML, each keyword updating (a dict) or replacing (a value) one section."""
    tree = fast_tree(output_dir)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section].update(values)
        else:
            tree[section] = values
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_config() -> Callable[..., Path]:
    """``write_config(path, output_dir, train={"steps": 3})``: a fast config file (for module fixtures)."""
    return write_config_file


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """``config_file(train={"steps": 3})``: a fast config file in ``tmp_path`` writing to ``tmp_path/run``."""

    def write(name: str = "config.yaml", output_dir: Path | None = None, **sections: Any) -> Path:
        return write_config_file(tmp_path / name, output_dir or tmp_path / "run", **sections)

    return write


class RunFiles:
    """Readers for what a run writes under its output_dir."""

    @staticmethod
    def metrics(run_dir: Path) -> list[dict[str, Any]]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @staticmethod
    def rounds(run_dir: Path) -> list[dict[str, Any]]:
        lines = (run_dir / "rounds.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @staticmethod
    def summary(run_dir: Path) -> dict[str, Any]:
        return json.loads((run_dir / "summary.json").read_text())

    @staticmethod
    def adapters(run_dir: Path, *names: str) -> dict[str, torch.Tensor]:
        """The union of ``adapters/<name>.safetensors``; a key in two files is an error."""
        union: dict[str, torch.Tensor] = {}
        for name in names:
            part = load_file(str(run_dir / "adapters" / f"{name}.safetensors"))
            overlap = set(part) & set(union)
            assert not overlap, f"{name} repeats adapter tensors {sorted(overlap)[:3]}"
            union.update(part)
        return union


@pytest.fixture(scope="session")
def run_files() -> type[RunFiles]:
    return RunFiles
