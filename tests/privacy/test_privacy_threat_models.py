"""Threat models for the offline attacker: ``public`` (the pretrained parts) and ``inside`` (the client's current
head and tail), an attacker that knows the defense (``AttackContext.simulate``), cache keys that tell them apart,
the PIDI attack, and ``splitlm attack --threat-model inside`` writing beside the public result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from splitlm.cli.main import main
from splitlm.errors import PrivacyError
from splitlm.frameworks.assemble import assemble
from splitlm.models import Stage
from splitlm.models.split import Role
from splitlm.privacy.attacks import AttackContext, make_attack, observations, pidi, sip
from splitlm.privacy.attacks.base import IMITATION_ROWS, Observation
from splitlm.privacy.defenses import token_texts
from splitlm.privacy.metrics import token_accuracy

QUICK = {"steps": "10", "aux_rows": "100"}  # a rough SIP: these tests check plumbing, not attack quality
PIDI = {"sip_steps": "30", "sip_aux_rows": "200", "steps": "10", "grad_steps": "5"}


@pytest.fixture(scope="module")
def ushape_run(record_run) -> Path:
    return record_run("split.head_layers=2")


@pytest.fixture
def run(ushape_run: Path, tmp_path: Path) -> Path:
    """A private copy of the recorded ushape run, without earlier attack results or cached inverters."""
    copy = tmp_path / "run"
    shutil.copytree(ushape_run, copy, ignore=shutil.ignore_patterns("attacks"))
    return copy


def _aux(ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
    batch = ctx.aux_batches(8, 4)[0]
    return batch.input_ids, batch.attention_mask


# --- inside: the client's current parts --------------------------------------------------------------------


def test_inside_parts_are_the_clients_merged_parts(ushape_run: Path) -> None:
    public = AttackContext.from_run(ushape_run)
    inside = AttackContext.from_run(ushape_run, threat_model="inside")
    full = assemble(ushape_run)[0].state_dict()  # the run's model as generate/export rebuild it
    for role in ("head", "tail"):
        mine = inside.stage(role).state_dict()
        theirs = public.stage(role).state_dict()
        assert mine.keys() == theirs.keys()
        for name, value in mine.items():
            assert torch.equal(value, full[name].float()), name  # the adapters, merged
        moved = [name for name in mine if not torch.equal(mine[name], theirs[name])]
        assert any("q_proj" in name or "v_proj" in name for name in moved), role  # LoRA moved them
    assert inside.stage("trunk") is inside.public_stage("trunk")  # the trunk is the server's own either way
    ids, mask = _aux(inside)
    assert not torch.allclose(inside.simulate(ids, mask), public.simulate(ids, mask))


def test_inside_sip_trains_on_the_clients_current_head(ushape_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = AttackContext.from_run(ushape_run, threat_model="inside")
    inside.run_dir = None  # keep nothing on disk: the inverter must be trained here
    inside.progress = False
    public_head = AttackContext.from_run(ushape_run).stage("head")
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    simulate = inside.simulate

    def spy(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = simulate(ids, mask)
        seen.append((ids, mask, out))
        return out

    monkeypatch.setattr(inside, "simulate", spy)
    sip.inverter(inside, sip.SipOptions(steps=3, aux_rows=40))
    assert len(seen) >= 3  # statistics + every training step go through the attacker's simulated client
    with torch.no_grad():
        for ids, mask, out in seen:
            assert torch.equal(out, inside.stage("head")(input_ids=ids, attention_mask=mask).float())
            assert not torch.allclose(out, public_head(input_ids=ids, attention_mask=mask).float())


def test_inside_bisr_inverts_through_the_clients_head_and_tail(
    ushape_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = AttackContext.from_run(ushape_run, threat_model="inside")
    inside.run_dir = None
    inside.progress = False
    used: list[tuple[Role, Stage]] = []
    stage = inside.stage

    def spy(role: Role) -> Stage:
        part = stage(role)
        used.append((role, part))
        return part

    monkeypatch.setattr(inside, "stage", spy)
    o = observations(ushape_run)[0]
    quick = {"sip_steps": "5", "sip_aux_rows": "40", "steps": "2"}
    make_attack("bisr_b", quick).invert(inside, o)
    make_attack("bisr_f", quick).invert(inside, o)
    tails = [part for role, part in used if role == "tail"]
    heads = [part for role, part in used if role == "head"]
    assert tails and heads
    public = AttackContext.from_run(ushape_run)
    checks: tuple[tuple[Role, list[Stage]], ...] = (("tail", tails), ("head", heads))
    for role, parts in checks:
        client = client_parts(ushape_run, role)
        for part in parts:
            assert part is not public.stage(role)
            assert all(torch.equal(v, client[k]) for k, v in part.state_dict().items())


def client_parts(run: Path, role: Role) -> dict[str, torch.Tensor]:
    """The run's merged ``role`` weights, as ``splitlm export`` rebuilds them (named as in the unsplit model)."""
    full = assemble(run)[0].state_dict()
    names = AttackContext.from_run(run).stage(role).state_dict()
    return {k: full[k].float() for k in names}


