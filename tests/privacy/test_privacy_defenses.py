"""The client-side defenses: each mechanism on small tensors, its accounting, and what crosses the cut in
tiny recorded runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from dp_accounting import dp_event

from splitlm.config import Config
from splitlm.data import Example
from splitlm.errors import ConfigError, PrivacyError
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.privacy.accounting import epsilon
from splitlm.privacy.defenses import DEFENSES, DefenseContext, build_defenses, token
from splitlm.privacy.defenses.label_dp import LabelDp
from splitlm.privacy.defenses.noise import GradNoise, SmashedNoise
from splitlm.privacy.defenses.nopeek import NoPeek, distance_correlation
from splitlm.privacy.defenses.token import CusText, Dxp, SanText, TokenDefense
from splitlm.privacy.tap import read_records

VOCAB, DIM, SEQ = 60, 8, 16
SPECIAL = frozenset({0, 1})


def context(mode: str = "ushape", seed: int = 0, seq_len: int = SEQ, vocab: int = VOCAB) -> DefenseContext:
    table = torch.randn(vocab, DIM, generator=torch.Generator().manual_seed(123))
    return DefenseContext(table, SPECIAL, mode, seq_len, seed)


def batch(rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (rows, SEQ): random ids with special ids at fixed places and padding at each row's end."""
    ids = torch.randint(2, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 1  # BOS-like
    ids[:, 5] = 0  # EOS-like in the middle
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    for row in range(rows):
        mask[row, SEQ - 1 - row % 4 :] = 0  # 1 to 4 padding positions
    ids[mask == 0] = 0
    ids[:, -1] = 33  # a padding position holding an ordinary id: must stay as it is too
    return ids, mask


def token_defense(name: str, eps: float, ctx: DefenseContext | None = None, top_k: int = 5) -> TokenDefense:
    ctx = ctx or context()
    if name == "custext":
        return CusText(ctx, eps, top_k)
    return {"dxp": Dxp, "santext": SanText}[name](ctx, eps)


def changed_rate(name: str, eps: float, rows: int = 64) -> float:
    ids, mask = batch(rows)
    out = token_defense(name, eps).tokens(ids, mask)
    free = mask.bool() & (ids > 1)
    return float((out != ids)[free].float().mean())


# ---------------------------------------------------------------------------------------------- token level

LOW_EPS = {"dxp": 1.0, "santext": 0.5, "custext": 0.5}


@pytest.mark.parametrize("name", ["dxp", "santext", "custext"])
def test_token_defense_keeps_shape_padding_and_special_ids(name: str) -> None:
    ids, mask = batch()
    out = token_defense(name, LOW_EPS[name]).tokens(ids, mask)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert torch.equal(out[mask == 0], ids[mask == 0])  # padding untouched, even an ordinary id there
    special = (ids == 0) | (ids == 1)
    assert torch.equal(out[special], ids[special])
    free = mask.bool() & ~special
    assert float((out != ids)[free].float().mean()) > 0.5  # a low epsilon changes most free tokens...
    assert not bool(((out == 0) | (out == 1))[free].any())  # ...and never into a special id
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB


@pytest.mark.parametrize("name", ["dxp", "santext", "custext"])
def test_token_defense_is_deterministic_per_seed(name: str) -> None:
    ids, mask = batch()
    first = [token_defense(name, LOW_EPS[name], context(seed=3)).tokens(ids, mask) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    other = token_defense(name, LOW_EPS[name], context(seed=4)).tokens(ids, mask)
    assert not torch.equal(first[0], other)


@pytest.mark.parametrize(
    ("name", "epsilons"), [("dxp", (1.0, 3.0, 10.0)), ("santext", (0.5, 2.0, 5.0)), ("custext", (0.5, 5.0, 20.0))]
)
def test_token_defense_changes_more_tokens_as_epsilon_falls(name: str, epsilons: tuple[float, ...]) -> None:
    rates = [changed_rate(name, eps) for eps in epsilons]
    assert rates[0] > rates[1] > rates[2], rates
    assert changed_rate(name, 1e6) < 0.01


def test_dxp_snaps_to_the_nearest_non_special_token_in_any_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    dxp = Dxp(context(), 1.0)
    points = torch.randn(40, DIM, generator=torch.Generator().manual_seed(1)) * 2
    dist = torch.cdist(points, dxp.table)
    dist[:, [0, 1]] = float("inf")
    assert torch.equal(dxp.nearest(points), dist.argmin(1))
    ids, mask = batch()
    whole = Dxp(context(), 2.0).tokens(ids, mask)
    monkeypatch.setattr(token, "BLOCK_BUDGET", 7)  # blocks of a few vocabulary rows: the same answer
    assert torch.equal(Dxp(context(), 2.0).tokens(ids, mask), whole)


def test_santext_samples_the_exponential_mechanism_over_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token, "BLOCK_BUDGET", 2000)  # several vocabulary blocks per draw
    ctx, eps, source = context(vocab=12), 1.5, 5
    draws = SanText(ctx, eps).substitute(torch.full((6000,), source))
    empirical = torch.bincount(draws, minlength=12).float() / draws.numel()
    score = -eps * torch.cdist(ctx.token_embeddings[source : source + 1], ctx.token_embeddings)[0] / 2
    score[[0, 1]] = -float("inf")
    assert float((empirical - torch.softmax(score, 0)).abs().sum()) / 2 < 0.03  # total variation


def test_custext_samples_among_the_top_k_most_similar_tokens() -> None:
    ctx, eps, source, k = context(), 4.0, 9, 6
    draws = CusText(ctx, eps, k).substitute(torch.full((6000,), source))
    unit = torch.nn.functional.normalize(ctx.token_embeddings, dim=1)
    cosine = unit @ unit[source]
    cosine[[0, 1]] = -float("inf")
    top, where = cosine.topk(k)
    assert int(where[0]) == source  # a token is its own nearest candidate
    assert set(draws.tolist()) <= set(where.tolist())
    expected = torch.softmax(eps * (top - top[-1]) / (top[0] - top[-1]) / 2, 0)
    empirical = torch.stack([(draws == w).float().mean() for w in where])
    assert float((empirical - expected).abs().sum()) / 2 < 0.03


def test_token_defenses_reject_ids_outside_the_vocabulary() -> None:
    ids, mask = batch()
    ids[0, 2] = VOCAB
    with pytest.raises(PrivacyError, match="token vectors"):
        Dxp(context(), 1.0).tokens(ids, mask)
    with pytest.raises(PrivacyError, match="epsilon"):
        SanText(context(), 0.0)


def sensitive_context(**kw: Any) -> DefenseContext:
    """A context whose client text uses ids 2..5 often (2: 40%, 3: 30%, 4: 20%, 5: 10% of its tokens) and whose ids
    6, 7, 8 spell the digits 1, 7, 9."""
    ctx = context(**kw)
    ctx.examples = [Example([2] * 4 + [3] * 3 + [4] * 2 + [5], [0] * 10) for _ in range(3)]
    digits = {6: "1", 7: "7", 8: "9"}
    ctx.token_texts = tuple(digits.get(i, f"w{chr(97 + i % 26)}") for i in range(VOCAB))
    return ctx


@pytest.mark.parametrize("name", ["dxp", "santext", "custext"])
def test_sensitive_tokens_are_the_rare_ones_and_the_frequent_ones_pass_at_their_rate(name: str) -> None:
    ids, mask = batch(64)
    ids[:, 2:10] = torch.tensor([2, 3, 4, 5, 7, 2, 3, 4])  # frequent ids and the digit amid random (rare) ones
    kind = DEFENSES.get(name)
    defense = kind.create(kind.Settings(epsilon=LOW_EPS[name], keep_share=0.7), sensitive_context())
    # 2 and 3 make up 70% of the client's tokens: the only frequent types; everything else is sensitive
    assert defense.sensitive is not None and defense.sensitive.sum() == VOCAB - 2
    assert not bool(defense.sensitive[2]) and not bool(defense.sensitive[3]) and bool(defense.sensitive[4])
    out = defense.tokens(ids, mask)
    frequent = mask.bool() & ((ids == 2) | (ids == 3))
    assert torch.equal(out[frequent], ids[frequent])  # frequent_rate 0: never replaced
    rare = mask.bool() & (ids > 3) & (ids != 7)
    assert float((out != ids)[rare].float().mean()) > 0.5  # the plain mechanism's rate on the rest
    plain = kind.create(kind.Settings(epsilon=LOW_EPS[name]), sensitive_context())
    full = float((plain.tokens(ids, mask) != ids)[frequent].float().mean())
    assert plain.sensitive is None and full > 0.5
    sometimes = kind.create(
        kind.Settings(epsilon=LOW_EPS[name], keep_share=0.7, frequent_rate=0.5), sensitive_context()
    )
    rate = float((sometimes.tokens(ids, mask) != ids)[frequent].float().mean())
    assert 0.25 * full < rate < 0.75 * full  # about half of them go through the mechanism


def test_numbers_makes_digit_tokens_sensitive_however_frequent() -> None:
    ctx = sensitive_context()
    ctx.examples = [Example([7] * 9 + [2], [0] * 10)]  # the digit token is 90% of the client's text
    kept = Dxp.create(Dxp.Settings(epsilon=1.0, keep_share=0.95), ctx)
    assert kept.sensitive is not None and not bool(kept.sensitive[7])
    numbers = Dxp.create(Dxp.Settings(epsilon=1.0, keep_share=0.95, numbers=True), ctx)
    assert numbers.sensitive is not None and bool(numbers.sensitive[7]) and not bool(numbers.sensitive[2])
    # A digit is drawn uniformly among the digits (with or without keep_share); the mechanism, all but off at this
    # epsilon, keeps the words.
    uniform = Dxp.create(Dxp.Settings(epsilon=1e6, numbers=True), ctx)
    ids = torch.tensor([[7, 2] * 1500])
    out = uniform.tokens(ids, torch.ones_like(ids))
    assert torch.equal(out[:, 1::2], ids[:, 1::2])
    drawn = torch.bincount(out[:, ::2].flatten(), minlength=VOCAB)[6:9].float() / 1500
    assert int(torch.bincount(out[:, ::2].flatten(), minlength=VOCAB)[6:9].sum()) == 1500  # only digits
    assert float((drawn - 1 / 3).abs().max()) < 0.05


def test_frequent_rate_without_keep_share_is_refused_in_one_line() -> None:
    (problem,) = Dxp.problems(Dxp.Settings(frequent_rate=0.3), None, None)
    assert "keep_share is 0" in problem and "\n" not in problem
    assert not Dxp.problems(Dxp.Settings(frequent_rate=0.3, keep_share=0.5), None, None)


def test_sensitive_tokens_need_the_clients_examples_and_token_texts() -> None:
    with pytest.raises(PrivacyError, match=r"keep_share=0\.5 ranks tokens"):
        Dxp.create(Dxp.Settings(epsilon=1.0, keep_share=0.5), context())
    ctx = sensitive_context()
    ctx.token_texts = ()
    with pytest.raises(PrivacyError, match="numbers=true needs the tokenizer's token texts"):
        CusText.create(CusText.Settings(epsilon=1.0, keep_share=0.5, numbers=True), ctx)


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize(("mechanism", "order"), [("gaussian", 2), ("laplace", 1)])
def test_clipping_bounds_every_token_and_leaves_short_vectors_alone(mechanism: str, order: int) -> None:
    hidden = torch.randn(4, SEQ, DIM, generator=torch.Generator().manual_seed(2))
    hidden[0, 0] *= 1e-3  # a short vector: below the clip
    clipped = SmashedNoise(context(), mechanism, clip=0.5, noise_multiplier=0.0).smashed(hidden, torch.ones(4, SEQ))
    norms = clipped.norm(p=order, dim=-1)
    assert float(norms.max()) <= 0.5 + 1e-5
    assert torch.allclose(norms[hidden.norm(p=order, dim=-1) > 0.5], torch.tensor(0.5))
    assert torch.equal(clipped[0, 0], hidden[0, 0])


@pytest.mark.parametrize(("mechanism", "clip", "multiplier"), [("gaussian", 0.5, 2.0), ("gaussian", 0.0, 0.3)])
def test_gaussian_noise_has_the_configured_std(mechanism: str, clip: float, multiplier: float) -> None:
    hidden = torch.zeros(8, 64, 64)
    noisy = SmashedNoise(context(), mechanism, clip, multiplier).smashed(hidden, torch.ones(8, 64))
    expected = multiplier * clip if clip else multiplier
    assert float(noisy.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(noisy.mean())) < 0.03 * expected


def test_laplace_noise_has_the_configured_scale() -> None:
    noisy = SmashedNoise(context(), "laplace", 0.5, 2.0).smashed(torch.zeros(8, 64, 64), torch.ones(8, 64))
    assert float(noisy.abs().mean()) == pytest.approx(1.0, rel=0.03)  # E|Laplace(0, b)| = b = 2 * 0.5
    assert float(noisy.std()) == pytest.approx(math.sqrt(2.0), rel=0.05)


def test_smashed_noise_is_differentiable_deterministic_and_keeps_dtype() -> None:
    hidden = torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    mask = torch.ones(2, SEQ)
    out = SmashedNoise(context(), "gaussian", 1.0, 0.5).smashed(hidden, mask)
    again = SmashedNoise(context(), "gaussian", 1.0, 0.5).smashed(hidden, mask)
    assert torch.equal(out, again) and not torch.equal(
        out, SmashedNoise(context(seed=1), "gaussian", 1.0, 0.5).smashed(hidden, mask)
    )
    out.sum().backward()
    assert hidden.grad is not None and bool(hidden.grad.isfinite().all())
    # Clipping scales each long vector to norm 1: the gradient of its coordinate sum is not all ones.
    assert not torch.allclose(hidden.grad, torch.ones_like(hidden.grad))
    half = SmashedNoise(context(), "laplace", 1.0, 0.5).smashed(torch.randn(2, SEQ, DIM).bfloat16(), mask)
    assert half.dtype == torch.bfloat16


def test_grad_noise_respects_its_directions() -> None:
    grad, mask = torch.full((2, SEQ, DIM), 1e-3), torch.ones(2, SEQ)
    up = GradNoise(context(), "gaussian", 1e-2, 1.0, ["up"])
    assert not torch.equal(up.grad_up(grad, mask), grad) and torch.equal(up.grad_down(grad, mask), grad)
    down = GradNoise(context(), "gaussian", 1e-2, 1.0, ["down"])
    assert torch.equal(down.grad_up(grad, mask), grad) and not torch.equal(down.grad_down(grad, mask), grad)
    both = GradNoise(context(), "laplace", 1e-2, 1.0, ["up", "down"])
    assert not torch.equal(both.grad_up(grad, mask), grad) and not torch.equal(both.grad_down(grad, mask), grad)
    assert up.dp_events() is not None and both.dp_events() is not None and down.dp_events() is None
    with pytest.raises(PrivacyError, match="directions=\\[down\\]"):
        GradNoise(context(mode="vanilla"), "gaussian", 1e-2, 1.0, ["up"])
    assert GradNoise(context(mode="vanilla"), "gaussian", 1e-2, 1.0, ["up", "down"]).dp_events() is None


# ---------------------------------------------------------------------------------------------- NoPeek


def test_distance_correlation_is_one_for_identical_and_small_for_independent_samples() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 2, generator=gen), torch.randn(256, 2, generator=gen)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)  # invariant to scale, shift
    assert float(distance_correlation(x, y)) < 0.2
    assert float(distance_correlation(x, x**2)) > 0.3  # a dependence that is not linear


