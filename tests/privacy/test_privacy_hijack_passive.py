"""Passive hijack detectors (Gradients Scrutinizer, SplitOut) next to SplitGuard, against FSHA and SplitSpy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from splitlm.config import Config
from splitlm.data import DataOrder, collate
from splitlm.errors import ConfigError, HijackAlarm
from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import build_federation
from splitlm.frameworks.setup import load_source, prepare_data
from splitlm.privacy.attacks.splitspy import SplitSpy
from splitlm.privacy.detectors.cut import cut_tokens
from splitlm.privacy.detectors.scrutinizer import GradientsScrutinizer, ScrutinizerSettings, detection_score
from splitlm.runtime.loss import causal_lm_loss

# Every 3rd step (0-based 2, 5, 8, 11, 14) is a SplitGuard probe: its first alarm can come at step 12.
STEPS = 15
WATCH = (
    f"train.steps={STEPS}",
    "privacy.detectors.splitguard.probe_every=3",
    "privacy.detectors.splitguard.stop=false",
    "privacy.detectors.gradients_scrutinizer.stop=false",
    "privacy.detectors.splitout.stop=false",
)
PASSIVE = ("gradients_scrutinizer", "splitout")


def _watched(make_config: Callable[..., Config], *overrides: str, name: str = "run") -> dict[str, Any]:
    """The ``privacy`` part of the summary of a tiny run with all three detectors recording (not stopping)."""
    return run_framework(make_config(name, *WATCH, *overrides))["privacy"]  # type: ignore[no-any-return]


def _alarms(privacy: dict[str, Any]) -> dict[str, int | None]:
    return {name: report["alarm_step"] for name, report in privacy["detectors"].items()}


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "mode", "seed"),
    [
        ("tiny-llama", "ushape", 0),
        ("tiny-llama", "vanilla", 1),
        ("tiny-qwen2", "ushape", 3),
        ("tiny-gemma3", "ushape", 1),
    ],
)
def test_no_detector_alarms_on_an_honest_server(
    make_config: Callable[..., Config], model: str, mode: str, seed: int
) -> None:
    privacy = _watched(make_config, f"model.name={model}", f"split.mode={mode}", f"seed={seed}")
    assert _alarms(privacy) == {"splitguard": None, "gradients_scrutinizer": None, "splitout": None}
    assert privacy["alarm_step"] is None
    scrutinizer, splitout = privacy["detectors"]["gradients_scrutinizer"], privacy["detectors"]["splitout"]
    assert scrutinizer["scored_steps"] == STEPS and scrutinizer["min_score"] > 0.5  # every step scored, all honest
    scores = privacy["detectors"]["splitguard"]["scores"]  # every probe's [step, score] once it has references
    assert scores and all(step % 3 == 0 for step, _ in scores) and all(0 < score <= 1 for _, score in scores)
    assert splitout["scored"] == STEPS and splitout["mean_outlier_share"] < 0.3


@pytest.mark.parametrize(("mode", "seed"), [("ushape", 0), ("vanilla", 2)])
def test_fsha_is_caught_by_all_three_and_splitspy_slips_past_splitguard_only(
    make_config: Callable[..., Config], mode: str, seed: int
) -> None:
    settings = (f"split.mode={mode}", f"seed={seed}")
    attacked = _watched(make_config, *settings, "privacy.server_attack=fsha")
    fsha = _alarms(attacked)
    assert attacked["alarm_step"] == min(fsha.values())  # the run's alarm is its detectors' first
    assert fsha["splitguard"] is not None and 12 <= fsha["splitguard"] <= STEPS
    for name in PASSIVE:  # the passive ones need no probe: a few steps are enough
        assert fsha[name] is not None and fsha[name] <= 8, (name, fsha)

    privacy = _watched(make_config, *settings, "privacy.server_attack=splitspy", name="spied")
    spied = _alarms(privacy)
    assert spied["splitguard"] is None  # the probes got honest gradients
    for name in PASSIVE:
        assert spied[name] is not None and spied[name] <= 8, (name, spied)
    report = privacy["server_attacks"]["splitspy"]
    probe_rows = 5 * 4  # 5 probe steps of batch_size 4
    assert report["rows_judged"] == STEPS * 4
    assert probe_rows <= report["rows_flagged"] <= probe_rows + 4  # every probe row, hardly a real one
    assert report["autoencoder_loss"] > 0  # FSHA's machinery ran underneath


def test_a_passive_alarm_stops_training_with_one_line(make_config: Callable[..., Config]) -> None:
    config = make_config("run", f"train.steps={STEPS}", "privacy.detectors=[gradients_scrutinizer]",
                         "privacy.server_attack=fsha")  # fmt: skip
    with pytest.raises(HijackAlarm) as caught:
        run_framework(config)
    message = str(caught.value)
    assert "\n" not in message and "Gradients Scrutinizer alarm at step" in message
    config = make_config("run2", f"train.steps={STEPS}", "privacy.detectors=[splitout]", "privacy.server_attack=fsha")
    with pytest.raises(HijackAlarm, match=r"^[^\n]*SplitOut alarm at step \d+[^\n]*$"):
        run_framework(config)


def test_refusals_are_one_line(make_config: Callable[..., Config]) -> None:
    spied = make_config("run", "framework.name=psl", "framework.num_clients=2", "privacy.server_attack=splitspy")
    with pytest.raises(ConfigError, match=r"privacy\.server_attack\.splitspy: the attack is simulated") as caught:
        run_framework(spied)
    assert "\n" not in str(caught.value)
    narrowed = make_config("run2", "split.bottleneck=8", "privacy.detectors=[splitout]")
    with pytest.raises(ConfigError, match=r"privacy\.detectors\.splitout: simulates the server") as caught:
        run_framework(narrowed)
    assert "\n" not in str(caught.value)
    alone = make_config("run3", "framework.name=centralized", "privacy.detectors=[gradients_scrutinizer]")
    with pytest.raises(ConfigError, match=r"privacy\.detectors\.gradients_scrutinizer: watches") as caught:
        run_framework(alone)
    assert "\n" not in str(caught.value)


# --- SplitSpy's shadow on hand-made inputs ---------------------------------------------------------------------


def _labels(config: Config, steps: int) -> list[torch.Tensor]:
    data = prepare_data(config, load_source(config).tokenizer())
    order = DataOrder(len(data.train), config.train.batch_size, config.seed)
    return [collate([data.train[i] for i in order.indices(step)], data.pad_id).labels for step in range(steps)]


def _random_like(labels: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    fake = torch.randint(vocab, labels.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(labels.ne(-100), fake, labels)


def _spy(config: Config) -> SplitSpy:
    fed = build_federation(config)
    return next(mod for mod in fed.server_mods if isinstance(mod, SplitSpy))


def test_splitspy_tells_random_labels_from_real_ones_in_a_vanilla_split(make_config: Callable[..., Config]) -> None:
    config = make_config("run", "split.mode=vanilla", "privacy.server_attack.splitspy.aux_rows=64")
    spy = _spy(config)
    assert spy.public_coverage > 0.5 and 0.25 < spy.threshold < spy.public_coverage
    real = torch.cat(_labels(config, 8))  # (32, T): rows of the client's own data, which the spy never saw
    fake = _random_like(real, 258, 0)
    assert float(spy.judge_labels(real).float().mean()) <= 0.05  # hardly a real row taken for a probe
    assert bool(spy.judge_labels(fake).all())  # every random-label row is


def test_splitspy_recovers_labels_from_the_clients_gradient_in_a_ushape_split(
    make_config: Callable[..., Config],
) -> None:
    config = make_config("run", "privacy.server_attack.splitspy.aux_rows=64")
    spy = _spy(config)
    assert spy.shadow is not None
    real = torch.cat(_labels(config, 4))  # (16, T)
    fake = _random_like(real, 258, 1)
    mask = real.ne(-100).long()
    torch.manual_seed(0)
    trunk_out = torch.randn(*real.shape, 64)  # (B, T, d): what the server's trunk returned

    def client_gradient(labels: torch.Tensor) -> torch.Tensor:
        """The client's gradient of the trunk output: its tail (still the public one) and its loss."""
        leaf = trunk_out.clone().requires_grad_(True)
        total, count = causal_lm_loss(spy.shadow(hidden_states=leaf, attention_mask=mask), labels)
        (grad,) = torch.autograd.grad(total / count, leaf)
        return grad

    covered_real = spy.coverage(client_gradient(real), trunk_out, mask)
    covered_fake = spy.coverage(client_gradient(fake), trunk_out, mask)
    assert float(covered_real.mean()) > 0.6 and float(covered_fake.mean()) < 0.3
    assert float(spy.judge_gradient(client_gradient(real), trunk_out, mask).float().mean()) <= 0.1
    assert bool(spy.judge_gradient(client_gradient(fake), trunk_out, mask).all())


