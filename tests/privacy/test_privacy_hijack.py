"""FSHA (a server that forges the gradients it returns) and the client's SplitGuard-style detector of it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.cli.main import main
from splitlm.config import Config
from splitlm.data import Batch, DataOrder, collate
from splitlm.errors import HijackAlarm
from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import build_federation
from splitlm.frameworks.setup import load_source, prepare_data
from splitlm.privacy.attacks.fsha import Fsha
from splitlm.privacy.detectors.splitguard import SplitGuard, SplitGuardSettings
from splitlm.privacy.tap import read_records

# Probes every 3rd step (0-based steps 2, 5, 8, 11); the first one is scored once 3 regular batches were seen,
# so with patience 3 an alarm comes at step 12 at the earliest. An honest server runs the same STEPS unalarmed.
STEPS = 15
DETECT = ("privacy.detectors.splitguard.probe_every=3", f"train.steps={STEPS}")
FSHA = "privacy.server_attack=fsha"
IGNORE = -100


def _alarm_step(error: HijackAlarm) -> int:
    found = re.search(r"at step (\d+)", str(error))
    assert found, str(error)
    return int(found.group(1))


def _batches(config: Config, count: int) -> list[Batch]:
    data = prepare_data(config, load_source(config).tokenizer())
    order = DataOrder(len(data.train), config.train.batch_size, config.seed)
    return [collate([data.train[i] for i in order.indices(step)], data.pad_id) for step in range(count)]


# --- the detector, end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "seed"), [("ushape", 0), ("ushape", 1), ("vanilla", 2)])
def test_detector_stops_fsha_and_spares_an_honest_server(
    make_config: Callable[..., Config], run_files: Any, mode: str, seed: int
) -> None:
    settings = (*DETECT, f"split.mode={mode}", f"seed={seed}")
    with pytest.raises(HijackAlarm) as caught:
        run_framework(make_config("fsha", *settings, FSHA))
    message = str(caught.value)
    assert "\n" not in message and "hijack" in message
    assert 12 <= _alarm_step(caught.value) < STEPS  # caught within the first scored probes, not at the last one

    honest = make_config("honest", *settings)
    summary = run_framework(honest)
    assert summary["privacy"]["alarm_step"] is None
    assert run_files.summary(Path(honest.output_dir))["privacy"]["alarm_step"] is None


def test_detector_only_records_when_told_not_to_stop(make_config: Callable[..., Config], run_files: Any) -> None:
    config = make_config("run", *DETECT, FSHA, "privacy.detectors.splitguard.stop=false")
    run_framework(config)
    out = Path(config.output_dir)
    alarm = run_files.summary(out)["privacy"]["alarm_step"]
    assert isinstance(alarm, int) and 12 <= alarm < STEPS
    assert len(run_files.metrics(out)) == STEPS  # training went on to the end


def test_cli_exits_8_with_one_line(config_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = config_file(
        train={"steps": STEPS},
        privacy={"server_attack": "fsha", "detectors": {"splitguard": {"probe_every": 3}}},
    )
    assert main(["train", str(path)]) == 8
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("splitlm: error: ") and "hijack" in lines[0] and "step 12" in lines[0]


# --- the attack ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_fsha_forges_the_gradient_of_the_smashed_data(record_run: Callable[..., Path], mode: str) -> None:
    honest = read_records(record_run(f"split.mode={mode}", "train.steps=2"))
    forged = read_records(record_run(f"split.mode={mode}", "train.steps=2", FSHA))
    (key, tap_h, _), (key_f, tap_f, _) = honest[0], forged[0]
    assert key == key_f == ("0", 0, 0)
    # The attacker's own randomness leaves the run's alone: step 0 sends the very same smashed data ...
    assert torch.equal(tap_h["smashed"], tap_f["smashed"])
    grad_h, grad_f = tap_h["grad_smashed"], tap_f["grad_smashed"]
    # ... but receives another gradient, of the same shape, dtype and (the first time) norm as the honest one.
    assert grad_f.shape == grad_h.shape and grad_f.dtype == grad_h.dtype
    cosine = float((grad_h * grad_f).sum() / (grad_h.norm() * grad_f.norm()))
    assert abs(cosine) < 0.3  # about 0 here: the forged direction has nothing to do with the loss
    assert math.isclose(float(grad_f.norm()), float(grad_h.norm()), rel_tol=1e-4)


def test_fsha_reconstructs_ids_and_serves_a_queued_server(make_config: Callable[..., Config]) -> None:
    config = make_config(
        "run", "privacy.server_attack.fsha.aux_rows=16", "privacy.server_attack.fsha.gradient_scale=2.0"
    )
    fed = build_federation(config)
    fsha = next(mod for mod in fed.server_mods if isinstance(mod, Fsha))
    # a server with a request queue answers with futures: the forgery waits for them
    fed.server.start()
    try:
        for step, batch in enumerate(_batches(config, 2)):
            fed.members[0].client.train_step(step, [batch])
    finally:
        fed.server.stop()
    assert len(fsha.history) == 2 and fsha.honest_norm is not None
    smashed = torch.randn(3, 7, 64)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    ids = fsha.reconstruct(smashed, mask)
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 258
    assert torch.equal(ids[0, 5:], torch.zeros(2, dtype=torch.long))


# --- probes --------------------------------------------------------------------------------------------------


def test_a_probe_step_leaves_the_client_parts_alone(make_config: Callable[..., Config]) -> None:
    config = make_config("run", "privacy.detectors.splitguard.probe_every=2", "train.warmup_steps=0")
    client = build_federation(config).members[0].client
    guard = next(plugin for plugin in client.plugins if isinstance(plugin, SplitGuard))
    assert [guard.is_probe(s) for s in range(4)] == [False, True, False, True]
    batches = _batches(config, 3)

    def state() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in client.state().items()}

    before = state()
    client.train_step(0, [batches[0]])
    after_regular = state()
    client.train_step(1, [batches[1]])  # a probe
    after_probe = state()
    client.train_step(2, [batches[2]])
    assert before and any(not torch.equal(before[k], after_regular[k]) for k in before)
    assert all(torch.equal(after_regular[k], after_probe[k]) for k in before)
    assert any(not torch.equal(after_probe[k], v) for k, v in state().items())


def test_fake_labels_keep_ignored_positions_and_follow_the_seed() -> None:
    labels = torch.randint(0, 50, (4, 64))
    labels[:, :5] = IGNORE
    settings = SplitGuardSettings()
    fake = SplitGuard(settings, vocab_size=50, seed=3).fake_labels(labels)
    assert torch.equal(fake[:, :5], labels[:, :5])
    assert int(fake.ne(labels).sum()) > 0.8 * int(labels.ne(IGNORE).sum())
    assert int(fake[:, 5:].min()) >= 0 and int(fake.max()) < 50
    assert torch.equal(fake, SplitGuard(settings, vocab_size=50, seed=3).fake_labels(labels))
    assert not torch.equal(fake, SplitGuard(settings, vocab_size=50, seed=4).fake_labels(labels))


def _token_grads(directions: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """(1, T, d) gradients: token t points along directions[which[t]], plus a little noise."""
    return (directions[which] + 0.05 * torch.randn(len(which), directions.shape[1])).unsqueeze(0)


def test_score_is_low_when_probe_gradients_follow_the_labels_and_high_when_not() -> None:
    torch.manual_seed(0)
    d, tokens = 32, 64
    directions = torch.randn(200, d)
    mask = torch.ones(1, tokens, dtype=torch.long)
    frequent = torch.arange(4)  # real text repeats a few frequent labels; fake labels are spread uniformly

    def run(probe_follows_labels: bool) -> SplitGuard:
        settings = SplitGuardSettings(probe_every=4, patience=2, stop=False)
        guard = SplitGuard(settings, vocab_size=200, seed=0)
        for step in range(16):
            probe = guard.is_probe(step)
            spread = probe and probe_follows_labels
            which = torch.randint(200, (tokens,)) if spread else frequent[torch.randint(4, (tokens,))]
            guard.observe(step, _token_grads(directions, which), mask, probe)
            guard.check(step)
        return guard

    honest, hijacked = run(True), run(False)
    assert honest.scores and all(score < 0.2 for _, score in honest.scores)
    assert hijacked.scores and all(score > 0.8 for _, score in hijacked.scores)
    assert honest.alarm_step is None
    assert hijacked.alarm_step == 8  # the 2nd scored probe (0-based steps 3, 7) with patience 2
    stopping = SplitGuard(SplitGuardSettings(), vocab_size=200)
    stopping.alarm_step = 4
    stopping.smoothed = 0.9
    with pytest.raises(HijackAlarm, match="step 4"):
        stopping.check(5)
