"""Learned defenses and the defense-state seam: mi_bottleneck (a variational information bottleneck at the cut) and
text_obfuscator (cluster-wise perturbation of the input word vectors), on small tensors and in tiny runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splitlm.config import Config
from splitlm.errors import CheckpointError, ConfigError
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.privacy.defenses import DefenseContext, build_defenses
from splitlm.privacy.defenses.mi_bottleneck import MiBottleneck
from splitlm.privacy.defenses.text_obfuscator import TextObfuscator

VOCAB, DIM, SEQ = 80, 6, 10
SPECIAL = frozenset({0, 1})


def context(seed: int = 0) -> DefenseContext:
    table = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(123))
    return DefenseContext(table, SPECIAL, "ushape", SEQ, seed)


def hidden_batch(rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A head output (rows, SEQ, DIM) with per-dimension offsets and spreads, and a mask with padding at the ends."""
    gen = torch.Generator().manual_seed(5)
    spread = torch.linspace(0.5, 3.0, DIM)
    hidden = torch.randn(rows, SEQ, DIM, generator=gen) * spread + torch.arange(DIM).float()
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[:, -2:] = 0
    return hidden, mask


# ---------------------------------------------------------------------------------------------- mi_bottleneck


def test_bottleneck_kl_is_the_gaussian_kl_against_the_calibrated_prior() -> None:
    hidden, mask = hidden_batch()
    defense = MiBottleneck(context(), beta=1.0, init_scale=0.3, calibration=1)
    defense.smashed(hidden, mask)  # calibrates the prior on the real tokens
    real = hidden[mask.bool()].double()  # (N, d)
    mean, std = real.mean(0), real.std(0, unbiased=False)
    assert defense.mean is not None and defense.std is not None
    assert torch.allclose(defense.mean.double(), mean, atol=1e-5) and torch.allclose(defense.std.double(), std)
    # by hand: per dimension log(s / sigma) + (sigma^2 + (h - m)^2) / (2 s^2) - 1/2 with sigma = 0.3 s
    sigma = 0.3 * std
    by_hand = (torch.log(std / sigma) + (sigma**2 + (real - mean) ** 2) / (2 * std**2) - 0.5).sum(1).mean()
    loss = defense.extra_loss(hidden, hidden, mask)
    assert loss is not None and float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    # the same from torch's own Gaussian KL
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(real, sigma), torch.distributions.Normal(mean, std)
    )
    assert float(loss.detach()) == pytest.approx(float(reference.sum(1).mean()), rel=1e-5)
    # a token at the prior's mean with r = 0.3 costs d * (-log 0.3 + 0.3^2 / 2 - 1/2) nats
    at_mean = defense.extra_loss(hidden, defense.mean.expand(1, 1, DIM), torch.ones(1, 1))
    expected = DIM * (-math.log(0.3) + 0.045 - 0.5)
    assert at_mean is not None and float(at_mean.detach()) == pytest.approx(expected, rel=1e-5)


def test_bottleneck_noise_has_the_scaled_std_and_is_seeded() -> None:
    hidden, mask = hidden_batch(rows=64)
    first, second = MiBottleneck(context(), init_scale=0.5), MiBottleneck(context(), init_scale=0.5)
    for defense in (first, second):
        defense.reseed("0", 3, 0, "forward")
    out = first.smashed(hidden, mask)
    assert torch.equal(out, second.smashed(hidden, mask))  # same seed, same key: same noise
    first.reseed("0", 4, 0, "forward")
    assert not torch.equal(out, first.smashed(hidden, mask))
    assert first.std is not None
    noise_std = (out - hidden).reshape(-1, DIM).std(0)
    assert torch.allclose(noise_std, 0.5 * first.std, rtol=0.1)
    assert (out - hidden)[~mask.bool()].abs().min() > 0  # padding is noised too (it carries the real tokens)


def train_scales(beta: float, steps: int = 40) -> torch.Tensor:
    """The scales after ``steps`` of a toy task that wants the head output back exactly (so wants no noise)."""
    hidden, mask = hidden_batch()
    defense = MiBottleneck(context(), beta=beta, init_scale=0.5, lr=0.05)
    for step in range(steps):
        defense.reseed("0", step, 0, "forward")
        z = defense.smashed(hidden, mask)
        task = ((z - hidden) ** 2).mean()
        kl = defense.extra_loss(hidden, hidden, mask)
        (task if kl is None else task + kl).backward()
        defense.after_step(step)
    assert defense.scales is not None
    return defense.scales


