"""Token-level defenses (step 2): each real, non-special input token is replaced by a nearby one before the head.

- ``dxp``: d_x-privacy (Feyisetan et al.): noise r*u on the token's embedding (u uniform on the unit sphere,
  r ~ Gamma(d, 1/epsilon)), then the nearest vocabulary embedding (L2).
- ``santext``: SanText (Yue et al.): y sampled with probability proportional to exp(-epsilon * ||E[x]-E[y]|| / 2)
  over the whole vocabulary.
- ``custext``: CusText (Chen et al.): y sampled among the ``top_k`` tokens most cosine-similar to x, with
  probability proportional to exp(epsilon * s / 2), s the similarity rescaled to [0, 1] within that set.

Padding (mask 0) and special ids are never changed, and no token is replaced *by* a special id (a stray
EOS or pad in the middle of a text would change what the model sees beyond the defense's intent). The
vocabulary is scanned in blocks, so memory stays bounded for large vocabularies (V = 49152 or more).
These are metric-DP / exponential-mechanism guarantees per token, not (epsilon, delta) of a sequence: their
``dp_events`` is None.

Sensitive tokens (SanText+, Yue et al. 2021; survey section 5.2.1, token-level perturbation): with ``keep_share`` >
0 only the client's *sensitive* tokens always go through the mechanism. The most frequent token types of its own
training text that together make up ``keep_share`` of its tokens are not sensitive (the words of its templates and
prose), and each of them goes through the mechanism only with probability ``frequent_rate`` (SanText+'s p); with
``numbers`` every token that spells a digit is sensitive however frequent (phone, account and card numbers are made
of frequent digit tokens) and is replaced by a uniformly random token of the same shape (a digit by any digit), so
numbers keep their form and tell nothing of their digits. A defense-aware attacker rebuilds the same split from its
own public text (``DefenseContext.examples``). The guarantee then covers the sensitive tokens only: the others are
sent as they are (most of the time), which is what keeps the model's text intact and its perplexity low.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Self

import torch
from pydantic import Field

from splitlm.errors import PrivacyError
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense
from splitlm.registry import ComponentSettings

_DIGITS = frozenset("0123456789")
BLOCK_BUDGET = 1 << 24  # elements of one (queries, vocabulary block) distance matrix: 64 MiB in float32


def _salt(name: str) -> int:
    return zlib.crc32(name.encode())


class SensitiveSettings(ComponentSettings):
    """Which tokens a token defense always replaces (SanText+'s sensitive words); the defaults replace all."""

    keep_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="SanText+: the most frequent token types of the client's own training text that together make "
        "up this share of its tokens are not sensitive and are replaced only with probability frequent_rate; every "
        "other token always goes through the mechanism. 0 = every token does (the plain mechanism). On the PII "
        "corpus with SmolLM2's tokenizer, 0.75 keeps about 100 types (the templates' words); with numbers, about half "
        "of the tokens are then replaced.",
    )
    frequent_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="With keep_share > 0: the probability that a non-sensitive token goes through the mechanism "
        "anyway (SanText+'s p; the paper uses 0.3).",
    )
    numbers: bool = Field(
        False,
        description="Every token that spells an ASCII digit is sensitive however frequent (phone and account numbers "
        "are made of the most frequent tokens) and is replaced by a uniformly random token of its shape (each digit "
        "any digit: '42' by '07') instead of going through the mechanism, so a number keeps its form and tells "
        "nothing of its digits.",
    )


