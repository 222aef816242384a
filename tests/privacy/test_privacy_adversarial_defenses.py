"""The learned defenses that move the head: ``adversarial`` (training against a simulated inverter) and ``dualguard``
(warm-up and retention away from the public parts): their mechanics on small modules, and tiny runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from splitlm.config import Config
from splitlm.data import Batch, Example
from splitlm.errors import ConfigError, PrivacyError
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.frameworks.pipeline import _defenses
from splitlm.frameworks.setup import load_source, spec_of
from splitlm.models import load_stage
from splitlm.privacy.defenses import DefenseContext, build_defenses
from splitlm.privacy.defenses.adversarial import Adversarial
from splitlm.privacy.defenses.dualguard import DualGuard, cosine_distance, parameter_distance
from splitlm.runtime.plugins import Micro

VOCAB, DIM, SEQ = 40, 8, 12


class TinyHead(nn.Module):
    """A stand-in for a head: embedding then a linear map, (B, T) ids -> (B, T, d)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mix(self.embed(input_ids))


def ids_and_mask(rows: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


def context(head: TinyHead, tmp: Path | None = None, **extra: Any) -> DefenseContext:
    public = TinyHead(seed=0).requires_grad_(False).eval()
    examples = [Example(ids.tolist(), ids.tolist()) for ids in ids_and_mask(16, seed=3)[0]]
    return DefenseContext(
        head.embed.weight.detach(),
        frozenset(),
        "ushape",
        SEQ,
        0,
        public_stage=lambda role: public,
        examples=examples,
        cache_dir=tmp,
        model_key="tiny",
        **extra,
    )


def micro(head: TinyHead, step: int = 0, index: int = 0) -> Micro:
    ids, mask = ids_and_mask()
    return Micro(("0", step, index), Batch(ids, mask, ids), 1.0, hidden=head(ids, mask))


def adversarial(head: TinyHead, tmp: Path | None = None, **settings: Any) -> Adversarial:
    return Adversarial.create(Adversarial.Settings(**settings), context(head, tmp))


# ---------------------------------------------------------------------------------------------- adversarial


def test_adversarial_alternates_the_inverter_step_and_the_heads_term() -> None:
    head = TinyHead()
    defense = adversarial(head, weight=1.0, lr=0.01)
    m = micro(head)
    term = defense.head_loss(m)
    assert term is not None and term.requires_grad and 0 <= float(term.detach()) <= math.log(VOCAB)
    inverter = defense.inverter
    assert inverter is not None
    before = {k: v.clone() for k, v in inverter.state_dict().items()}
    term.backward()
    # the head's loss reaches the head, never the inverter
    assert head.mix.weight.grad is not None and head.mix.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in inverter.parameters())
    assert all(torch.equal(before[k], v) for k, v in inverter.state_dict().items())
    defense.after_step(0)  # the inverter's own step, on the detached head output
    assert any(not torch.equal(before[k], v) for k, v in inverter.state_dict().items())
    metrics = defense.step_metrics(0)
    assert set(metrics) == {"adversarial_inverter_acc", "adversarial_inverter_loss"}
    assert 0 <= metrics["adversarial_inverter_acc"] <= 1 and metrics["adversarial_inverter_loss"] > 0
    assert defense.pending == [] and defense.step_metrics(1) == {}


def test_adversarial_inverter_learns_the_tokens_over_its_steps() -> None:
    head = TinyHead()
    defense = adversarial(head, weight=0.0, lr=0.02, inverter_steps=5)
    accuracy = []
    for step in range(8):
        assert defense.head_loss(micro(head, step)) is None  # weight 0: the inverter only watches
        defense.after_step(step)
        accuracy.append(defense.step_metrics(step)["adversarial_inverter_acc"])
    assert accuracy[-1] > accuracy[0] + 0.3


@pytest.mark.parametrize("objective", ["entropy", "ce"])
def test_adversarial_term_changes_the_heads_gradient(objective: str) -> None:
    grads = []
    for weight in (0.0, 0.5):
        head = TinyHead()
        defense = adversarial(head, weight=weight, objective=objective)
        m = micro(head)
        task = m.hidden.pow(2).mean()  # type: ignore[union-attr]
        term = defense.head_loss(m)
        assert (term is None) == (weight == 0)
        (task if term is None else task + term).backward()
        grads.append(head.mix.weight.grad.clone())  # type: ignore[union-attr]
    assert not torch.allclose(grads[0], grads[1])