def test_bottleneck_scales_learn_and_beta_pushes_them_up() -> None:
    free, squeezed = train_scales(beta=0.0), train_scales(beta=0.5)
    assert float(free.max()) < 0.5 - 0.05  # the task alone shrinks the noise
    assert float(squeezed.mean()) > float(free.mean()) + 0.1  # the KL holds it up
    fixed = MiBottleneck(context(), init_scale=0.5, lr=0.0)
    fixed.smashed(*hidden_batch())
    fixed.after_step(0)
    assert fixed.scales is not None and torch.allclose(fixed.scales, torch.full((DIM,), 0.5))


def test_bottleneck_clip_gives_a_gaussian_mechanism() -> None:
    hidden, mask = hidden_batch()
    unclipped = MiBottleneck(context())
    unclipped.smashed(hidden, mask)
    assert unclipped.dp_events() is None and unclipped.report()["noise_multiplier"] is None
    clipped = MiBottleneck(context(), init_scale=0.5, clip=2.0)
    out = clipped.smashed(hidden, mask)
    assert clipped.std is not None and float(out.isfinite().float().mean()) == 1.0
    events = clipped.dp_events()
    expected = float((0.5 * clipped.std).min()) / (math.sqrt(SEQ) * 2.0)
    assert events is not None and events[0].noise_multiplier == pytest.approx(expected, rel=1e-5)


