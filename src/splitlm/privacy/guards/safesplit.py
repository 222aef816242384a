"""SafeSplit (Rieger et al., NDSS 2025; survey §5.2.3): the server checks each client's change to the parts it trained
in the frequency domain (static) and by how far it turns away from the other clients' changes (dynamic, rotational),
and flags a client whose change is an outlier with respect to the round's majority.

The parts watched (``parts``; ``guards/base.py`` says how each is read):

- ``trunk``: the trunk adapter it trained, before and after its local training, as the server holds it (the
  paper's view: the server-side model);
- ``client_side``: its client side (head [+ tail] adapters), which the server receives anyway to average it (sflv1,
  sflv2, gsfl) or to pass it on (sl). The paper's server never sees client models (sequential SL passes them from
  client to client); splitlm's server does, and a check that ignores them misses what only the client side carries.
  Measured on the default model (``benchmarks/security_integrity.py``, sflv2, 8 clients): a backdoor client that
  boosts its update (model replacement) leaves an ordinary-looking change on the shared trunk adapter (static 0.73x
  the median, honest 0.67-1.66x; 75 degrees, honest 68-82), while its client side is 76x the median distance at
  boost 12 and 5.5x at boost 3 (honest clients 0.9-1.4x in every round judged).

What is compared, for client i of a round and one part:

- static, in the frequency domain: for each LoRA module, the change of its weight delta, dW = B'A' - BA (out x in;
  LoRA's scaling alpha / r is left out: the same for every client), through an orthonormal 2-D DCT-II, of which the
  ``low_frequencies`` x ``low_frequencies`` lowest frequencies are kept; those of every module, concatenated, are the
  client's static features (a tensor outside a LoRA pair: the DCT of its change). Among the round's n clients,
  client i's score is the mean Euclidean distance from its features to those of its floor(n/2) nearest other
  clients (Krum's score: while fewer than half the clients are malicious, an honest client's nearest floor(n/2) are
  honest, and a malicious client's are all far when its change differs from the honest ones'). It is an outlier
  when its score exceeds ``ratio`` times the round's median score (only clients above the median can: a minority);
- dynamic, a rotational distance: the angle between the client's change of the part (every tensor's change,
  flattened) and the majority's change, the coordinate-wise median of the round's changes. It is an outlier when
  the angle exceeds ``max_angle`` degrees: past 90 its change works against the majority's.

A client is flagged when, in some part, it is an outlier in either check (``rule: any``: as in the paper, a change
is accepted only when both analyses find it benign), or only in both (``rule: both``). A round of fewer than
``min_clients`` clients (e.g. the rerun of a small round without its flagged client) is not judged.

The defaults were set on the tiny test model (4 and 8 clients, sflv1 / sflv2 / sl, several seeds): honest clients'
static ratios stayed below 2.5 and their angles below 65 degrees, while a client that sends the server the
opposite of its gradients turned 84 to 131 degrees away in sflv1 (above 90 from its second round on). Unboosted
subtler attacks (label flipping, smash poisoning, a backdoor) stayed within those bounds there: the round's most
deviant client, but not an outlier by these rules. In the sequential frameworks (sl, sflv2) the trunk adapter's
optimizer state is shared: a client's turn of few steps moves the adapter mostly along the momentum the previous
clients left, so a malicious client shows less there unless its turns are long.

Where this differs from the paper: the paper's server keeps the last N checkpoints of sequential SL, one per client,
and rolls back to the latest one both analyses find benign; here a round is the window and the unit of rollback (a
round is a transaction in splitlm), so a flagged client's round is run again without it, which computes exactly
what ``framework.leave_out`` computes. The paper's analyses read the server's last layer and its dynamic analysis
the angular velocity of the parameters; here every LoRA module of the trunk adapter is read (and of the client side,
which the paper does not watch), and the rotation is measured against the majority's change (the trunk's AdamW
steps have about the same size for every client, so a client's angular velocity alone hardly differs). The majority
score (Krum's), the median ratio and the angle bound are this module's choices.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
from typing import Any, Literal

import torch
from pydantic import Field

from splitlm.privacy.guards.base import GUARDS, PARTS, Guard, Parts, State, watch_problems
from splitlm.registry import ComponentSettings

LORA_FACTORS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


@functools.lru_cache(maxsize=64)
def dct_basis(n: int, k: int) -> torch.Tensor:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n`` (k, n), float64."""
    x = torch.arange(n, dtype=torch.float64)
    f = torch.arange(k, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * x + 1) * f / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis


