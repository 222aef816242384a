"""Partitioners: split a training set across clients for split-federated learning (IID and non-IID).

A partitioner maps per-example labels (and, for ``by_source``, per-example source names) to one list of
example indices per client. Every built-in returns disjoint lists that together cover each index exactly
once, gives every client at least one example, lists each client's indices in ascending order, and is a
pure function of its inputs and ``seed``.

Partitioners register themselves by name (``register_partitioner``); ``make_partitioner(name, **options)``
builds one from a config. ``label_histograms`` and ``skew`` describe how non-IID a partition is.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from splitlm.errors import ConfigError, DataError
from splitlm.registry import Registry

NONE_LABEL = "none"  # how an example without a label is counted in histograms and skew
DIRICHLET_TRIES = 10  # draws of the Dirichlet label split before an empty client is patched by hand


class Partitioner(Protocol):
    """Splits ``len(labels)`` examples across ``num_clients`` clients."""

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """For each client, the ascending indices of the examples it owns.

        ``labels`` has one class label per example (``None`` where the row has none); ``sources``, where
        given, one source name per example (which dataset or file it came from). The lists are disjoint,
        cover every index exactly once and are each non-empty; ``DataError`` where that is impossible.
        """
        ...


PartitionerFactory = Callable[..., Partitioner]
PARTITIONERS = Registry[PartitionerFactory]("partitioner", "data.partition")


def register_partitioner(name: str) -> Callable[[PartitionerFactory], PartitionerFactory]:
    """Register a partitioner factory (called with keyword options) under ``name``."""
    return PARTITIONERS.register(name)


def make_partitioner(name: str, **options: Any) -> Partitioner:
    """The partitioner registered as ``name``, built with ``options``.

    Raises ``ConfigError`` for an unknown name (listing the choices), or listing every unknown, missing
    or invalid option at once (with the options the partitioner accepts).
    """
    factory = PARTITIONERS.get(name)
    params = inspect.signature(factory).parameters
    accepted = sorted(params)
    problems = [f"unknown option {key!r} (accepted: {accepted or 'none'})" for key in options if key not in params]
    problems += [
        f"missing option {key!r}"
        for key, param in params.items()
        if param.default is inspect.Parameter.empty and key not in options
    ]
    known = {key: value for key, value in options.items() if key in params}
    try:
        partitioner = factory(**known)  # validates the values even when other options are wrong
    except ConfigError as error:
        problems.append(str(error))
    except TypeError:
        if not problems:  # not a missing option: a bug in the factory
            raise
    if not problems:
        return partitioner
    raise ConfigError(f"partitioner {name!r}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- helpers


def _check_counts(num_examples: int, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_examples < num_clients:
        raise DataError(
            f"cannot give each of {num_clients} clients at least one example: the training set has only "
            f"{num_examples}; use fewer clients or more training data"
        )


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0 (smaller = more skewed), got {alpha!r}; try 0.5")
    return float(alpha)


def _by_class(labels: Sequence[str | None], partitioner: str) -> dict[str, list[int]]:
    """The indices of each class label, in order; every example must have one."""
    unlabelled = sum(label is None for label in labels)
    if unlabelled:
        raise DataError(
            f"the {partitioner} partitioner needs a class label on every example, but {unlabelled} of "
            f"{len(labels)} have none; set data.label_field to the column holding the label, use a "
            "labelled dataset, or choose the 'iid' or 'quantity' partitioner"
        )
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(str(label), []).append(i)
    return by_class


def _apportion(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` by ``proportions`` (largest remainder), summing to ``total`` exactly."""
    exact = proportions / proportions.sum() * total
    shares = np.floor(exact).astype(np.int64)
    left = total - int(shares.sum())
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:left]] += 1
    return shares


def _shards(order: np.ndarray, sizes: np.ndarray) -> list[list[int]]:
    """``order`` cut into consecutive pieces of ``sizes``, each sorted ascending."""
    return [sorted(piece.tolist()) for piece in np.split(order, np.cumsum(sizes)[:-1])]


# ------------------------------------------------------------------------------------------- built-ins


@register_partitioner("iid")
@dataclass(frozen=True)
class IIDPartitioner:
    """IID: a seeded shuffle, cut into near-equal contiguous shards (sizes differ by at most 1)."""

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        _check_counts(len(labels), num_clients)
        order = np.random.default_rng(seed).permutation(len(labels))
        return [sorted(piece.tolist()) for piece in np.array_split(order, num_clients)]


