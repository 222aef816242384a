"""Client grouping and selection (survey §3.1.3): which clients share a trunk adapter (``framework.grouping``, for
gsfl) and which take part in a round (``framework.selection``).

Both are pure functions of one summary per client (and the seed), so every machine of a networked run computes
the same groups and the same participants, and a resumed run chooses as the uninterrupted one did. A grouping
declares which summary it takes (``Grouping.needs``): the clients' label histograms (known from the partition), or
``sketches``, hashed summaries of each client's smashed data (``frameworks/sketch.py`` computes them, before the
server is built). Selections take the histograms.

Groupings (``GROUPINGS``: ``(summaries, num_groups, seed) -> groups``; min(num_groups, clients) groups, none
empty, each group's clients ascending):

- ``label_kmeans`` (CSFL): k-means with cosine distance on the label histograms, k = min(num_groups, clients), so
  clients of similar label mix train together. The first center is a seeded random client, each next one the
  client least like every center so far (farthest-point init); a cluster left empty takes the client farthest
  from its own center. Up to ``KMEANS_ITERATIONS`` rounds of assign / re-center, or until the assignment is stable.
  Groups ordered by their first client (group 0 holds client 0).
- ``balanced`` (ParallelSFL): groups whose pooled label mix is close to the global one, so each group's data is
  nearly IID. Group sizes differ by at most 1. A greedy pass puts the clients, largest first, each into the
  open group whose pooled mix it leaves closest to the global mix (KL(group || global)); then the best swap of two
  clients between two groups is made while it lowers the total KL (``total_kl``). Ordered as label_kmeans'.
- ``feature_hash`` (GSFL, needs sketches): no labels. Each client hashes the mean of its smashed data (the
  initial head's output over the real tokens of a few of its own training micro-batches) with a seeded random
  projection, the same for every client, to a short sketch (``sketch.py``); the server sees only the sketches.
  Every client's mean shares a large common component (the same head on text), which would make every pair look
  alike, so the sketches are centered first: the mean sketch of all clients is subtracted from each (the
  projection is linear, so this is the sketch of the centered means). Then label_kmeans' k-means with cosine
  distance on the centered sketches: clients whose data moves the head's output the same way train together.
- ``first_label``: clients sorted by their share of the first label (alphabetically), cut into contiguous groups
  (exact for two-label data; the behaviour before the other two existed), the lowest share first.

Selections (``SELECTIONS``: ``(histograms, per_round, round_index, seed) -> client positions``):

- ``random``: ``per_round`` clients sampled afresh each round (seeded by the seed and the round).
- ``pairing`` (PairingFL): each round, ``per_round`` clients picked one at a time, each the one whose histogram
  most raises the entropy of the chosen set's pooled label histogram (ties: the client waiting longest, then the
  lowest position), under a fairness rule: with ``wait = ceil(clients / per_round)``, no client is left out more
  than ``wait`` rounds in a row (nor more than the first ``wait`` rounds). A client may be picked only while the
  rest of the round can still be filled so that every client can meet its deadline later (earliest deadline
  first); the rule therefore always holds, however the histograms look. A chosen client counts as chosen even
  where ``framework.leave_out`` or a lost connection then keeps it out of the round.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from splitlm.registry import Registry

Histogram = dict[str, int]
Sketch = list[float]  # a client's hashed smashed-data summary (``sketch.py``)
Needs = Literal["histograms", "sketches"]
Selection = Callable[[list[Histogram], int, int, int], list[int]]


@dataclass(frozen=True)
class Grouping:
    """A way to group clients: ``form(summaries, num_groups, seed) -> groups``, one summary per client of the kind
    ``needs`` names (label histograms, or smashed-data sketches). Called like ``form`` itself."""

    form: Callable[[list[Any], int, int], list[list[int]]]
    needs: Needs = "histograms"

    def __call__(self, summaries: list[Any], count: int, seed: int) -> list[list[int]]:
        return self.form(summaries, count, seed)


GROUPINGS = Registry[Grouping]("grouping", "framework.grouping")
SELECTIONS = Registry[Selection]("selection", "framework.selection")


def register_grouping(name: str, needs: Needs = "histograms") -> Callable[[Callable[..., list[list[int]]]], Grouping]:
    """Decorator: register a grouping function under ``name`` (``framework.grouping``), taking ``needs``."""

    def decorate(form: Callable[..., list[list[int]]]) -> Grouping:
        grouping = Grouping(form, needs)
        GROUPINGS.add(name, grouping)
        return grouping

    return decorate


KMEANS_ITERATIONS = 100
SWAP_PASSES = 1000  # a bound only: each swap lowers the total KL, so the swaps end long before


def _labels(histograms: list[Histogram]) -> list[str]:
    return sorted({label for h in histograms for label in h})


def _counts(histogram: Histogram, labels: list[str]) -> list[int]:
    return [histogram.get(label, 0) for label in labels]


def _add(a: list[int], b: list[int], sign: int = 1) -> list[int]:
    return [x + sign * y for x, y in zip(a, b, strict=True)]


def _unit(vector: list[int] | list[float]) -> list[float]:
    """``vector`` scaled to length 1 (cosine similarity is then a dot product); a zero vector stays zero."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else [0.0 for _ in vector]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _grouped(assignment: list[int], count: int) -> list[list[int]]:
    """Each group's clients ascending, the groups ordered by their first client (empty groups dropped)."""
    groups = [[i for i, g in enumerate(assignment) if g == group] for group in range(count)]
    return sorted((g for g in groups if g), key=lambda g: g[0])


