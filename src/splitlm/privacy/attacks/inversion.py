"""Training-free inversions of smashed data: nearest-neighbour and embedding relaxation (EIA).

``nn_inversion`` maps every smashed vector to the token of its nearest neighbour (cosine) in a dictionary.
With no block in the head (``split.head_layers=0``) the dictionary is the token embedding matrix: a
Llama-family client then sends its raw token vectors, so this is exact (GPT-2 adds learned position vectors
before the first block, so it is not exact even there). Deeper cuts mix attention and MLP updates into each
vector, and the embeddings stop matching; there the dictionary is built from public text passed through the
attacker's copy of the client (``AttackContext.simulate``: the head per the threat model and the run's defenses;
each real position's output vector, labelled with its token), standardised per dimension by the dictionary's own
statistics (a few dimensions of some models' activations are huge).

``eia`` relaxes the discrete input: it optimises logits ``W`` (B, T, V) over the vocabulary, feeds the
head (per the threat model) ``softmax(W / temperature) @ E`` as input embeddings, pulls the head's output towards the
smashed data (cosine or L2 distance on real positions) and decodes ``argmax W``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from splitlm.errors import PrivacyError
from splitlm.privacy.attacks.base import AttackContext, Observation, bar, parse_options, register_attack

log = logging.getLogger(__name__)


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, T) ids of the token embeddings (V, d) nearest in cosine to ``vectors`` (B, T, d)."""
    table = F.normalize(embeddings.float(), dim=-1)  # (V, d)
    flat = F.normalize(vectors.float().reshape(-1, vectors.shape[-1]), dim=-1)  # (N, d)
    ids = torch.cat([(part @ table.T).argmax(-1) for part in flat.split(chunk)])  # (N,)
    return ids.reshape(vectors.shape[:-1])


@dataclass(frozen=True)
class NnOptions:
    dictionary: str = "auto"  # embeddings, aux (public text through the simulated client), or auto (by split)
    aux_rows: int = 400  # public rows for the aux dictionary
    aux: str | None = None  # a data name for the public text (default: the run's unseen rows)

    def check(self) -> None:
        if self.dictionary not in ("auto", "embeddings", "aux") or self.aux_rows < 1:
            raise PrivacyError(
                f"nn_inversion options: dictionary must be auto, embeddings or aux (got {self.dictionary!r}) and "
                "aux_rows >= 1"
            )


