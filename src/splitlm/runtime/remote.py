"""Client and server as separate processes (``splitlm serve`` / ``splitlm client``) over gRPC.

The server process hosts the trunk and the aggregator and runs the *same* round recipes as an in-process
run; each of its federation members is a ``RemoteMember`` whose operations are commands sent down that
client's stream (``cmd:train``, ``cmd:get_state``, ``cmd:set_state``, ``cmd:evaluate``, ``cmd:accuracy``,
``cmd:save_adapters``, ``cmd:finish``). The client process holds its head [+ tail], data and labels, and
answers commands; while training it sends the pipeline's requests on the same stream. With the same config
and seed, a networked run computes what the in-process run computes.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitlm.config import Config
from splitlm.errors import CheckpointError, ConfigError, ProtocolError
from splitlm.frameworks.federation import (
    Federation,
    Member,
    assign_groups,
    client_steps,
    drive_rounds,
    make_member,
    make_server,
    partition,
    route,
)
from splitlm.frameworks.loop import prepare_output
from splitlm.frameworks.setup import load_source, prepare_data
from splitlm.runtime.client import EvalStats
from splitlm.transport.base import ByteMeter
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import GrpcServer
from splitlm.transport.messages import Message
from splitlm.transport.security import load_tokens

log = logging.getLogger(__name__)


# --- server side ------------------------------------------------------------------------------------------


class RemoteClientProxy:
    """What the recipes ask of a client, carried out by the client process."""

    def __init__(self, grpc_server: GrpcServer, client_id: str, timeout: float) -> None:
        self.grpc_server = grpc_server
        self.client_id = client_id
        self.timeout = timeout

    def command(self, kind: str, tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> Message:
        message = Message(f"cmd:{kind}", self.client_id, -1, 0, dict(tensors or {}), dict(meta))
        return self.grpc_server.command(self.client_id, message, self.timeout)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.command("get_state").tensors)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.command("set_state", state)

    def evaluate(self, batches: list) -> EvalStats:  # the client evaluates on its own copy of the held-out set
        reply = self.command("evaluate")
        return EvalStats(float(reply.meta["loss_sum"]), int(reply.meta["tokens"]))

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """A round checkpoint: the client writes its own state, on its own machine, under the same round."""
        if with_optimizer:
            self.command("checkpoint", round=_round_of(folder.parent))

    def load(self, folder: Path) -> None:
        """Resume: the client goes back to its own checkpoint of the round the server resumes from."""
        self.command("restore", round=_round_of(folder.parent))


def _round_of(checkpoint: Path) -> int:
    """``checkpoints/step-000003`` (or its temporary ``.tmp-step-000003``) -> 3."""
    try:
        return int(checkpoint.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{checkpoint} is not a round checkpoint folder") from None


@dataclass
class RemoteMember(Member):
    """A federation member whose client runs in another process."""

    remote_examples: int = 0
    param_count: int = 0

    @property
    def num_examples(self) -> int:
        return self.remote_examples

    def client_param_count(self) -> int:
        return self.param_count

    def train_round(self, fed: Federation, round_index: int) -> None:
        proxy: RemoteClientProxy = self.client  # type: ignore[assignment]
        reply = proxy.command("train", round=round_index, steps=fed.local_steps, start_step=self.steps_done)
        for record in json.loads(str(reply.meta["records"])):
            fed.log_step(record)
            self.steps_done = int(record["step"])
            self.tokens += int(record["tokens"])
            self.last_loss = float(record["loss"])

    def accuracy(self, fed: Federation) -> float | None:
        proxy: RemoteClientProxy = self.client  # type: ignore[assignment]
        value = proxy.command("accuracy").meta.get("accuracy")
        return None if value is None or value == "" else float(value)


class _MeterView:
    def __init__(self, meter: ByteMeter) -> None:
        self.meter = meter


def serve(
    config: Config,
    address: str,
    certs: Path | None,
    tokens_file: Path,
    mutual_tls: bool = False,
    connect_timeout: float = 600.0,
    resume: bool = False,
) -> dict[str, Any]:
    """Host the trunk and the aggregator; wait for every client; run the configured framework."""
    from splitlm.frameworks.federation import check_supported
    from splitlm.frameworks.recipes import ROUNDS

    check_supported(config)
    if config.privacy.tap.enabled:
        raise ConfigError("privacy.tap records in-process runs only: drop it from the server's config")
    fw = config.framework
    if fw.name not in ROUNDS:
        raise ConfigError(f"framework.name={fw.name} does not run across processes; choose from {sorted(ROUNDS)}")
    tokens = load_tokens(tokens_file)
    expected = [str(i) for i in range(fw.num_clients)]
    if sorted(tokens.values()) != sorted(expected):
        raise ConfigError(
            f"{tokens_file} names clients {sorted(tokens.values())}, but framework.num_clients={fw.num_clients} "
            f"needs exactly {expected}"
        )
    out = prepare_output(config, resume=resume)
    source = load_source(config)
    # gsfl groups by label mix need the clients' histograms: the trunk is built once they said hello.
    grpc_server = GrpcServer(None, tokens, address, certs, mutual_tls, work_needs_command=True)  # type: ignore[arg-type]
    grpc_server.start()
    print(f"splitlm server listening on {address.rsplit(':', 1)[0]}:{grpc_server.port}", flush=True)
    try:
        for client_id in expected:
            if not grpc_server.wait_for(client_id, connect_timeout):
                raise ProtocolError(f"client {client_id} did not connect within {connect_timeout:.0f} s")
        hellos = {cid: grpc_server.connections[cid].hello for cid in expected}
        histograms = [json.loads(str(hellos[cid].meta["histogram"])) for cid in expected]
        groups = assign_groups(config, histograms) if fw.name == "gsfl" else []
        server = make_server(config, source, groups)
        grpc_server.split_server = server
        members: list[Member] = []
        for index, client_id in enumerate(expected):
            hello = hellos[client_id]
            route(config, server, index, groups)
            members.append(
                RemoteMember(
                    index,
                    RemoteClientProxy(grpc_server, client_id, fw.round_timeout_s),  # type: ignore[arg-type]
                    _MeterView(grpc_server.connections[client_id].meter),
                    [],
                    None,  # type: ignore[arg-type]
                    histograms[index],
                    remote_examples=int(hello.meta["examples"]),
                    param_count=int(hello.meta["param_count"]),
                )
            )
        fed = Federation(config, server, members, None, fw.steps_per_round(config.train.steps), groups)
        summary = drive_rounds(config, fed, ROUNDS[fw.name], out, resume=resume)
        for kind in ("save_adapters", "finish"):  # each client writes its own adapters, on its own machine
            for member in members:
                try:
                    member.client.command(kind)  # type: ignore[union-attr]
                except ProtocolError as error:  # the run is complete either way
                    log.warning("%s on client %s: %s", kind, member.client_id, error)
        return summary
    finally:
        grpc_server.stop()


# --- client side ------------------------------------------------------------------------------------------


def _client_checkpoint(out: Path, round_number: int) -> Path:
    return out / "checkpoints" / f"round-{round_number:06d}"


def _save_client_checkpoint(out: Path, member: Member, round_number: int) -> None:
    """This client's state at a round boundary, written to a temporary folder and renamed; keeps two."""
    final = _client_checkpoint(out, round_number)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    member.client.save(tmp, with_optimizer=True)
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"steps_done": member.steps_done, "tokens": member.tokens}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in final.parent.iterdir() if p.name.startswith("round-"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _load_client_checkpoint(out: Path, member: Member, round_number: int) -> None:
    folder = _client_checkpoint(out, round_number)
    if not folder.is_dir():
        raise ProtocolError(f"client {member.client_id} has no checkpoint of round {round_number} in {folder}")
    member.client.load(folder)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    progress = json.loads((folder / "progress.json").read_text())
    member.steps_done, member.tokens = int(progress["steps_done"]), int(progress["tokens"])


class _LocalLog:
    """Collects the step records of one ``cmd:train`` to send back with its ``done``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log_step(self, record: dict[str, Any]) -> None:
        self.records.append(record)


class ClientAgent:
    """A client that answers the orchestrator's commands: its parts, data and state live here.

    Used by ``splitlm client`` (commands over gRPC) and by the Ray simulation (commands as actor calls).
    """

    def __init__(self, config: Config, client_id: str, transport: Any) -> None:
        fw = config.framework
        if not client_id.isdigit() or int(client_id) >= fw.num_clients:
            raise ConfigError(f"client id {client_id!r}: expected 0..{fw.num_clients - 1} (framework.num_clients)")
        self.client_id = client_id
        self.index = int(client_id)
        source = load_source(config)
        self.data = prepare_data(config, source.tokenizer(), pack=False)
        parts, histograms = partition(config, self.data)
        self.histogram = histograms[self.index]
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.member = make_member(config, source, self.data, self.index, parts[self.index], self.histogram, transport)
        self.local = Federation(config, None, [self.member], self.data, fw.steps_per_round(config.train.steps))  # type: ignore[arg-type]
        self.log_sink = _LocalLog()
        self.local.log_step = self.log_sink.log_step  # type: ignore[method-assign]
        self.session = secrets.token_hex(8)
        self.steps = client_steps(config)

    def hello(self) -> Message:
        meta = {
            "examples": self.member.num_examples, "histogram": json.dumps(self.histogram),
            "param_count": self.member.client_param_count(), "steps": self.steps, "session": self.session,
        }  # fmt: skip
        return Message("hello", self.client_id, -1, 0, {}, meta)

    def answer(self, command: Message) -> Message:
        """Carry out one command; a ``done`` (with results) or an ``error`` reply."""
        member, kind = self.member, command.kind.removeprefix("cmd:")
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"seq": command.meta.get("seq", 0)}
        try:
            if kind == "train":
                start = int(command.meta.get("start_step", member.steps_done))
                if start > member.steps_done:  # a restarted process: continue the schedule where it was
                    member.steps_done = start
                    member.client.optimizer.fast_forward(start)
                self.log_sink.records = []
                member.train_round(self.local, int(command.meta["round"]))
                meta["records"] = json.dumps(self.log_sink.records)
            elif kind == "get_state":
                tensors = member.client.state()
            elif kind == "set_state":
                member.client.load_state(dict(command.tensors))
            elif kind == "evaluate":
                stats = member.client.evaluate(self.data.eval)
                meta.update(loss_sum=stats.loss_sum, tokens=stats.tokens)
            elif kind == "accuracy":
                value = member.accuracy(self.local)
                meta["accuracy"] = "" if value is None else value
            elif kind == "checkpoint":
                _save_client_checkpoint(self.out, member, int(command.meta["round"]))
            elif kind == "restore":
                _load_client_checkpoint(self.out, member, int(command.meta["round"]))
            elif kind == "save_adapters":
                member.client.save(self.out / "adapters", with_optimizer=False)
            elif kind != "finish":
                raise ProtocolError(f"unknown command {command.kind!r}")
        except ProtocolError as error:
            return Message("error", self.client_id, -1, 0, {}, {**meta, "error": str(error)})
        return Message("done", self.client_id, -1, 0, tensors, meta)


def run_client(
    config: Config,
    client_id: str,
    address: str,
    token: str,
    ca: Path | None,
    client_cert: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """One client in its own process: build its parts and data, connect, answer the server's commands."""
    connection: GrpcConnection | None = None

    class _Lazy:  # the member needs a transport before the connection exists
        meter = ByteMeter()

        def request(self, message: Message) -> Message:
            assert connection is not None
            return connection.request(message)

    lazy = _Lazy()
    agent = ClientAgent(config, client_id, lazy)
    connection = GrpcConnection(address, client_id, token, ca, client_cert, hello=agent.hello())
    lazy.meter = connection.meter
    print(f"client {client_id} connected to {address} with {agent.member.num_examples} examples", flush=True)
    try:
        while True:
            try:
                command = connection.commands.get(timeout=5.0)
            except queue.Empty:
                if connection._broken.is_set():  # the stream broke while idle: reconnect
                    connection.connect()
                continue
            if not isinstance(command, Message):
                raise ProtocolError(f"the server at {address} closed the stream")
            connection.send(agent.answer(command))
            if command.kind == "cmd:finish":
                connection.wait_closed(timeout=10.0)  # let the server end the stream after our last word
                return {"client": client_id, "steps": agent.member.steps_done, "tokens": agent.member.tokens}
    finally:
        connection.close()
