"""Every non-IID remedy (survey §3) refuses the frameworks it does not apply to, in one line that says what was wrong
and what to do, before anything is built: the checks ``splitlm train`` makes (the schema's, the registries' names,
then ``Framework.check``). Each (remedy, framework) pair is walked; the pairs a remedy applies to pass."""

from __future__ import annotations

import re

import pytest

from splitlm.config import build_config
from splitlm.config.load import is_typo
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, framework_of
from splitlm.frameworks.base import COMPONENT_KEYS, component_registry

FRAMEWORKS = ("centralized", "sl", "psl", "sflv1", "sflv2", "gsfl")
BASE = ("framework.num_clients=4", "framework.rounds=2", "train.steps=4")


def problems(framework: str, *overrides: str) -> str:
    """The error ``splitlm train`` gives for the defaults with ``overrides``, checked as it checks a run before
    building anything ("" when it has none)."""
    try:
        config = build_config({}, [f"framework.name={framework}", *BASE, *overrides], checks=[config_problems])
        framework_of(config).check(config)
    except ConfigError as error:
        return str(error)
    return ""


GROUPINGS = ("balanced", "feature_hash", "first_label")  # and the default, label_kmeans: see below
GROUP_KEYS = [f"framework.grouping={name}" for name in GROUPINGS] + ["framework.groups=[[0, 1], [2, 3]]"]

# (the remedy's overrides, the frameworks it applies to, what the refusal says)
REMEDIES: list[tuple[tuple[str, ...], set[str], str]] = [
    *(
        (
            (key,),
            {"gsfl"},
            f"{key.partition('=')[0]}: groups the clients that share a trunk adapter; framework.name="
            f"{{name}} keeps none per group: set framework.name=gsfl or unset {key.partition('=')[0]}",
        )
        for key in GROUP_KEYS
    ),
    (
        ("server.policy=dissimilar_first",),
        {"psl", "sflv1", "gsfl"},
        "server.policy=dissimilar_first: ",
    ),
    (
        ("framework.merge=2",),
        {"sflv2", "psl"},
        "framework.merge=2: concatenates several clients' smashed data into one batch of one shared trunk adapter; "
        "framework.name={name} ",
    ),
    (
        ("remedies.logit_adjustment.tau=1.0",),
        {"sl", "psl", "sflv1", "sflv2", "gsfl"},
        "remedies.logit_adjustment: adjusts a split client's loss; framework.name={name} has no client side, so "
        "remove it from remedies",
    ),
    (
        ("remedies=[multi_exit]",),
        {"sl", "psl", "sflv1", "sflv2", "gsfl"},
        "remedies.multi_exit: a split client's early exit on its head's output; framework.name={name} "
        "has no client side, so remove it from remedies",
    ),
    (
        ("remedies.align_kl.weight=0.1",),
        {"sl", "psl", "sflv1", "sflv2", "gsfl"},
        "remedies.align_kl: aligns a split client's head output with the server's statistics at the cut; "
        "framework.name={name} has no cut, so remove it from remedies",
    ),
    (
        ("framework.server_lr_scale=mu_splitfed",),
        {"sflv2", "gsfl"},
        "framework.server_lr_scale=mu_splitfed: ",
    ),
    (
        ("framework.aggregation.sync.lr=2",),
        {"sflv1", "sflv2", "gsfl"},
        "framework.aggregation.sync.lr: steps the FedAvg of the clients' client sides; framework.name={name} ",
    ),
    (
        ("remedies.ema.decay=0.5",),
        {"sl"},
        "remedies.ema averages the client side passed from one client to the next; framework.name={name} passes "
        "none: set framework.name=sl or remove it from remedies",
    ),
]
PAIRS = [(overrides, name, name in applies, said) for overrides, applies, said in REMEDIES for name in FRAMEWORKS]
# What the shorter refusals above go on to say, framework by framework (what to do instead).
ADVICE = {
    ("server.policy=dissimilar_first", "centralized"): "has no server, so set server.policy=fifo",
    ("server.policy=dissimilar_first", "sl"): "trains one client at a time: use psl, sflv1 or gsfl, or set "
    "server.policy=fifo",
    (
        "server.policy=dissimilar_first",
        "sflv2",
    ): "serves one client at a time: set framework.merge>1, use psl, sflv1 or gsfl, or set server.policy=fifo",
    ("framework.merge=2", "centralized"): "has no server: use sflv2 or psl, or set framework.merge=1",
    ("framework.merge=2", "sl"): "trains one client at a time: use sflv2 or psl, or set framework.merge=1",
    ("framework.merge=2", "sflv1"): "keeps one trunk adapter per client: use sflv2 or psl, or set framework.merge=1",
    ("framework.merge=2", "gsfl"): "keeps one trunk adapter per group: use sflv2 or psl, or set framework.merge=1",
    ("framework.server_lr_scale=mu_splitfed", "centralized"): "has no server, so set framework.server_lr_scale=none",
    ("framework.server_lr_scale=mu_splitfed", "sl"): "passes one client side on instead of averaging them: use sflv2 "
    "or gsfl",
    ("framework.server_lr_scale=mu_splitfed", "psl"): "averages no client sides: use sflv2 or gsfl",
    ("framework.server_lr_scale=mu_splitfed", "sflv1"): "gives each client its own trunk adapter: use sflv2 or gsfl",
    ("framework.aggregation.sync.lr=2", "centralized"): "trains one unsplit model, so unset "
    "framework.aggregation.sync.lr",
    ("framework.aggregation.sync.lr=2", "sl"): "passes one client side on instead: use sflv1, sflv2 or gsfl, or unset "
    "framework.aggregation.sync.lr",
    ("framework.aggregation.sync.lr=2", "psl"): "lets each client keep its own: use sflv1, sflv2 or gsfl, or unset "
    "framework.aggregation.sync.lr",
}