@dataclass
class NearestNeighbour:
    name: ClassVar[str] = "nn_inversion"
    options: NnOptions = NnOptions()

    def _dictionary(self, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors (N, d), their token ids (N,), mean (d,), std (d,)), cached per context and options."""
        threat = json.dumps(ctx.threat_identity(), sort_keys=True)
        key = ("nn_inversion", self.options.aux_rows, self.options.aux, threat)
        if key not in ctx.cache:
            vectors, ids = [], []
            with torch.no_grad():
                batches = ctx.aux_batches(self.options.aux_rows, 8, self.options.aux)
                for batch in bar(ctx, batches, "nn_inversion: building the dictionary"):
                    batch = batch.to(ctx.device)
                    out = ctx.simulate(batch.input_ids, batch.attention_mask)  # (B, T, d)
                    real = batch.attention_mask.bool()
                    vectors.append(out[real])
                    ids.append(batch.input_ids[real])
            table = torch.cat(vectors)
            mean, std = table.mean(0), table.std(0).clamp_min(1e-6)
            ctx.cache[key] = (F.normalize((table - mean) / std, dim=-1), torch.cat(ids), mean, std)
        return ctx.cache[key]

    @torch.no_grad()
    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        smashed = obs.smashed.to(ctx.device)
        embeddings = ctx.token_embeddings()
        if smashed.shape[-1] != embeddings.shape[-1]:
            raise PrivacyError(
                f"nn_inversion: smashed vectors have {smashed.shape[-1]} dims but token embeddings "
                f"{embeddings.shape[-1]}; a defense changed their width, use sip instead"
            )
        kind = self.options.dictionary
        if kind == "auto":
            kind = "embeddings" if ctx.spec.head_layers == 0 else "aux"
        if kind == "embeddings":
            return nearest_tokens(smashed, embeddings)
        table, ids, mean, std = self._dictionary(ctx)
        flat = F.normalize((smashed.float().reshape(-1, smashed.shape[-1]) - mean) / std, dim=-1)  # (N, d)
        nearest = torch.cat([(part @ table.T).argmax(-1) for part in flat.split(1024)])
        return ids[nearest].reshape(smashed.shape[:-1])


@register_attack("nn_inversion")
def make_nn_inversion(options: dict[str, str]) -> NearestNeighbour:
    parsed = parse_options(NnOptions, options)
    parsed.check()
    return NearestNeighbour(parsed)


@dataclass(frozen=True)
class EiaOptions:
    steps: int = 200  # AdamW steps on the vocabulary logits, in all
    full_steps: int = 40  # of which over the whole vocabulary; the rest over each position's top_k candidates
    top_k: int = 64  # candidates per position kept after full_steps (0 = never narrow)
    lr: float = 0.1  # AdamW learning rate of the vocabulary logits
    temperature: float = 0.1  # softmax temperature of the relaxed one-hot input
    distance: str = "cos"  # cos or l2, between the head's output and the smashed data

    def check(self) -> None:
        if self.steps < 0 or self.full_steps < 0 or self.top_k < 0 or self.lr <= 0 or self.temperature <= 0:
            raise PrivacyError(
                "eia options: steps, full_steps and top_k >= 0, lr > 0 and temperature > 0; fix them, e.g. steps=200"
            )
        if self.distance not in ("cos", "l2"):
            raise PrivacyError(f"eia option distance={self.distance!r}: expected cos or l2")


Mix = Callable[[torch.Tensor], torch.Tensor]  # (B, T, K) weights -> (B, T, d) input embeddings


@dataclass
class EmbeddingInversion:
    name: ClassVar[str] = "eia"
    options: EiaOptions

    @torch.enable_grad()
    def invert(self, ctx: AttackContext, obs: Observation) -> torch.Tensor:
        embeddings = ctx.token_embeddings().float()  # (V, d)
        mask = obs.attention_mask.to(ctx.device)
        vocab, steps = embeddings.shape[0], self.options.steps
        narrow = 0 < self.options.top_k < vocab and self.options.full_steps < steps
        full = self.options.full_steps if narrow else steps
        w = torch.zeros((*mask.shape, vocab), device=ctx.device)  # (B, T, V)
        w = self._optimise(ctx, obs, mask, w, lambda p: p @ embeddings, full, 0)
        if not narrow:
            return w.argmax(-1)
        top = w.topk(self.options.top_k, dim=-1)  # (B, T, K) values and ids
        table = embeddings[top.indices]  # (B, T, K, d)
        w = self._optimise(
            ctx, obs, mask, top.values, lambda p: torch.einsum("btk,btkd->btd", p, table), steps - full, full
        )
        return top.indices.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1)

    def _optimise(
        self, ctx: AttackContext, obs: Observation, mask: torch.Tensor, w: torch.Tensor, mix: Mix, steps: int, done: int
    ) -> torch.Tensor:
        """Run ``steps`` AdamW steps on the logits ``w`` (B, T, K), whose softmax mixes the inputs by ``mix``."""
        head = ctx.stage("head")
        real = mask.bool()
        target = obs.smashed.to(ctx.device).float()[real]  # (N, d)
        scale = target.pow(2).mean().clamp_min(1e-12)
        w = w.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([w], lr=self.options.lr, weight_decay=0.0)
        phase = "whole vocabulary" if done == 0 else f"top {self.options.top_k} candidates"
        for step in bar(ctx, range(done, done + steps), f"eia: {phase}"):
            inputs = mix((w / self.options.temperature).softmax(-1))  # (B, T, d)
            out = head(inputs_embeds=inputs, attention_mask=mask).float()[real]  # (N, d)
            if self.options.distance == "cos":
                loss = (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()
            else:
                loss = (out - target).pow(2).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == self.options.steps - 1:
                log.info("eia step %d/%d: distance %.4f", step + 1, self.options.steps, loss.item())
        return w.detach()


@register_attack("eia")
def make_eia(options: dict[str, str]) -> EmbeddingInversion:
    parsed = parse_options(EiaOptions, options)
    parsed.check()
    return EmbeddingInversion(parsed)
