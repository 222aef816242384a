"""Reproducible randomness: every random draw that affects training comes from a stream fixed by (seed, what).

A run's randomness must not depend on which process or thread computes a piece of work, in what order
clients are served, or whether a process restarted: then networked, Ray and in-process runs are identical,
two networked runs are identical, and a round replayed after a fault computes what it computed the first
time. So each piece of work draws from a stream derived from the run's seed and its own name, e.g.
(client, step, micro-batch, part) for a part's forward pass (its dropout masks), or (defense, client, step,
micro-batch, kind) for a defense's noise.

``derive`` hashes such a key to a seed; ``seeded`` runs a block with torch's global generator set from one
(dropout in peft's LoRA layers and in the models draws from it) and restores the generator afterwards. A
process-wide lock keeps two threads (in-process clients, the server's worker) from drawing from it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from splitlm.models.split import RNG_LOCK

_LOCK = RNG_LOCK  # a checkpointed block's recomputation sets the generator too (models.split)


def derive(seed: int, *key: object) -> int:
    """A 63-bit seed for ``key`` under ``seed``, the same in every process and Python version."""
    text = repr((int(seed), *key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, *key: object, devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Run a block with torch's global generator (and those of CUDA ``devices``) seeded from (seed, key)."""
    cuda = [d.index or 0 for d in devices if d.type == "cuda"]
    with _LOCK, torch.random.fork_rng(devices=cuda):
        value = derive(seed, *key)
        torch.manual_seed(value)
        yield