@register_partitioner("dirichlet")
@dataclass(frozen=True)
class DirichletPartitioner:
    """Label skew: each class is split across clients by proportions drawn from Dirichlet(``alpha``).

    Classes are taken in sorted order; for each, the (seeded) shuffled indices of that class are cut by
    client proportions ~ Dirichlet(alpha, ..., alpha), rounded by largest remainder. Small ``alpha``
    (e.g. 0.05) gives each client few classes; large ``alpha`` (e.g. 100) is close to IID.

    If a client ends up empty, the whole draw is repeated, up to ``DIRICHLET_TRIES`` draws; if the last
    draw still leaves clients empty, each empty client takes one example (the last-listed) from the client
    that then holds the most. Every example must have a label.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        _check_counts(len(labels), num_clients)
        by_class = _by_class(labels, "dirichlet")
        rng = np.random.default_rng(seed)
        for _ in range(DIRICHLET_TRIES):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for label in sorted(by_class):
                members = rng.permutation(np.asarray(by_class[label]))
                sizes = _apportion(len(members), rng.dirichlet(np.full(num_clients, self.alpha)))
                for client, piece in enumerate(np.split(members, np.cumsum(sizes)[:-1])):
                    parts[client].extend(piece.tolist())
            if all(parts):
                break
        for client in range(num_clients):
            if not parts[client]:
                largest = max(range(num_clients), key=lambda c: len(parts[c]))
                parts[client].append(parts[largest].pop())
        return [sorted(part) for part in parts]


@register_partitioner("label_mix")
@dataclass(frozen=True)
class LabelMixPartitioner:
    """Label skew at equal size (Hsu et al., 2019): client k's label mix is q_k ~ Dirichlet(``alpha`` x p), p the
    classes' shares of the whole set, and every client gets the same number of examples (n // num_clients, the
    first n % num_clients one more).

    ``dirichlet`` splits each class across clients, so with few classes and small ``alpha`` most clients end up
    with almost nothing (quantity skew on top of label skew); here only the mix differs. Clients are served in
    order: client k takes its share of each class (largest remainder) from that class's seeded shuffle, largest
    share first; what a class no longer has is taken from the classes that still have examples, in the order of
    k's shares. Small ``alpha`` (0.1) gives each client nearly one class; large ``alpha`` is close to IID.
    Every example must have a label.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        _check_counts(len(labels), num_clients)
        by_class = _by_class(labels, "label_mix")
        classes = sorted(by_class)
        rng = np.random.default_rng(seed)
        pools = [rng.permutation(np.asarray(by_class[c])).tolist() for c in classes]
        prior = np.asarray([len(pool) for pool in pools], dtype=np.float64) / len(labels)
        base, extra = divmod(len(labels), num_clients)
        parts: list[list[int]] = []
        for client in range(num_clients):
            size = base + (client < extra)
            mix = rng.dirichlet(self.alpha * prior)
            wanted = _apportion(size, mix) if np.isfinite(mix).all() and mix.sum() > 0 else _apportion(size, prior)
            order = np.argsort(-mix, kind="stable")
            part: list[int] = []
            for c in order:  # its own share of each class, as far as the class still has examples
                take = min(int(wanted[c]), len(pools[c]))
                part += pools[c][:take]
                del pools[c][:take]
            for c in order:  # the rest from whatever classes are left
                take = min(size - len(part), len(pools[c]))
                part += pools[c][:take]
                del pools[c][:take]
            parts.append(sorted(part))
        return parts


@register_partitioner("quantity")
@dataclass(frozen=True)
class QuantityPartitioner:
    """Quantity skew: client sizes ~ Dirichlet(``alpha``) over clients, at least one example each.

    Labels are ignored. Each client gets 1 example plus its Dirichlet share (largest remainder) of the
    other ``n - num_clients``; the shards are cut from a seeded shuffle.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        _check_counts(len(labels), num_clients)
        rng = np.random.default_rng(seed)
        proportions = rng.dirichlet(np.full(num_clients, self.alpha))
        sizes = 1 + _apportion(len(labels) - num_clients, proportions)
        return _shards(rng.permutation(len(labels)), sizes)


@register_partitioner("by_source")
@dataclass(frozen=True)
class SourcePartitioner:
    """One source per client: client ``k`` owns every example of the ``k``-th source in sorted order.

    ``sources`` names the source of each example (e.g. the dataset or file it came from); the number of
    distinct sources must equal ``num_clients``. Labels and ``seed`` are not used.
    """

    def __call__(
        self,
        labels: Sequence[str | None],
        num_clients: int,
        seed: int,
        sources: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        if sources is None:
            raise DataError(
                "the by_source partitioner needs the source of each example, but none were given; "
                "load the training data with a source per row or choose another partitioner"
            )
        if len(sources) != len(labels):
            raise DataError(
                f"by_source: got {len(sources)} sources for {len(labels)} examples; expected one source per example"
            )
        missing = [i for i, source in enumerate(sources) if source is None]
        if missing:
            raise DataError(
                f"by_source: {len(missing)} examples have no source (first at index {missing[0]}); "
                "every example needs a source name"
            )
        _check_counts(len(labels), num_clients)
        named = [str(source) for source in sources]
        names = sorted(set(named))
        if len(names) != num_clients:
            shown = names if len(names) <= 20 else [*names[:20], f"... ({len(names) - 20} more)"]
            raise DataError(
                f"by_source: the data has {len(names)} distinct sources but num_clients is {num_clients}; "
                f"set num_clients to {len(names)} or change the data (sources: {shown})"
            )
        client_of = {name: k for k, name in enumerate(names)}
        parts: list[list[int]] = [[] for _ in names]
        for i, source in enumerate(named):
            parts[client_of[source]].append(i)
        return parts


# ------------------------------------------------------------------------------------------- measures


def label_histograms(parts: list[list[int]], labels: Sequence[str | None]) -> list[dict[str, int]]:
    """Per client, label -> number of its examples with that label (``None`` counted as ``"none"``)."""
    return [dict(Counter(NONE_LABEL if labels[i] is None else str(labels[i]) for i in part)) for part in parts]


def skew(parts: list[list[int]], labels: Sequence[str | None]) -> float:
    """Non-IID measure: mean over clients of the total-variation distance to the global label mix.

    The global mix is that of all examples the clients hold together; 0 = every client has exactly the
    global mix, values near 1 = clients hold disjoint classes. Empty clients are left out (0.0 if all are).
    """
    histograms = [h for h in label_histograms(parts, labels) if h]
    if not histograms:
        return 0.0
    overall: Counter[str] = Counter()
    for histogram in histograms:
        overall.update(histogram)
    total = sum(overall.values())
    distances = []
    for histogram in histograms:
        size = sum(histogram.values())
        distances.append(0.5 * sum(abs(histogram.get(k, 0) / size - n / total) for k, n in overall.items()))
    return float(np.mean(distances))