def test_inside_without_adapters_is_one_line(tmp_path: Path, ushape_run: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(ushape_run, copy, ignore=shutil.ignore_patterns("attacks", "adapters"))
    with pytest.raises(PrivacyError, match="client-dir") as error:
        AttackContext.from_run(copy, threat_model="inside")
    assert "\n" not in str(error.value)
    with pytest.raises(PrivacyError, match="unknown threat model"):
        AttackContext.from_run(copy, threat_model="collusion")
    # A networked run's client keeps its adapters in its own folder: client_dir points there.
    ctx = AttackContext.from_run(copy, threat_model="inside", client_dir=ushape_run)
    assert ctx.adapters_dir() == ushape_run / "adapters"


# --- public with no defense: today's numbers -----------------------------------------------------------------


def test_public_without_defense_reproduces_the_old_path(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = sip.SipOptions(steps=20, aux_rows=100)
    new = AttackContext.from_run(run)
    new.run_dir = None
    new.progress = False
    model = sip.inverter(new, options)

    @torch.no_grad()
    def old_head_outputs(ctx: AttackContext, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ctx.stage("head")(input_ids=ids, attention_mask=mask).float()  # before threat models

    monkeypatch.setattr(sip, "_head_outputs", old_head_outputs)
    old = AttackContext.from_run(run)
    old.run_dir = None
    old.progress = False
    reference = sip.train_inverter(old, options)
    mine, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    o = observations(run)[0]
    assert torch.equal(
        sip.sip_logits(new, o.smashed, o.attention_mask, options), reference(o.smashed, o.attention_mask)
    )
    ids, mask = _aux(new)
    assert torch.equal(new.simulate(ids, mask), old_head_outputs(new, ids, mask))


# --- the attacker knows the defense --------------------------------------------------------------------------


def test_simulate_applies_the_defenses(fast_config, tmp_path: Path) -> None:
    plain = AttackContext(fast_config(tmp_path / "a", "split.head_layers=2"))
    noisy = AttackContext(
        fast_config(tmp_path / "b", "split.head_layers=2", "privacy.defenses={smashed_noise: {noise_multiplier: 0.5}}")
    )
    ids, mask = _aux(plain)
    clean = plain.simulate(ids, mask)
    noise = noisy.simulate(ids, mask) - clean  # same public head: the difference is the defense's noise
    assert 0.4 < noise.std().item() < 0.6
    assert not torch.equal(noisy.simulate(ids, mask), noisy.simulate(ids, mask))  # fresh draws per call
    tokens = AttackContext(fast_config(tmp_path / "c", "split.head_layers=2", "privacy.defenses={dxp: {epsilon: 1}}"))
    assert not torch.allclose(tokens.simulate(ids, mask), clean)  # the token defense rewrote the ids first
    settings = "privacy.defenses={text_obfuscator: {clusters: 4, mix: 1.0, noise: 0.0}}"
    vectors = AttackContext(fast_config(tmp_path / "d", "split.head_layers=2", settings))
    # the token vectors were pulled onto their clusters' prototypes before the head (the embeddings hook)
    assert not torch.allclose(vectors.simulate(ids, mask), clean)


def test_the_attackers_copy_ranks_sensitive_tokens_by_its_public_text(fast_config, tmp_path: Path) -> None:
    settings = "privacy.defenses={custext: {epsilon: 1, keep_share: 0.6, numbers: true}}"
    ctx = AttackContext(fast_config(tmp_path / "a", "split.head_layers=2", settings))
    (defense,) = ctx.defenses().defenses
    public = torch.tensor([t for example in ctx.aux_examples(IMITATION_ROWS) for t in example.input_ids])
    counts = torch.bincount(public, minlength=defense.vocab_size)
    texts = token_texts(ctx.tokenizer)
    words = [i for i in counts.argsort(descending=True).tolist() if not any(c.isdigit() for c in texts[i])]
    assert defense.sensitive is not None and not bool(defense.sensitive[words[0]])  # its most frequent word passes
    assert bool(defense.sensitive[counts == 0].all())  # what its public text never uses is sensitive
    digits = [i for i, text in enumerate(texts) if text in "0123456789" and text]
    assert digits and bool(defense.sensitive[digits].all())


def test_cache_keys_tell_threat_models_and_defenses_apart(fast_config, tmp_path: Path, ushape_run: Path) -> None:
    options = sip.SipOptions()

    def key(*overrides: str) -> str:
        return sip._cache_key(AttackContext(fast_config(tmp_path / "a", "split.head_layers=2", *overrides)), options)

    public = sip._cache_key(AttackContext.from_run(ushape_run), options)
    inside = sip._cache_key(AttackContext.from_run(ushape_run, threat_model="inside"), options)
    keys = [public, inside, key("privacy.defenses=[nopeek]"), key("privacy.defenses={nopeek: {beta: 2}}")]
    assert len(set(keys)) == len(keys)
    assert key() == public  # the same public attacker (the run's tap settings shape nothing it trains)
    assert key("privacy.defenses={nopeek: {}}") == key("privacy.defenses=[nopeek]")  # defaults filled in


def test_inside_cache_key_follows_the_clients_adapters(run: Path) -> None:
    before = sip._cache_key(AttackContext.from_run(run, threat_model="inside"), sip.SipOptions())
    head = run / "adapters" / "head.safetensors"
    head.write_bytes(head.read_bytes() + b" ")  # any change to the client's parts
    after = sip._cache_key(AttackContext.from_run(run, threat_model="inside"), sip.SipOptions())
    assert before != after


# --- PIDI ------------------------------------------------------------------------------------------------------


def test_pidi_on_a_ushape_run(ushape_run: Path) -> None:
    for threat_model in ("public", "inside"):
        ctx = AttackContext.from_run(ushape_run, threat_model=threat_model)
        ctx.run_dir = None
        ctx.progress = False
        attack = make_attack("pidi", PIDI)
        assert isinstance(attack, pidi.PidiAttack)
        o = observations(ushape_run)[0]
        guess, start, fixed = attack.invert_with_fixed(ctx, o)
        assert guess.shape == o.attention_mask.shape and guess.dtype == torch.long
        assert fixed.any() and torch.equal(guess[fixed], start[fixed])  # agreed positions are kept
        assert o.truth is not None
        assert token_accuracy(o.truth, guess, o.attention_mask) > 0.5


def test_pidi_patching_fixes_the_agreed_positions_and_refines_the_rest(ushape_run: Path) -> None:
    ctx = AttackContext.from_run(ushape_run)
    ctx.progress = False
    o = observations(ushape_run)[0]
    assert o.truth is not None
    mask = o.attention_mask
    vocab = ctx.token_embeddings().shape[0]
    start = torch.randint(0, vocab, mask.shape, generator=torch.Generator().manual_seed(0))
    fixed = torch.zeros_like(mask, dtype=torch.bool)
    fixed[:, ::3] = True
    options = pidi.PidiOptions(patch=8, steps=60, lr=0.05)
    smashed = ctx.stage("head")(input_ids=o.truth, attention_mask=mask).detach()  # a clean target
    guess = pidi.patched_inversion(ctx, smashed, mask, start, fixed, options, "pidi")
    assert torch.equal(guess[fixed], start[fixed])
    free = ~fixed & mask.bool()
    right = (guess[free] == o.truth[free]).float().mean().item()
    assert right > 0.5 > (start[free] == o.truth[free]).float().mean().item()  # refined towards the truth


def test_pidi_in_a_vanilla_split_uses_the_received_labels(record_run) -> None:
    vanilla = record_run("split.mode=vanilla", "split.head_layers=2")
    ctx = AttackContext.from_run(vanilla)
    ctx.run_dir = None
    ctx.progress = False
    o = observations(vanilla)[0]
    assert o.labels is not None and o.grad_trunk_out is None
    _, start, fixed = make_attack("pidi", PIDI).invert_with_fixed(ctx, o)
    has = (o.labels != -100) & o.attention_mask.bool()
    assert torch.equal(start[has], o.labels[has])  # the response side: what the client sent
    assert not (fixed & ~has).any()  # only where the labels and SIP agree
    forward_only = make_attack("pidi", {**PIDI, "response": "off"})
    guess, _, nothing = forward_only.invert_with_fixed(ctx, Observation(o.key, o.smashed, o.attention_mask))
    assert not nothing.any() and guess.shape == o.attention_mask.shape


def test_pidi_options_are_checked() -> None:
    with pytest.raises(PrivacyError, match="patch"):
        make_attack("pidi", {"patch": "0"})
    with pytest.raises(PrivacyError, match="response"):
        make_attack("pidi", {"response": "labels"})


# --- the command -------------------------------------------------------------------------------------------


def test_attack_command_inside_writes_its_own_file(run: Path) -> None:
    options = [f"{k}={v}" for k, v in QUICK.items()]
    assert main(["attack", str(run), "sip", *options, "--no-progress"]) == 0
    public = json.loads((run / "attacks" / "sip.json").read_text())
    assert main(["attack", str(run), "sip", *options, "--threat-model", "inside", "--no-progress"]) == 0
    inside = json.loads((run / "attacks" / "inside" / "sip.json").read_text())
    assert public["threat_model"] == "public" and inside["threat_model"] == "inside"
    assert json.loads((run / "attacks" / "sip.json").read_text()) == public  # not overwritten
    assert (run / "attacks" / "inside" / "sip.jsonl").is_file()
    cached = sorted((run / "attacks" / "cache").glob("sip-*.safetensors"))
    assert len(cached) == 2  # one inverter per threat model