@pytest.mark.parametrize(
    ("overrides", "name", "applies", "said"),
    PAIRS,
    ids=[f"{overrides[0]}-{name}" for overrides, name, _, _ in PAIRS],
)
def test_a_remedy_is_refused_where_it_does_not_apply(
    overrides: tuple[str, ...], name: str, applies: bool, said: str
) -> None:
    found = problems(name, *overrides)
    if applies:
        assert found == ""
        return
    assert found and "\n" not in found
    assert said.format(name=name) in found, found
    advice = ADVICE.get((overrides[0], name))
    if advice is not None:
        assert advice in found, found


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_the_default_grouping_and_selection_are_refused_nowhere(name: str) -> None:
    """A resolved config (a run's config.yaml, `splitlm config`) spells the defaults out: it loads again."""
    assert problems(name) == ""
    assert problems(name, "framework.clients_per_round=2") == ""
    assert problems(name, "framework.grouping=label_kmeans", "framework.selection=random", "server.policy=fifo") == ""


@pytest.mark.parametrize("per_round", [0, 4])
@pytest.mark.parametrize("name", FRAMEWORKS)
def test_pairing_needs_fewer_clients_per_round_than_clients(name: str, per_round: int) -> None:
    found = problems(name, "framework.selection=pairing", f"framework.clients_per_round={per_round}")
    assert "\n" not in found
    assert (
        "framework.selection: pairing picks framework.clients_per_round of the clients each round; set "
        f"framework.clients_per_round between 1 and framework.num_clients - 1 (got {per_round} of 4)"
    ) in found
    assert problems(name, "framework.selection=pairing", "framework.clients_per_round=2") == ""


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_replay_needs_earlier_rounds(name: str) -> None:
    found = problems(name, "remedies.replay.fraction=0.5", "framework.rounds=1")
    assert "\n" not in found
    assert (
        "remedies.replay: draws from the samples a client kept from its earlier rounds, and framework.rounds=1 has "
        "none; set framework.rounds > 1 or remove it from remedies"
    ) in found
    assert problems(name, "remedies.replay.fraction=0.5") == ""


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (("remedies.logit_adjustment.tau=1.0",), "remedies.logit_adjustment: the client's loss is adjusted, so it "
         "needs split.mode=ushape"),
        (("remedies=[multi_exit]",), "remedies.multi_exit: the early exit is the client's tail applied to its "
         "head's output, so it needs split.mode=ushape"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", ["sl", "sflv2"])
def test_ushape_remedies_refuse_a_vanilla_split(name: str, overrides: tuple[str, ...], said: str) -> None:
    found = problems(name, "split.mode=vanilla", *overrides)
    assert "\n" not in found and said in found, found


def test_sflv2_takes_dissimilar_first_with_merged_clients() -> None:
    assert problems("sflv2", "server.policy=dissimilar_first", "framework.merge=2") == ""


@pytest.mark.parametrize("name", ["sl", "psl", "sflv1", "sflv2", "gsfl"])
def test_feature_hash_under_ray_is_refused_by_gsfl_only_once(name: str) -> None:
    found = problems(name, "framework.grouping=feature_hash", "transport.name=ray")
    assert "\n" not in found and "framework.grouping" in found
    if name == "gsfl":
        assert "the clients' smashed-data sketches are computed in-process; with transport.name=ray set " in found


def test_aggregation_lr_refuses_the_asynchronous_modes_and_mixed_clients() -> None:
    found = problems("sflv1", "framework.aggregation.async.lr=2")
    assert found == "invalid config: framework.aggregation.async.lr: unknown key", found  # a setting of sync only
    ranks = "framework.clients=[{lora: {rank: 4}}, {lora: {rank: 8}}, {}, {}]"
    for name, extra in (
        ("sflv1", ("framework.aggregation.sync.lr=2",)),
        ("sflv2", ("framework.server_lr_scale=mu_splitfed",)),
    ):
        found = problems(name, ranks, *extra)
        assert "\n" not in found and "framework.clients gives the clients different cuts or LoRA ranks; set " in found
        plain = [e for e in extra if not e.startswith("framework.aggregation")]
        assert problems(name, ranks, *plain, "framework.aggregation.sync.lr=1") == ""  # plain FedAvg: module by module


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_a_resolved_config_passes_its_checks_again(name: str) -> None:
    """``config.yaml`` of a run (every default spelled out) is a valid config for the same framework."""
    config = build_config({}, [f"framework.name={name}", *BASE])
    again = build_config(config.model_dump(mode="json"), checks=[config_problems])
    framework_of(again).check(again)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.logit_adjustment=1", "train.logit_adjustment: moved; write remedies.logit_adjustment.tau"),
        ("framework.personalize=multi_exit", "framework.personalize: moved; write remedies: [multi_exit]"),
        ("train.client_update_every=2", "train.client_update_every: moved; write remedies.intermittent.every"),
        ("privacy.splitguard.enabled=true", "privacy.splitguard: moved; write privacy.detectors.splitguard"),
        ("privacy.dxp.epsilon=3", "privacy.dxp: moved; write privacy.defenses.dxp"),
        ("privacy.fsha.lr=0.1", "privacy.fsha: moved; write privacy.server_attack.fsha"),
        ("framework.aggregation_lr=2", "framework.aggregation_lr: moved; write framework.aggregation.sync.lr"),
        ("framework.async_mix=0.3", "framework.async_mix: moved; write framework.aggregation.async.mix"),
    ],
)
def test_a_key_that_became_a_components_setting_says_where_it_went(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config({}, [override], checks=[config_problems])
    assert str(error.value) == f"invalid config: {message}"  # instead of a bare "unknown key"


def test_every_former_key_is_told_where_it_went_by_the_clis_quick_check_too() -> None:
    """The CLI reports typos without asking the registries (``quick``): no key a component took over may pass for
    a typo of a key of its section, or it would be answered with "did you mean" instead of where it went."""
    former = [
        old for key in COMPONENT_KEYS for name in component_registry(key).names()
        for old, _ in component_registry(key).get(name).former_keys
    ]  # fmt: skip
    assert len(former) >= 20
    for old in former:
        assert not is_typo(tuple(old.split("."))), old
        with pytest.raises(ConfigError, match=rf"{re.escape(old)}: moved; write "):
            build_config({}, [f"{old}=1"], checks=[config_problems], quick=True)