def test_nopeek_loss_reaches_the_real_positions_of_the_head_output_only() -> None:
    ids, mask = batch(4)
    table = context().token_embeddings
    embeddings = table[ids].requires_grad_(True)  # the client passes detached vectors; make sure none flows back
    hidden = (table[ids] @ torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(9))).requires_grad_(True)
    hidden.data[0, 3] = hidden.data[0, 4]  # identical rows: no NaN from a zero distance
    loss = NoPeek(context(), beta=2.0).extra_loss(embeddings, hidden, mask)
    assert loss is not None and 1.0 < loss.item() <= 2.0 + 1e-5  # a linear map of the inputs: dCor near 1
    loss.backward()
    assert hidden.grad is not None and bool(hidden.grad.isfinite().all())
    assert float(hidden.grad[mask.bool()].abs().sum()) > 0 and float(hidden.grad[~mask.bool()].abs().sum()) == 0
    assert embeddings.grad is None
    assert NoPeek(context(), beta=0.0).extra_loss(embeddings, hidden, mask) is None


def test_nopeek_subsamples_long_batches_deterministically() -> None:
    gen = torch.Generator().manual_seed(4)
    embeddings, hidden = torch.randn(4, 200, DIM, generator=gen), torch.randn(4, 200, DIM, generator=gen)
    mask = torch.ones(4, 200)  # 800 real tokens > 256
    values = [NoPeek(context(), 1.0).extra_loss(embeddings, hidden, mask) for _ in range(2)]
    assert values[0] is not None and values[1] is not None and torch.equal(values[0], values[1])
    assert 0 < float(values[0]) < 0.5