class TokenDefense(InputDefense):
    """Shared machinery: which positions may change, the vocabulary in float32 blocks, the random stream."""

    @classmethod
    def create(cls, settings: ComponentSettings, context: DefenseContext) -> Self:
        return cls(context, **settings.model_dump())

    def __init__(
        self,
        context: DefenseContext,
        epsilon: float,
        keep_share: float = 0.0,
        frequent_rate: float = 0.0,
        numbers: bool = False,
    ) -> None:
        if not epsilon > 0:
            raise PrivacyError(
                f"{self.name}: epsilon must be > 0, got {epsilon}; set privacy.defenses.{self.name}.epsilon"
            )
        self.epsilon = float(epsilon)
        self.frequent_rate = float(frequent_rate)
        self.table = context.token_embeddings.detach()  # (V, d)
        vocab = int(self.table.shape[0])
        self.blocked = torch.zeros(vocab, dtype=torch.bool, device=self.table.device)  # (V,) never a replacement
        special = [i for i in context.special_ids if 0 <= i < vocab]
        if special:
            self.blocked[torch.tensor(special, device=self.table.device)] = True
        if bool(self.blocked.all()):
            raise PrivacyError(f"{self.name}: every token id is special, nothing to substitute; check the tokenizer")
        self.sq_norms = torch.cat([(rows.float() ** 2).sum(1) for _, _, rows in self._blocks(1)])  # (V,)
        self.generator = context.generator(_salt(self.name))
        # (V,) number shape of each token spelling a digit (``numbers``), -1 for the others, and each shape's ids
        self.shape_of = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.table.device)
        self.shapes: list[torch.Tensor] = []
        if numbers:
            if not context.token_texts:
                raise PrivacyError(
                    f"{self.name}: numbers=true needs the tokenizer's token texts, which this context lacks; set "
                    f"privacy.defenses.{self.name}.numbers=false"
                )
            self._number_shapes(context.token_texts[: self.vocab_size])
        # (V,) the tokens always replaced; None: every token (the plain mechanism)
        self.sensitive = self._sensitive(context, keep_share) if keep_share > 0 else None

    @classmethod
    def problems(cls, settings: SensitiveSettings, config: object, framework: object) -> list[str]:
        found = super().problems(settings, config, framework)
        if settings.frequent_rate > 0 and settings.keep_share == 0:
            found.append(
                f"privacy.defenses.{cls.name}.frequent_rate acts on the frequent tokens keep_share sets apart, and "
                "keep_share is 0 (every token is sensitive); set keep_share (e.g. 0.75) or drop frequent_rate"
            )
        return found

    def _sensitive(self, context: DefenseContext, keep_share: float) -> torch.Tensor:
        """(V,) True for the sensitive ids: all but the most frequent types making up ``keep_share`` of the tokens
        of ``context.examples``, and every id whose token spells a digit (``numbers``)."""
        ids = [t for example in context.examples for t in example.input_ids if 0 <= t < self.vocab_size]
        if not ids:
            raise PrivacyError(
                f"{self.name}: keep_share={keep_share} ranks tokens by their frequency in the client's training "
                f"text, and none was given; set privacy.defenses.{self.name}.keep_share=0 or build the defense with "
                "the client's examples"
            )
        counts = torch.bincount(torch.tensor(ids), minlength=self.vocab_size).float()
        counts[self.blocked.cpu()] = 0.0
        order = counts.argsort(descending=True, stable=True)
        share = counts[order].cumsum(0) / counts.sum().clamp_min(1.0)
        frequent = order[: int(torch.searchsorted(share, torch.tensor(keep_share))) + 1]
        sensitive = torch.ones(self.vocab_size, dtype=torch.bool)
        sensitive[frequent] = False
        sensitive[self.shape_of.cpu() >= 0] = True
        return sensitive.to(self.table.device)

    def _number_shapes(self, texts: Sequence[str]) -> None:
        """Group the non-special tokens that spell an ASCII digit by their shape (the text with every digit as 0):
        ``shape_of`` (V,) is a token's group or -1, ``shapes`` the ids of each group."""
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            if any(c in _DIGITS for c in text) and not bool(self.blocked[i]):
                groups.setdefault("".join("0" if c in _DIGITS else c for c in text), []).append(i)
        device = self.table.device
        self.shape_of = torch.full((self.vocab_size,), -1, dtype=torch.long, device=device)
        self.shapes = [torch.tensor(ids, dtype=torch.long, device=device) for ids in groups.values()]
        for group, ids in enumerate(self.shapes):
            self.shape_of[ids] = group

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[0])

    def _blocks(self, queries: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows as float32) over the vocabulary, sized so queries x rows stays in budget."""
        step = max(1, BLOCK_BUDGET // max(queries, 1))
        for start in range(0, self.vocab_size, step):
            stop = min(start + step, self.vocab_size)
            yield start, stop, self.table[start:stop].float()

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.table.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise PrivacyError(
                f"{self.name}: input ids span {int(ids.min())}..{int(ids.max())} but the head has {self.vocab_size} "
                "token vectors; use the tokenizer that belongs to the model"
            )
        change = attention_mask.to(self.table.device).bool() & ~self.blocked[ids]  # (B, T)
        if self.sensitive is not None:
            anyway = torch.rand(ids.shape, generator=self.generator, device=ids.device) < self.frequent_rate
            change &= self.sensitive[ids] | anyway
        if not bool(change.any()):
            return input_ids
        out = ids.clone()
        if self.shapes:  # numbers: a digit by a uniformly random digit, so the number tells nothing of its digits
            number = change & (self.shape_of[ids] >= 0)
            change &= ~number
            out[number] = self._renumber(ids[number])
        if bool(change.any()):
            out[change] = self.substitute(ids[change])
        return out.to(input_ids.device)

    def _renumber(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id (N,) replaced by a uniformly drawn id of its number shape (``numbers``)."""
        out = ids.clone()
        shape = self.shape_of[ids]
        for group in shape.unique().tolist():
            at = shape == group
            pool = self.shapes[group]
            pick = torch.randint(len(pool), (int(at.sum()),), generator=self.generator, device=ids.device)
            out[at] = pool[pick]
        return out

    def substitute(self, ids: torch.Tensor) -> torch.Tensor:
        """New ids (N,) for the ids (N,) of the positions that may change."""
        raise NotImplementedError


