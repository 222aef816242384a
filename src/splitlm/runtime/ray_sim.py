"""``transport.name: ray``: simulated clients as Ray actors, so a study with many clients can use a cluster.

The server is one Ray actor (threaded, so parallel clients and psl's step barrier work), each client another,
and the driver runs the same round recipes as any run, as it does for networked clients. Messages cross
actors as wire frames (``transport/wire.py``: validated header + raw bytes), never as pickled tensors.
Install the extra with ``pip install 'splitlm[ray]'``; ``transport.address`` joins an existing cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splitlm.config import Config, build_config
from splitlm.errors import ConfigError, ProtocolError, SplitLMError
from splitlm.frameworks.federation import Federation, assign_groups, drive_rounds, make_server, route
from splitlm.frameworks.loop import prepare_output
from splitlm.frameworks.setup import count_parameters, load_source
from splitlm.runtime.remote import ClientAgent, RemoteClientProxy, RemoteMember
from splitlm.transport.base import ByteMeter
from splitlm.transport.grpc_server import error_message
from splitlm.transport.messages import Message
from splitlm.transport.wire import decode, encode


def _frames(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    return encode(Message("state", "-", -1, 0, tensors))


def _tensors(frames: list[bytes]) -> dict[str, torch.Tensor]:
    return dict(decode(frames).tensors)


class ServerActorImpl:
    """The trunk and its adapter bank, in one actor."""

    def __init__(self, tree: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.config = build_config(tree)
        self.source = load_source(self.config)
        self.server = None

    def setup(self, groups: list[list[int]]) -> int:
        self.server = make_server(self.config, self.source, groups)
        for index in range(self.config.framework.num_clients):
            route(self.config, self.server, index, groups)
        self.server.start()
        return count_parameters(self.server.trunk)

    def submit(self, frames: list[bytes]) -> list[bytes]:
        message = decode(frames)
        try:
            reply = self.server.submit(message).result()
        except SplitLMError as error:
            reply = error_message(message.client_id, message, error)
        return encode(reply)

    def adapter_of(self, client_id: str) -> str:
        return self.server.adapter_of(client_id)

    def adapter_state(self, adapter: str) -> list[bytes]:
        return _frames(self.server.adapter_state(adapter))

    def load_adapter_state(self, adapter: str, frames: list[bytes]) -> None:
        self.server.load_adapter_state(adapter, _tensors(frames))

    def set_barrier(self, adapter: str, count: int) -> None:
        self.server.barriers[adapter] = count

    def adapter_names(self) -> list[str]:
        return self.server.bank.names if self.server.bank else []

    def save(self, folder: str, with_optimizer: bool) -> None:
        self.server.save(Path(folder), with_optimizer=with_optimizer)

    def load(self, folder: str) -> None:
        self.server.load(Path(folder))

    def export_adapter(self, adapter: str, path: str) -> None:
        self.server.export_adapter(adapter, Path(path))

    def stop(self) -> None:
        self.server.stop()


class _RayTransport:
    """A client actor's way to the server actor; counts the bytes of every frame set it moves."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.meter = ByteMeter()

    def request(self, message: Message) -> Message:
        import ray

        outgoing = message.detached()
        self.meter.record(outgoing, "up")
        reply = decode(ray.get(self.server.submit.remote(encode(outgoing))))
        self.meter.record(reply, "down")
        if reply.kind == "error":
            raise ProtocolError(f"server rejected {message.kind}: {reply.meta.get('error')}")
        return reply


class ClientActorImpl:
    def __init__(self, tree: dict[str, Any], client_id: str, server: Any) -> None:
        torch.set_num_threads(1)
        self.transport = _RayTransport(server)
        self.agent = ClientAgent(build_config(tree), client_id, self.transport)

    def hello(self) -> list[bytes]:
        return encode(self.agent.hello())

    def answer(self, frames: list[bytes]) -> list[bytes]:
        return encode(self.agent.answer(decode(frames)))

    def traffic(self) -> tuple[int, int]:
        return self.transport.meter.snapshot()