# ---------------------------------------------------------------------------------------------- label DP


def test_label_dp_flips_at_the_expected_rate_to_other_non_special_tokens() -> None:
    labels = torch.randint(2, VOCAB, (200, 100), generator=torch.Generator().manual_seed(1))
    labels[:, :3] = -100
    labels[:, 50] = 0  # EOS label
    defense = LabelDp(context(mode="vanilla"), epsilon=3.0)
    out = defense.labels(labels)
    buckets = VOCAB - len(SPECIAL)
    keep = math.exp(3.0) / (math.exp(3.0) + buckets - 1)
    assert defense.keep_probability == pytest.approx(keep)
    assert torch.equal(out[:, :3], labels[:, :3]) and torch.equal(out[:, 50], labels[:, 50])
    free = labels > 1
    flipped = (out != labels) & free
    assert float(flipped[free].float().mean()) == pytest.approx(1 - keep, abs=0.01)
    assert int(out[flipped].min()) >= 2  # never to a special id
    assert len(set(out[flipped].tolist())) == buckets  # every other token is reachable
    assert torch.equal(LabelDp(context(mode="vanilla"), 3.0).labels(labels), out)  # deterministic per seed
    with pytest.raises(PrivacyError, match="vanilla"):
        LabelDp(context(mode="ushape"), 3.0)


