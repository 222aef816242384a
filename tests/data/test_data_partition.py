"""Partitioners: every index once, non-empty clients, seeded, and the skew each one is meant to give."""

from __future__ import annotations

import statistics

import pytest

from splitlm.data.partition import (
    PARTITIONERS,
    Partitioner,
    label_histograms,
    make_partitioner,
    register_partitioner,
    skew,
)
from splitlm.errors import ConfigError, DataError

LABELS = ["a"] * 1000 + ["b"] * 1000  # 2000 examples of 2 balanced labels
SOURCES = [f"file{i % 3}" for i in range(len(LABELS))]

BUILT_INS = [
    ("iid", {}, 4),
    ("dirichlet", {"alpha": 0.5}, 4),
    ("dirichlet", {"alpha": 0.05}, 7),
    ("label_mix", {"alpha": 0.1}, 8),
    ("label_mix", {"alpha": 2.0}, 3),
    ("quantity", {"alpha": 0.1}, 5),
    ("by_source", {}, 3),
]


def assert_is_partition(parts: list[list[int]], num_examples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(parts), [len(p) for p in parts]  # every client has at least one example
    assert sum(len(p) for p in parts) == num_examples
    assert sorted(i for p in parts for i in p) == list(range(num_examples))  # disjoint and covering


@pytest.mark.parametrize(("name", "options", "num_clients"), BUILT_INS)
def test_every_index_exactly_once_and_every_client_non_empty(name: str, options: dict, num_clients: int) -> None:
    for seed in range(3):
        parts = make_partitioner(name, **options)(LABELS, num_clients, seed, sources=SOURCES)
        assert_is_partition(parts, len(LABELS), num_clients)
        assert all(p == sorted(p) for p in parts)


@pytest.mark.parametrize(("name", "options", "num_clients"), [b for b in BUILT_INS if b[0] != "by_source"])
def test_seeds_reproduce_exactly_and_different_seeds_differ(name: str, options: dict, num_clients: int) -> None:
    partition = make_partitioner(name, **options)
    first = partition(LABELS, num_clients, seed=11)
    assert make_partitioner(name, **options)(LABELS, num_clients, seed=11) == first
    assert partition(LABELS, num_clients, seed=12) != first


def test_iid_sizes_differ_by_at_most_one_and_mix_labels() -> None:
    parts = make_partitioner("iid")(LABELS[:1003], 4, seed=0)
    assert sorted(len(p) for p in parts) == [250, 251, 251, 251]
    assert parts[0] != list(range(len(parts[0])))  # shuffled, not the first rows in file order
    assert skew(make_partitioner("iid")(LABELS, 4, seed=0), LABELS) < 0.1


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    def mean_skew(alpha: float) -> float:
        partition = make_partitioner("dirichlet", alpha=alpha)
        return statistics.mean(skew(partition(LABELS, 4, seed), LABELS) for seed in range(5))

    near_iid, moderate, extreme = mean_skew(100.0), mean_skew(1.0), mean_skew(0.05)
    assert near_iid < 0.08 < moderate < extreme
    assert extreme > 0.3  # at most 0.5 with two balanced labels


def test_dirichlet_keeps_each_class_whole_across_clients() -> None:
    parts = make_partitioner("dirichlet", alpha=0.3)(LABELS, 4, seed=2)
    histograms = label_histograms(parts, LABELS)
    assert sum(h.get("a", 0) for h in histograms) == 1000
    assert sum(h.get("b", 0) for h in histograms) == 1000


def test_dirichlet_fills_empty_clients_when_resampling_fails() -> None:
    # 6 examples, 5 clients, tiny alpha: draws almost always leave clients empty, so the fallback runs
    labels = ["a"] * 3 + ["b"] * 3
    for seed in range(10):
        parts = make_partitioner("dirichlet", alpha=0.001)(labels, 5, seed)
        assert_is_partition(parts, len(labels), 5)


def test_quantity_sizes_are_unequal_at_small_alpha_and_at_least_one() -> None:
    for seed in range(5):
        parts = make_partitioner("quantity", alpha=0.1)(LABELS, 5, seed)
        sizes = [len(p) for p in parts]
        assert min(sizes) >= 1
        assert max(sizes) > 3 * len(LABELS) / 5  # one client holds much more than an equal share
    large = [len(p) for p in make_partitioner("quantity", alpha=1000.0)(LABELS, 5, seed=0)]
    assert max(large) - min(large) < 0.2 * len(LABELS) / 5


def test_quantity_gives_one_each_when_examples_equal_clients() -> None:
    parts = make_partitioner("quantity", alpha=0.01)(["x", None, "y"], 3, seed=4)
    assert sorted(len(p) for p in parts) == [1, 1, 1]


def test_by_source_gives_each_source_one_client_in_sorted_order() -> None:
    sources = ["wiki", "code", "wiki", "chat", "code", "wiki"]
    parts = make_partitioner("by_source")([None] * 6, 3, seed=0, sources=sources)
    assert parts == [[3], [1, 4], [0, 2, 5]]  # chat, code, wiki
    for part in parts:
        assert len({sources[i] for i in part}) == 1


def test_by_source_errors() -> None:
    partition = make_partitioner("by_source")
    with pytest.raises(DataError, match=r"3 distinct sources but num_clients is 2.*'chat', 'code', 'wiki'"):
        partition([None] * 3, 2, seed=0, sources=["wiki", "code", "chat"])
    with pytest.raises(DataError, match=r"needs the source of each example"):
        partition([None] * 3, 3, seed=0)
    with pytest.raises(DataError, match=r"2 sources for 3 examples"):
        partition([None] * 3, 2, seed=0, sources=["a", "b"])
    with pytest.raises(DataError, match=r"no source \(first at index 1\)"):
        partition([None] * 3, 2, seed=0, sources=["a", None, "b"])


@pytest.mark.parametrize(("name", "options", "num_clients"), BUILT_INS)
def test_more_clients_than_examples(name: str, options: dict, num_clients: int) -> None:
    few = num_clients - 1
    with pytest.raises(DataError, match=rf"each of {num_clients} clients.*only {few}"):
        make_partitioner(name, **options)(["a"] * few, num_clients, seed=0, sources=[f"s{i}" for i in range(few)])


def test_num_clients_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"num_clients must be an integer >= 1, got 0"):
        make_partitioner("iid")(["a"], 0, seed=0)