def low_frequencies(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k x k lowest frequencies of the 2-D DCT-II of ``delta`` (k of the 1-D DCT for a vector), flattened; a
    tensor of more dimensions is taken as (its first dimension, the rest)."""
    delta = delta.detach().to("cpu", torch.float64)
    if delta.dim() == 0:
        return delta.reshape(1)
    if delta.dim() == 1:
        return dct_basis(delta.shape[0], min(k, delta.shape[0])) @ delta
    matrix = delta.reshape(delta.shape[0], -1)
    rows, cols = matrix.shape
    return (dct_basis(rows, min(k, rows)) @ matrix @ dct_basis(cols, min(k, cols)).T).flatten()


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two vectors in radians (0 when either is zero), computed as 2 atan2(|u - v|, |u + v|) of
    the unit vectors u, v, which stays accurate for small angles."""
    a, b = a.detach().to("cpu", torch.float64).flatten(), b.detach().to("cpu", torch.float64).flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    u, v = a / na, b / nb
    return float(2 * torch.atan2((u - v).norm(), (u + v).norm()))


def modules(state: State) -> dict[str, tuple[str, ...]]:
    """The keys of ``state`` grouped by module: a LoRA pair's (A, B) keys, or a single tensor's key."""
    grouped: dict[str, tuple[str, ...]] = {}
    for key in sorted(state):
        parts = key.split(".")
        for a, b in LORA_FACTORS:
            if a in parts:
                at = parts.index(a)
                partner = ".".join([*parts[:at], b, *parts[at + 1 :]])
                if partner in state:
                    grouped[".".join(parts[:at])] = (key, partner)
                break
            if b in parts:
                break
        else:
            grouped[key] = (key,)
    return grouped


def features(before: State, after: State, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(static, dynamic) features of one client's change of the trunk adapter from ``before`` to ``after``: the low
    DCT frequencies of each module's weight-delta change, and the change of every adapter tensor, flattened."""
    static = []
    for keys in modules(after).values():
        if len(keys) == 2:
            a0, b0 = (before[key].detach().to("cpu", torch.float64) for key in keys)
            a1, b1 = (after[key].detach().to("cpu", torch.float64) for key in keys)
            static.append(low_frequencies(b1 @ a1 - b0 @ a0, k))  # the change of the module's weight delta
        else:
            static.append(low_frequencies(after[keys[0]].double() - before[keys[0]].double(), k))
    change = [(after[key].detach().float() - before[key].detach().float()).flatten() for key in sorted(after)]
    return (torch.cat(static) if static else torch.zeros(1)), (torch.cat(change) if change else torch.zeros(1))


def rotations(changes: list[torch.Tensor]) -> list[float]:
    """Each change's angle to the majority's change: the coordinate-wise median of ``changes``."""
    majority = torch.stack(changes).median(dim=0).values
    return [angle(change, majority) for change in changes]


def majority_scores(points: list[torch.Tensor]) -> list[float]:
    """Each point's mean Euclidean distance to its floor(n/2) nearest other points (n: how many there are)."""
    stacked = torch.stack([p.to(torch.float64) for p in points])  # (n, d)
    distances = torch.cdist(stacked, stacked)  # (n, n)
    nearest = len(points) // 2
    scores = []
    for i in range(len(points)):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:nearest].mean()))
    return scores


def ratios(scores: list[float]) -> list[float]:
    """Each score over the median score (inf for a positive score when the median is 0)."""
    median = statistics.median(scores)
    if median > 0:
        return [s / median for s in scores]
    return [math.inf if s > 0 else 0.0 for s in scores]


def finite(value: float) -> float | None:
    """``value`` for a JSON summary (None for inf: a positive score over a median of 0)."""
    return value if math.isfinite(value) else None