# ---------------------------------------------------------------------------------------------- accounting


def noise_epsilon(kind: str, multiplier: float, clip: float = 1.0, mechanism: str = "gaussian", count: int = 1):
    ctx = context()
    if kind == "smashed_noise":
        defense: SmashedNoise | GradNoise = SmashedNoise(ctx, mechanism, clip, multiplier)
    else:
        defense = GradNoise(ctx, mechanism, clip, multiplier, ["up"])
    return epsilon(defense.dp_events(), count, 1e-5)


@pytest.mark.parametrize("kind", ["smashed_noise", "grad_noise"])
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_epsilon_falls_as_noise_grows_and_grows_with_releases(kind: str, mechanism: str) -> None:
    values = [noise_epsilon(kind, m, mechanism=mechanism) for m in (2.0, 4.0, 8.0)]
    assert all(v is not None for v in values) and values[0] > values[1] > values[2] > 0, values
    once, many = noise_epsilon(kind, 4.0, mechanism=mechanism), noise_epsilon(kind, 4.0, mechanism=mechanism, count=5)
    assert once is not None and many is not None and many > once
    assert noise_epsilon(kind, 4.0, clip=0.0, mechanism=mechanism) is None  # no clipping: no sensitivity


def test_events_compose_the_tokens_of_a_sequence() -> None:
    # Gaussian: one sequence of T clipped tokens is T Gaussian releases of one token.
    sequence = epsilon(SmashedNoise(context(seq_len=4), "gaussian", 1.0, 3.0).dp_events(), 1, 1e-5)
    assert sequence == pytest.approx(epsilon([dp_event.GaussianDpEvent(3.0)], 4, 1e-5), rel=1e-3)
    # Laplace with b = 2 * C on one token is pure 0.5-DP.
    one = epsilon(SmashedNoise(context(seq_len=1), "laplace", 1.0, 2.0).dp_events(), 1, 1e-5)
    assert one is not None and 0.4 < one <= 0.5 + 1e-3
    # Randomized response at epsilon 2 on one label: at most 2 against the zero record, and it composes.
    label = [epsilon(LabelDp(context(mode="vanilla", seq_len=1), 2.0).dp_events(), n, 1e-5) for n in (1, 3)]
    assert label[0] is not None and label[1] is not None and 1.5 < label[0] <= 2.0 + 1e-3 < label[1]
    longer = epsilon(LabelDp(context(mode="vanilla", seq_len=8), 2.0).dp_events(), 1, 1e-5)
    assert longer is not None and longer > label[0]


