"""Client plugins: named hooks into the client's own computation, for what never crosses the cut.

Whatever acts on a message is a mod (``transport/mods.py``). What acts on the client's private inputs or
its loss is a plugin: token-level defenses (DxP, SanText, CusText) rewrite the input ids, NoPeek adds a
loss term, SplitGuard swaps in fake labels for its probes and keeps a probe from training the client, the
truth recorder keeps the true tokens of the batches a tap records, and the non-IID remedies
(``splitlm/remedies/``) select rows, adjust the training logits, add loss terms, decide how the head learns and
evaluate a personal model. ``SplitClient`` calls the hooks at fixed points of its schedule; each defaults to doing
nothing, and the client never learns a plugin's name.

| hook              | when                                            | returns                                  |
|-------------------|-------------------------------------------------|------------------------------------------|
| ``on_batch``      | a training micro-batch starts                   |                                          |
| ``on_forward``    | before every head forward (training or eval)    | (key: client, step or -1, micro-batch)   |
| ``labels``        | before the loss (or the vanilla labels) is made | the labels to train on (B, T)            |
| ``tokens``        | step 2, before the head                         | the input ids the head sees (B, T)       |
| ``embeddings``    | step 2, after ``tokens``, before the blocks     | the token vectors the head gets (B, T, d)|
| ``rows``          | step 2, after the head, before anything is sent | the rows to keep (indices) or None: all  |
| ``waits``         | a training step starts                          | False: no step-9 gradient this step      |
| ``trains_head``   | a training step starts                          | False: the head learns nothing this step |
| ``train_logits``  | step 6 (and any training exit), before the loss | the logits the client trains on          |
| ``global_scale``  | step 6, the split path's loss                   | its factor (the micro-batch's scale)     |
| ``follows_server``| step 10, with a step-9 gradient                 | False: only ``observe`` it               |
| ``own_loss``      | step 10, before the server's gradient           | the head's own loss (None: none)         |
| ``extra_loss``    | step 10, with the head's backward               | a scalar added to the client's loss      |
| ``head_loss``     | step 10, with the micro-batch's whole context   | a term added to the backward (None)      |
| ``local_logits``  | evaluation, after the head                      | logits without the server (None: split)  |
| ``on_compute``    | after the client's own computation              | (seconds it took)                        |
| ``keeps_gradients`` | before the optimizer step                     | False: drop this step's client gradients |
| ``after_step``    | after the optimizer step                        | (may raise, e.g. ``HijackAlarm``)        |
| ``step_metrics``  | after the optimizer step                        | numbers for the step's metrics record    |
| ``save``/``load`` | with the client's adapters (run, checkpoints)   | (its own trained state, in that folder)  |

``embeddings`` is used only when a plugin overrides it: the head then gets ``inputs_embeds`` (its own token vectors
of the ids, rewritten by the plugins) instead of the ids; with none, the head runs on the ids exactly as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitlm.data import Batch
from splitlm.transport import Message, Pending

Key = tuple[str, int, int]  # (client id, step, micro-batch)


def _same(logits: torch.Tensor) -> torch.Tensor:
    return logits


@dataclass
class Micro:
    """One training micro-batch as its operations pass it on within a step, and as plugins see it."""

    key: Key  # (client id, step, micro-batch)
    batch: Batch
    scale: float  # its share of the step's loss (1 / micro-batches)
    labels: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # the head's output (B, T, d)
    message: Message | None = None
    pending: Pending | None = None
    reply: Message | None = None  # the server's reply to its forward (step 4, or 5 in U-shape)
    sent: torch.Tensor | None = None  # the differentiable version of what was sent (B, T, d)
    trunk_out: torch.Tensor | None = None  # U-shape: a leaf on this side of the cut
    grad_up: torch.Tensor | None = None  # U-shape: gradient of the trunk output (B, T, d)
    grad: torch.Tensor | None = None  # gradient of the head output, from the server (B, T, d)
    train_logits: Callable[[torch.Tensor], torch.Tensor] = _same  # every plugin's ``train_logits``, in order

    @property
    def step(self) -> int:
        return self.key[1]


class ClientPlugin:
    """A plugin that does nothing; subclasses override the hooks they need."""

    name = "plugin"

    def on_batch(self, key: Key, batch: Batch) -> None:
        pass

    def on_forward(self, key: Key, training: bool) -> None:
        pass  # e.g. reseed a random stream for this piece of work (``runtime/rng.py``)

    def labels(self, step: int, labels: torch.Tensor) -> torch.Tensor:
        return labels  # (B, T), -100 where no loss

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids  # (B, T)

    def embeddings(
        self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return inputs_embeds  # (B, T, d): the token vectors the head's first block gets for ``input_ids``

    def rows(self, micro: Micro) -> torch.Tensor | None:
        return None  # indices (ascending) of the rows of ``micro`` that are sent and trained on; None: all

    def waits(self, step: int) -> bool:
        return True  # asks for the server's gradient at the cut (step 9) and waits for it

    def trains_head(self, step: int) -> bool:
        return True

    def train_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # (B, T, V): what the training loss is taken on (evaluation uses the plain logits)

    def global_scale(self, scale: float) -> float:
        return scale  # the factor of the split path's per-token loss

    def follows_server(self, step: int) -> bool:
        return True  # the head backpropagates the server's gradient (False: ``observe`` only)

    def own_loss(self, hidden: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor | None:
        return None  # a loss of the head's own, backpropagated into the head

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        pass  # the server's gradient at the cut, on a step where the head does not follow it

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        return None  # a term joined to the head's backward (already scaled), e.g. an early exit or alignment

    def local_logits(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return None  # evaluation: logits (B, T, V) computed on this side alone, instead of the split path

    def on_compute(self, seconds: float) -> None:
        pass  # the client's own computation just took ``seconds``

    def step_metrics(self, step: int) -> dict[str, float]:
        return {}

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        return None  # a scalar added to the client's loss; gradients flow into ``hidden`` only

    def keeps_gradients(self, step: int) -> bool:
        return True

    def after_step(self, step: int) -> None:
        pass

    def save(self, folder: Path) -> None:
        pass  # write this plugin's own trained state under ``folder`` (the client's adapter or checkpoint folder)

    def load(self, folder: Path) -> None:
        pass  # read back what ``save`` wrote


def _overrides(plugin: ClientPlugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(ClientPlugin, hook)


class Plugins:
    """A client's plugins in order; each method runs one hook through all of them."""

    def __init__(self, plugins: Sequence[ClientPlugin] = ()) -> None:
        self.plugins = list(plugins)

    def __iter__(self) -> Iterator[ClientPlugin]:
        return iter(self.plugins)

    def on_batch(self, key: Key, batch: Batch) -> None:
        for plugin in self.plugins:
            plugin.on_batch(key, batch)

    def on_forward(self, key: Key, training: bool) -> None:
        for plugin in self.plugins:
            plugin.on_forward(key, training)

    def labels(self, step: int, labels: torch.Tensor) -> torch.Tensor:
        for plugin in self.plugins:
            labels = plugin.labels(step, labels)
        return labels

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        for plugin in self.plugins:
            input_ids = plugin.tokens(input_ids, attention_mask)
        return input_ids

    @property
    def rewrites_embeddings(self) -> bool:
        return any(_overrides(p, "embeddings") for p in self.plugins)

    def embeddings(
        self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        for plugin in self.plugins:
            inputs_embeds = plugin.embeddings(inputs_embeds, input_ids, attention_mask)
        return inputs_embeds

    def rows(self, micro: Micro) -> torch.Tensor | None:
        """The rows every plugin keeps (the first plugin that selects decides; None: all)."""
        for plugin in self.plugins:
            keep = plugin.rows(micro)
            if keep is not None:
                return keep
        return None

    def waits(self, step: int) -> bool:
        return all(p.waits(step) for p in self.plugins)

    def trains_head(self, step: int) -> bool:
        return all(p.trains_head(step) for p in self.plugins)

    def train_logits(self, logits: torch.Tensor) -> torch.Tensor:
        for plugin in self.plugins:
            logits = plugin.train_logits(logits)
        return logits

    def global_scale(self, scale: float) -> float:
        for plugin in self.plugins:
            scale = plugin.global_scale(scale)
        return scale

    def follows_server(self, step: int) -> bool:
        return all(p.follows_server(step) for p in self.plugins)

    def own_loss(self, hidden: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor | None:
        terms = [t for p in self.plugins if (t := p.own_loss(hidden, labels, scale)) is not None]
        return None if not terms else terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def observe(self, hidden: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
        for plugin in self.plugins:
            plugin.observe(hidden, labels, grad, scale)

    def head_losses(self, micro: Micro) -> list[torch.Tensor]:
        """Every plugin's ``head_loss`` term of ``micro`` that has a graph, in order."""
        return [t for p in self.plugins if (t := p.head_loss(micro)) is not None and t.requires_grad]

    def local_logits(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        for plugin in self.plugins:
            logits = plugin.local_logits(hidden, batch)
            if logits is not None:
                return logits
        return None

    def on_compute(self, seconds: float) -> None:
        for plugin in self.plugins:
            plugin.on_compute(seconds)

    def step_metrics(self, step: int) -> dict[str, Any]:
        return {k: v for plugin in self.plugins for k, v in plugin.step_metrics(step).items()}

    @property
    def wants_embeddings(self) -> bool:
        return any(_overrides(p, "extra_loss") for p in self.plugins)

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        terms = [t for p in self.plugins if (t := p.extra_loss(embeddings, hidden, attention_mask)) is not None]
        return torch.stack(terms).sum() if terms else None

    def keeps_gradients(self, step: int) -> bool:
        return all(p.keeps_gradients(step) for p in self.plugins)

    def after_step(self, step: int) -> None:
        for plugin in self.plugins:
            plugin.after_step(step)

    def save(self, folder: Path) -> None:
        for plugin in self.plugins:
            plugin.save(folder)

    def load(self, folder: Path) -> None:
        for plugin in self.plugins:
            plugin.load(folder)


class Pace(ClientPlugin):
    """A slower device, simulated on this one (``framework.clients[i].speed``): after each piece of the client's own
    computation, sleep (pace - 1) x the time it took, so the figures of a run with mixed speeds are reproducible on
    one machine."""

    name = "pace"

    def __init__(self, pace: float) -> None:
        self.pace = pace
        self.seconds = 0.0  # the extra time slept so far

    def on_compute(self, seconds: float) -> None:
        if self.pace > 1.0 and seconds > 0:
            extra = (self.pace - 1.0) * seconds
            time.sleep(extra)
            self.seconds += extra