@DEFENSES.component
class Dxp(TokenDefense):
    name = "dxp"
    former_keys = (("privacy.dxp", "privacy.defenses.dxp"),)

    class Settings(SensitiveSettings):
        epsilon: float = Field(
            50.0,
            gt=0,
            description="d_x-privacy parameter per unit of embedding distance: each input embedding gets noise r*u "
            "(u uniform on the unit sphere, r ~ Gamma(d, 1/epsilon), so about d/epsilon long) and is snapped to the "
            "nearest token; smaller is stronger (the noise is about d/epsilon long: on SmolLM2-135M, d=576, epsilon "
            "50 / 40 / 30 change about 18 / 35 / 55% of the tokens, 100 almost none). Padding and special ids stay; "
            "metric DP, so no epsilon is reported.",
        )

    def substitute(self, ids: torch.Tensor) -> torch.Tensor:
        points = self.table[ids].float()  # (N, d)
        n, dim = points.shape
        direction = torch.randn(n, dim, generator=self.generator, device=points.device)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)  # uniform on the sphere
        # Gamma(d, 1/epsilon) for an integer shape d: the sum of d unit exponentials, scaled.
        radius = torch.empty(n, dim, device=points.device).exponential_(1.0, generator=self.generator).sum(1)
        return self.nearest(points + (radius / self.epsilon)[:, None] * direction)

    def nearest(self, points: torch.Tensor) -> torch.Tensor:
        """The id of the nearest non-special vocabulary vector (L2) to each point (N, d)."""
        best = torch.full((points.shape[0],), float("inf"), device=points.device)
        choice = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        for start, stop, rows in self._blocks(points.shape[0]):
            dist = self.sq_norms[None, start:stop] - 2.0 * points @ rows.T  # (N, block); + ||p||^2 is constant
            dist = dist.masked_fill(self.blocked[None, start:stop], float("inf"))
            value, index = dist.min(dim=1)
            better = value < best
            best = torch.where(better, value, best)
            choice = torch.where(better, index + start, choice)
        return choice


