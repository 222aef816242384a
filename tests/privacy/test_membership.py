"""Membership inference: the metrics on hand-made scores, the attacks on an overfit tiny run, and their refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitlm.cli.main import main
from splitlm.config import Config, load_config
from splitlm.data import Example
from splitlm.errors import PrivacyError
from splitlm.frameworks import run_framework
from splitlm.frameworks.rows import client_examples, held_out_examples
from splitlm.models import load_stage
from splitlm.privacy.attacks import AttackContext
from splitlm.privacy.attacks.membership import (
    LossRatio,
    auc_interval,
    calibrate,
    membership_scores,
    mia_metrics,
)

# 16 member rows seen 25 times each by a fully trained trunk: it memorises them (a LoRA trunk of the tiny random
# model barely learns at all in seconds). 32 held-out rows of the same corpus are the non-members; the rows past
# data.max_rows are the attacker's public text.
OVERFIT = (
    "data.max_rows=48", "data.eval_size=32", "train.steps=100", "train.lr=0.01", "lora.trunk.method=full",
    "privacy.tap.enabled=true", "privacy.tap.max_batches=8",
)  # fmt: skip
FEW_STEPS = "steps=10"  # ktmia's alignment, kept short in tests


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory, fast_config: Callable[..., Config]) -> Path:
    out = tmp_path_factory.mktemp("mia") / "run"
    run_framework(fast_config(out, *OVERFIT))
    return out


@pytest.fixture(scope="module")
def rows(overfit: Path) -> tuple[list[Example], list[Example]]:
    config = load_config(overfit / "config.yaml")
    return client_examples(config, 0), held_out_examples(config)


def test_metrics_on_hand_made_scores() -> None:
    assert mia_metrics([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0}
    assert mia_metrics([0.0, 1.0], [2.0, 3.0])["auc"] == 0.0
    assert mia_metrics([1.0] * 4, [1.0] * 4) == {"auc": 0.5, "tpr_at_1pct_fpr": 0.0}  # ties: chance, no TPR at 1 %
    # 100 non-members: one false positive is 1 % FPR, two are 2 %. Two of them above three of the four members:
    # at most 1 % FPR, only the top member is caught
    members, others = [10.0, 0.5, 0.4, 0.3], [0.0] * 98 + [5.0, 6.0]
    result = mia_metrics(members, others)
    assert result["tpr_at_1pct_fpr"] == pytest.approx(0.25)
    assert result["auc"] == pytest.approx((100 + 3 * 98) / 400)
    assert mia_metrics(members, [0.0] * 99 + [5.0])["tpr_at_1pct_fpr"] == 1.0  # one false positive is allowed
    low, high = auc_interval(members, others, rounds=200)
    assert low <= result["auc"] <= high


def test_metrics_refuse_empty_or_broken_scores() -> None:
    with pytest.raises(PrivacyError, match="members and non-members"):
        mia_metrics([], [1.0])
    with pytest.raises(PrivacyError, match="finite"):
        mia_metrics([float("nan")], [1.0])


def test_rows_are_disjoint_and_members_are_what_the_client_trained(rows: tuple[list[Example], list[Example]]) -> None:
    members, others = rows
    assert len(members) == 16 and len(others) == 32
    assert not {tuple(e.input_ids) for e in members} & {tuple(e.input_ids) for e in others}


def test_loss_attack_tells_members_of_an_overfit_run(overfit: Path, rows: tuple[list[Example], list[Example]]) -> None:
    members, others = rows
    inside = membership_scores(overfit, members, "loss")
    outside = membership_scores(overfit, others, "loss")
    assert len(inside) == len(members) and len(outside) == len(others)
    assert mia_metrics(inside, outside)["auc"] > 0.75
    assert membership_scores(overfit, members, "loss") == inside  # deterministic


def test_loss_reference_is_the_pretrained_trunk(overfit: Path) -> None:
    ctx = AttackContext.from_run(overfit)
    (trained, *_), (reference, *_) = LossRatio().pairs(ctx)
    assert reference is ctx.public_stage("trunk")
    fresh = load_stage(ctx.source, ctx.spec, "trunk", "float32", ctx.device).state_dict()  # the public weights
    pretrained, fine_tuned = reference.state_dict(), trained.state_dict()
    assert set(pretrained) == set(fresh) == set(fine_tuned)
    assert all(torch.equal(pretrained[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(fine_tuned[k], fresh[k]) for k in fresh)  # the server's trained trunk is not


def test_untrained_trunk_gives_no_signal(tmp_path: Path, make_config: Callable[..., Config]) -> None:
    config = make_config("zero", *OVERFIT[:2], "train.steps=1", "lora.trunk.method=full", "train.lr=1e-12")
    run_framework(config)
    members, others = client_examples(config, 0), held_out_examples(config)
    scores = membership_scores(Path(config.output_dir), members + others, "loss")
    assert max(abs(s) for s in scores) < 1e-4  # the trunk barely moved: trained and reference models agree


def test_ktmia_and_observed_tell_members(overfit: Path, rows: tuple[list[Example], list[Example]]) -> None:
    members, others = rows
    ctx = AttackContext.from_run(overfit)
    options = {"steps": "10", "aux_rows": "16", "calib_rows": "16"}
    inside = membership_scores(None, members, "ktmia", options, ctx=ctx)
    outside = membership_scores(None, others, "ktmia", options, ctx=ctx)
    assert mia_metrics(inside, outside)["auc"] > 0.7
    cached = list((overfit / "attacks" / "cache").glob("ktmia-*"))
    assert len(cached) == 2  # the two aligned pseudo-clients, for later processes
    assert membership_scores(overfit, members, "ktmia", options) == pytest.approx(inside, abs=1e-5)  # read back
    seen = membership_scores(overfit, members, "observed")
    unseen = membership_scores(overfit, others, "observed")
    assert mia_metrics(seen, unseen)["auc"] > 0.9  # the tap kept the last epoch: every member's smashed data
    threshold = calibrate(ctx, "loss")["threshold"]
    assert isinstance(threshold, float)


def test_cli_writes_the_membership_result(overfit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", str(overfit), "mia_loss", "--no-progress", "calib_rows=8"]) == 0
    result = json.loads((overfit / "attacks" / "mia_loss.json").read_text())
    assert result["members"] == 16 and result["nonmembers"] == 32
    assert result["auc"] > 0.75 and 0 <= result["tpr_at_1pct_fpr"] <= 1
    assert result["auc_95ci"][0] <= result["auc"] <= result["auc_95ci"][1]
    assert json.loads(capsys.readouterr().out)["auc"] == result["auc"]


def test_refusals(overfit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PrivacyError, match="unknown membership attack"):
        membership_scores(overfit, [Example([1, 2, 3], [1, 2, 3])], "shadow")
    with pytest.raises(PrivacyError, match="no candidate rows"):
        membership_scores(overfit, [], "loss")
    with pytest.raises(PrivacyError, match="public threat model"):
        membership_scores(overfit, [Example([1, 2, 3], [1, 2, 3])], "ktmia", threat_model="inside")
    with pytest.raises(PrivacyError, match="unknown option"):
        membership_scores(overfit, [Example([1, 2, 3], [1, 2, 3])], "loss", {"shadows": "3"})
    (tmp_path / "adapters").mkdir()
    (tmp_path / "config.yaml").write_text((overfit / "config.yaml").read_text())
    with pytest.raises(PrivacyError, match=r"trunk\.safetensors not found"):
        membership_scores(tmp_path, [Example([1, 2, 3], [1, 2, 3])], "loss")
    assert main(["attack", str(overfit), "mia_loss", "client=7", "--no-progress"]) != 0
    assert "client 7" in capsys.readouterr().err