@GUARDS.component
class SafeSplit(Guard):
    """SafeSplit's static (DCT) and dynamic (rotational) checks of each client's change to its trunk adapter and
    client side."""

    name = "safesplit"

    class Settings(ComponentSettings):
        low_frequencies: int = Field(
            8, ge=1, description="k: the static check keeps the k x k lowest DCT frequencies of each module's change."
        )
        ratio: float = Field(
            3.0,
            gt=1,
            allow_inf_nan=False,
            description="Static check: a client is an outlier when its distance to the majority (DCT domain) exceeds "
            "ratio x the round's median one.",
        )
        max_angle: float = Field(
            90.0,
            gt=0,
            le=180,
            description="Dynamic check: a client is an outlier when its change of the trunk adapter turns more than "
            "this many degrees away from the majority's change.",
        )
        rule: Literal["any", "both"] = Field(
            "any", description="Flag a client that is an outlier in either check (any, the paper's) or in both."
        )
        min_clients: int = Field(
            3, ge=3, description="Rounds with fewer clients (e.g. a small round's rerun) are not judged."
        )
        parts: list[Literal["trunk", "client_side"]] = Field(
            default_factory=lambda: list(PARTS),
            min_length=1,
            description="What is checked, each part on its own: trunk (each client's change to the trunk adapter, "
            "the paper's) and client_side (its change to its client side, which the server receives to average "
            "or pass on).",
        )

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.lock = threading.Lock()
        self.pending: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # client -> part -> features
        self.flags: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        key = f"privacy.guards.{cls.name}"
        return watch_problems(key, config, framework, settings.min_clients, settings.parts)

    def watches(self) -> frozenset[str]:
        return frozenset(self.settings.parts)

    def open_round(self, round_index: int, client_ids: list[str]) -> None:
        with self.lock:
            self.pending = {}

    def trained(self, round_index: int, client_id: str, before: Parts, after: Parts, steps: int) -> None:
        k = self.settings.low_frequencies
        found = {part: features(before[part], after[part], k) for part in self.settings.parts}
        with self.lock:
            self.pending[client_id] = found

    def check(self, round_index: int) -> dict[str, str]:
        with self.lock:
            pending, self.pending = dict(self.pending), {}
        clients = sorted(pending, key=lambda c: (len(c), c))
        entry: dict[str, Any] = {"round": round_index + 1, "clients": clients}
        if len(clients) < self.settings.min_clients:
            self.rounds.append({**entry, "judged": False})
            return {}
        settings = self.settings
        flagged: dict[str, str] = {}
        static: dict[str, dict[str, float | None]] = {}
        dynamic: dict[str, dict[str, float]] = {}
        for part in settings.parts:
            ratio = ratios(majority_scores([pending[c][part][0] for c in clients]))
            turned = [math.degrees(a) for a in rotations([pending[c][part][1] for c in clients])]
            static[part] = {c: finite(r) for c, r in zip(clients, ratio, strict=True)}
            dynamic[part] = dict(zip(clients, turned, strict=True))
            for client, s, d in zip(clients, ratio, turned, strict=True):
                outliers = [s > settings.ratio, d > settings.max_angle]
                if client in flagged or not (any(outliers) if settings.rule == "any" else all(outliers)):
                    continue
                flagged[client] = (
                    f"SafeSplit: its {part.replace('_', ' ')} change is {s:.2f}x the round's median distance to the "
                    f"majority in the DCT domain (ratio={settings.ratio:g}) and turns {d:.0f} degrees away from the "
                    f"majority's (max_angle={settings.max_angle:g})"
                )
                self.flags.append(
                    {"round": round_index + 1, "client": client, "part": part, "static": finite(s), "angle": d}
                )
        self.rounds.append(
            {**entry, "judged": True, "static": static, "angle": dynamic, "flagged": sorted(flagged)}
        )  # fmt: skip
        return flagged

    def report(self) -> dict[str, Any]:
        """``flags``: each flag raised, ``{"round" (1-based), "client", "part", "static", "angle"}`` (the part that
        gave it away, the client's distance to the majority there over the round's median one, and its angle to the
        majority's change in degrees); ``rounds``: every attempt at a round (a rerun without flagged clients is one
        more), with each client's two numbers per part (``static`` and ``angle``: part -> client -> number)."""
        return {"flags": list(self.flags), "rounds": list(self.rounds)}

    def state(self) -> dict[str, Any]:
        return self.report()

    def load_state(self, state: dict[str, Any]) -> None:
        self.flags = list(state.get("flags", []))
        self.rounds = list(state.get("rounds", []))
