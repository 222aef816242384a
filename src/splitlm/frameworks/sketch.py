"""Smashed-data sketches for ``framework.grouping=feature_hash`` (GSFL, survey §3.1.3): how the server groups
clients by what their data does to the head's output, without seeing labels or the smashed data itself.

Each client runs its head (the initial one: every client starts from the same weights) with no gradient on up
to ``SKETCH_BATCHES`` micro-batches of its own training data and takes the mean smashed vector over the real
tokens (padding left out): a first-moment summary of its data as the cut sees it, ``(d,)``. It hashes the mean
with a locality-sensitive hash for cosine similarity, a seeded Gaussian random projection to ``SKETCH_DIMS``
dimensions (the seed is the run's, shared by the clients and not needed by the server), and rounds the result to
int16 levels of its absolute maximum, what a client would send: ``SKETCH_DIMS`` int16 values and one scale.

The projection is kept linear (no sign bits, as SimHash would take): every client's mean shares a large common
component, the same head run on text, so the grouping (``grouping.feature_hash``) subtracts the clients' mean
sketch before it compares them; a linear hash makes that the sketch of the centered means, and 16-bit levels keep
the rounding error (2^-15 of the largest entry) far below the differences that remain.

In-process runs compute every client's sketch here with one head (``client_sketches``), before the server is
built (the groups decide its trunk adapters); ``privacy.defenses`` act on training traffic, not on this one-off
summary. Networked and Ray runs refuse ``feature_hash`` (``gsfl``'s check, ``deploy/serve.py``).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from splitlm.config import Config
from splitlm.data import Batch, Example, collate
from splitlm.frameworks.setup import RunData, build_part
from splitlm.models import ModelSource

SKETCH_BATCHES = 4  # micro-batches (of train.batch_size rows) of its own training data a client summarises
SKETCH_DIMS = 128  # the sketch's length
LEVELS = 32767  # int16: the sketch is rounded to this many levels either side of zero


@torch.no_grad()
def smashed_mean(head: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The mean of ``head``'s output over the real tokens of ``batches``, ``(d,)`` in float64."""
    total: torch.Tensor | None = None
    count = 0
    for batch in batches:
        device = next(head.parameters()).device
        batch = batch.to(device)
        hidden = head(input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # (B, T, d)
        mask = batch.attention_mask.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
        summed = (hidden.to(torch.float64) * mask).sum(dim=(0, 1)).cpu()  # (d,)
        total = summed if total is None else total + summed
        count += int(batch.attention_mask.sum())
    if total is None or count == 0:
        raise ValueError("smashed_mean: no tokens to summarise")
    return total / count


def projection(width: int, seed: int, dims: int = SKETCH_DIMS) -> torch.Tensor:
    """The seeded Gaussian random projection ``(dims, width)`` every client hashes with (float64)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return torch.randn(dims, width, generator=generator, dtype=torch.float64) / dims**0.5


def sketch(summary: torch.Tensor, seed: int, dims: int = SKETCH_DIMS) -> list[float]:
    """``summary`` ``(d,)`` hashed: projected to ``dims`` values and rounded to int16 levels of its largest one,
    returned as the values those levels stand for (what the server decodes)."""
    projected = projection(summary.numel(), seed, dims) @ summary.to(torch.float64).flatten()  # (dims,)
    scale = float(projected.abs().max()) / LEVELS
    if scale == 0.0:
        return [0.0] * dims
    codes = torch.round(projected / scale).to(torch.int16)
    return [float(code) * scale for code in codes.tolist()]


def sample_batches(config: Config, examples: list[Example], pad_id: int, client: int) -> list[Batch]:
    """Up to ``SKETCH_BATCHES`` micro-batches of ``examples`` (a seeded choice per client), cut to train.seq_len."""
    size, seq_len = config.train.batch_size, config.train.seq_len
    chosen = list(range(len(examples)))
    random.Random(f"sketch/{config.seed}/{client}").shuffle(chosen)
    chosen = sorted(chosen[: SKETCH_BATCHES * size])
    rows = [Example(examples[i].input_ids[:seq_len], examples[i].labels[:seq_len], examples[i].label) for i in chosen]
    return [collate(rows[at : at + size], pad_id) for at in range(0, len(rows), size)]


def client_sketches(config: Config, source: ModelSource, data: RunData, parts: list[list[int]]) -> list[list[float]]:
    """Every client's sketch of its share ``parts[i]`` of ``data.train``, computed with one initial head."""
    head, _ = build_part(config.for_client(0), source, "head")  # gsfl: every client has the same cut
    head.eval()
    sketches = []
    for index, indices in enumerate(parts):
        batches = sample_batches(config, [data.train[i] for i in indices], data.pad_id, index)
        sketches.append(sketch(smashed_mean(head, batches), config.seed))
    return sketches