def test_token_and_loss_defenses_have_no_epsilon() -> None:
    ctx = context()
    for defense in (Dxp(ctx, 1.0), SanText(ctx, 1.0), CusText(ctx, 1.0, 5), NoPeek(ctx, 1.0)):
        assert defense.dp_events() is None and epsilon(defense.dp_events(), 3, 1e-5) is None


def test_every_defense_is_registered_and_built_from_its_section() -> None:
    names = ["dxp", "santext", "custext", "smashed_noise", "grad_noise", "nopeek"]
    assert set(names) | {"label_dp"} <= set(DEFENSES)
    chain = build_defenses(names, context())
    assert chain.names == names
    assert build_defenses(["label_dp"], context(mode="vanilla")).names == ["label_dp"]


def test_label_dp_in_a_ushape_split_is_a_config_error(make_config: Callable[..., Config]) -> None:
    # its own rule (LabelDp.problems), reported by the config's one pass and refused by the run
    problems = config_problems({"privacy": {"defenses": ["label_dp"]}})
    assert problems == [
        "privacy.defenses.label_dp: protects the labels a vanilla split sends; in a ushape split labels never leave "
        "the client, so drop label_dp or set split.mode=vanilla"
    ]
    assert config_problems({"split": {"mode": "vanilla"}, "privacy": {"defenses": ["label_dp"]}}) == []
    with pytest.raises(ConfigError, match=r"privacy\.defenses\.label_dp: protects the labels"):
        run_framework(make_config("bad", "privacy.defenses=[label_dp]"))


