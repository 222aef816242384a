"""The orchestrator's view of a client that runs elsewhere: a member whose operations are commands.

The server process (``splitlm serve``) and the Ray driver run the same round recipes and the same driver as
an in-process run; each of their federation members is a ``RemoteMember`` whose client is a proxy that
carries out what the recipes ask (train a round, get or set the client-side state, evaluate, checkpoint,
snapshot and roll back) by sending commands to the client's agent (``deploy/agent.py``).

A networked client can be lost (its process dies, restarts, or is cut off or stalled past the grace period).
Then its commands raise ``ClientGone``, the driver rolls the round back and does it again without it, and when
the client is back it *rejoins*: it restores its own newest checkpoint (up to the server's newest) and, before it
next trains, takes the current client side, as a client left out of those rounds would have. A process that was
only cut off rejoins the same way: until it has, no command reaches it, so nothing it still does from the round
it was left out of reaches the others.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitlm.data import Batch, Example
from splitlm.errors import ClientGone, ProtocolError
from splitlm.frameworks.checkpoint import TMP_PREFIX
from splitlm.frameworks.federation import Federation, Member
from splitlm.runtime.client import EvalStats, StepStats
from splitlm.transport import ByteMeter, Message

log = logging.getLogger(__name__)

# Sends a command to the client (only to the process of the given session, when not None) and returns its
# ``done`` (or raises).
Command = Callable[[Message, str | None], Message]


class RemoteClientProxy:
    """What the recipes ask of a client, carried out by the client's own process or actor.

    ``session()`` names the client process now connected and ``wait_connected(timeout)`` waits for one (both
    given for networked clients, which ``can_fail``); a command to a process other than the one this member
    last worked with, or to a client left out of a round (``left_out``), raises ``ClientGone`` until it rejoins."""

    def __init__(
        self,
        client_id: str,
        send: Command,
        meter: Callable[[], ByteMeter],
        session: Callable[[], str] | None = None,
        wait_connected: Callable[[float], bool] | None = None,
        shares_files: bool = False,
    ) -> None:
        self.client_id = client_id
        self._send = send
        self._meter = meter
        self._session = session
        self._wait_connected = wait_connected
        self.can_fail = session is not None
        self.shares_files = shares_files  # the client sees the driver's files (Ray actors on one cluster)
        self.expected_session = self.session()
        self.left_out = False  # lost in a round and rolled back: it must rejoin before it gets any other command

    @property
    def meter(self) -> ByteMeter:
        return self._meter()

    def session(self) -> str:
        return self._session() if self._session is not None else ""

    def connected(self, timeout: float) -> bool:
        return self._wait_connected(timeout) if self._wait_connected is not None else True

    def command(
        self, kind: str, tensors: dict[str, torch.Tensor] | None = None, rejoining: bool = False, **meta: Any
    ) -> Message:
        if self.left_out and not rejoining:
            raise ClientGone([self.client_id], "left out of a round; it rejoins at the next round")
        message = Message(f"cmd:{kind}", self.client_id, -1, 0, dict(tensors or {}), dict(meta))
        return self._send(message, None if rejoining or not self.can_fail else self.expected_session)

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

    def snapshot(self) -> None:
        """The client keeps the snapshot itself (its state never travels for it)."""
        self.command("snapshot")

    def restore(self, snapshot: None) -> None:
        self.command("rollback")

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """A checkpoint: the client writes its own state, on its own machine, under the checkpoint's name. The
        run's final adapters (``with_optimizer=False``) it writes into ``folder`` only where it sees the driver's
        files; a networked client writes them into its own ``output_dir``."""
        if with_optimizer:
            self.command("checkpoint", name=folder.parent.name.removeprefix(TMP_PREFIX))
        elif self.shares_files:
            self.command("save_adapters", folder=str(folder))

    def load(self, folder: Path) -> None:
        """Resume: the client goes back to its own checkpoint of the same name."""
        self.command("restore", name=folder.parent.name, rejoining=True)
        self.expected_session, self.left_out = self.session(), False


@dataclass
class RemoteMember(Member):
    """A federation member whose client runs in another process or actor."""

    remote_examples: int = 0
    param_count: int = 0
    attempt: int = 0  # which attempt at a round the client's step records belong to (late ones are dropped)
    logged: set[int] = field(default_factory=set)  # steps of the current attempt already passed to on_step
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_examples(self) -> int:
        return self.remote_examples

    @property
    def proxy(self) -> RemoteClientProxy:
        return self.client  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        return {"client_param_count": self.param_count, "client_trainable_param_count": None}

    def train_round(self, fed: Federation, round_index: int) -> None:
        fed.check_stop()  # a stopped server asks for no more work (the clients finish what they have)
        with self._lock:
            self.attempt += 1
            self.logged = set()
            attempt = self.attempt
        # a round reopened by a resume that made the run longer (driver.reopen) ends at its new length
        goal = {"goal": self.round_goal} if self.round_goal is not None else {}
        reply = self.proxy.command(
            "train", round=round_index, steps=fed.local_steps, start_step=self.steps_done, attempt=attempt, **goal
        )
        for record in json.loads(str(reply.meta["records"])):
            self.steps_done = int(record["step"])
            self.tokens += int(record["tokens"])
            self.last_loss = float(record["loss"])
            self.progress(fed, record, attempt)
        self.round_goal = None

    def progress(self, fed: Federation, record: dict[str, Any], attempt: int | None = None) -> None:
        """A step record, streamed as the client takes the step or with the round's reply: logged once."""
        fields = {"step": (int,), "round": (int,), "loss": (int, float), "tokens": (int,)}
        wrong = [k for k, kinds in fields.items() if type(record.get(k)) not in kinds]  # not bool, not None
        optional = {"comm_seconds": (int, float)}  # absent from an older client's records
        wrong += [k for k, kinds in optional.items() if k in record and type(record[k]) not in kinds]
        if wrong or record.get("client") != self.client_id:
            raise ProtocolError(
                f"a step record from client {self.client_id} has no valid {', '.join(wrong) or 'client'}; "
                "client and server must run the same splitlm version"
            )
        with self._lock:
            current = attempt if attempt is not None else int(record.pop("attempt", self.attempt))
            step = int(record["step"])
            if current != self.attempt or step in self.logged:
                return
            self.logged.add(step)
        record.pop("attempt", None)
        fed.on_step(self, record)

    def restore(self, snapshot: dict[str, Any], gone: bool = False) -> None:
        with self._lock:
            self.attempt += 1  # records still on their way from the rolled-back attempt are dropped
        if not gone:
            super().restore(snapshot, gone)
            return
        self.restore_progress(snapshot)
        self.stale = True  # it rejoins, then takes the client side
        if self.proxy.can_fail:
            # Restarted or not (a process only cut off or stalled is still mid-round), it goes back to its
            # checkpoint before it works again, and until then gets no command.
            self.proxy.left_out = True

    def ready(self, fed: Federation, deadline: float, rejoin: bool = True) -> bool:
        proxy = self.proxy
        if not proxy.can_fail:
            return True
        if not proxy.connected(max(0.0, deadline - time.monotonic())):
            return False
        if proxy.session() == proxy.expected_session and not proxy.left_out:
            return True
        if not rejoin:
            return False
        try:
            self.rejoin(fed)
        except ClientGone as gone:  # lost again on the way back: it stays out for now
            log.warning("client %s could not rejoin: %s", self.client_id, gone.reason)
            return False
        return True

    def rejoin(self, fed: Federation) -> None:
        """A client left out of a round (its process restarted, or the same one, cut off or stalled past the
        grace period) goes back to its own newest checkpoint (up to the server's newest) and takes the current
        client side before it next trains."""
        proxy = self.proxy
        proxy.expected_session = proxy.session()
        reply = proxy.command("restore", name=fed.last_checkpoint or "", rejoining=True)
        self.steps_done, self.tokens = int(reply.meta["steps_done"]), int(reply.meta["tokens"])
        self.round_goal, self.stale = None, True
        proxy.left_out = False
        log.warning("client %s rejoined from its checkpoint %s", self.client_id, reply.meta.get("restored"))

    def evaluate(self, fed: Federation) -> EvalStats:
        return self.client.evaluate([])

    def accuracy(self, fed: Federation) -> float | None:
        value = self.proxy.command("accuracy").meta.get("accuracy")
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
