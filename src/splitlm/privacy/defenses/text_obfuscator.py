"""TextObfuscator (Zhou et al., 2023; survey §5.2.2): word vectors made hard to tell apart within clusters.

The client's vocabulary is clustered once (k-means on its pretrained token vectors, seeded, ``clusters``
prototypes; special ids take no part). Before the head's first block each real, non-special input token's vector
``e`` of cluster ``c`` becomes

    e' = e + mix * (p_c - e) + noise * r_c * u,    u ~ N(0, I / d)   (so |u| is about 1),

``p_c`` the cluster's prototype (its mean) and ``r_c`` its radius (the root mean squared distance of its members to
``p_c``): ``mix`` pulls the tokens of one cluster together (1: all become the prototype), the noise blurs them
within the cluster's own spread. What the server receives is then computed from vectors that say which cluster a
token is in more than which token it is, while related tokens (a cluster) keep most of their meaning for the task.
The paper learns the prototypes with task losses; here they are the pretrained vectors' k-means clusters, fixed.

Padding and special ids are never changed. On a large vocabulary the centres are fitted on ``SAMPLE`` ids drawn
from it (seeded) and every id then joins its nearest centre. The clustering is cached in memory per (vocabulary,
clusters, seed), so
every client and every attacker's simulation of one run shares it. Not a DP mechanism: no epsilon.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Self

import torch
from pydantic import Field

from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense
from splitlm.registry import ComponentSettings

BLOCK_BUDGET = 1 << 24  # elements of one (rows, clusters) distance block: 64 MiB in float32
ITERATIONS = 25  # Lloyd iterations after k-means++ seeding (the assignment rarely moves after ~15)
SAMPLE = 8192  # the centres are fitted on at most this many token vectors (drawn, seeded), then every id assigned


@dataclass(frozen=True)
class Clusters:
    """A clustering of the vocabulary: each id's cluster (-1: special, never changed), prototypes and radii."""

    assignment: torch.Tensor  # (V,) long
    prototypes: torch.Tensor  # (k, d) float32
    radius: torch.Tensor  # (k,) float32


_CACHE: dict[tuple[str, int, int], Clusters] = {}


def _nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The index of the nearest of ``centres`` (k, d) to each row of ``points`` (N, d), in blocks."""
    step = max(1, BLOCK_BUDGET // max(centres.shape[0], 1))
    sq = (centres**2).sum(1)  # (k,)
    out = [(sq[None] - 2.0 * block @ centres.T).argmin(1) for block in points.split(step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=points.device)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on ``points`` (N, d) float32: the centres (k, d). Deterministic for
    one generator state; a cluster left empty keeps its centre."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centres = [points[first]]
    closest = ((points - points[first]) ** 2).sum(1)  # (N,) squared distance to the nearest centre so far
    for _ in range(1, k):
        weights = closest.clamp_min(0).to(generator.device)
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else 0
        centres.append(points[pick])
        closest = torch.minimum(closest, ((points - points[pick]) ** 2).sum(1))
    centre = torch.stack(centres)  # (k, d)
    for _ in range(iterations):
        assign = _nearest(points, centre)
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros_like(centre).index_add_(0, assign, points)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centre)
        if torch.equal(moved, centre):
            break
        centre = moved
    return centre


def cluster_vocabulary(table: torch.Tensor, special: frozenset[int], k: int, seed: int) -> Clusters:
    """The clustering of ``table`` (V, d) into ``k`` clusters (special ids left out), cached in memory."""
    data = table.detach().float().cpu().contiguous()
    key = (hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest() + str(sorted(special)), k, seed)
    if key not in _CACHE:
        vocab = data.shape[0]
        free = torch.ones(vocab, dtype=torch.bool)
        free[[i for i in special if 0 <= i < vocab]] = False
        members = data[free]  # (N, d)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"text_obfuscator"))
        fit = members
        if members.shape[0] > SAMPLE:  # a large vocabulary (49152 ids): fit on a sample, assign everyone after
            fit = members[torch.randperm(members.shape[0], generator=generator)[:SAMPLE]]
        centres = kmeans(fit, min(k, fit.shape[0]), generator)
        own = _nearest(members, centres)  # (N,)
        count = torch.bincount(own, minlength=centres.shape[0]).clamp_min(1)
        spread = torch.zeros(centres.shape[0]).index_add_(0, own, ((members - centres[own]) ** 2).sum(1))
        assignment = torch.full((vocab,), -1, dtype=torch.long)
        assignment[free] = own
        _CACHE[key] = Clusters(assignment, centres, (spread / count).sqrt())
    return _CACHE[key]


@DEFENSES.component
class TextObfuscator(InputDefense):
    name = "text_obfuscator"

    class Settings(ComponentSettings):
        clusters: int = Field(
            256,
            ge=2,
            description="Clusters of the vocabulary (k-means on the client's pretrained token vectors, seeded); "
            "fewer: larger groups of tokens that look alike at the cut.",
        )
        mix: float = Field(
            0.5,
            ge=0,
            le=1,
            description="How far each token's vector moves to its cluster's prototype (0: not at all, 1: onto it).",
        )
        noise: float = Field(
            0.5,
            ge=0,
            description="Gaussian noise on each token's vector, with length about noise x its cluster's radius (the "
            "root mean squared distance of the cluster's tokens to its prototype).",
        )

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, settings.clusters, settings.mix, settings.noise)

    def __init__(self, context: DefenseContext, clusters: int = 256, mix: float = 0.5, noise: float = 0.5) -> None:
        if clusters < 2 or not 0 <= mix <= 1 or noise < 0:
            raise PrivacyError(
                f"text_obfuscator: need clusters >= 2, 0 <= mix <= 1, noise >= 0; got clusters={clusters} mix={mix} "
                f"noise={noise}; fix privacy.defenses.text_obfuscator"
            )
        self.mix, self.noise = float(mix), float(noise)
        device = context.token_embeddings.device
        found = cluster_vocabulary(context.token_embeddings, context.special_ids, int(clusters), context.seed)
        self.clusters = Clusters(found.assignment.to(device), found.prototypes.to(device), found.radius.to(device))
        self.generator = context.generator(zlib.crc32(self.name.encode()))

    def embeddings(
        self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.mix == 0 and self.noise == 0:
            return inputs_embeds
        table = self.clusters
        ids = input_ids.to(table.assignment.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.assignment.shape[0]):
            raise PrivacyError(
                f"text_obfuscator: input ids span {int(ids.min())}..{int(ids.max())} but the head has "
                f"{table.assignment.shape[0]} token vectors; use the tokenizer that belongs to the model"
            )
        cluster = table.assignment[ids]  # (B, T)
        change = attention_mask.to(ids.device).bool() & (cluster >= 0)  # (B, T)
        if not bool(change.any()):
            return inputs_embeds
        own = cluster.clamp_min(0)
        dim = inputs_embeds.shape[-1]
        # The noise is drawn for every position (one draw per key whatever the mask) and used where tokens change.
        noise = torch.randn(inputs_embeds.shape, generator=self.generator, device=self.generator.device) / dim**0.5
        device = inputs_embeds.device
        work = inputs_embeds.float()
        shift = self.mix * (table.prototypes[own].to(device) - work)
        shift = shift + self.noise * table.radius[own].to(device)[..., None] * noise.to(device)
        out = work + shift * change.to(device)[..., None]
        return out.to(inputs_embeds.dtype)
