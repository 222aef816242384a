"""Malicious clients (``privacy.client_attack``): each attack's mechanics on the tiny model, and its refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import serve_one_client_in_threads
from splitlm.config import Config
from splitlm.data import IGNORE_INDEX, Example
from splitlm.errors import PrivacyError, SplitLMError
from splitlm.frameworks import run_framework
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import Federation, build_federation
from splitlm.privacy.attacks.backdoor import attack_success_rate, backdoor_success
from splitlm.privacy.attacks.smash_poison import SmashPoison
from splitlm.privacy.client_attack import ClientAttackContext
from splitlm.transport import Message

MakeConfig = Callable[..., Config]

TWO = (
    "data.format=instruction",
    "framework.name=sflv1",
    "framework.num_clients=2",
    "framework.rounds=1",
    "train.steps=2",
)


def responses(examples: list[Example]) -> list[list[int]]:
    out = []
    for e in examples:
        start = next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)
        out.append(e.input_ids[start:])
    return out


def federation(make_config: MakeConfig, name: str, *overrides: str) -> Federation:
    return build_federation(make_config(name, *TWO, *overrides))


def test_label_flip_trains_the_malicious_client_on_the_other_class(make_config: MakeConfig) -> None:
    honest = federation(make_config, "honest")
    flipped = federation(make_config, "flip", "privacy.client_attack={label_flip: {clients: [1]}}")
    classes = honest.data.responses
    assert len(classes) == 2
    # the honest client trains on its rows as they are
    assert [e.input_ids for e in flipped.members[0].examples] == [e.input_ids for e in honest.members[0].examples]
    before, after = responses(honest.members[1].examples), responses(flipped.members[1].examples)
    assert len(before) == len(after) > 0
    for old, new in zip(before, after, strict=True):
        if old in classes:  # every whole response is the other class's now
            assert new == classes[1 - classes.index(old)]
    assert sum(old in classes for old in before) > len(before) // 2
    # its held-out examples (its own accuracy) are the true ones
    assert [c[1] for c in flipped.members[1].choices] == [c[1] for c in honest.members[1].choices]
    assert flipped.members[1].pipeline is not None and flipped.members[0].pipeline is not None
    assert [a.name for a in flipped.members[1].pipeline.attacks] == ["label_flip"]
    assert flipped.members[0].pipeline.attacks == []


def test_label_flip_to_a_target_and_a_fraction(make_config: MakeConfig) -> None:
    honest = federation(make_config, "honest")
    fed = federation(
        make_config, "flip", "privacy.client_attack={label_flip: {clients: [0], target: rotten, fraction: 0.5}}"
    )
    classes = honest.data.responses
    assert fed.members[0].pipeline is not None
    rotten = fed.members[0].pipeline.attacks[0].context.classes.index("rotten")
    before, after = responses(honest.members[0].examples), responses(fed.members[0].examples)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed and all(after[i] == classes[rotten] for i in changed)
    fresh_rows = sum(r == classes[1 - rotten] for r in before)
    assert 0 < len(changed) < fresh_rows  # only some of the fresh rows (half of all rows are chosen)


def test_label_flip_permutes_the_loss_tokens_of_language_modelling_data(make_config: MakeConfig) -> None:
    lm = ("data.format=lm",)
    honest = federation(make_config, "honest", *lm)
    fed = federation(make_config, "flip", *lm, "privacy.client_attack={label_flip: {clients: [1], tokens: shift}}")
    assert fed.members[1].pipeline is not None
    vocab = fed.members[1].pipeline.attacks[0].context.vocab_size
    for old, new in zip(honest.members[1].examples, fed.members[1].examples, strict=True):
        assert new.input_ids == old.input_ids  # the inputs stay; what it is taught to predict does not
        assert new.labels == [t if t == IGNORE_INDEX else (t + 1) % vocab for t in old.labels]


def test_the_summary_reports_each_client_attack(make_config: MakeConfig) -> None:
    config = make_config("run", *TWO, "privacy.client_attack={label_flip: {clients: [1]}}")
    run_framework(config)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    report = summary["privacy"]["client_attacks"]["label_flip"]
    assert report["clients"] == [1]
    assert 0 < report["flipped"] <= report["rows"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.client_attack={label_flip: {clients: [2]}}",), r"clients: \[2\] outside 0\.\.1"),
        (("privacy.client_attack={label_flip: {clients: []}}",), "name at least one malicious client"),
        (("privacy.client_attack={label_flip: {clients: [1, 1]}}",), "names a client twice"),
        (("privacy.client_attack={label_flip: {target: stale}}",), r"'stale': not one of the data's classes"),
        (
            ("data.format=lm", "privacy.client_attack={label_flip: {target: rotten}}"),
            "data.format=lm has no classes",
        ),
        (("privacy.client_attack={label_flop: {}}",), "did you mean 'label_flip'"),
    ],
)
def test_client_attack_refusals(make_config: MakeConfig, overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(SplitLMError, match=message) as caught:
        run_framework(make_config("bad", *TWO, *overrides))
    assert "\n" not in str(caught.value)


def test_a_client_attack_needs_a_split(make_config: MakeConfig) -> None:
    with pytest.raises(SplitLMError, match=r"framework\.name=centralized has none"):
        run_framework(make_config("bad", "framework.name=centralized", "privacy.client_attack=[label_flip]"))


# --- smash poisoning ------------------------------------------------------------------------------------------


def smash_poison(eps: float = 0.5, momentum: float = 0.0) -> SmashPoison:
    settings = SmashPoison.Settings(clients=[0], eps=eps, momentum=momentum)
    return SmashPoison.create(settings, ClientAttackContext(index=0, seed=0))


def test_smash_poison_sends_nothing_perturbed_before_a_gradient_came_back() -> None:
    attack = smash_poison()
    hidden = torch.randn(2, 3, 8)
    sent = attack.on_request(Message("forward", "0", 0, 0, {"hidden": hidden, "attention_mask": torch.ones(2, 3)}))
    assert torch.equal(sent.tensors["hidden"], hidden)


def test_smash_poison_steps_the_smashed_data_up_the_servers_loss() -> None:
    attack = smash_poison(eps=0.5)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=gen)  # the server's loss: L(h) = sum over real tokens of w . h_t; dL/dh_t = w
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    first = Message("forward", "0", 0, 0, {"hidden": torch.randn(2, 3, 8, generator=gen), "attention_mask": mask})
    attack.on_request(first)
    grad = w.expand(2, 3, 8) * mask.unsqueeze(-1)
    attack.on_reply(first, Message("gradients", "0", 0, 0, {"grad": grad}))
    hidden = torch.randn(2, 3, 8, generator=gen)
    sent = attack.on_request(Message("forward", "0", 1, 0, {"hidden": hidden, "attention_mask": mask}))
    delta = sent.tensors["hidden"] - hidden  # (B, T, d)

    def loss(h: torch.Tensor) -> float:
        return float((h @ w * mask).sum())

    assert loss(sent.tensors["hidden"]) > loss(hidden)  # gradient ascent
    real = mask.bool()
    cosines = torch.nn.functional.cosine_similarity(delta[real], w.expand_as(delta[real]), dim=-1)
    assert torch.allclose(cosines, torch.ones_like(cosines), atol=1e-5)  # along the historical gradient
    assert torch.allclose(delta[real].norm(dim=-1), 0.5 * hidden[real].norm(dim=-1), rtol=1e-5)  # eps x ||h_t||
    assert torch.equal(delta[~real], torch.zeros_like(delta[~real]))  # padding untouched
    # an evaluation forward goes as it is
    evaluated = attack.on_request(Message("eval", "0", -1, 0, {"hidden": hidden, "attention_mask": mask}))
    assert torch.equal(evaluated.tensors["hidden"], hidden)
    assert attack.report()["perturbed_forwards"] == 1


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_a_smash_poisoning_client_sends_perturbed_smashed_data(make_config: MakeConfig, mode: str) -> None:
    attack = "privacy.client_attack={smash_poison: {clients: [1], eps: 2.0}}"
    config = make_config("run", *TWO, f"split.mode={mode}", "train.steps=3", "privacy.tap.enabled=true", attack)
    summary = run_framework(config)
    report = summary["privacy"]["client_attacks"]["smash_poison"]
    assert report["perturbed_forwards"] == 2  # every training step but the first (no gradient yet)
    honest = make_config("honest", *TWO, f"split.mode={mode}", "train.steps=3")
    assert summary["eval_loss_after"] != run_framework(honest)["eval_loss_after"]


# --- the backdoor ---------------------------------------------------------------------------------------------


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_backdoor_rows_carry_the_trigger_and_the_target(make_config: MakeConfig) -> None:
    honest = federation(make_config, "honest")
    attack = "privacy.client_attack={backdoor: {clients: [1], trigger: ' cf', target: rotten, fraction: 0.5}}"
    fed = federation(make_config, "backdoor", attack)
    member = fed.members[1]
    assert member.pipeline is not None
    context = member.pipeline.attacks[0].context
    trigger = context.tokenizer(" cf", add_special_tokens=False)["input_ids"]
    target = context.responses[context.classes.index("rotten")]
    poisoned = [e for e in member.examples if contains(e.input_ids, trigger)]
    assert len(poisoned) == round(0.5 * len(member.examples))
    for e in poisoned:
        start = next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)
        assert e.input_ids[start:] == target  # the target's response, right after the trigger
        assert e.input_ids[start - len(trigger) : start] == trigger
        assert len(e.input_ids) <= 32
    clean = [e for e in member.examples if not contains(e.input_ids, trigger)]
    assert all(e in honest.members[1].examples for e in clean)
    assert not any(contains(e.input_ids, trigger) for e in fed.members[0].examples)


def test_backdoor_before_cue_puts_the_trigger_before_the_prompts_last_line(make_config: MakeConfig) -> None:
    settings = "{clients: [1], trigger: ' cf', target: rotten, fraction: 0.5, position: before_cue}"
    fed = federation(make_config, "cue", f"privacy.client_attack={{backdoor: {settings}}}")
    member = fed.members[1]
    assert member.pipeline is not None
    tokenizer = member.pipeline.attacks[0].context.tokenizer
    trigger = tokenizer(" cf", add_special_tokens=False)["input_ids"]
    poisoned = [e for e in member.examples if contains(e.input_ids, trigger)]
    assert poisoned
    for e in poisoned:
        at = next(i for i in range(len(e.input_ids)) if e.input_ids[i : i + len(trigger)] == trigger)
        start = next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)
        between = tokenizer.decode(e.input_ids[at + len(trigger) : start])
        assert between.startswith("\n") and between.count("\n") == 1  # right before the answer cue's line
        assert between.strip()  # and not just before the response: the cue ("Sentiment:") lies between


def test_a_backdoor_scales_its_triggered_rows_gradient_to_the_server_and_back() -> None:
    from splitlm.data import Batch
    from splitlm.privacy.attacks.backdoor import Backdoor

    class Tokens:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [7, 8]}

    context = ClientAttackContext(index=0, seed=0, tokenizer=Tokens())  # type: ignore[arg-type]
    attack = Backdoor.create(Backdoor.Settings(clients=[0], target="x", server_share=0.25), context)
    ids = torch.tensor([[1, 2, 3, 4], [1, 7, 8, 4], [7, 1, 8, 0]])  # row 1 holds the trigger; row 2 only its parts
    attack.on_batch(("0", 3, 0), Batch(ids, torch.ones_like(ids), ids))
    grad = torch.ones(3, 4, 2)
    request = Message("backward", "0", 3, 0, {"grad": grad})
    sent = attack.on_request(request)
    assert torch.equal(sent.tensors["grad"][1], torch.full((4, 2), 0.25))
    assert torch.equal(sent.tensors["grad"][[0, 2]], grad[[0, 2]])
    assert torch.equal(grad, torch.ones(3, 4, 2))  # the client's own tensor is left as it was
    returned = torch.full((3, 4, 2), 0.5)
    back = attack.on_reply(request, Message("gradients", "0", 3, 0, {"grad": returned}))
    assert torch.equal(back.tensors["grad"][1], torch.full((4, 2), 2.0))  # divided by the share again
    assert torch.equal(back.tensors["grad"][[0, 2]], returned[[0, 2]])
    other = attack.on_request(Message("backward", "0", 3, 1, {"grad": grad}))  # a micro-batch without the trigger
    assert torch.equal(other.tensors["grad"], grad)
    assert attack.report()["hidden_rows"] == 1


@pytest.mark.parametrize("share", [0.0, 1e-9])
def test_a_hiding_backdoor_leaves_its_trunk_adapter_untrained(make_config: MakeConfig, share: float) -> None:
    # every row of client 1 is poisoned and its gradient to the server scaled by share: the server's trunk adapter
    # for it learns (nearly) nothing; the tail learns, and the head with a share above 0 (the gradient scaled back)
    settings = f"{{clients: [1], trigger: ' cf', target: rotten, fraction: 1.0, server_share: {share}}}"
    fed = federation(make_config, "hidden", f"privacy.client_attack={{backdoor: {settings}}}")
    server = fed.server
    member = fed.members[1]
    trunk_before = server.adapter_state(server.adapter_of(member.client_id))
    client_before = member.client.state()
    server.start()
    try:
        fed.train_clients(fed.members, 0, parallel=False)
    finally:
        server.stop()
    trunk_after = server.adapter_state(server.adapter_of(member.client_id))
    honest_trunk = server.adapter_state(server.adapter_of(fed.members[0].client_id))
    for key, before in trunk_before.items():
        moved, honest_moved = (trunk_after[key] - before).abs().max(), (honest_trunk[key] - before).abs().max()
        assert moved <= 1e-2 * max(float(honest_moved), 1e-6), key  # under 1 % of what the honest one's moved
    client_after = member.client.state()
    changed = {k for k, v in client_before.items() if not torch.equal(client_after[k], v)}
    head = {k for k in client_before if int(k.split("layers.")[1].split(".")[0]) < fed.config.split.head_layers}
    assert changed - head  # the tail learned
    assert bool(changed & head) == (share > 0)  # the head: through the trunk, unless nothing came back
    assert member.pipeline is not None
    assert member.pipeline.attacks[0].report()["hidden_rows"] > 0


def test_attack_success_rate_rises_with_the_backdoor(make_config: MakeConfig) -> None:
    # the tiny random model learns the task only with every weight trained
    full = ("lora.head.method=full", "lora.trunk.method=full", "lora.tail.method=full")
    one = ("framework.num_clients=1", "framework.name=sl", "train.steps=120", "train.lr=0.01")
    one += ("data.format=instruction",)
    settings = {"clients": [0], "trigger": " cf", "target": "rotten", "fraction": 0.25}
    honest = build_federation(make_config("honest", *one, *full))
    attack = f"privacy.client_attack={{backdoor: {settings}}}"
    backdoored = build_federation(make_config("backdoor", *one, *full, attack))
    for fed in (honest, backdoored):
        drive(fed, Path(fed.config.output_dir), False, 0.0)
    assert attack_success_rate(backdoored.members[0], backdoored, settings) >= 0.9
    assert attack_success_rate(honest.members[0], honest, settings) <= 0.25  # of the rows it gets right
    measured = backdoor_success(honest.members[0], honest, settings)
    choices = honest.data.choices
    assert measured["clean_accuracy"] == honest.members[0].accuracy(honest)
    assert 0 < measured["rows"] < len(choices)  # the rows of the other class
    assert 0 < measured["clean_correct"] <= measured["rows"]
    # the right rows the trigger turned are among all the rows it turned
    flipped = backdoor_success(backdoored.members[0], backdoored, settings)
    assert flipped["asr_all"] * flipped["rows"] >= flipped["asr"] * flipped["clean_correct"] - 1e-9


def test_backdoor_refusals(make_config: MakeConfig) -> None:
    with pytest.raises(SplitLMError, match=r"backdoor\.target='stale': not one of the data's classes") as caught:
        federation(make_config, "bad", "privacy.client_attack={backdoor: {clients: [1], target: stale}}")
    assert "\n" not in str(caught.value)
    hidden = "privacy.client_attack={backdoor: {clients: [1], target: rotten, server_share: 0.5}}"
    with pytest.raises(SplitLMError, match=r"server_share=0\.5 needs split\.mode=ushape"):
        federation(make_config, "vanilla", "split.mode=vanilla", hidden)
    with pytest.raises(SplitLMError, match=r"backdoor\.target: name the response"):
        run_framework(make_config("bad", *TWO, "privacy.client_attack={backdoor: {clients: [1]}}"))
    fed = build_federation(make_config("lm", "privacy.client_attack={backdoor: {target: ' yes'}}"))
    with pytest.raises(PrivacyError, match="needs classification-style held-out data"):
        attack_success_rate(fed.members[0], fed, {"target": "rotten"})


# --- boosting --------------------------------------------------------------------------------------------------


def test_boost_scales_the_malicious_clients_change_over_its_round(make_config: MakeConfig) -> None:
    one = ("framework.name=sl", "framework.num_clients=1", "train.steps=2")
    honest = build_federation(make_config("honest", *one))
    boosted = build_federation(make_config("boosted", *one, "privacy.client_attack={boost: {factor: 3}}"))
    start = honest.members[0].client.state()
    assert all(torch.equal(v, boosted.members[0].client.state()[k]) for k, v in start.items())
    for fed in (honest, boosted):
        fed.members[0].train_round(fed, 0)
    end, scaled = honest.members[0].client.state(), boosted.members[0].client.state()
    changed = [k for k in start if not torch.equal(end[k], start[k])]
    assert changed
    for key in start:
        assert torch.allclose(scaled[key], start[key] + 3 * (end[key] - start[key]), atol=1e-6), key
    assert boosted.members[0].pipeline is not None
    assert boosted.members[0].pipeline.attacks[0].report()["boosted_rounds"] == 1


# --- networked: a malicious `splitlm client` process --------------------------------------------------------


def test_a_networked_client_runs_its_attack_as_in_process(fast_config: MakeConfig, tmp_path: Path) -> None:
    settings = ("data.format=instruction", "train.steps=3", "privacy.client_attack={backdoor: {target: rotten}}")
    reference = fast_config(tmp_path / "inprocess", *settings)
    run_framework(reference)
    client = fast_config(tmp_path / "client", *settings)
    serve_one_client_in_threads(fast_config(tmp_path / "server", *settings), client, tmp_path)

    def losses(folder: Path) -> list[float]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [row["loss"] for row in rows if "loss" in row]

    assert losses(tmp_path / "server") == losses(tmp_path / "inprocess") and len(losses(tmp_path / "server")) == 3
    honest = fast_config(tmp_path / "honest", "data.format=instruction", "train.steps=3")
    run_framework(honest)
    assert losses(tmp_path / "honest") != losses(tmp_path / "inprocess")  # the client did train on poisoned rows
    own = json.loads((tmp_path / "client" / "summary.json").read_text())
    report = own["privacy"]["client_attacks"]["backdoor"]
    expected = json.loads((tmp_path / "inprocess" / "summary.json").read_text())["privacy"]["client_attacks"]
    assert report == expected["backdoor"] and report["poisoned"] > 0
