"""A test partitioner under which every client holds every example: clients with the same data, seed and
initialisation are copies of one client (``tests/frameworks/conftest.py`` registers it as a fixture)."""

from __future__ import annotations

EVERYONE = "test-everyone"  # every client gets every index


class EveryoneGetsAll:
    def __call__(self, labels, num_clients, seed, sources=None) -> list[list[int]]:
        return [list(range(len(labels))) for _ in range(num_clients)]