# ---------------------------------------------------------------------------------------------- tiny runs

USHAPE = {
    "dxp": ("privacy.defenses.dxp.epsilon=200",),
    "santext": (),
    "custext": (),
    "smashed_noise": ("privacy.defenses.smashed_noise.clip=0.1", "privacy.defenses.smashed_noise.noise_multiplier=0.5"),
    "grad_noise": ("privacy.defenses.grad_noise.clip=0.001", "privacy.defenses.grad_noise.directions=[up,down]"),
    "nopeek": ("privacy.defenses.nopeek.beta=4",),
}
WITH_EPSILON = {"smashed_noise", "grad_noise", "label_dp"}
FROZEN_HEAD = "lora.head.method=frozen"  # the head output is then the pretrained one at every step


def check_trained(run: Path, name: str, run_files: Any) -> None:
    summary = run_files.summary(run)
    block = summary["privacy"]
    assert list(block["defenses"]) == [name]
    if name in WITH_EPSILON:
        assert isinstance(block["epsilon"], float) and 0 < block["epsilon"] < math.inf
    else:
        assert block["epsilon"] is None
    losses = [row["loss"] for row in run_files.metrics(run) if "loss" in row]
    assert losses and all(math.isfinite(v) for v in losses) and math.isfinite(summary["eval_loss_after"])


