"""The ``centralized`` baseline: the unsplit model, same LoRA, same data order, same seed.

It is the reference a split run is measured against: with identical settings, ``sl`` reproduces its
per-step losses and final adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlm.config import Config
from splitlm.data import Batch
from splitlm.frameworks.loop import train
from splitlm.frameworks.registry import register
from splitlm.frameworks.setup import build_centralized, count_parameters, load_source, prepare_data
from splitlm.peft import load_trainable, save_trainable, trainable_parameters
from splitlm.runtime.client import EvalStats, StepStats
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.optim import PartyOptimizer


class CentralizedLearner:
    client_id = "centralized"

    def __init__(self, model: nn.Module, config: Config) -> None:
        self.model = model
        self.optimizer = PartyOptimizer(trainable_parameters(model), config.train)
        self.device = next(model.parameters()).device

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

    def traffic(self) -> tuple[int, int]:
        return 0, 0

    def save(self, folder: Path, with_optimizer: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_trainable(self.model, folder / "model.safetensors")
        if with_optimizer:
            self.optimizer.save(folder)

    def load(self, folder: Path) -> None:
        load_trainable(self.model, folder / "model.safetensors")
        self.optimizer.load(folder)

    def info(self) -> dict[str, Any]:
        return {
            "client_param_count": count_parameters(self.model),
            "server_param_count": 0,
            "trainable_param_count": sum(p.numel() for p in trainable_parameters(self.model)),
        }


@register("centralized")
def run(config: Config, resume: bool = False) -> dict[str, Any]:
    source = load_source(config)
    data = prepare_data(config, source.tokenizer())
    learner = CentralizedLearner(build_centralized(config, source), config)
    return train(config, learner, data, resume)