def kl_to(counts: list[int], reference: list[float]) -> float:
    """KL(mix of ``counts`` || ``reference``) in nats; 0.0 for no examples. ``reference`` is positive wherever
    ``counts`` is (the global mix of which ``counts`` is a part)."""
    total = sum(counts)
    if not total:
        return 0.0
    return sum(c / total * math.log(c / total / q) for c, q in zip(counts, reference, strict=True) if c)


def total_kl(histograms: list[Histogram], groups: list[list[int]]) -> float:
    """Sum over ``groups`` of KL(the group's pooled label mix || the global mix): what ``balanced`` lowers."""
    labels = _labels(histograms)
    counts = [_counts(h, labels) for h in histograms]
    overall = [sum(column) for column in zip(*counts, strict=True)] if counts else []
    total = sum(overall) or 1
    reference = [c / total for c in overall]
    pooled = [[sum(column) for column in zip(*(counts[i] for i in g), strict=True)] for g in groups if g]
    return sum(kl_to(p, reference) for p in pooled)


@register_grouping("label_kmeans")
def label_kmeans(histograms: list[Histogram], count: int, seed: int) -> list[list[int]]:
    labels = _labels(histograms)
    return cosine_kmeans([_unit(_counts(h, labels)) for h in histograms], count, seed)


@register_grouping("feature_hash", needs="sketches")
def feature_hash(sketches: list[Sketch], count: int, seed: int) -> list[list[int]]:
    return cosine_kmeans([_unit(v) for v in centered(sketches)], count, seed)


def centered(vectors: list[Sketch]) -> list[Sketch]:
    """``vectors`` less their mean (what they all share), so that cosine similarity compares what differs."""
    if not vectors:
        return []
    mean = [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]
    return [[x - m for x, m in zip(v, mean, strict=True)] for v in vectors]


def cosine_kmeans(points: list[list[float]], count: int, seed: int) -> list[list[int]]:
    """label_kmeans' clustering of unit vectors ``points`` (module docstring): k = min(count, points) groups."""
    n, k = len(points), min(count, len(points))
    if not k:
        return []
    centers = [points[random.Random(seed).randrange(n)]]
    while len(centers) < k:  # farthest-point init: the client least like every center so far
        far = max(range(n), key=lambda i: (min(1 - _cosine(points[i], c) for c in centers), -i))
        centers.append(points[far])
    assignment: list[int] = []
    for _ in range(KMEANS_ITERATIONS):
        new = [max(range(k), key=lambda g: (_cosine(p, centers[g]), -g)) for p in points]
        for group in range(k):
            if group not in new:  # an empty cluster takes the client farthest from its center (of a shared one)
                sizes = [new.count(g) for g in range(k)]
                far = max(
                    (i for i in range(n) if sizes[new[i]] > 1),
                    key=lambda i: (1 - _cosine(points[i], centers[new[i]]), -i),
                )
                new[far] = group
        if new == assignment:
            break
        assignment = new
        centers = [_unit([sum(col) for col in zip(*(points[i] for i in range(n) if new[i] == g), strict=True)])
                   for g in range(k)]  # fmt: skip
    return _grouped(assignment, k)


