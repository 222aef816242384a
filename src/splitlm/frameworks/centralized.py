"""``centralized``: the unsplit baseline. The whole model, same LoRA, same data order, same seed, one client
holding everyone's data and no server.

It is the reference a split run is measured against: with identical settings, ``sl`` reproduces its
per-step losses and final adapters. It runs through the same driver as every framework, as a federation of
one whose client computes the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from splitlm.config import Config
from splitlm.config.schema import TrainConfig
from splitlm.data import Batch, Example, collate
from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import build_centralized
from splitlm.frameworks.sl import train_in_sequence
from splitlm.models import ModelSource
from splitlm.peft import load_trainable, save_trainable, trainable_parameters, trainable_state
from splitlm.runtime.client import EvalStats, StepStats
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.optim import PartyOptimizer
from splitlm.transport import ByteMeter


class CentralizedClient:
    """The unsplit model as a federation member's client: nothing crosses a cut, nothing is metered."""

    client_id = "0"

    def __init__(self, model: nn.Module, train: TrainConfig) -> None:
        self.model = model
        self.parts = {"model": model}
        self.stages: dict[str, nn.Module] = {}
        self.optimizer = PartyOptimizer(trainable_parameters(model), train)
        self.device = next(model.parameters()).device
        self._meter = ByteMeter()

    @classmethod
    def build(cls, config: Config, source: ModelSource, train: TrainConfig) -> CentralizedClient:
        return cls(build_centralized(config, source), train)

    @property
    def meter(self) -> ByteMeter:
        return self._meter

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        self.model.train()
        losses, tokens = [], 0
        for batch in micro_batches:
            batch = batch.to(self.device)
            tokens += int(batch.attention_mask.sum())
            total, count = causal_lm_loss(self._logits(batch), batch.labels)
            losses.append(total.item() / max(count, 1))
            if count:
                (total / count / len(micro_batches)).backward()
        sq_norm = self.optimizer.grad_sq_norm()
        self.optimizer.step(self.optimizer.clip_coefficient(sq_norm))
        return StepStats(sum(losses) / len(losses), tokens, sq_norm**0.5, self.optimizer.lr())

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> EvalStats:
        self.model.eval()
        loss_sum, count = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            total, tokens = causal_lm_loss(self._logits(batch), batch.labels)
            loss_sum += float(total)
            count += tokens
        self.model.train()
        return EvalStats(loss_sum, count)

    @torch.no_grad()
    def sequence_losses(self, examples: list[Example], pad_id: int) -> list[float]:
        self.model.eval()
        batch = collate(examples, pad_id).to(self.device)
        losses = row_losses(self._logits(batch), batch.labels)
        self.model.train()
        return [float(x) for x in losses]

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError("the centralized baseline has one client; nothing is passed between clients")

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_trainable(self.model, folder / "model.safetensors")
        if with_optimizer:
            self.optimizer.save(folder)

    def load(self, folder: Path) -> None:
        load_trainable(self.model, folder / "model.safetensors")
        self.optimizer.load(folder)


def centralized_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    """The one client trains its local steps (its state carries over between rounds by itself)."""
    return train_in_sequence(fed, round_index, members)


CENTRALIZED = register(
    Framework(
        "centralized",
        centralized_round,
        "the unsplit baseline: the whole model on all clients' data in one process, same LoRA, data order and seed",
        split=False,
        make_client=CentralizedClient.build,
    )
)