class _ActorMeter:
    """Bytes a client actor moved, read when the driver asks."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def snapshot(self) -> tuple[int, int]:
        import ray

        return tuple(ray.get(self.actor.traffic.remote()))  # type: ignore[return-value]

    @property
    def up(self) -> int:
        return self.snapshot()[0]

    @property
    def down(self) -> int:
        return self.snapshot()[1]


class _MeterHolder:
    def __init__(self, meter: _ActorMeter) -> None:
        self.meter = meter


class RayClientProxy(RemoteClientProxy):
    """The same client commands as over gRPC, carried out as calls on the client's actor."""

    def __init__(self, actor: Any, client_id: str) -> None:
        self.actor = actor
        self.client_id = client_id

    def command(self, kind: str, tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> Message:
        import ray

        message = Message(f"cmd:{kind}", self.client_id, -1, 0, dict(tensors or {}), dict(meta))
        reply = decode(ray.get(self.actor.answer.remote(encode(message))))
        if reply.kind == "error":
            raise ProtocolError(f"client {self.client_id}: {reply.meta.get('error')}")
        return reply


class _Barriers:
    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __setitem__(self, adapter: str, count: int) -> None:
        import ray

        ray.get(self.actor.set_barrier.remote(adapter, count))


class _Bank:
    def __init__(self, names: list[str]) -> None:
        self.names = names


class RayServerProxy:
    """The server surface the recipes and the round loop use, as calls on the server actor."""

    def __init__(self, actor: Any, param_count: int) -> None:
        self.actor = actor
        self.barriers = _Barriers(actor)
        self.param_count = param_count

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def adapter_of(self, client_id: str) -> str:
        return self._get(self.actor.adapter_of.remote(client_id))

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        return _tensors(self._get(self.actor.adapter_state.remote(adapter)))

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        self._get(self.actor.load_adapter_state.remote(adapter, _frames(state)))

    @property
    def bank(self) -> _Bank:
        return _Bank(self._get(self.actor.adapter_names.remote()))

    def start(self) -> None:
        pass  # the actor's worker runs from setup on

    def stop(self) -> None:
        pass  # stopped with the actor

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        self._get(self.actor.save.remote(str(folder), with_optimizer))

    def load(self, folder: Path) -> None:
        self._get(self.actor.load.remote(str(folder)))

    def export_adapter(self, adapter: str, path: Path) -> None:
        self._get(self.actor.export_adapter.remote(adapter, str(path)))


def run_ray(config: Config, recipe: Any, resume: bool = False) -> dict[str, Any]:
    """Run a multi-client framework with the server and every client as Ray actors."""
    try:
        import ray
    except ImportError:
        raise ConfigError("transport.name=ray needs Ray: pip install 'splitlm[ray]'") from None
    fw = config.framework
    out = prepare_output(config, resume)
    tree = config.model_dump(mode="json")
    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
        ray.init(address=config.transport.address, include_dashboard=False, log_to_driver=False)
    try:
        server_actor = ray.remote(ServerActorImpl).options(max_concurrency=max(16, 4 * fw.num_clients)).remote(tree)
        actors = [ray.remote(ClientActorImpl).remote(tree, str(i), server_actor) for i in range(fw.num_clients)]
        hellos = [decode(frames) for frames in ray.get([a.hello.remote() for a in actors])]
        import json

        histograms = [json.loads(str(h.meta["histogram"])) for h in hellos]
        groups = assign_groups(config, histograms) if fw.name == "gsfl" else []
        server = RayServerProxy(server_actor, ray.get(server_actor.setup.remote(groups)))
        members = [
            RemoteMember(
                index,
                RayClientProxy(actor, str(index)),
                _MeterHolder(_ActorMeter(actor)),
                [],
                None,  # type: ignore[arg-type]
                histograms[index],
                remote_examples=int(hello.meta["examples"]),
                param_count=int(hello.meta["param_count"]),
            )
            for index, (actor, hello) in enumerate(zip(actors, hellos, strict=True))
        ]
        fed = Federation(config, server, members, None, fw.steps_per_round(config.train.steps), groups)  # type: ignore[arg-type]
        summary = drive_rounds(config, fed, recipe, out, resume)
        for member in members:
            member.client.command("save_adapters")  # type: ignore[union-attr]
        ray.get(server_actor.stop.remote())
        return summary
    finally:
        if started_here:
            ray.shutdown()