def test_adversarial_ce_objective_is_cut_at_log_v() -> None:
    head = TinyHead()
    term = adversarial(head, weight=1.0, objective="ce").head_loss(micro(head))
    assert term is not None and -math.log(VOCAB) - 1e-6 <= float(term.detach()) < 0


def test_adversarial_pretrains_once_and_reads_the_cache(tmp_path: Path) -> None:
    head = TinyHead()
    first = adversarial(head, tmp_path, pretrain_steps=4)
    first.head_loss(micro(head))
    files = list(tmp_path.glob("adversarial-*.safetensors"))
    assert len(files) == 1
    second = adversarial(head, tmp_path, pretrain_steps=4)
    second.head_loss(micro(head))
    assert first.inverter is not None and second.inverter is not None
    for (name, a), b in zip(first.inverter.state_dict().items(), second.inverter.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = adversarial(head, None, pretrain_steps=0)
    fresh.head_loss(micro(head))
    assert fresh.inverter is not None
    assert not torch.equal(fresh.inverter.bias, first.inverter.bias) or not torch.equal(
        fresh.inverter.proj.weight, first.inverter.proj.weight
    )
    other = adversarial(head, tmp_path, pretrain_steps=5)  # other settings: another key, another file
    other.head_loss(micro(head))
    assert len(list(tmp_path.glob("adversarial-*.safetensors"))) == 2


# ---------------------------------------------------------------------------------------------- dualguard


def test_parameter_distance_measures_lora_deltas_and_full_weights() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(DIM, DIM))
    weight = base[0].weight.detach().clone()
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    assert float(parameter_distance(lora, None).detach()) < 1e-6  # type: ignore[union-attr]  # B starts at zero
    layer = lora.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0  # alpha / r
    expected = delta.norm() / weight.norm()
    assert torch.allclose(parameter_distance(lora, None), expected, rtol=1e-5)  # type: ignore[arg-type]
    full, public = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
    public.load_state_dict(full.state_dict())
    with torch.no_grad():
        full.weight.add_(0.1)
    r = parameter_distance(full, public)
    assert r is not None and r.requires_grad and float(r.detach()) > 0


def test_dualguard_hinge_pushes_the_head_from_the_public_one_during_warm_up_only() -> None:
    head = TinyHead()  # the public head (seed 0) after a small step of training: at equality the push is flat
    with torch.no_grad():
        head.mix.weight.add_(0.01 * torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(5)))
    defense = DualGuard.create(DualGuard.Settings(weight=1.0, margin=0.5, warmup_steps=3, retention=0.0), context(head))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    ids, mask = ids_and_mask()
    distances = []
    for step in range(6):
        term = defense.head_loss(micro(head, step))
        optimizer.zero_grad()
        if term is not None:
            term.backward()
        optimizer.step()
        with torch.no_grad():
            distances.append(float(cosine_distance(head(ids, mask), TinyHead(seed=0)(ids, mask), mask)))
        assert set(defense.step_metrics(step)) == {"dualguard_head_distance"}  # no tail in the context's parts
    assert distances[2] > distances[1] > distances[0] > 0
    assert distances[3:] == [distances[2]] * 3  # retention 0: after the warm-up nothing pushes
    public = context(head).public_stage("head")  # type: ignore[misc]
    assert all(not p.requires_grad for p in public.parameters())


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals_are_one_line() -> None:
    tail = config_problems({"split": {"mode": "vanilla"}, "privacy": {"defenses": {"dualguard": {"tail_weight": 1}}}})
    assert tail == [
        "privacy.defenses.dualguard.tail_weight: a vanilla split has no client tail; drop tail_weight or set "
        "split.mode=ushape"
    ]
    assert config_problems({"split": {"mode": "vanilla"}, "privacy": {"defenses": ["dualguard"]}}) == []
    assert config_problems({"split": {"bottleneck": 8}, "privacy": {"defenses": ["dualguard"]}}) == [
        "privacy.defenses.dualguard: compares the head's output with the public head's, which split.bottleneck "
        "changes in width; drop split.bottleneck or dualguard"
    ]
    frozen = {"lora": {"head": {"method": "frozen"}}}
    assert config_problems({**frozen, "privacy": {"defenses": ["adversarial"]}}) == [
        "privacy.defenses.adversarial: trains the head against an inverter, but lora.head.method=frozen; set "
        "lora.head.method to lora or full, or weight=0"
    ]
    assert config_problems({**frozen, "privacy": {"defenses": ["dualguard"]}}) == [
        "privacy.defenses.dualguard: moves the head, but lora.head.method=frozen; set it to full or lora"
    ]
    for name in ("adversarial", "dualguard"):
        assert config_problems({"framework": {"name": "centralized"}, "privacy": {"defenses": [name]}}) == [
            f"privacy.defenses.{name}: defenses act at the cut; framework.name=centralized has none"
        ]
    assert config_problems({"privacy": {"defenses": {"adversarial": {"weight": -1}}}}) == [
        "privacy.defenses.adversarial.weight: Input should be greater than or equal to 0 (got -1)"
    ]