# --- the statistics ------------------------------------------------------------------------------------------


def _clustered(labels: torch.Tensor, directions: torch.Tensor, follow: bool, noise: float = 0.3) -> torch.Tensor:
    """(n, d) gradients: along their label's direction (follow) or along one shared direction, plus noise."""
    base = directions[labels] if follow else directions[:1].expand(len(labels), -1)
    return base + noise * torch.randn(len(labels), directions.shape[1])


def test_scrutinizer_statistics_separate_label_following_from_label_blind_gradients() -> None:
    torch.manual_seed(0)
    directions = torch.randn(20, 32)
    labels = torch.randint(20, (200,))
    scrutinizer = GradientsScrutinizer(ScrutinizerSettings(), seed=0)
    honest = scrutinizer.statistics(_clustered(labels, directions, True), labels)
    blind = scrutinizer.statistics(_clustered(labels, directions, False), labels)
    assert honest is not None and blind is not None
    assert honest["same"] - honest["different"] > 0.2
    assert abs(blind["same"] - blind["different"]) < 0.02
    # too few same-label pairs: not scored
    assert scrutinizer.statistics(torch.randn(5, 32), torch.arange(5)) is None
    # the paper's score: high for a clear gap, a smooth fit and apart sets; low for no gap and overlapping sets
    assert detection_score(3.0, 0.005, 0.0) > 0.9
    assert detection_score(0.02, 0.05, 0.9) < 0.1
    assert detection_score(3.0, 0.005, 0.9) < detection_score(3.0, 0.005, 0.0)


