"""Robust aggregation (``frameworks/aggregation/robust.py``): median, trimmed_mean and krum on hand-made states
(Prepare / Execute / Assert, values worked out by hand), a split-federated run with a malicious client that ends
closer to its honest run than FedAvg's does, and the strategies' one-line refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitlm.config import Config
from splitlm.errors import SplitLMError
from splitlm.frameworks import run_framework
from splitlm.frameworks.aggregate import AggregationError, fedavg
from splitlm.frameworks.aggregation import STRATEGIES, Strategy, strategy_of
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import build_federation

MakeConfig = Callable[..., Config]


def strategy(name: str, **settings: float) -> Strategy:
    (built,) = STRATEGIES.build({name: settings})
    return built


def states(*values: list[float]) -> list[dict[str, torch.Tensor]]:
    """One state per value list: ``w`` holds the values, ``b`` their negation (two tensors, two coordinates)."""
    return [{"w": torch.tensor(v), "b": -torch.tensor(v)} for v in values]


# four honest states near (1, 2) and one far off
HONEST = [[1.0, 2.0], [1.2, 1.8], [0.8, 2.4], [1.1, 2.1]]
OUTLIER = [100.0, -50.0]


def test_median_is_the_coordinate_wise_middle_value() -> None:
    out = strategy("median").average(states(*HONEST, OUTLIER), [1.0] * 5)
    assert torch.allclose(out["w"], torch.tensor([1.1, 2.0]))  # sorted: (0.8 1 1.1 1.2 100), (-50 1.8 2 2.1 2.4)
    assert torch.allclose(out["b"], -torch.tensor([1.1, 2.0]))
    even = strategy("median").average(states(*HONEST), [1.0] * 4)
    assert torch.allclose(even["w"], torch.tensor([1.05, 2.05]))  # the mean of the two middle values


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    out = strategy("trimmed_mean", beta=0.2).average(states(*HONEST, OUTLIER), [1.0, 1.0, 1.0, 1.0, 50.0])
    assert torch.allclose(out["w"], torch.tensor([(1.0 + 1.1 + 1.2) / 3, (1.8 + 2.0 + 2.1) / 3]))


def test_krum_keeps_the_state_nearest_the_others_and_multi_krum_their_mean() -> None:
    given = states(*HONEST, OUTLIER)
    krum = strategy("krum", f=1)
    out = krum.average(given, [1.0] * 5)
    # squared distances (over w; b doubles them) to the n - f - 2 = 2 nearest others: state 0 scores 0.02 + 0.08,
    # state 3 0.02 + 0.10, state 1 0.08 + 0.10, state 2 0.18 + 0.20, the outlier thousands
    assert krum.summary()["selected"] == [0]
    assert torch.equal(out["w"], given[0]["w"])
    multi = strategy("krum", f=1, m=3)
    out = multi.average(given, [1.0, 1.0, 2.0, 1.0, 1.0])
    assert multi.summary()["selected"] == [0, 1, 3]
    assert torch.allclose(out["w"], torch.tensor([(1.0 + 1.2 + 1.1) / 3, (2.0 + 1.8 + 2.1) / 3]))


def test_krum_keeps_the_same_clients_for_every_part_of_a_round() -> None:
    # client 4 is an outlier in its client side only, client 0 in its trunk adapter only: Krum on each part alone
    # would keep client 0's client side (state 0 above) with another client's trunk adapter
    sides = states(*HONEST, OUTLIER)
    trunks = states([50.0, 50.0], *HONEST[1:], HONEST[0])
    krum = strategy("krum", f=1)
    side, trunk = krum.average_parts([sides, trunks], [1.0] * 5)
    (kept,) = krum.summary()["selected"]
    assert kept in (1, 2, 3)  # an honest client in both parts (each part alone: side 0, trunk 4)
    assert torch.equal(side["w"], sides[kept]["w"]) and torch.equal(trunk["w"], trunks[kept]["w"])
    assert [krum.average(part, [1.0] * 5)["w"].tolist() for part in (sides, trunks)] == [HONEST[0], HONEST[0]]
    # the strategies that combine coordinate by coordinate treat each part on its own
    median = strategy("median")
    assert [
        torch.equal(a["w"], median.average(p, [1.0] * 5)["w"])
        for a, p in zip(median.average_parts([sides, trunks], [1.0] * 5), (sides, trunks), strict=True)
    ] == [True, True]
    with pytest.raises(AggregationError, match=r"parts of \[5, 4\] states"):
        krum.average_parts([sides, trunks[:4]], [1.0] * 5)


def test_every_robust_strategy_ignores_the_outlier_that_fedavg_follows() -> None:
    given = states(*HONEST, OUTLIER)
    honest_mean = fedavg(states(*HONEST), [1.0] * 4)["w"]
    assert (fedavg(given, [1.0] * 5)["w"] - honest_mean).abs().max() > 10
    for name, settings in (("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}), ("krum", {"m": 2})):
        out = strategy(name, **settings).average(given, [1.0] * 5)
        assert (out["w"] - honest_mean).abs().max() < 0.3, name


def test_a_robust_average_keeps_each_tensors_dtype() -> None:
    given = [{"w": torch.tensor(v, dtype=torch.bfloat16)} for v in (*HONEST, OUTLIER)]
    for name in ("median", "trimmed_mean", "krum"):
        assert strategy(name).average(given, [1.0] * 5)["w"].dtype == torch.bfloat16


def test_krum_refuses_too_few_states_at_aggregation() -> None:
    with pytest.raises(AggregationError, match=r"krum\.f=1: Krum needs at least 2f \+ 3 = 5 states per round, got 4"):
        strategy("krum", f=1).average(states(*HONEST), [1.0] * 4)


# --- a run with a malicious client ---------------------------------------------------------------------------

RUN = (
    "data.format=instruction",
    "framework.name=sflv1",
    "framework.num_clients=5",
    "framework.rounds=1",
    "train.steps=3",
    "train.lr=0.01",
    "train.eval_before=false",
)
# client 4 trains on flipped labels and hands in 10 x its change: an outlier among the five client sides
ATTACK = "privacy.client_attack={label_flip: {clients: [4]}, boost: {clients: [4], factor: 10}}"


def final_state(config: Config) -> torch.Tensor:
    """The global model a run ends with (client side and trunk adapter), flattened."""
    fed = build_federation(config)
    drive(fed, Path(config.output_dir), False, 0.0)
    member = fed.members[0]
    trunk = fed.server.adapter_state(fed.server.adapter_of(member.client_id))
    tensors = {**member.client.state(), **{f"trunk.{k}": v for k, v in trunk.items()}}
    return torch.cat([tensors[k].detach().float().flatten() for k in sorted(tensors)])


def test_a_boosted_malicious_client_side_is_an_outlier_the_robust_averages_ignore(make_config: MakeConfig) -> None:
    """One round of five clients trained with and without the malicious one (sflv1: each its own trunk adapter, so
    the honest four train exactly alike), then each strategy's average of the five client sides."""
    trained = {}
    for name, extra in (("honest", ()), ("attacked", (ATTACK,))):
        fed = build_federation(make_config(name, *RUN, *extra))
        fed.server.start()
        try:
            finished = fed.train_clients(fed.members, 0, parallel=True)
        finally:
            fed.server.stop()
        trained[name] = [m.client.state() for m in finished]
    honest, attacked = trained["honest"], trained["attacked"]
    for a, b in zip(honest[:4], attacked[:4], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # the honest clients are untouched by the attack

    def moved(name: str, **settings: float) -> float:
        base, hit = (strategy(name, **settings).average(s, [1.0] * 5) for s in (honest, attacked))
        flat = [torch.cat([t[k].float().flatten() for k in sorted(t)]) for t in (base, hit)]
        return float((flat[1] - flat[0]).norm() / flat[0].norm())

    mean = moved("sync")
    assert moved("median") < 0.5 * mean
    assert moved("trimmed_mean", beta=0.2) < 0.5 * mean
    assert moved("krum", f=1) < 1e-6 < mean


def test_an_sflv2_round_is_its_serving_order_then_the_strategys_average_of_the_client_sides(
    make_config: MakeConfig,
) -> None:
    """What ``benchmarks/security_integrity.py`` computes for sflv2: the round's clients trained one after another in
    ``serving_order`` on the shared trunk adapter, then a strategy's average of their client sides, equals the run."""
    from splitlm.frameworks.sflv2 import serving_order

    run = (*RUN[:1], "framework.name=sflv2", *RUN[2:], "framework.aggregation={krum: {f: 1, m: 4}}", ATTACK)
    fed = build_federation(make_config("by-hand", *run))
    fed.server.start()
    try:
        fed.train_clients(serving_order(fed.config, 0, fed.members), 0, parallel=False)
    finally:
        fed.server.stop()
    (side,) = strategy("krum", f=1, m=4).average_parts([[m.client.state() for m in fed.members]], [1.0] * 5)
    trunk = fed.server.adapter_state(fed.server.adapter_of(fed.members[0].client_id))
    tensors = {**side, **{f"trunk.{k}": v for k, v in trunk.items()}}
    by_hand = torch.cat([tensors[k].detach().float().flatten() for k in sorted(tensors)])
    assert torch.allclose(by_hand, final_state(make_config("run", *run)), atol=1e-6)


@pytest.mark.slow  # six runs of five clients: about 30 s on a busy CPU
def test_robust_strategies_keep_a_malicious_client_from_moving_the_global_model(make_config: MakeConfig) -> None:
    moved = {}
    for name in ("sync", "median", "krum"):
        aggregation = f"framework.aggregation={name}"
        honest = final_state(make_config(f"{name}-honest", *RUN, aggregation))
        attacked = final_state(make_config(f"{name}-attacked", *RUN, aggregation, ATTACK))
        moved[name] = float((attacked - honest).norm() / honest.norm())
    assert moved["median"] < 0.5 * moved["sync"], moved
    # Krum keeps one honest client's state, trained exactly as in the honest run (each has its own trunk adapter)
    assert moved["krum"] < 1e-6 < moved["sync"], moved


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("framework.name=sl", "framework.aggregation=median"), r"framework\.name=sl averages none"),
        (("framework.name=sflv1", "framework.num_clients=4", "framework.aggregation={krum: {f: 1}}"),
         r"krum\.f=1: Krum needs at least 2f \+ 3 = 5 states per round, got 4"),
        (("framework.name=sflv1", "framework.num_clients=5", "framework.aggregation={krum: {m: 5}}"),
         r"krum\.m=5: keeps at most n - f = 4 of 5"),
        (("framework.name=sflv1", "framework.num_clients=4", "framework.aggregation={trimmed_mean: {beta: 0.2}}"),
         r"trimmed_mean\.beta=0\.2: drops floor\(beta x 4\) = 0 of the 4 values"),
        (("framework.name=sflv1", "framework.aggregation={trimmed_mean: {beta: 0.5}}"), r"trimmed_mean\.beta"),
        (("framework.name=sflv1", "framework.num_clients=2",
          "framework.clients=[{split: {head_layers: 2}}, {}]", "framework.aggregation=median"),
         "different cuts or LoRA ranks"),
        (("framework.name=sflv1", "framework.aggregation=medain"), "did you mean 'median'"),
    ],
)  # fmt: skip
def test_robust_strategy_refusals(make_config: MakeConfig, overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(SplitLMError, match=message) as caught:
        run_framework(make_config("bad", *overrides))
    assert "\n" not in str(caught.value)


def test_the_robust_strategies_are_registered_by_name(make_config: MakeConfig) -> None:
    assert {"median", "trimmed_mean", "krum"} <= set(STRATEGIES.names())
    config = make_config("run", "framework.name=sflv1", "framework.aggregation={krum: {f: 0, m: 2}}")
    assert strategy_of(config).summary() == {"mode": "krum", "selected": []}