def test_bottleneck_state_round_trips_through_save_and_load(tmp_path: Path) -> None:
    scales = train_scales(beta=0.1, steps=5)
    hidden, mask = hidden_batch()
    defense = MiBottleneck(context(), beta=0.1, init_scale=0.5, lr=0.05)
    defense.smashed(hidden, mask)
    defense.log_scale.data.copy_(scales.log())  # type: ignore[union-attr]
    defense.save(tmp_path)
    assert (tmp_path / "defense-mi_bottleneck.safetensors").is_file()
    again = MiBottleneck(context(), beta=0.1, init_scale=0.5, lr=0.05)
    again.load(tmp_path)
    assert again.scales is not None and torch.equal(again.scales, defense.scales)
    assert torch.equal(again.mean, defense.mean) and torch.equal(again.std, defense.std)  # type: ignore[arg-type]
    for d in (defense, again):
        d.reseed("0", 9, 0, "eval")
    assert torch.equal(defense.smashed(hidden, mask), again.smashed(hidden, mask))
    with pytest.raises(CheckpointError, match=r"defense-mi_bottleneck\.safetensors not found"):
        MiBottleneck(context()).load(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------- text_obfuscator


def obfuscate(mix: float, noise: float = 0.0, clusters: int = 4) -> tuple[torch.Tensor, TextObfuscator]:
    ctx = context()
    defense = TextObfuscator(ctx, clusters=clusters, mix=mix, noise=noise)
    ids = torch.arange(VOCAB).reshape(8, VOCAB // 8)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    defense.reseed("0", 0, 0)
    return defense.embeddings(ctx.token_embeddings[ids], ids, mask).reshape(VOCAB, DIM), defense


def spread_within_clusters(vectors: torch.Tensor, defense: TextObfuscator) -> float:
    assignment = defense.clusters.assignment
    total = 0.0
    for c in range(defense.clusters.prototypes.shape[0]):
        members = vectors[assignment == c]
        total += float(torch.cdist(members, members).mean())
    return total


def test_text_obfuscator_pulls_the_tokens_of_a_cluster_together() -> None:
    table = context().token_embeddings
    spreads = [spread_within_clusters(obfuscate(mix)[0], obfuscate(mix)[1]) for mix in (0.0, 0.3, 0.7)]
    assert spreads[0] > spreads[1] > spreads[2] > 0
    out, defense = obfuscate(1.0)
    assignment = defense.clusters.assignment
    free = assignment >= 0
    free[-3:] = False  # padding positions (mask 0) keep their vectors
    assert torch.allclose(out[free], defense.clusters.prototypes[assignment[free]], atol=1e-6)
    assert torch.equal(out[~free], table[~free])  # special ids (0, 1) and padding stay as they are
    assert set(assignment[[0, 1]].tolist()) == {-1}


def test_text_obfuscator_noise_follows_the_cluster_radius_and_the_seed() -> None:
    still, _ = obfuscate(0.0, 0.0)
    assert torch.equal(still, context().token_embeddings)  # mix 0 and noise 0: nothing moves
    noisy, defense = obfuscate(0.0, 1.0)
    again, _ = obfuscate(0.0, 1.0)
    assert torch.equal(noisy, again)
    assignment = defense.clusters.assignment
    moved = (noisy - still).norm(dim=1)
    free = (assignment >= 0) & (torch.arange(VOCAB) < VOCAB - 3)
    ratio = moved[free] / defense.clusters.radius[assignment[free]]
    assert 0.5 < float(ratio.mean()) < 1.5  # about noise x the cluster's radius long


# ---------------------------------------------------------------------------------------------- config and runs


def test_refused_combinations_are_one_line_config_errors(make_config: Callable[..., Config]) -> None:
    for name in ("mi_bottleneck", "text_obfuscator"):
        assert config_problems({"privacy": {"defenses": [name]}}) == []
        assert config_problems({"split": {"mode": "vanilla"}, "privacy": {"defenses": [name]}}) == []
        assert config_problems({"framework": {"name": "centralized"}, "privacy": {"defenses": [name]}}) == [
            f"privacy.defenses.{name}: defenses act at the cut; framework.name=centralized has none"
        ]
    frozen = {"lora": {"head": {"method": "frozen"}}, "privacy": {"defenses": ["mi_bottleneck"]}}
    assert config_problems(frozen) == [
        "privacy.defenses.mi_bottleneck: its noise scales learn through the head's backward, and "
        "lora.head.method=frozen runs none; set privacy.defenses.mi_bottleneck.lr=0 (fixed noise) or train the head"
    ]
    assert config_problems({**frozen, "privacy": {"defenses": {"mi_bottleneck": {"lr": 0}}}}) == []
    assert config_problems({"privacy": {"defenses": {"text_obfuscator": {"mix": 1.5}}}}) == [
        "privacy.defenses.text_obfuscator.mix: Input should be less than or equal to 1 (got 1.5)"
    ]
    with pytest.raises(ConfigError, match=r"lora\.head\.method=frozen runs none") as error:
        run_framework(make_config("bad", "lora.head.method=frozen", "privacy.defenses=[mi_bottleneck]"))
    assert "\n" not in str(error.value)


def losses_of(run: Path, run_files: Any) -> list[float]:
    return [row["loss"] for row in run_files.metrics(run) if "loss" in row]


def test_the_embeddings_hook_left_as_it_is_changes_nothing(make_config: Callable[..., Config], run_files: Any) -> None:
    # text_obfuscator with mix 0 and noise 0 sends the head its token vectors instead of the ids: same run
    plain, still = make_config("plain"), make_config("still", "privacy.defenses.text_obfuscator.mix=0",
                                                      "privacy.defenses.text_obfuscator.noise=0",
                                                      "privacy.defenses.text_obfuscator.clusters=8")  # fmt: skip
    moved = make_config("moved", "privacy.defenses.text_obfuscator.clusters=8")
    for config in (plain, still, moved):
        run_framework(config)
    reference = losses_of(Path(plain.output_dir), run_files)
    assert losses_of(Path(still.output_dir), run_files) == reference
    assert (
        run_files.summary(Path(still.output_dir))["eval_loss_after"]
        == run_files.summary(Path(plain.output_dir))["eval_loss_after"]
    )
    assert losses_of(Path(moved.output_dir), run_files) != reference


def test_a_bottleneck_run_reports_its_bound_and_keeps_its_scales(
    make_config: Callable[..., Config], run_files: Any
) -> None:
    config = make_config("mib", "privacy.defenses.mi_bottleneck.beta=0.01", "privacy.defenses.mi_bottleneck.lr=0.05")
    run_framework(config)
    run = Path(config.output_dir)
    report = run_files.summary(run)["privacy"]["defenses"]["mi_bottleneck"]
    assert report["kl_nats_per_token"] > 0 and report["noise_multiplier"] is None
    assert report["scale_mean"] != pytest.approx(0.5)  # the scales trained
    rows = [row for row in run_files.metrics(run) if "mi_kl" in row]
    assert rows and all(math.isfinite(row["mi_kl"]) for row in rows)
    saved = load_file(str(run / "adapters" / "defense-mi_bottleneck.safetensors"))
    assert float(saved["log_scale"].exp().mean()) == pytest.approx(report["scale_mean"], rel=1e-5)
    defense = build_defenses({"mi_bottleneck": {}}, context()).defenses[0]
    assert isinstance(defense, MiBottleneck)
    defense.load(run / "adapters")  # what an inside attacker rebuilds
    assert defense.scales is not None and torch.equal(defense.scales, saved["log_scale"].exp())
