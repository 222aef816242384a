"""README's one-module example (``examples/my_extensions.py``): a remedy, a defense and an aggregation strategy of a
user's own, in a file the config's ``plugins`` names, are validated with the config, run in-process, and run over
gRPC (the server and the clients in threads here; in `splitlm serve` / `splitlm client` processes that import the
file themselves in the slow test) with the same losses as in-process."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from network_support import serve_over_network

from helpers import serve_one_client_in_threads
from splitlm.config import Config, load_config
from splitlm.config.load import import_plugins
from splitlm.frameworks import run_framework
from splitlm.frameworks.aggregation import STRATEGIES
from splitlm.frameworks.base import config_problems
from splitlm.privacy.defenses import DEFENSES
from splitlm.privacy.tap import read_records
from splitlm.remedies import REMEDIES

ROOT = Path(__file__).resolve().parents[2]
MODULE = "my_extensions"
FILE = ROOT / "examples" / f"{MODULE}.py"
# The three components at once, on sflv1 with three clients (the medoid of three differs from their mean).
SETTINGS = (
    f"plugins=[{FILE}]", "framework.name=sflv1", "framework.num_clients=3", "train.steps=2",
    "remedies.shrink.weight=0.05", "privacy.defenses.coarsen.step=0.25", "framework.aggregation=medoid",
)  # fmt: skip


def _forget() -> None:
    """Nothing of the example registered or imported (another test, e.g. README's lines, may have imported it)."""
    sys.modules.pop(MODULE, None)
    REMEDIES.remove("shrink")
    DEFENSES.remove("coarsen")
    STRATEGIES.remove("medoid")


@pytest.fixture
def extensions() -> Iterator[ModuleType]:
    """``examples/my_extensions.py`` imported as ``plugins`` imports it; forgotten afterwards."""
    _forget()
    import_plugins([str(FILE)])
    try:
        yield sys.modules[MODULE]
    finally:
        _forget()


def test_the_readme_shows_the_whole_module() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert FILE.read_text() in blocks


def test_the_components_are_validated_with_the_config(extensions: ModuleType) -> None:
    tree = {"plugins": [str(FILE)], "framework": {"name": "sflv1", "num_clients": 3, "aggregation": "medoid"}}
    assert config_problems({**tree, "remedies": {"shrink": {"weight": 0.1}}}) == []
    assert config_problems({**tree, "remedies": {"shrnk": {}}, "privacy": {"defenses": {"coarsen": {"step": 0}}}}) == [
        "privacy.defenses.coarsen.step: Input should be greater than 0 (got 0)",
        f"remedies: unknown remedy 'shrnk'; choose from {sorted(REMEDIES.names())} (did you mean 'shrink'?)",
    ]
    assert config_problems({**tree, "framework": {"name": "psl", "aggregation": "medoid"}}) == [
        "framework.aggregation: medoid averages client sides; framework.name=psl has none"
    ]
    assert config_problems({"framework": {"name": "centralized"}, "remedies": ["shrink"]}) == [
        "remedies.shrink: acts on a split client's head; framework.name=centralized has none"
    ]


def test_they_run_in_process(
    extensions: ModuleType, make_config: Callable[..., Config], run_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    averaged: list[tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = []
    real = extensions.Medoid.average

    def spy(self: Any, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        result = real(self, states, weights)
        averaged.append(([dict(s) for s in states], result))
        return result

    monkeypatch.setattr(extensions.Medoid, "average", spy)
    config = make_config("run", *SETTINGS, "privacy.tap.enabled=true")
    summary = run_framework(config)
    assert summary["aggregation"]["mode"] == "medoid"
    states, result = averaged[0]  # the round's client sides: three of them, and the one closest to the others
    assert len(states) == 3
    flat = [torch.cat([s[key].flatten().float() for key in result]) for s in states]
    spread = [sum(float((a - b).norm()) for b in flat) for a in flat]
    nearest = states[spread.index(min(spread))]
    means = 0
    for key, value in result.items():
        assert torch.equal(value, nearest[key]), key
        means += torch.allclose(value, torch.stack([s[key] for s in states]).mean(dim=0))
    assert means < len(result)  # not FedAvg's mean (the clients trained apart)
    records = read_records(Path(config.output_dir))
    assert records
    for _, tap, _ in records:  # the server received the head's output on coarsen's grid of 0.25
        grid = tap["smashed"].float() / 0.25
        assert torch.allclose(grid, grid.round(), atol=1e-3)


def _losses(run_files: Any, folder: Path) -> list[tuple[str, int, float]]:
    return sorted((row["client"], row["step"], row["loss"]) for row in run_files.metrics(folder) if "loss" in row)


def test_they_run_over_grpc_as_in_process(
    extensions: ModuleType, fast_config: Callable[..., Config], tmp_path: Path, run_files: Any
) -> None:
    # One client (the server and its client in threads of this process, which build their models one at a time);
    # the slow test below runs three client processes.
    settings = (*SETTINGS, "framework.num_clients=1")
    run_framework(fast_config(tmp_path / "inprocess", *settings))
    run_framework(fast_config(tmp_path / "plain", *settings[1:4], "framework.num_clients=1"))
    summary = serve_one_client_in_threads(
        fast_config(tmp_path / "server", *settings), fast_config(tmp_path / "client0", *settings), tmp_path
    )
    assert summary["aggregation"]["mode"] == "medoid"
    assert _losses(run_files, tmp_path / "server") == _losses(run_files, tmp_path / "inprocess")
    assert _losses(run_files, tmp_path / "server") != _losses(run_files, tmp_path / "plain")  # they acted


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serve_and_client_processes_import_the_plugins_themselves(write_config: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "unused")
    overrides = [*SETTINGS, "train.progress=false"]
    local = tmp_path / "local"
    _forget()
    try:
        run_framework(load_config(config, [*overrides, f"output_dir={local}"]))
    finally:
        _forget()
    serve_over_network(tmp_path, config, overrides, 3)  # each process imports the file itself
    lines = [
        sorted((r["client"], r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").open()))
        for d in (local, tmp_path / "server")
    ]
    assert lines[0] == lines[1] and len(lines[0]) == 3 * 2
