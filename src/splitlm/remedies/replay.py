"""MultiSFL-style replay (survey §3.3): ``remedies: {replay: {fraction: F}}``.

From its second round on, a client replaces the fraction F of each batch's rows, at positions a seeded draw picks,
with examples its data order dealt it in its earlier rounds: it revisits earlier rounds' data while it learns new,
so the new cannot simply overwrite the old. The kept examples are recomputed from the data order (the same on every
machine and on a resume), so a resumed run or a restarted remote client keeps exactly the same ones; the first
round is as without replay. F = 0 is off.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, Remedy, RoundRows


def with_replay(rows: list[int], kept: list[int], fraction: float, rng: random.Random) -> list[int]:
    """``rows`` with ``round(fraction * len(rows))`` of them, at positions ``rng`` picks, replaced by examples drawn
    from ``kept``. Drawn without repeats where ``kept`` has enough; ``rows`` as they are while nothing is kept
    yet."""
    count = min(round(fraction * len(rows)), len(rows))
    if not kept or count == 0:
        return list(rows)
    positions = rng.sample(range(len(rows)), count)
    drawn = rng.sample(kept, count) if len(kept) >= count else rng.choices(kept, k=count)
    out = list(rows)
    for position, index in zip(positions, drawn, strict=True):
        out[position] = index
    return out


@REMEDIES.component
class Replay(Remedy):
    name = "replay"
    former_keys = (("train.replay", "remedies.replay.fraction"),)

    class Settings(ComponentSettings):
        fraction: float = Field(
            0.25,
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="This fraction of each batch's rows is drawn from the samples the client was dealt in its "
            "earlier rounds, so it needs framework.rounds > 1 (0: off).",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if settings.fraction > 0 and config.framework.rounds == 1:
            return [
                "remedies.replay: draws from the samples a client kept from its earlier rounds, and framework.rounds=1 "
                "has none; set framework.rounds > 1 or remove it from remedies"
            ]
        return []

    def batches(self, rows: RoundRows, step: int, batches: list[list[int]]) -> list[list[int]]:
        if not self.settings.fraction:
            return batches
        rng = rows.rng("replay", step)
        return [with_replay(batch, rows.earlier, self.settings.fraction, rng) for batch in batches]
