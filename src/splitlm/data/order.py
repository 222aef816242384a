"""The training data order: a pure function of (examples, batch size, seed, micro-batch number).

Epochs are seeded permutations laid end to end; micro-batch ``m`` takes positions
``[m * batch_size, (m + 1) * batch_size)`` of that endless stream, so a batch may span two epochs and a
resumed run continues exactly where it stopped without replaying anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from splitlm.errors import DataError

_EPOCH_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DataOrder:
    """Which example indices go into each global micro-batch."""

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise DataError(f"no training examples to order (num_examples={self.num_examples}); add data")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def indices(self, micro_batch: int) -> list[int]:
        """The ``batch_size`` example indices of global micro-batch ``micro_batch`` (0, 1, 2, ...)."""
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0, got {micro_batch}")
        n = self.num_examples
        start = micro_batch * self.batch_size
        end = start + self.batch_size
        out: list[int] = []
        for epoch in range(start // n, (end - 1) // n + 1):
            lo, hi = max(start, epoch * n) - epoch * n, min(end, (epoch + 1) * n) - epoch * n
            out.extend(_permutation(n, self.seed, epoch)[lo:hi].tolist())
        return out

    def epoch(self, micro_batch: int) -> float:
        """Epochs completed before micro-batch ``micro_batch`` starts (fractional)."""
        return micro_batch * self.batch_size / self.num_examples

    def batches(self, start: int = 0) -> Iterator[list[int]]:
        """Endless micro-batches from number ``start`` on."""
        micro_batch = start
        while True:
            yield self.indices(micro_batch)
            micro_batch += 1


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * _EPOCH_SEED_STRIDE + epoch) % 2**63)
    return torch.randperm(n, generator=generator)
