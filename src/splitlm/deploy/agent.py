"""A client in its own process (``splitlm client``) or Ray actor: its parts, data and state live here.

The ``ClientAgent`` answers the orchestrator's commands (``cmd:train``, ``cmd:get_state``, ``cmd:set_state``,
``cmd:evaluate``, ``cmd:accuracy``, ``cmd:checkpoint``, ``cmd:restore``, ``cmd:save_adapters``,
``cmd:finish``). While training it runs the same step loop as an in-process client (``Member.train_round``)
and sends the pipeline's requests through its own mods on the same stream.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splitlm.config import Config
from splitlm.errors import CheckpointError, ConfigError, ProtocolError
from splitlm.files import write_json
from splitlm.frameworks.base import client_steps
from splitlm.frameworks.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from splitlm.frameworks.driver import evaluate_now
from splitlm.frameworks.federation import Member, build_parties, link_seconds
from splitlm.privacy.client_attack import attack_reports
from splitlm.runtime.tracking import MetricLogger
from splitlm.transport import Message, Transport
from splitlm.transport.codecs import wire_limits
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import HEADER_LIMIT
from splitlm.transport.wire import Limits

log = logging.getLogger(__name__)


def check_client_id(config: Config, client_id: str) -> None:
    count = config.framework.num_clients
    if not client_id.isdigit() or int(client_id) >= count:
        raise ConfigError(f"client id {client_id!r}: expected 0..{count - 1} (framework.num_clients)")


class ClientAgent:
    """A client that answers the orchestrator's commands: its parts, data and state live here.

    It writes its own ``metrics.jsonl`` (its steps; and to the trackers of ``train.report_to``) and, at the end,
    ``summary.json`` into its ``output_dir``;
    ``report`` (networked clients) streams each step's record to the server as it happens. A command the
    server sends again after a broken stream is answered from a small cache, never carried out twice."""

    def __init__(
        self,
        config: Config,
        client_id: str,
        transport: Transport,
        session: str | None = None,
        progress: bool = False,
        report: Callable[[dict[str, Any]], None] | None = None,
        shares_files: bool = False,
    ) -> None:
        check_client_id(config, client_id)
        self.started = time.perf_counter()
        self.config = config
        self.client_id = client_id
        self.index = int(client_id)
        # a federation of this one client (no server here): what the one step loop runs in
        self.local = build_parties(config, "agent", client=self.index, transport=transport)
        self.data = self.local.data
        self.member = self.local.members[0]
        self.histogram = self.member.histogram
        self.out = Path(config.output_dir)
        self.logger = MetricLogger(config, self.out, name=f"client {client_id}")
        self.state_tensors = len(self.member.client.state())  # what its state (client side) carries on the wire
        self.records: list[dict[str, Any]] = []
        self.local.on_step = self._on_step
        self.session = session or secrets.token_hex(8)
        self.shares_files = shares_files  # Ray: the driver may name a folder of its own to export adapters to
        self.steps = client_steps(config)
        self.report = report
        self.attempt = 0
        self._snapshot: dict[str, Any] | None = None
        self._answered: OrderedDict[tuple[str, int], Message] = OrderedDict()
        self._summary: dict[str, Any] | None = None
        self.bar = tqdm(
            total=self.steps, desc=f"client {client_id}", unit="step", dynamic_ncols=True,
            disable=not (progress and config.train.progress),
        )  # fmt: skip

    def _on_step(self, member: Member, record: dict[str, Any]) -> None:
        evaluate_now(self.local, member, record)
        self.records.append(record)
        self.logger.step(record)
        if self.report is not None:
            self.report({**record, "attempt": self.attempt})
        self.bar.update(1)
        self.bar.set_postfix(round=record["round"], loss=f"{record['loss']:.4f}")

    def _rewound(self) -> None:
        """The client's steps went back (a restore or a rollback): its metrics and progress bar follow."""
        self.logger.rewind({self.client_id: self.member.steps_done})
        self.bar.n = self.member.steps_done
        self.bar.refresh()

    def hello(self) -> Message:
        member = self.member
        split = self.config.for_client(self.index).split  # this client's own cut (framework.clients)
        meta = {
            "examples": member.num_examples, "histogram": json.dumps(self.histogram),
            "param_count": member.info()["client_param_count"], "steps": self.steps, "session": self.session,
            "head_layers": split.head_layers, "tail_layers": split.tail_layers, "mode": split.mode, "ready": True,
            "state_tensors": self.state_tensors,
        }  # fmt: skip
        return Message("hello", self.client_id, -1, 0, {}, meta)

    def answer(self, command: Message) -> Message:
        """Carry out one command (once: a repeated one gets the same reply); a ``done`` or an ``error`` reply."""
        key = (str(command.meta.get("server", "")), int(command.meta.get("seq", 0)))  # a server's n-th command
        if key[1] and key in self._answered:
            return self._answered[key]
        reply = self._answer(command)
        if key[1]:
            self._answered[key] = reply
            while len(self._answered) > 16:
                self._answered.popitem(last=False)
        return reply

    def _answer(self, command: Message) -> Message:
        member, kind = self.member, command.kind.removeprefix("cmd:")
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"seq": command.meta.get("seq", 0)}
        try:
            if kind == "train":
                start = int(command.meta.get("start_step", member.steps_done))
                if start != member.steps_done:
                    raise ProtocolError(
                        f"the server expects client {self.client_id} at step {start}, but it is at step "
                        f"{member.steps_done}; restart the run with --resume"
                    )
                self.attempt = int(command.meta.get("attempt", 0))
                if "goal" in command.meta:  # a round a resume made longer (driver.reopen)
                    member.round_goal = int(command.meta["goal"])
                self.records = []
                self._rewound()  # lines a previous process left beyond this step go
                member.train_round(self.local, int(command.meta["round"]))
                meta["records"] = json.dumps(self.records)
            elif kind == "get_state":
                tensors = member.client.state()
            elif kind == "set_state":
                member.client.load_state(dict(command.tensors))
            elif kind == "evaluate":
                stats = member.evaluate(self.local)
                meta.update(loss_sum=stats.loss_sum, tokens=stats.tokens)
            elif kind == "accuracy":
                value = member.accuracy(self.local)
                meta["accuracy"] = "" if value is None else value
            elif kind == "snapshot":
                self._snapshot = member.snapshot()
            elif kind == "rollback":
                if self._snapshot is None:
                    raise ProtocolError(f"client {self.client_id} has no snapshot to roll back to")
                member.restore(self._snapshot)
                self._rewound()
            elif kind == "checkpoint":
                self.save_checkpoint(str(command.meta["name"]))
            elif kind == "restore":
                meta["restored"] = self.load_checkpoint(str(command.meta["name"]))
                meta.update(steps_done=member.steps_done, tokens=member.tokens)
            elif kind == "save_adapters":
                folder = command.meta.get("folder") if self.shares_files else None  # never a peer's path
                member.client.save(Path(str(folder)) if folder else self.out / "adapters", with_optimizer=False)
            elif kind == "finish":
                self.finish()
            else:
                raise ProtocolError(f"unknown command {command.kind!r}")
        except ProtocolError as error:
            return Message("error", self.client_id, -1, 0, {}, {**meta, "error": str(error)})
        return Message("done", self.client_id, -1, 0, tensors, meta)

    def finish(self) -> dict[str, Any]:
        """This client's own summary (its steps, tokens, traffic, time), also written to ``summary.json``."""
        if self._summary is not None:
            return self._summary
        self.bar.close()
        self.logger.close()
        member = self.member
        meter = member.meter
        summary = {
            "client": self.client_id, "steps": member.steps_done, "tokens": member.tokens,
            "last_loss": member.last_loss, "bytes_up": meter.up, "bytes_down": meter.down,
            "eval_bytes_up": meter.eval_up, "eval_bytes_down": meter.eval_down,
            "link_seconds": link_seconds(member.client),  # every message on the emulated link, eval included
            "wall_seconds": time.perf_counter() - self.started,
        }  # fmt: skip
        attacks = member.pipeline.attacks if member.pipeline is not None else []
        if attacks:  # privacy.client_attack: this client was malicious
            summary["privacy"] = {"client_attacks": attack_reports([attacks])}
        self.out.mkdir(parents=True, exist_ok=True)
        truth = self.local.truth
        if truth is not None:  # privacy.tap: the true tokens of its latest micro-batches, for ``splitlm audit``
            truth.write(self.out, list(truth.batches))
        write_json(self.out / "summary.json", summary)
        self._summary = summary
        return summary

    # --- this client's own checkpoints, named like the server's ------------------------------------------

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """What a checkpoint of this process holds: the client's parts, optimizer and progress."""
        member = self.member
        member.client.save(folder, with_optimizer=with_optimizer)
        write_json(folder / "member.json", {"steps_done": member.steps_done, "tokens": member.tokens})

    def load(self, folder: Path) -> None:
        member = self.member
        member.client.load(folder)
        state = json.loads((folder / "member.json").read_text())
        member.steps_done, member.tokens, member.round_goal = int(state["steps_done"]), int(state["tokens"]), None
        self._rewound()

    def save_checkpoint(self, name: str) -> None:
        """This client's state at the server's checkpoint ``name`` (the driver's checkpoint writer)."""
        save_checkpoint(self.out, self, self.member.steps_done, {"client": self.client_id}, name)

    def load_checkpoint(self, name: str) -> str:
        """Restore checkpoint ``name``, or this client's newest one before it (a client that missed ``name``);
        ``""`` for the newest of all. Returns the name restored."""
        found = [folder.name for folder in checkpoints(self.out) if not name or folder.name <= name]
        if not found:
            raise ProtocolError(f"client {self.client_id} has no checkpoint up to {name or 'now'} in {self.out}")
        try:
            load_checkpoint(self.out, self, found[-1])
        except CheckpointError as error:
            raise ProtocolError(f"client {self.client_id}: {error}") from None
        return found[-1]


