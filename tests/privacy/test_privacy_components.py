"""Defenses, detectors and the server attack are components: a defense of one's own, registered from this module,
is validated with the config (its settings, its own rule), runs in-process and over gRPC, and feeds the accountant;
unknown names get the closest registered one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dp_accounting import dp_event
from pydantic import Field

from helpers import serve_one_client_in_threads
from splitlm.cli.main import main
from splitlm.config import Config
from splitlm.errors import ConfigError
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.privacy.defenses import DEFENSES, MessageDefense
from splitlm.privacy.tap import read_records
from splitlm.registry import ComponentSettings

FROZEN_HEAD = "lora.head.method=frozen"  # the head output is then the pretrained one at every step


class Shift(MessageDefense):
    """A user's defense on the smashed data (step 3): every coordinate moves by ``shift``. For the accountant's sake
    it declares the Gaussian mechanism of ``noise_multiplier`` (it adds no noise: this is a test of the seams)."""

    name = "shift"

    class Settings(ComponentSettings):
        shift: float = Field(0.5, gt=0, description="Added to every coordinate of the head's output.")
        noise_multiplier: float = Field(4.0, gt=0, description="The Gaussian mechanism it declares per release.")

    @classmethod
    def problems(cls, settings: Settings, config: Any, framework: Any) -> list[str]:
        if config.split.mode != "ushape":
            return ["privacy.defenses.shift: this test's defense wants split.mode=ushape"]
        return super().problems(settings, config, framework)

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden + self.settings.shift  # (B, T, d)

    def dp_events(self) -> list[dp_event.DpEvent] | None:
        return [dp_event.GaussianDpEvent(self.settings.noise_multiplier)]


@pytest.fixture
def shift() -> Iterator[type[Shift]]:
    """``Shift`` registered as the defense ``shift`` for one test (nothing else sees it)."""
    DEFENSES.component(Shift)
    try:
        yield Shift
    finally:
        DEFENSES.remove(Shift.name)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- validation ------------------------------------------------------------------------------------------------


def test_a_defense_of_ones_own_is_validated_with_the_config(shift: type[Shift]) -> None:
    assert config_problems({"privacy": {"defenses": {"shift": {"shift": 2.0}}}}) == []
    assert config_problems({"privacy": {"defenses": ["shift", "nopeek"]}}) == []
    assert config_problems({"privacy": {"defenses": {"shift": {"shift": -1, "shfit": 2}}}}) == [
        "privacy.defenses.shift.shift: Input should be greater than 0 (got -1)",
        "privacy.defenses.shift.shfit: unknown key (did you mean 'shift'?)",
    ]
    assert config_problems({"split": {"mode": "vanilla"}, "privacy": {"defenses": ["shift"]}}) == [
        "privacy.defenses.shift: this test's defense wants split.mode=ushape"
    ]
    # the rule every defense inherits: no cut, no defense
    assert config_problems({"framework": {"name": "centralized"}, "privacy": {"defenses": ["shift"]}}) == [
        "privacy.defenses.shift: defenses act at the cut; framework.name=centralized has none"
    ]


def test_a_defense_is_named_once() -> None:
    assert config_problems({"privacy": {"defenses": ["dxp", "nopeek", "dxp"]}}) == [
        "privacy.defenses: 'dxp' is listed twice; name each once"
    ]


def test_unknown_component_names_get_the_closest_one(config_file: Callable[..., Path], capsys: Any) -> None:
    argv = ["config", str(config_file()), "privacy.defenses=[smashed_nosie]", "privacy.detectors=[splitgaurd]",
            "privacy.server_attack=fhsa"]  # fmt: skip
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "privacy.defenses: unknown defense 'smashed_nosie'" in line and "(did you mean 'smashed_noise'?)" in line
    assert "privacy.detectors: unknown detector 'splitgaurd'" in line and "(did you mean 'splitguard'?)" in line
    assert (
        "privacy.server_attack: unknown server attack 'fhsa'; choose from ['fsha', 'splitspy'] (did you mean 'fsha'?)"
        in line
    )


def test_a_defenses_settings_live_under_its_name(config_file: Callable[..., Path], capsys: Any) -> None:
    assert main(["config", str(config_file()), "privacy.smashed_noise.clip=1"]) == 2
    assert "privacy.smashed_noise: moved; write privacy.defenses.smashed_noise" in _one_error_line(capsys)
    argv = ["config", str(config_file()), "privacy.defenses=[nopeek, smashed_noise]",
            "privacy.defenses.smashed_noise.clip=2", "privacy.detectors.splitguard.probe_every=3"]  # fmt: skip
    assert main(argv) == 0
    privacy = capsys.readouterr().out.split("\nprivacy:\n", 1)[1]
    assert "defenses:\n    nopeek: {}\n    smashed_noise:\n      clip: 2" in privacy  # in order, with the settings
    assert "detectors:\n    splitguard:\n      probe_every: 3" in privacy


# --- running -------------------------------------------------------------------------------------------------


def test_a_defense_of_ones_own_runs_in_process_and_is_accounted(
    shift: type[Shift], record_run: Callable[..., Path], run_files: Any
) -> None:
    clean = {key: tap for key, tap, _ in read_records(record_run(FROZEN_HEAD))}
    shifted = record_run(FROZEN_HEAD, "privacy.defenses.shift.shift=0.25")
    records = read_records(shifted)
    assert records
    for key, tap, _ in records:  # the server received the head's output moved by 0.25, nothing else
        assert torch.allclose(tap["smashed"], clean[key]["smashed"] + 0.25, atol=1e-5)
    block = run_files.summary(shifted)["privacy"]
    assert block["defenses"] == {"shift": {}}  # each defense with its report (none here)
    assert isinstance(block["epsilon"], float) and 0 < block["epsilon"] < 100  # from its declared mechanism


def test_a_defense_of_ones_own_runs_over_grpc_as_in_process(
    shift: type[Shift], fast_config: Callable[..., Config], tmp_path: Path, run_files: Any
) -> None:
    settings = ("privacy.defenses.shift.shift=0.25", "train.steps=3")
    reference = fast_config(tmp_path / "inprocess", *settings)
    run_framework(reference)
    plain = fast_config(tmp_path / "plain", "train.steps=3")
    run_framework(plain)
    summary = serve_one_client_in_threads(
        fast_config(tmp_path / "server", *settings), fast_config(tmp_path / "client", *settings), tmp_path
    )
    losses = {
        name: [row["loss"] for row in run_files.metrics(tmp_path / name) if "loss" in row]
        for name in ("inprocess", "server", "plain")
    }
    assert losses["server"] == losses["inprocess"] and len(losses["server"]) == 3
    assert losses["server"] != losses["plain"]  # the defense did act over the wire
    assert list(summary["privacy"]["defenses"]) == ["shift"]


def test_a_configured_defense_that_is_not_registered_stops_the_run(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.defenses: unknown defense 'shift'"):
        run_framework(make_config("run", "privacy.defenses=[shift]"))