@DEFENSES.component
class SanText(TokenDefense):
    name = "santext"
    former_keys = (("privacy.santext", "privacy.defenses.santext"),)

    class Settings(SensitiveSettings):
        epsilon: float = Field(
            10.0,
            gt=0,
            description="Exponential-mechanism parameter: a token is replaced by w with probability proportional "
            "to exp(-epsilon * distance(E[x], E[w]) / 2) over the whole vocabulary (Euclidean distance of the token "
            "vectors); smaller is stronger. Padding and special ids stay; no epsilon is reported.",
        )

    def substitute(self, ids: torch.Tensor) -> torch.Tensor:
        # Gumbel-max over vocabulary blocks: an exact sample of softmax(-epsilon * distance / 2) without
        # holding the (N, V) distribution.
        points = self.table[ids].float()  # (N, d)
        own = self.sq_norms[ids]  # (N,)
        best = torch.full((points.shape[0],), -float("inf"), device=points.device)
        choice = ids.clone()
        for start, stop, rows in self._blocks(points.shape[0]):
            sq = (own[:, None] + self.sq_norms[None, start:stop] - 2.0 * points @ rows.T).clamp_min(0.0)
            sq = sq.masked_fill(ids[:, None] == torch.arange(start, stop, device=ids.device)[None], 0.0)
            score = -self.epsilon * sq.sqrt() / 2.0  # (N, block) log-probabilities up to a constant
            score = score.masked_fill(self.blocked[None, start:stop], -float("inf"))
            exponential = torch.empty_like(score).exponential_(1.0, generator=self.generator)
            score = score - exponential.clamp_min(1e-30).log()  # + Gumbel(0, 1)
            value, index = score.max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            choice = torch.where(better, index + start, choice)
        return choice


@DEFENSES.component
class CusText(TokenDefense):
    name = "custext"
    former_keys = (("privacy.custext", "privacy.defenses.custext"),)

    class Settings(SensitiveSettings):
        epsilon: float = Field(
            10.0,
            gt=0,
            description="Exponential-mechanism parameter: a token is replaced by one of its top_k nearest tokens w "
            "with probability proportional to exp(epsilon * s / 2), s the cosine similarity rescaled to [0, 1] "
            "within those candidates; smaller is stronger. Padding and special ids stay; no epsilon is reported.",
        )
        top_k: int = Field(20, ge=1, description="Candidates per token (its nearest tokens by cosine similarity).")

    def __init__(self, context: DefenseContext, epsilon: float, top_k: int, **sensitive: Any) -> None:
        super().__init__(context, epsilon, **sensitive)
        if top_k < 1:
            raise PrivacyError(f"custext: top_k must be >= 1, got {top_k}; set privacy.defenses.custext.top_k")
        self.top_k = min(int(top_k), int((~self.blocked).sum()))
        vocab, device = self.vocab_size, self.table.device
        self.candidates = torch.zeros(vocab, self.top_k, dtype=torch.long, device=device)  # (V, k) cached per id
        self.similarity = torch.zeros(vocab, self.top_k, device=device)  # (V, k) rescaled to [0, 1]
        self.known = torch.zeros(vocab, dtype=torch.bool, device=device)

    def _fill(self, ids: torch.Tensor) -> None:
        """Compute and cache the candidate sets of ``ids`` (unique, not yet known)."""
        query = self.table[ids].float()
        query = query / query.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (U, d)
        top = torch.full((ids.numel(), 0), -float("inf"), device=query.device)
        where = torch.zeros((ids.numel(), 0), dtype=torch.long, device=query.device)
        for start, stop, rows in self._blocks(ids.numel()):
            norms = self.sq_norms[start:stop].sqrt().clamp_min(1e-12)
            cosine = (query @ rows.T) / norms[None]  # (U, block)
            cosine = cosine.masked_fill(self.blocked[None, start:stop], -float("inf"))
            top, pick = torch.cat([top, cosine], 1).topk(min(self.top_k, top.shape[1] + stop - start), dim=1)
            where = torch.cat([where, torch.arange(start, stop, device=ids.device).expand(ids.numel(), -1)], 1)
            where = where.gather(1, pick)
        high, low = top[:, :1], top[:, -1:]
        self.candidates[ids] = where
        self.similarity[ids] = (top - low) / (high - low).clamp_min(1e-12)
        self.known[ids] = True

    def substitute(self, ids: torch.Tensor) -> torch.Tensor:
        missing = ids.unique()
        missing = missing[~self.known[missing]]
        if missing.numel():
            self._fill(missing)
        weights = torch.softmax(self.epsilon * self.similarity[ids] / 2.0, dim=1)  # (N, k)
        pick = torch.multinomial(weights, 1, generator=self.generator)  # (N, 1)
        return self.candidates[ids].gather(1, pick).squeeze(1)
