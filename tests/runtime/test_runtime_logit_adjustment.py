"""``remedies: {logit_adjustment: {tau: tau}}`` (SCALA): the adjustment follows its formula, the prior counts only
the label tokens the loss is taken on (smoothed), a ushape run trains with it, tau 0 changes nothing, and a vanilla
split is refused (its loss is the server's)."""

from __future__ import annotations

import math

import pytest
import torch

from splitlm.data import Example
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, framework_of, run_framework
from splitlm.remedies.logit_adjustment import LogitAdjustment, label_prior
from splitlm.runtime.loss import IGNORE


def test_the_adjustment_adds_tau_times_log_prior() -> None:
    prior = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)  # (1, 2, 4)
    adjusted = LogitAdjustment(prior, tau=2.0)(logits)
    expected = logits.detach() + 2.0 * torch.tensor([math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)])
    torch.testing.assert_close(adjusted, expected)
    adjusted.sum().backward()  # a constant shift: the gradient reaches the logits unchanged
    torch.testing.assert_close(logits.grad, torch.ones_like(logits))
    with pytest.raises(ValueError, match="width 3"):
        LogitAdjustment(prior, tau=1.0)(torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="positive prior"):
        LogitAdjustment(torch.tensor([1.0, 0.0]), tau=1.0)


def test_the_prior_counts_loss_labels_only_smoothed() -> None:
    examples = [
        # position 0 is never predicted; -100 marks prompt tokens and padding
        Example(input_ids=[3, 1, 1, 2], labels=[3, IGNORE, 1, 2]),
        Example(input_ids=[4, 1, 0], labels=[IGNORE, 1, IGNORE], label="x"),
    ]
    prior = label_prior(examples, vocab_size=5)
    counts = torch.tensor([0, 2, 1, 0, 0]) + 1  # token 1 twice, token 2 once; 3 and 4 only at position 0 / input
    torch.testing.assert_close(prior, counts.float() / counts.sum())
    assert torch.all(prior > 0) and prior.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(label_prior([], vocab_size=4), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        label_prior([Example(input_ids=[0, 9], labels=[0, 9])], vocab_size=5)


def _losses(run_files, out) -> list[float]:
    return [record["loss"] for record in run_files.metrics(out) if "loss" in record]


def test_a_ushape_run_trains_with_it_and_tau_zero_changes_nothing(tmp_path, make_config, run_files) -> None:
    run_framework(make_config("plain", "train.steps=3"))
    run_framework(make_config("zero", "train.steps=3", "remedies.logit_adjustment.tau=0"))
    run_framework(make_config("adjusted", "train.steps=3", "remedies.logit_adjustment.tau=1.0"))
    plain, zero, adjusted = (_losses(run_files, tmp_path / name) for name in ("plain", "zero", "adjusted"))
    assert len(plain) == 3 and zero == plain  # bit-identical
    assert len(adjusted) == 3 and all(math.isfinite(x) for x in adjusted)
    assert adjusted != plain  # the adjusted loss is what the client trains on and reports


def test_a_vanilla_split_is_refused_in_one_line(make_config) -> None:
    config = make_config("run", "split.mode=vanilla", "remedies.logit_adjustment.tau=1.0")
    with pytest.raises(ConfigError) as caught:
        framework_of(config).check(config)
    assert config_problems(config.model_dump(mode="json")) == [str(caught.value)]
    lines = [line for line in str(caught.value).splitlines() if "logit_adjustment" in line]
    assert len(lines) == 1 and "split.mode=ushape" in lines[0]
