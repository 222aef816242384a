"""Client grouping (label_kmeans, balanced, first_label) and selection (random, pairing) on hand-made label
histograms, feature_hash on hand-made smashed-data summaries, the config errors for unknown names, and a tiny gsfl
run with each grouping (feature_hash: clients of two kinds of text grouped by kind)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from splitlm.config import build_config
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, framework_of, run_framework
from splitlm.frameworks.grouping import GROUPINGS, SELECTIONS, total_kl
from splitlm.frameworks.sketch import SKETCH_DIMS, sketch

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


# --- feature_hash --------------------------------------------------------------------------------------------------


def _two_kinds(width: int, offset: float = 50.0) -> list[torch.Tensor]:
    """Smashed-data means of 6 clients: a large offset every client shares, plus one of two directions (clients
    0, 2, 3 and 1, 4, 5) and a little noise of their own."""
    generator = torch.Generator().manual_seed(0)
    shared = offset * torch.randn(width, generator=generator, dtype=torch.float64)
    kinds = torch.randn(2, width, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(6, width, generator=generator, dtype=torch.float64)
    return [shared + kinds[kind] + noise[i] for i, kind in enumerate([0, 1, 0, 0, 1, 1])]


def test_feature_hash_groups_clients_by_what_differs_past_the_shared_offset() -> None:
    means = _two_kinds(8)
    vectors = [m.tolist() for m in means]
    raw = [torch.nn.functional.normalize(m, dim=0) for m in means]
    assert min(float(a @ b) for a in raw for b in raw) > 0.99  # uncentered, every pair looks alike
    for seed in range(3):
        assert GROUPINGS["feature_hash"](vectors, 2, seed) == [[0, 2, 3], [1, 4, 5]]
    kind = {0: 0, 1: 1, 2: 0, 3: 0, 4: 1, 5: 1}
    three = GROUPINGS["feature_hash"](vectors, 3, 0)
    assert len(three) == 3 and all(len({kind[i] for i in group}) == 1 for group in three)  # no group mixes kinds
    assert GROUPINGS["feature_hash"].needs == "sketches" and GROUPINGS["label_kmeans"].needs == "histograms"


def test_feature_hash_groups_the_same_through_the_hash() -> None:
    """The clients' sketches (seeded projection of a 64-wide mean to SKETCH_DIMS int16 levels) group as the means do."""
    sketches = [sketch(m, seed=3) for m in _two_kinds(64)]
    assert all(len(s) == SKETCH_DIMS for s in sketches)
    assert sketch(_two_kinds(64)[0], seed=3) == sketches[0]  # the same seed, the same hash on every client
    assert GROUPINGS["feature_hash"](sketches, 2, 0) == [[0, 2, 3], [1, 4, 5]]


def test_a_gsfl_run_with_feature_hash_groups_clients_of_the_same_text(make_config, tmp_path: Path) -> None:
    """Clients 0 and 2 hold English words, clients 1 and 3 sums of numbers (one file each, by_source)."""
    vocabulary = ["the", "a", "movie", "film", "story", "actor", "plot", "scene", "great", "bad", "fun", "boring"]
    sources = []
    for client in range(4):
        rng = random.Random(client)
        if client % 2 == 0:
            lines = [" ".join(rng.choice(vocabulary) for _ in range(12)) for _ in range(40)]
        else:
            lines = [" ".join(f"{rng.randint(0, 999)}+{rng.randint(0, 999)}" for _ in range(5)) for _ in range(40)]
        path = tmp_path / f"{client}-{'words' if client % 2 == 0 else 'sums'}.txt"
        path.write_text("\n".join(lines) + "\n")
        sources.append(str(path))
    config = make_config(
        "hashed", *COMMON, "framework.grouping=feature_hash", "data.partition=by_source",
        f"data.sources=[{', '.join(sources)}]", "data.eval_size=8",
    )  # fmt: skip
    summary = run_framework(config)
    assert summary["groups"] == [[0, 2], [1, 3]]
    assert math.isfinite(summary["eval_loss_after"])


def test_feature_hash_is_refused_where_the_sketches_are_not_computed_in_this_process(make_config) -> None:
    config = make_config("ray", *COMMON, "framework.grouping=feature_hash", "transport.name=ray")
    with pytest.raises(ConfigError) as caught:
        framework_of(config).check(config)
    assert "\n" not in str(caught.value)
    assert "framework.grouping=feature_hash" in str(caught.value) and "framework.groups" in str(caught.value)
    explicit = make_config("ray", *COMMON, "transport.name=ray", "framework.groups=[[0, 1], [2, 3]]")
    framework_of(explicit).check(explicit)  # explicit groups: no sketches needed


def test_splitlm_serve_refuses_feature_hash(make_config) -> None:
    from splitlm.frameworks.federation import check_placement

    with pytest.raises(
        ConfigError, match=r"framework\.grouping=feature_hash: .*for `splitlm serve` set framework\.groups"
    ):
        check_placement(make_config("served", *COMMON, "framework.grouping=feature_hash"), "serve")
    check_placement(make_config("served", *COMMON, "framework.grouping=label_kmeans"), "serve")