def test_scrutinizer_alarms_when_most_recent_steps_are_label_blind() -> None:
    torch.manual_seed(1)
    directions = torch.randn(20, 32)
    settings = ScrutinizerSettings(votes=5, min_steps=4, stop=False)

    def run(follow_after: int) -> GradientsScrutinizer:
        scrutinizer = GradientsScrutinizer(settings)
        for step in range(10):
            labels = torch.randint(20, (1, 65))
            grads = _clustered(labels[0, 1:], directions, step < follow_after).unsqueeze(0)  # (1, 64, d)
            grads = torch.cat([grads, torch.zeros(1, 1, 32)], dim=1)  # the last position has no loss
            mask = torch.ones(1, 65, dtype=torch.long)
            scrutinizer.gradient(cut_tokens(step, 0, grads, torch.zeros(1, 65, 32), mask, labels))
            scrutinizer.check(step)
        return scrutinizer

    assert run(follow_after=10).alarm_step is None
    hijacked = run(follow_after=5)  # honest for 5 steps, then label-blind
    assert hijacked.alarm_step == 8  # decided from 0-based step 3 on: 3 of 5 (steps 5, 6, 7) score low
    assert all(h["score"] > 0.5 for h in hijacked.history[3:5])
    stopping = GradientsScrutinizer(ScrutinizerSettings())
    stopping.alarm_step, stopping.history = 3, [{"score": 0.1}]
    with pytest.raises(HijackAlarm, match="step 3"):
        stopping.check(4)


def test_splitout_flags_gradients_that_ignore_the_labels(make_config: Callable[..., Config]) -> None:
    from splitlm.privacy.detectors.splitout import SplitOut, SplitOutSettings

    torch.manual_seed(2)
    directions = torch.randn(20, 32)
    detector = SplitOut(SplitOutSettings(fit_steps=2, stop=False), lambda role: None, {}, "ushape")  # type: ignore[arg-type,return-value]

    def tokens(step: int, follow: bool) -> Any:
        labels = torch.randint(20, (1, 129))
        grads = torch.cat([_clustered(labels[0, 1:], directions, follow).unsqueeze(0), torch.zeros(1, 1, 32)], 1)
        return cut_tokens(step, 0, grads, torch.zeros(1, 129, 32), torch.ones(1, 129, dtype=torch.long), labels)

    detector._simulate = lambda t: tokens(t.step, True)  # type: ignore[method-assign]  # an honest simulation
    for step in range(4):
        detector.gradient(tokens(step, True))
        detector.check(step)
    honest = [share for _, share in detector.shares]
    for step in range(4, 10):
        detector.gradient(tokens(step, False))
        detector.check(step)
    blind = [share for _, share in detector.shares][len(honest) :]
    assert len(honest) == 4 and np.mean(honest) < 0.2
    assert min(blind) > 0.8
    assert detector.alarm_step == 7  # the 3rd flagged of a window of 5: 0-based steps 4, 5, 6
    assert not math.isnan(float(np.mean(blind)))
