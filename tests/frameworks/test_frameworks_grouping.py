"""Client grouping (label_kmeans, balanced, first_label) and selection (random, pairing) on hand-made label
histograms, the config errors for unknown names, and a tiny gsfl run with each grouping."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from splitlm.config import build_config
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, run_framework
from splitlm.frameworks.grouping import GROUPINGS, SELECTIONS, total_kl

COMMON = ("framework.name=gsfl", "framework.num_clients=4", "framework.rounds=2", "train.steps=4")


def test_label_kmeans_groups_clients_of_similar_label_mix() -> None:
    two = [{"a": 9, "b": 1}, {"a": 1, "b": 9}, {"a": 90, "b": 10}, {"a": 2, "b": 18}]  # cosine: scale does not count
    assert GROUPINGS["label_kmeans"](two, 2, 0) == [[0, 2], [1, 3]]
    three = [{"a": 10}, {"b": 10}, {"c": 10}, {"a": 8, "b": 1}, {"b": 7, "c": 1}, {"c": 9, "a": 1}]
    for seed in range(4):  # any first center: the same clusters
        assert GROUPINGS["label_kmeans"](three, 3, seed) == [[0, 3], [1, 4], [2, 5]]


def test_label_kmeans_never_leaves_a_group_empty() -> None:
    same = [{"a": 5, "b": 5}] * 5
    groups = GROUPINGS["label_kmeans"](same, 3, 0)
    assert len(groups) == 3 and all(groups) and sorted(i for g in groups for i in g) == list(range(5))
    assert GROUPINGS["label_kmeans"](same[:2], 4, 0) == [[0], [1]]  # k = min(num_groups, clients)


def skewed(clients: int = 12) -> list[dict[str, int]]:
    rng = random.Random(1)
    return [{"a": rng.randint(0, 50), "b": rng.randint(0, 5), "c": rng.randint(0, 20) * (i % 3 == 0)}
            for i in range(clients)]  # fmt: skip


def test_balanced_groups_are_closer_to_the_global_mix_than_random_ones() -> None:
    histograms = skewed()
    groups = GROUPINGS["balanced"](histograms, 3, 0)
    assert sorted(i for g in groups for i in g) == list(range(12))
    order = list(range(12))
    random.Random(0).shuffle(order)
    seeded = [sorted(order[g::3]) for g in range(3)]
    assert total_kl(histograms, groups) < total_kl(histograms, seeded) / 2


def test_balanced_pairs_opposite_clients_and_keeps_group_sizes_even() -> None:
    opposite = [{"a": 10}, {"a": 10}, {"b": 10}, {"b": 10}]
    groups = GROUPINGS["balanced"](opposite, 2, 0)
    assert [sorted(label for i in g for label in opposite[i]) for g in groups] == [["a", "b"], ["a", "b"]]
    assert total_kl(opposite, groups) == pytest.approx(0.0)  # each group half a, half b: the global mix
    for clients, count in ((7, 3), (12, 5), (5, 2), (3, 4)):
        sizes = [len(g) for g in GROUPINGS["balanced"](skewed(clients), count, 0)]
        assert len(sizes) == min(count, clients) and max(sizes) - min(sizes) <= 1 and sum(sizes) == clients


def test_first_label_sorts_by_the_share_of_the_first_label() -> None:
    histograms = [{"a": 9, "b": 1}, {"a": 1, "b": 9}, {"a": 5, "b": 5}, {"a": 2, "b": 8}]
    assert GROUPINGS["first_label"](histograms, 2, 0) == [[1, 3], [0, 2]]


def test_pairing_picks_the_most_diverse_set_first() -> None:
    histograms = [{"a": 10}, {"a": 10}, {"b": 10}, {"c": 10}, {"a": 5}]
    assert SELECTIONS["pairing"](histograms, 3, 0, 0) == [0, 2, 3]  # a, b and c: the highest entropy
    assert SELECTIONS["pairing"](histograms, 3, 0, 0) == SELECTIONS["pairing"](list(histograms), 3, 0, 0)


def test_pairing_honours_the_fairness_bound() -> None:
    """Clients 0 and 1 together are the most diverse pair; the others still wait at most ceil(6 / 2) = 3 rounds."""
    histograms = [{"a": 5, "b": 5}, {"c": 5, "d": 5}, {"a": 10}, {"a": 10}, {"b": 3}, {"a": 1}]
    wait = math.ceil(len(histograms) / 2)
    rounds = [SELECTIONS["pairing"](histograms, 2, r, 0) for r in range(24)]
    assert rounds[0] == [0, 1]
    assert all(len(chosen) == 2 for chosen in rounds)
    for client in range(len(histograms)):
        taken = [-1] + [r for r, chosen in enumerate(rounds) if client in chosen] + [len(rounds)]
        assert max(b - a - 1 for a, b in itertools.pairwise(taken)) <= wait, (client, rounds)
    assert sum(0 in chosen for chosen in rounds) > sum(5 in chosen for chosen in rounds)  # diversity still counts


def test_random_selection_is_a_seeded_sample() -> None:
    histograms = [{"a": 1}] * 6
    picked = SELECTIONS["random"](histograms, 3, 2, 5)
    assert picked == sorted(random.Random(5 * 7919 + 2).sample(range(6), 3))
    assert picked == SELECTIONS["random"](histograms, 3, 2, 5)


@pytest.mark.parametrize(("key", "name"), [("framework.grouping", "kmeans"), ("framework.selection", "pair")])
def test_an_unknown_grouping_or_selection_is_a_config_error(key: str, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({}, [f"{key}={name}"], checks=[config_problems])
    registry = GROUPINGS if key == "framework.grouping" else SELECTIONS
    assert key in str(caught.value) and str(registry.names()) in str(caught.value)


@pytest.mark.parametrize(
    ("grouping", "extra"),
    [
        ("label_kmeans", ()),
        ("balanced", ("framework.selection=pairing", "framework.clients_per_round=3")),
        ("first_label", ()),
    ],
)
def test_gsfl_runs_with_each_grouping(make_config, grouping: str, extra: tuple[str, ...]) -> None:
    config = make_config(grouping, *COMMON, "data.partition=dirichlet", f"framework.grouping={grouping}", *extra)
    summary = run_framework(config)
    groups = summary["groups"]
    assert len(groups) == 2 and sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    if grouping == "balanced":
        assert [len(g) for g in groups] == [2, 2]
        rounds = [json.loads(line) for line in (Path(config.output_dir) / "rounds.jsonl").read_text().splitlines()]
        assert [len(r["participants"]) for r in rounds] == [3, 3]
    assert math.isfinite(summary["eval_loss_after"])