def test_a_refused_combination_stops_the_run(make_config: Callable[..., Config]) -> None:
    bad = make_config("bad", "split.mode=vanilla", "privacy.defenses.dualguard.tail_weight=1")
    with pytest.raises(ConfigError, match=r"^privacy\.defenses\.dualguard\.tail_weight: a vanilla split"):
        run_framework(bad)


# ---------------------------------------------------------------------------------------------- tiny runs


def test_the_public_head_is_the_pretrained_one_frozen_and_loaded_once(make_config: Callable[..., Config]) -> None:
    config = make_config("ctx", "privacy.defenses=[dualguard]")
    source = load_source(config)
    pretrained = load_stage(source, spec_of(config), "head")
    trained = load_stage(source, spec_of(config), "head")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # the client's head may be resumed or trained: the public copy never follows it
    chain = _defenses(config, source, trained)
    defense = chain.defenses[0]
    assert isinstance(defense, DualGuard)
    public = defense.public_head()
    assert public is defense.public_head() and not public.training
    assert all(not p.requires_grad for p in public.parameters())
    expected = dict(pretrained.named_parameters())
    for name, p in public.named_parameters():
        assert torch.equal(p, expected[name]), name
    bytes_ = sum(p.numel() * p.element_size() for p in public.parameters())
    assert (
        bytes_ == 4 * (258 * 64 + 36_992) == 214_016
    )  # the client memory the module's docstring states for the tiny model


# the tiny random model drifts far from its start within a few steps of full tuning: a margin above that drift
GUARD = (
    "privacy.defenses.dualguard.weight=1",
    "privacy.defenses.dualguard.margin=1.5",
    "privacy.defenses.dualguard.warmup_steps=6",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fast_config: Callable[..., Config]) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("moved")
    full = ("lora.head.method=full", "train.steps=6")
    overrides = {
        "plain": full,
        "adversarial_off": (*full, "privacy.defenses.adversarial.weight=0"),
        "dualguard_off": (*full, "privacy.defenses.dualguard.weight=0", "privacy.defenses.dualguard.tail_weight=0"),
        "dualguard": (*full, *GUARD),
        "dualguard_local": (
            *full,
            *GUARD,
            "privacy.defenses.dualguard.local_steps=4",
            "privacy.defenses.dualguard.local_lr=0.01",
        ),
        "adversarial": (*full, "privacy.defenses.adversarial.weight=2"),
        "composed": (
            *full,
            "privacy.defenses.smashed_noise.clip=100",
            "privacy.defenses.smashed_noise.noise_multiplier=0.01",
            "privacy.defenses.adversarial.weight=1",
            "privacy.defenses.dualguard.weight=1",
        ),
    }
    out = {}
    for name, extra in overrides.items():
        config = fast_config(base / name, *extra)
        run_framework(config)
        out[name] = base / name
    return out


def test_a_defense_that_does_nothing_leaves_the_run_exact(runs: dict[str, Path], run_files: Any) -> None:
    plain = run_files.adapters(runs["plain"], "head", "tail")
    for name in ("adversarial_off", "dualguard_off"):
        other = run_files.adapters(runs[name], "head", "tail")
        assert set(other) == set(plain), name  # no public copy, no inverter among the adapters
        assert all(torch.equal(other[k], plain[k]) for k in plain), name
    losses = [[r["loss"] for r in run_files.metrics(runs[n]) if "loss" in r] for n in ("plain", "dualguard_off")]
    assert losses[0] == losses[1]


