"""Personalization by an early exit: SplitGP's multi-exit objective (survey §3.1.1), ``remedies: {multi_exit:
{exit_weight: w}}``.

In a U-shaped split the client holds both ends of the model, so it can also skip the server: its own tail
applied straight to its head's output is a small model of its own, the *early exit*. With ``multi_exit`` every
training micro-batch also takes that path, with the same labels, and the client minimizes

    (1 - w) x global loss + w x exit loss,        w = exit_weight

where the global loss is the split path's (tail after the server's trunk). Scaling the global loss by
(1 - w) scales everything its backward reaches: the tail's gradient from it, the gradient of the trunk output
sent at step 7, hence the trunk's gradient and the head gradient the server returns at step 9. The exit
loss's gradient (w-scaled) reaches the tail and the head directly, and the head's backward (step 10) is one
backward of both terms together: the server's gradient at the cut and the exit loss. On a step where the
head does not train (a frozen head, a step without step 9), the exit loss still trains the tail. The exit loss
is on the training logits (those every plugin's ``train_logits`` gives, e.g. logit-adjusted). The step's reported
loss stays the global one; the exit loss is reported next to it (``exit_loss`` in the step's metrics).

After its local training (before any aggregation) each member keeps its client side as the personalized model
(its per-member state, checkpointed with it); the evaluation of each round reports that model through its early
exit (``personal_eval_loss``, ``personal_accuracy``): the client's own head and tail alone, no request to the
server, not a byte sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field
from torch import nn

from splitlm.data import Batch
from splitlm.errors import ConfigError
from splitlm.models.split import Stage
from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy, State, loaded
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.plugins import ClientPlugin, Micro
from splitlm.runtime.rng import seeded


class MultiExit(ClientPlugin):
    """The multi-exit objective with early-exit weight ``weight`` (w, in (0, 1)) on one client's tail; inside
    ``personal()`` its evaluation takes the early exit."""

    name = "multi_exit"

    def __init__(self, weight: float, tail: nn.Module | None = None, stage: Stage | None = None, seed: int = 0) -> None:
        if not 0.0 < weight < 1.0:
            raise ValueError(f"the early exit's weight is {weight}; expected 0 < w < 1 (remedies.multi_exit)")
        self.weight = weight
        self.tail, self.stage, self.seed = tail, stage, seed
        self.active = False  # inside ``personal()``: evaluation takes the early exit
        self._exits: dict[int, float] = {}  # this step's exit loss per micro-batch

    def global_scale(self, scale: float) -> float:
        """The factor of the split path's per-token loss: (1 - w) x the micro-batch's ``scale``."""
        return scale * (1.0 - self.weight)

    def exit_loss(self, logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[torch.Tensor | None, float]:
        """The early exit's loss to backpropagate (w x ``scale`` x per-token loss; None when it has no token or
        nothing to train) and its per-token value. logits: (B, T, V) of tail(head(x)); labels: (B, T)."""
        total, count = causal_lm_loss(logits, labels)
        value = total.item() / max(count, 1)
        if not count or not total.requires_grad:
            return None, value
        return total / count * (self.weight * scale), value

    def _exit(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        assert self.tail is not None and self.stage is not None, "an early exit needs the client's tail"
        return self.tail(
            hidden_states=hidden.to(device=self.stage.device, dtype=self.stage.dtype),
            attention_mask=batch.attention_mask,
        )

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        """The early exit's loss of ``micro`` (w x scale x per-token loss of tail(head output), on the training
        logits), recorded for the step's metrics."""
        assert micro.hidden is not None and micro.labels is not None and self.stage is not None
        client, step, index = micro.key
        with seeded(self.seed, client, step, index, "exit", devices=(self.stage.device,)):
            logits = micro.train_logits(self._exit(micro.hidden, micro.batch))
        loss, self._exits[index] = self.exit_loss(logits, micro.labels, micro.scale)
        return loss

    def step_metrics(self, step: int) -> dict[str, float]:
        exits, self._exits = [self._exits[m] for m in sorted(self._exits)], {}
        return {"exit_loss": sum(exits) / len(exits)} if exits else {}

    def local_logits(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return self._exit(hidden, batch) if self.active else None

    @contextlib.contextmanager
    def personal(self) -> Iterator[MultiExit]:
        """Evaluate the personalized model: inside, the client's ``evaluate`` and ``sequence_losses`` take the early
        exit (its head, then its own tail; no request to the server, no byte sent). Training is unaffected.
        Nests; yields the plugin.

            with plugin.personal():
                personal_loss = client.evaluate(batches).loss
        """
        if self.tail is None:
            raise ConfigError("this client has no early exit to evaluate: it has no tail; use split.mode=ushape")
        previous, self.active = self.active, True
        try:
            yield self
        finally:
            self.active = previous


def early_exit(client: Any) -> MultiExit | None:
    """``client``'s early exit (its ``MultiExit`` plugin), if it has one here."""
    return next((p for p in getattr(client, "plugins", ()) if isinstance(p, MultiExit)), None)


@REMEDIES.component
class MultiExitRemedy(Remedy):
    name = "multi_exit"
    former_keys = (
        ("framework.personalize", "remedies: [multi_exit]"),
        ("framework.exit_weight", "remedies.multi_exit.exit_weight"),
    )

    class Settings(ComponentSettings):
        exit_weight: float = Field(
            0.5,
            gt=0,
            lt=1,
            allow_inf_nan=False,
            description="The early-exit loss's weight w; the client minimizes (1 - w) x global + w x exit.",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = []
        if framework is not None and not framework.split:
            problems.append(
                "remedies.multi_exit: a split client's early exit on its head's output; "
                f"framework.name={framework.name} has no client side, so remove it from remedies"
            )
        if config.split.mode != "ushape":
            problems.append(
                "remedies.multi_exit: the early exit is the client's tail applied to its head's output, so it needs "
                "split.mode=ushape"
            )
        return problems

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        if "tail" not in setup.parts:
            raise ValueError(f"client {setup.client_id}: an early exit needs a tail (a U-shaped split)")
        return MultiExit(self.settings.exit_weight, setup.parts["tail"], setup.stages["tail"], setup.seed)

    def member_state(self, client: Any, previous: State | None) -> State | None:
        """SplitGP: the member's client side as its own local training left it, before any aggregation."""
        return {k: v.detach().clone() for k, v in client.state().items()}

    def personal(self, client: Any, state: State | None) -> contextlib.AbstractContextManager[Any] | None:
        plugin = early_exit(client)
        if state is None or plugin is None:
            return None
        return _personal(client, state, plugin)


@contextlib.contextmanager
def _personal(client: Any, state: State, plugin: MultiExit) -> Iterator[None]:
    with loaded(client, state), plugin.personal():
        yield
