"""DataOrder: a deterministic, resumable order of training micro-batches."""

from __future__ import annotations

import itertools

import pytest

from splitlm.data import DataOrder
from splitlm.errors import DataError


def test_every_batch_has_batch_size_indices_in_range() -> None:
    order = DataOrder(num_examples=7, batch_size=3, seed=0)
    for m in range(20):
        batch = order.indices(m)
        assert len(batch) == 3 and all(0 <= i < 7 for i in batch)


def test_deterministic_and_resumable() -> None:
    a = DataOrder(num_examples=10, batch_size=4, seed=5)
    b = DataOrder(num_examples=10, batch_size=4, seed=5)
    first = [a.indices(m) for m in range(12)]
    assert [b.indices(m) for m in reversed(range(12))] == first[::-1]  # order of calls is irrelevant
    assert list(itertools.islice(a.batches(start=7), 5)) == first[7:12]


def test_every_index_once_per_epoch_across_batch_boundaries() -> None:
    n, batch_size = 10, 4  # 10 is not a multiple of 4: batches 2, 4 and 7 span epoch boundaries
    order = DataOrder(num_examples=n, batch_size=batch_size, seed=1)
    stream = [i for m in range(10) for i in order.indices(m)]  # 40 positions = 4 epochs
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(epoch) for epoch in epochs}) == 4  # each epoch is reshuffled
    assert order.indices(2) == epochs[0][8:] + epochs[1][:2]


def test_batch_larger_than_the_dataset_spans_several_epochs() -> None:
    order = DataOrder(num_examples=3, batch_size=7, seed=2)
    batch = order.indices(0)
    assert len(batch) == 7
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]


def test_different_seeds_differ() -> None:
    a = DataOrder(num_examples=100, batch_size=8, seed=0)
    b = DataOrder(num_examples=100, batch_size=8, seed=1)
    assert [a.indices(m) for m in range(5)] != [b.indices(m) for m in range(5)]


def test_far_micro_batches_are_cheap() -> None:
    order = DataOrder(num_examples=1000, batch_size=16, seed=3)
    batch = order.indices(5_000_000)
    assert len(batch) == 16 and order.indices(5_000_000) == batch
    assert order.epoch(5_000_000) == 80_000.0


def test_bad_construction() -> None:
    with pytest.raises(DataError, match=r"no training examples"):
        DataOrder(num_examples=0, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        DataOrder(num_examples=4, batch_size=0, seed=0)
    with pytest.raises(ValueError, match=r"micro_batch must be >= 0"):
        DataOrder(num_examples=4, batch_size=1, seed=0).indices(-1)