def run_client(
    config: Config,
    client_id: str,
    address: str,
    token: str,
    ca: Path | None,
    client_cert: tuple[Path, Path] | None = None,
    connect_timeout: float = 30.0,
) -> dict[str, Any]:
    """One client in its own process: connect (the token is checked before anything is built or written),
    build its parts and data, answer the server's commands until it says finish."""
    check_client_id(config, client_id)
    session = secrets.token_hex(8)
    hello = Message("hello", client_id, -1, 0, {}, {"session": session, "ready": False})
    codec = config.transport.codec
    limits = wire_limits(codec.activations, codec.gradients, base=Limits(max_header_bytes=HEADER_LIMIT))
    connection = GrpcConnection(
        address, client_id, token, ca, client_cert, hello=hello, connect_timeout=connect_timeout, limits=limits
    )
    try:
        print(f"client {client_id}: connected to {address}; loading the model and data", flush=True)

        def report(record: dict[str, Any]) -> None:  # each step's record, to the server's metrics as it happens
            connection.send(Message("progress", client_id, -1, 0, {}, {"record": json.dumps(record)}))

        agent = ClientAgent(config, client_id, connection, session, progress=True, report=report)
        connection.allow_states(agent.state_tensors)  # the server sends it client sides of its own size
        connection.update_hello(agent.hello())
        print(f"client {client_id}: ready with {agent.member.num_examples} examples", flush=True)
        while True:
            try:
                command = connection.commands.get(timeout=5.0)
            except queue.Empty:
                continue
            if not isinstance(command, Message):
                raise ProtocolError(f"the server at {address} closed the stream")
            if command.kind == "cmd:finish":
                connection.expect_close()
            connection.send(agent.answer(command))
            if command.kind == "cmd:finish":
                connection.wait_closed(timeout=10.0)  # let the server end the stream after our last word
                return agent.finish()
    finally:
        connection.close()