def test_dualguard_moves_the_head_further_from_the_public_one(runs: dict[str, Path], run_files: Any) -> None:
    def distances(name: str) -> list[float]:
        return [r["dualguard_head_distance"] for r in run_files.metrics(runs[name]) if "dualguard_head_distance" in r]

    watched, guarded = distances("dualguard_off"), distances("dualguard")
    assert len(watched) == len(guarded) == 6
    assert watched[0] == guarded[0] < 1e-6  # the first step's head is the pretrained one in both
    assert guarded[-1] > watched[-1] + 0.1  # measured: 0.72 against 0.53 with the same steps of task training
    tail = [
        r["dualguard_tail_distance"] for r in run_files.metrics(runs["dualguard"]) if "dualguard_tail_distance" in r
    ]
    assert tail and tail[-1] > 0
    adapters = run_files.adapters(runs["dualguard"], "head", "tail")
    assert set(adapters) == set(run_files.adapters(runs["plain"], "head", "tail"))


def test_dualguard_local_warm_up_moves_the_head_before_split_training(runs: dict[str, Path], run_files: Any) -> None:
    def first_distance(name: str) -> float:
        return next(
            r["dualguard_head_distance"] for r in run_files.metrics(runs[name]) if "dualguard_head_distance" in r
        )

    assert first_distance("dualguard") < 1e-6  # without a local warm-up the first step's head is the public one
    moved = run_files.summary(runs["dualguard_local"])["privacy"]["defenses"]["dualguard"]["local_distance"]
    assert moved > 0.05 and first_distance("dualguard_local") == pytest.approx(moved, abs=0.2)
    assert run_files.summary(runs["dualguard"])["privacy"]["defenses"]["dualguard"]["local_distance"] is None