@pytest.mark.parametrize("name", sorted(USHAPE))
def test_ushape_run_with_a_defense_trains_and_sends_no_labels_or_ids(
    name: str, record_run: Callable[..., Path], run_files: Any
) -> None:
    run = record_run(f"privacy.defenses=[{name}]", *USHAPE[name])
    check_trained(run, name, run_files)
    records = read_records(run)
    assert records
    for _, tap, truth in records:
        assert truth is not None and "labels" not in tap
        ids = truth["input_ids"]
        assert not any(v.shape == ids.shape and torch.equal(v.long(), ids) for v in tap.values())
        assert tap["smashed"].is_floating_point() and tap["smashed"].shape[:2] == ids.shape


def test_a_run_ranks_sensitive_tokens_by_the_clients_own_text(record_run: Callable[..., Path], run_files: Any) -> None:
    settings = "privacy.defenses={custext: {epsilon: 1, keep_share: 0.6, numbers: true}}"
    check_trained(record_run(settings), "custext", run_files)  # built from the client's examples and token texts


def test_smashed_noise_sends_clipped_head_output_plus_noise(record_run: Callable[..., Path]) -> None:
    clean = {key: (tap, truth) for key, tap, truth in read_records(record_run(FROZEN_HEAD))}
    noisy = read_records(record_run(FROZEN_HEAD, "privacy.defenses=[smashed_noise]", *USHAPE["smashed_noise"]))
    assert noisy
    for key, tap, truth in noisy:
        reference, reference_truth = clean[key]
        assert truth is not None and reference_truth is not None
        assert torch.equal(truth["input_ids"], reference_truth["input_ids"])  # same data order in both runs
        head = reference["smashed"]  # (B, T, d) the clean head output
        clipped = head * (0.1 / head.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        noise = tap["smashed"] - clipped
        assert float(noise.std()) == pytest.approx(0.5 * 0.1, rel=0.1)
        assert float((tap["smashed"] - head).abs().mean()) > 0.01


def test_vanilla_label_dp_randomizes_the_labels_the_server_receives(
    record_run: Callable[..., Path], run_files: Any
) -> None:
    def expected(truth: dict[str, torch.Tensor]) -> torch.Tensor:  # as collate builds them for plain text
        labels = truth["input_ids"].masked_fill(truth["attention_mask"] == 0, -100)
        labels[:, 0] = -100
        return labels

    for _, tap, truth in read_records(record_run("split.mode=vanilla", "privacy.tap.max_batches=5")):
        assert truth is not None and torch.equal(tap["labels"], expected(truth))
    run = record_run("split.mode=vanilla", "privacy.tap.max_batches=5", "privacy.defenses=[label_dp]",
                     "privacy.defenses.label_dp.epsilon=6")  # fmt: skip
    check_trained(run, "label_dp", run_files)
    flipped, total = 0, 0
    for _, tap, truth in read_records(run):
        assert truth is not None
        labels = expected(truth)
        free = (labels >= 0) & (labels < 256)  # the byte tokens; 256 (EOS) and 257 (PAD) are special
        assert torch.equal(tap["labels"][~free], labels[~free])
        flipped += int((tap["labels"] != labels)[free].sum())
        total += int(free.sum())
    keep = math.exp(6.0) / (math.exp(6.0) + 255)
    assert total > 300 and flipped / total == pytest.approx(1 - keep, abs=0.08)


def test_nopeek_changes_how_the_head_trains(make_config: Callable[..., Config], run_files: Any) -> None:
    plain = make_config("plain")
    with_nopeek = make_config("nopeek", "privacy.defenses.nopeek.beta=4")
    run_framework(plain)
    run_framework(with_nopeek)
    heads = [run_files.adapters(Path(c.output_dir), "head") for c in (plain, with_nopeek)]
    head_gap = max(float((heads[0][k] - heads[1][k]).abs().max()) for k in heads[0])
    assert set(heads[0]) == set(heads[1]) and head_gap > 1e-4