@pytest.mark.parametrize("name", ["dirichlet", "label_mix", "quantity"])
@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "0.5"])
def test_alpha_must_be_positive_and_finite(name: str, alpha: object) -> None:
    with pytest.raises(ConfigError, match=rf"partitioner '{name}': alpha must be a finite number > 0"):
        make_partitioner(name, alpha=alpha)


def test_every_option_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        make_partitioner("dirichlet", alpha=-1, alhpa=0.5)
    message = str(caught.value)
    assert "unknown option 'alhpa' (accepted: ['alpha'])" in message
    assert "alpha must be a finite number > 0, got -1" in message.replace(" (smaller = more skewed)", "")
    with pytest.raises(ConfigError, match=r"unknown option 'alpha' \(accepted: none\)"):
        make_partitioner("iid", alpha=1.0)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown partitioner 'dirichlett'; choose from \['by_source', 'dirichlet'"):
        make_partitioner("dirichlett")


def test_dirichlet_rejects_unlabelled_data() -> None:
    with pytest.raises(DataError, match=r"2 of 4 have none; set data.label_field"):
        make_partitioner("dirichlet", alpha=1.0)(["a", None, "b", None], 2, seed=0)


def test_register_partitioner_by_name() -> None:
    @register_partitioner("first_client_only_test")
    def factory(*, keep: int = 1) -> Partitioner:
        def partition(labels, num_clients, seed, sources=None):  # type: ignore[no-untyped-def]
            return [list(range(keep)), list(range(keep, len(labels)))]

        return partition

    try:
        assert make_partitioner("first_client_only_test", keep=2)(["a"] * 5, 2, seed=0) == [[0, 1], [2, 3, 4]]
        with pytest.raises(ConfigError, match=r"unknown option 'drop' \(accepted: \['keep'\]\)"):
            make_partitioner("first_client_only_test", drop=1)
    finally:
        del PARTITIONERS["first_client_only_test"]


def test_label_histograms_and_skew() -> None:
    labels = ["a", "a", "b", "b", None, None]
    assert label_histograms([[0, 1], [2, 3, 4, 5]], labels) == [{"a": 2}, {"b": 2, "none": 2}]
    # global mix a/b/none = 1/3 each; client 0 is all a: TV = 2/3; client 1 is half b, half none: TV = 1/3
    assert skew([[0, 1], [2, 3, 4, 5]], labels) == pytest.approx(0.5)
    assert skew([[0, 2, 4], [1, 3, 5]], labels) == 0.0
    assert skew([[0, 1], [2, 3]], ["a", "a", "b", "b"]) == pytest.approx(0.5)  # disjoint classes


def test_label_mix_skews_labels_not_sizes() -> None:
    labels = LABELS[:1003]
    for alpha in (0.05, 1.0, 100.0):
        parts = make_partitioner("label_mix", alpha=alpha)(labels, 4, seed=0)
        assert sorted(len(p) for p in parts) == [250, 251, 251, 251]  # the same size, whatever the skew

    def mean_skew(alpha: float) -> float:
        partition = make_partitioner("label_mix", alpha=alpha)
        return statistics.mean(skew(partition(LABELS, 8, seed), LABELS) for seed in range(5))

    near_iid, moderate, extreme = mean_skew(100.0), mean_skew(1.0), mean_skew(0.1)
    assert near_iid < 0.08 < moderate < extreme
    assert extreme > 0.3
    shares = [sum(LABELS[i] == "a" for i in p) / len(p) for p in make_partitioner("label_mix", alpha=0.1)(LABELS, 8, 0)]
    assert sum(share > 0.9 or share < 0.1 for share in shares) >= 4  # most clients hold nearly one label


def test_label_mix_rejects_unlabelled_data() -> None:
    with pytest.raises(DataError, match=r"label_mix partitioner needs a class label on every example, but 2 of 4"):
        make_partitioner("label_mix", alpha=1.0)(["a", None, "b", None], 2, seed=0)
