"""``centralized``: the unsplit baseline. The whole model, same LoRA, same data order, same seed, one client
holding everyone's data and no server.

It is the reference a split run is measured against: with identical settings, ``sl`` reproduces its
per-step losses and final adapters. It runs through the same driver as every framework, as a federation of
one whose client computes the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from splitlm import progress
from splitlm.config import Config
from splitlm.config.schema import TrainConfig
from splitlm.data import Batch, Example, collate
from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import build_centralized, same_cut_and_rank, spec_of
from splitlm.frameworks.sl import train_in_sequence
from splitlm.models import ModelSource, family_for
from splitlm.models.families import get_module
from splitlm.peft import load_trainable, load_trainable_state, save_trainable, trainable_parameters, trainable_state
from splitlm.runtime.client import EvalStats, StepStats
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.rng import derive, seeded
from splitlm.transport import ByteMeter


class CentralizedClient:
    """The unsplit model as a federation member's client: nothing crosses a cut, nothing is metered.

    Its random draws (dropout) follow the split run's: the stream is reseeded where the split's parts begin
    (``runtime/rng.py``), so with the same seed the baseline and a split run draw the same dropout masks."""

    client_id = "0"

    def __init__(self, model: nn.Module, train: TrainConfig, seed: int = 0, cuts: dict[int, str] | None = None) -> None:
        self.model = model
        self.seed = seed
        self._key: tuple[str, int, int] | None = None  # (client, step, micro-batch) of the forward in progress
        blocks = get_module(
            model.get_base_model() if isinstance(model, PeftModel) else model, family_for(model.config).layers
        )
        for index, part in (cuts or {}).items():  # a part of the split model starts at block ``index``
            blocks[index].register_forward_pre_hook(lambda module, args, part=part: self._enter(part))
        self.parts = {"model": model}
        self.stages: dict[str, nn.Module] = {}
        self.optimizer = PartyOptimizer(trainable_parameters(model), train)
        self.device = next(model.parameters()).device
        self._meter = ByteMeter()

    @classmethod
    def build(cls, config: Config, source: ModelSource, train: TrainConfig) -> CentralizedClient:
        spec = spec_of(config)
        total = int(source.config().num_hidden_layers)
        cuts = {spec.head_layers: "trunk"} if spec.head_layers < total else {}
        if spec.mode == "ushape" and spec.tail_layers:
            cuts[total - spec.tail_layers] = "tail"
        return cls(build_centralized(config, source), train, config.seed, cuts)

    def _enter(self, part: str) -> None:
        if self._key is not None and self.model.training:
            torch.manual_seed(derive(self.seed, *self._key, part))

    @property
    def meter(self) -> ByteMeter:
        return self._meter

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        self.model.train()
        losses, tokens = [], 0
        for micro, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            tokens += int(batch.attention_mask.sum())
            self._key = (self.client_id, step, micro)
            with seeded(self.seed, *self._key, "head", devices=(self.device,)):
                logits = self._logits(batch)
            self._key = None
            total, count = causal_lm_loss(logits, batch.labels)
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
        for batch in progress.bar(batches, desc="evaluating", unit="batch"):
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

    def snapshot(self) -> dict[str, Any]:
        return {"state": {k: v.clone() for k, v in self.state().items()}, "optimizer": self.optimizer.snapshot()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        load_trainable_state(self.model, snapshot["state"], "the model")
        self.optimizer.restore(snapshot["optimizer"])

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
        checks=(same_cut_and_rank("trains one unsplit model with one LoRA rank"),),
    )
)
