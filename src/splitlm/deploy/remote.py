"""The orchestrator's view of a client that runs elsewhere: a member whose operations are commands.

The server process (``splitlm serve``) and the Ray driver run the same round recipes and the same driver as
an in-process run; each of their federation members is a ``RemoteMember`` whose client is a proxy that
carries out what the recipes ask (train a round, get or set the client-side state, evaluate, checkpoint) by
sending commands to the client's agent (``deploy/agent.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitlm.data import Batch, Example
from splitlm.errors import ProtocolError
from splitlm.frameworks.checkpoint import TMP_PREFIX
from splitlm.frameworks.federation import Federation, Member
from splitlm.runtime.client import EvalStats, StepStats
from splitlm.transport import ByteMeter, Message

Command = Callable[[Message], Message]  # sends a command to the client and returns its ``done`` (or raises)


class RemoteClientProxy:
    """What the recipes ask of a client, carried out by the client's own process or actor."""

    def __init__(self, client_id: str, send: Command, meter: Callable[[], ByteMeter]) -> None:
        self.client_id = client_id
        self._send = send
        self._meter = meter

    @property
    def meter(self) -> ByteMeter:
        return self._meter()

    def command(self, kind: str, tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> Message:
        return self._send(Message(f"cmd:{kind}", self.client_id, -1, 0, dict(tensors or {}), dict(meta)))

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        raise ProtocolError("a remote client trains whole rounds (cmd:train), not single steps")

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.command("get_state").tensors)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.command("set_state", state)

    def evaluate(self, batches: list[Batch]) -> EvalStats:  # the client evaluates on its own copy of the held-out set
        reply = self.command("evaluate")
        return EvalStats(float(reply.meta["loss_sum"]), int(reply.meta["tokens"]))

    def sequence_losses(self, examples: list[Example], pad_id: int) -> list[float]:
        raise ProtocolError("a remote client scores its own held-out choices (cmd:accuracy)")

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """A checkpoint: the client writes its own state, on its own machine, under the checkpoint's name."""
        if with_optimizer:
            self.command("checkpoint", name=folder.parent.name.removeprefix(TMP_PREFIX))

    def load(self, folder: Path) -> None:
        """Resume: the client goes back to its own checkpoint of the same name."""
        self.command("restore", name=folder.parent.name)


@dataclass
class RemoteMember(Member):
    """A federation member whose client runs in another process or actor."""

    remote_examples: int = 0
    param_count: int = 0

    @property
    def num_examples(self) -> int:
        return self.remote_examples

    def info(self) -> dict[str, Any]:
        return {"client_param_count": self.param_count, "client_trainable_param_count": None}

    def train_round(self, fed: Federation, round_index: int) -> None:
        fed.check_stop()  # a stopped server asks for no more work (the clients finish what they have)
        proxy: RemoteClientProxy = self.client  # type: ignore[assignment]
        reply = proxy.command("train", round=round_index, steps=fed.local_steps, start_step=self.steps_done)
        for record in json.loads(str(reply.meta["records"])):
            self.steps_done = int(record["step"])
            self.tokens += int(record["tokens"])
            self.last_loss = float(record["loss"])
            fed.on_step(self, record)

    def evaluate(self, fed: Federation) -> EvalStats:
        return self.client.evaluate([])

    def accuracy(self, fed: Federation) -> float | None:
        proxy: RemoteClientProxy = self.client  # type: ignore[assignment]
        value = proxy.command("accuracy").meta.get("accuracy")
        return None if value is None or value == "" else float(value)


def remote_member(index: int, proxy: RemoteClientProxy, hello: Message) -> RemoteMember:
    return RemoteMember(
        index,
        proxy,
        [],
        None,
        json.loads(str(hello.meta["histogram"])),
        remote_examples=int(hello.meta["examples"]),
        param_count=int(hello.meta["param_count"]),
    )
