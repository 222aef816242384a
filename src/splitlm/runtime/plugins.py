"""Client plugins: named hooks into the client's own computation, for what never crosses the cut.

Whatever acts on a message is a mod (``transport/mods.py``). What acts on the client's private inputs or
its loss is a plugin: token-level defenses (DxP, SanText, CusText) rewrite the input ids, NoPeek adds a
loss term, SplitGuard swaps in fake labels for its probes and keeps a probe from training the client, the
truth recorder keeps the true tokens of the batches a tap records. ``SplitClient`` calls the hooks at
fixed points of its schedule; each defaults to doing nothing.

| hook              | when                                            | returns                                  |
|-------------------|-------------------------------------------------|------------------------------------------|
| ``on_batch``      | a training micro-batch starts                   |                                          |
| ``on_forward``    | before every head forward (training or eval)    | (key: client, step or -1, micro-batch)   |
| ``labels``        | before the loss (or the vanilla labels) is made | the labels to train on (B, T)            |
| ``tokens``        | step 2, before the head                         | the input ids the head sees (B, T)       |
| ``extra_loss``    | step 10, with the head's backward               | a scalar added to the client's loss      |
| ``keeps_gradients`` | before the optimizer step                     | False: drop this step's client gradients |
| ``after_step``    | after the optimizer step                        | (may raise, e.g. ``HijackAlarm``)        |
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from splitlm.data import Batch

Key = tuple[str, int, int]  # (client id, step, micro-batch)


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

    def extra_loss(
        self, embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        return None  # a scalar added to the client's loss; gradients flow into ``hidden`` only

    def keeps_gradients(self, step: int) -> bool:
        return True

    def after_step(self, step: int) -> None:
        pass


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