@register_grouping("balanced")
def balanced(histograms: list[Histogram], count: int, seed: int) -> list[list[int]]:
    labels = _labels(histograms)
    counts = [_counts(h, labels) for h in histograms]
    n, k = len(counts), min(count, len(counts))
    if not k:
        return []
    overall = [sum(column) for column in zip(*counts, strict=True)]
    reference = [c / (sum(overall) or 1) for c in overall]
    capacity = [n // k + (g < n % k) for g in range(k)]
    members: list[list[int]] = [[] for _ in range(k)]
    pools = [[0] * len(labels) for _ in range(k)]
    for i in sorted(range(n), key=lambda i: (-sum(counts[i]), i)):  # greedy: largest clients first
        open_groups = [g for g in range(k) if len(members[g]) < capacity[g]]
        group = min(open_groups, key=lambda g: (kl_to(_add(pools[g], counts[i]), reference), g))
        members[group].append(i)
        pools[group] = _add(pools[group], counts[i])
    for _ in range(SWAP_PASSES):  # then the best swap between two groups, while one lowers the total KL
        current = [kl_to(p, reference) for p in pools]
        best, swap = -1e-12, None
        for a in range(k):
            for b in range(a + 1, k):
                for i in members[a]:
                    for j in members[b]:
                        moved = _add(counts[j], counts[i], -1)
                        pool_a, pool_b = _add(pools[a], moved), _add(pools[b], moved, -1)
                        gain = kl_to(pool_a, reference) + kl_to(pool_b, reference) - current[a] - current[b]
                        if gain < best:
                            best, swap = gain, (a, b, i, j, pool_a, pool_b)
        if swap is None:
            break
        a, b, i, j, pools[a], pools[b] = swap
        members[a][members[a].index(i)] = j
        members[b][members[b].index(j)] = i
    assignment = [0] * n
    for group, clients in enumerate(members):
        for i in clients:
            assignment[i] = group
    return _grouped(assignment, k)


@register_grouping("first_label")
def first_label(histograms: list[Histogram], count: int, seed: int) -> list[list[int]]:
    count = min(count, len(histograms))
    if not count:
        return []
    labels = _labels(histograms)
    vectors = []
    for h in histograms:
        total = sum(h.values()) or 1
        vectors.append([h.get(label, 0) / total for label in labels])
    ordered = sorted(range(len(vectors)), key=lambda i: (vectors[i][0] if vectors[i] else 0.0, i))
    return [sorted(ordered[g * len(ordered) // count : (g + 1) * len(ordered) // count]) for g in range(count)]


@SELECTIONS.register("random")
def random_selection(histograms: list[Histogram], per_round: int, round_index: int, seed: int) -> list[int]:
    rng = random.Random(seed * 7919 + round_index)
    return sorted(rng.sample(range(len(histograms)), min(per_round, len(histograms))))


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c) if total else 0.0


@dataclass
class PairingPlan:
    """The ``pairing`` choices of one set of clients, grown a round at a time from round 0."""

    counts: list[list[int]]  # each client's label counts
    per_round: int
    last: list[int] = field(default_factory=list)  # each client's latest round chosen (-1: none yet)
    rounds: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last = self.last or [-1] * len(self.counts)

    def extend(self) -> None:
        """Choose the next round's clients (module docstring: greedy entropy gain, under the fairness rule)."""
        r, n, k = len(self.rounds), len(self.counts), min(self.per_round, len(self.counts))
        wait = math.ceil(n / k)
        deadline = [last + wait + 1 for last in self.last]  # the round by which each client must be chosen
        horizon = range(r, r + wait + 1)  # every deadline falls in it
        # deficit[t]: how many more of the clients due by round t this round must take, so that the rounds
        # r+1..t (k clients each) can take the rest in time
        deficit = {t: sum(d <= t for d in deadline) - k * (t - r) for t in horizon}
        chosen: list[int] = []
        pool = [0] * (len(self.counts[0]) if self.counts else 0)
        for left in range(k, 0, -1):
            allowed = [
                c for c in range(n)
                if c not in chosen and all(deficit[t] - (deadline[c] <= t) <= left - 1 for t in horizon)
            ]  # fmt: skip
            best = max(allowed, key=lambda c: (round(_entropy(_add(pool, self.counts[c])), 12), -deadline[c], -c))
            chosen.append(best)
            pool = _add(pool, self.counts[best])
            for t in horizon:
                deficit[t] -= deadline[best] <= t
        for c in chosen:
            self.last[c] = r
        self.rounds.append(sorted(chosen))


@functools.lru_cache(maxsize=8)
def _plan(histograms: tuple[tuple[tuple[str, int], ...], ...], per_round: int) -> PairingPlan:
    """One plan per set of clients, kept so that round r costs one round's choice, not a replay of r rounds."""
    dicts = [dict(h) for h in histograms]
    labels = _labels(dicts)
    return PairingPlan([_counts(h, labels) for h in dicts], per_round)


@SELECTIONS.register("pairing")
def pairing(histograms: list[Histogram], per_round: int, round_index: int, seed: int) -> list[int]:
    plan = _plan(tuple(tuple(sorted(h.items())) for h in histograms), per_round)
    while len(plan.rounds) <= round_index:
        plan.extend()
    return list(plan.rounds[round_index])


pairing.picks_a_subset = True  # type: ignore[attr-defined]  # it needs framework.clients_per_round < num_clients