def test_the_public_attacker_imitates_the_local_warm_up(runs: dict[str, Path]) -> None:
    from splitlm.privacy.attacks import AttackContext
    from splitlm.privacy.knowledge import PublicKnowledge

    plain = AttackContext.from_run(runs["dualguard"])  # no local warm-up: nothing to imitate
    assert plain.imitated_head() is None and plain.stage("head") is plain.public_stage("head")
    ctx = AttackContext.from_run(runs["dualguard_local"])
    imitated = ctx.imitated_head()
    assert imitated is not None and ctx.stage("head") is imitated and ctx.imitated_head() is imitated  # built once
    assert not any(p.requires_grad for p in imitated.parameters())
    batch = ctx.aux_batches(8, 8)[0]
    with torch.no_grad():
        moved = imitated(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        public = ctx.public_stage("head")(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        simulated = ctx.simulate(batch.input_ids, batch.attention_mask)
    assert float(cosine_distance(moved, public, batch.attention_mask)) > 0.05  # its own warm-up moved it (1.0)
    assert torch.equal(simulated, moved)  # SIP and the nn dictionary train on what the imitated head sends
    inside = AttackContext.from_run(runs["dualguard_local"], threat_model="inside")
    assert inside.stage("head") is PublicKnowledge.stage(inside, "head")  # inside holds the client's own head


def test_the_chain_gives_its_token_defenses_to_the_context() -> None:
    head = TinyHead()
    ctx = context(head)
    chain = build_defenses({"dxp": {"epsilon": 1.0}, "dualguard": {}}, ctx)
    assert ctx.tokens is not None and ctx.tokens == chain.tokens
    ids, mask = ids_and_mask()
    first, again, other = (ctx.tokens(ids, mask, "local", k) for k in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)  # drawn per key, reproducibly
    assert not torch.equal(first, ids) and torch.equal(first[mask == 0], ids[mask == 0])  # dxp; padding stays


class TinyTrunk(nn.Module):
    """A stand-in for the public trunk (hidden -> hidden) or a tail (hidden -> logits)."""

    def __init__(self, out: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.map = nn.Linear(DIM, out)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.map(torch.tanh(hidden_states))


def test_dualguard_local_warm_up_trains_the_head_only_and_once() -> None:
    head, public = TinyHead(), TinyHead(seed=0).requires_grad_(False).eval()
    trunk, tail = TinyTrunk(DIM, 1).requires_grad_(False), TinyTrunk(VOCAB, 2)
    tail_before = {k: v.clone() for k, v in tail.state_dict().items()}
    examples = [Example(ids.tolist(), ids.tolist()) for ids in ids_and_mask(16, seed=3)[0]]
    ctx = DefenseContext(
        head.embed.weight.detach(), frozenset(), "ushape", SEQ, 0, parts={"head": head, "tail": tail},
        public_stage=lambda role: {"head": public, "trunk": trunk}[role], examples=examples,
    )  # fmt: skip
    seen: list[tuple[object, ...]] = []

    def substituted(ids: torch.Tensor, mask: torch.Tensor, *key: object) -> torch.Tensor:
        seen.append(key)  # the chain's token defenses (dxp) act on the warm-up's inputs, drawn per local step
        return (ids + 1) % VOCAB

    ctx.tokens = substituted
    settings = DualGuard.Settings(weight=10, margin=1.0, local_steps=30, local_lr=0.05, local_batch_size=4)
    defense = DualGuard.create(settings, ctx)
    ids, mask = ids_and_mask()
    for key, training in ((("0", 0, 0), False), (("0", 3, 0), True), (("0", 0, 1), True)):
        defense.on_forward(key, training)  # evaluation, a later step, a later micro-batch: no warm-up
        assert defense.local_distance is None
    defense.on_forward(("0", 0, 0), True)
    with torch.no_grad():
        distance = float(cosine_distance(head(ids, mask), public(ids, mask), mask))
    assert defense.local_distance is not None and defense.local_distance > 0.9 and distance > 0.9  # measured: 1.45
    assert seen == [("local", step) for step in range(30)]
    assert all(torch.equal(tail.state_dict()[k], v) for k, v in tail_before.items())  # the tail only passes gradient
    assert all(p.grad is None for p in (*tail.parameters(), *trunk.parameters(), *head.parameters()))
    moved = {k: v.clone() for k, v in head.state_dict().items()}
    defense.on_forward(("0", 0, 0), True)  # a second step-0 forward (e.g. a retried round) does not warm up again
    assert all(torch.equal(head.state_dict()[k], v) for k, v in moved.items())
    bare = DualGuard.create(settings, DefenseContext(head.embed.weight.detach(), frozenset(), "ushape", SEQ, 0))
    bare.on_forward(("attacker", 0, 0), True)  # the attacker's copy has no parts: nothing to warm up
    assert bare.local_distance is None


def test_adversarial_run_reports_its_inverter_and_changes_the_head(runs: dict[str, Path], run_files: Any) -> None:
    rows = [r for r in run_files.metrics(runs["adversarial"]) if "loss" in r]
    assert all(0 <= r["adversarial_inverter_acc"] <= 1 for r in rows) and len(rows) == 6
    plain = run_files.adapters(runs["plain"], "head")
    moved = run_files.adapters(runs["adversarial"], "head")
    assert set(moved) == set(plain)
    assert any(not torch.equal(moved[k], plain[k]) for k in plain)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_defenses_are_off_by_default(make_config: Callable[..., Config]) -> None:
    config = make_config("default")
    assert not config.privacy.defenses
    assert build_defenses({}, context(TinyHead())).names == []


def test_the_defenses_compose_with_noise(runs: dict[str, Path], run_files: Any) -> None:
    summary = run_files.summary(runs["composed"])
    assert list(summary["privacy"]["defenses"]) == ["smashed_noise", "adversarial", "dualguard"]  # name -> report
    rows = [r for r in run_files.metrics(runs["composed"]) if "loss" in r]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert all("adversarial_inverter_acc" in r and "dualguard_head_distance" in r for r in rows)


def test_dualguard_needs_the_public_head_only_to_train() -> None:
    head = TinyHead()
    bare = DefenseContext(head.embed.weight.detach(), frozenset(), "ushape", SEQ, 0)  # e.g. an attacker's copy
    defense = DualGuard.create(DualGuard.Settings(), bare)
    assert defense.tail_weight == 0.0  # no tail among the context's parts
    with pytest.raises(PrivacyError, match=r"^dualguard: this client has no public pretrained head"):
        defense.head_loss(micro(head))
