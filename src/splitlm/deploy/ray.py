"""``transport.name: ray``: simulated clients as Ray actors, so a study with many clients can use a cluster.

The server is one Ray actor (threaded, so parallel clients and psl's step barrier work), each client another,
and the driver runs the same round recipes as any run, as it does for networked clients. Messages cross
actors as wire frames (``transport/wire.py``: validated header + raw bytes), never as pickled tensors, and
go through the same mods as any transport: the client's in its actor, the server's in the server actor.
Install the extra with ``pip install 'splitlm[ray]'``; ``transport.address`` joins an existing cluster.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from splitlm.config import Config, build_config
from splitlm.deploy.agent import ClientAgent
from splitlm.deploy.remote import RemoteClientProxy, remote_member
from splitlm.errors import ConfigError, ProtocolError, SplitLMError
from splitlm.frameworks.base import framework_of
from splitlm.frameworks.checkpoint import prepare_output
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import build_parties, check_placement, host
from splitlm.frameworks.setup import count_parameters, load_source
from splitlm.runtime.server.surface import surface_members
from splitlm.transport import ByteMeter, Message
from splitlm.transport.base import resolved, then
from splitlm.transport.codecs import wire_limits
from splitlm.transport.grpc_server import error_message
from splitlm.transport.wire import Limits, decode, encode

SURFACE = surface_members()  # what the driver's proxy may call on the server actor


def _frames(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    return encode(Message("state", "-", -1, 0, tensors))


def _tensors(frames: list[bytes], limits: Limits) -> dict[str, torch.Tensor]:
    return dict(decode(frames, limits).tensors)


def _limits(config: Config, *state_tensors: int) -> Limits:
    """What an actor's (or the driver's) decoder accepts: the run's training messages and states of up to
    ``state_tensors`` tensors (what that end receives: a client side, a trunk adapter)."""
    codec = config.transport.codec
    return wire_limits(codec.activations, codec.gradients, max(state_tensors, default=0))


class ServerActorImpl:
    """The trunk, its adapter bank and the server's mods, in one actor."""

    def __init__(self, tree: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.config = build_config(tree)
        self.source = load_source(self.config)
        self.server: Any = None
        self.handler: Any = None
        self.limits = _limits(self.config)
        self.snapshot: tuple[int, Any] | None = None  # the round's snapshot (its number, the server's snapshot)

    def setup(self, groups: list[list[int]]) -> tuple[int, int, list[int], int]:
        """Build the trunk (``federation.host``: the server's half of ``build_parties``, in this actor); its
        parameter counts, its blocks and the tensors of its largest adapter state."""
        clients = range(self.config.framework.num_clients)
        hosted = host(self.config, framework_of(self.config), self.source, groups, clients)
        self.server, self.handler = hosted.server, hosted.handler
        names = self.server.adapter_names()
        trunk_tensors = max((len(self.server.adapter_state(name)) for name in names), default=0)
        self.limits = _limits(self.config, trunk_tensors)
        self.server.start()
        server = self.server
        return count_parameters(server.trunk), server.trainable_param_count, server.trunk_layers(), trunk_tensors

    def submit(self, frames: list[bytes]) -> list[bytes]:
        message = decode(frames, self.limits)
        try:
            reply = resolved(self.handler(message)).result()
        except SplitLMError as error:
            reply = error_message(message.client_id, message, error)
        return encode(reply)

    def call(self, method: str, *args: Any) -> Any:
        """A ``ServerSurface`` call of the driver's ``RayServerProxy`` on the server. Adapter states travel as
        wire frames; a round's snapshot stays in this actor (the driver holds its number)."""
        if method not in SURFACE:
            raise ProtocolError(f"unknown server call {method!r}; expected one of {SURFACE}")
        if method == "adapter_state":
            return _frames(self.server.adapter_state(*args))
        if method == "load_adapter_state":
            adapter, frames = args
            return self.server.load_adapter_state(adapter, _tensors(frames, self.limits))
        if method == "snapshot":
            number = self.snapshot[0] + 1 if self.snapshot is not None else 0
            self.snapshot = (number, self.server.snapshot())
            return number
        if method == "restore":
            if self.snapshot is None or self.snapshot[0] != args[0]:
                raise ProtocolError(f"no server snapshot {args[0]!r} to restore; only the newest one is kept")
            return self.server.restore(self.snapshot[1])
        return getattr(self.server, method)(*args)


class _RayTransport:
    """A client actor's way to the server actor: wire frames through Ray, a future per request."""

    def __init__(self, server: Any, limits: Limits) -> None:
        self.server = server
        self.limits = limits

    def submit(self, message: Message) -> Future[Message]:
        ref = self.server.submit.remote(encode(message.detached()))
        return resolved(then(ref.future(), lambda frames: _reply(message, frames, self.limits)))  # type: ignore[arg-type]

    def request(self, message: Message) -> Message:
        return self.submit(message).result()

    def close(self) -> None:
        pass


def _reply(request: Message, frames: Any, limits: Limits) -> Message:
    reply = decode(frames, limits)
    if reply.kind == "error":
        raise ProtocolError(f"server rejected {request.kind}: {reply.meta.get('error')}")
    return reply


class ClientActorImpl:
    def __init__(self, tree: dict[str, Any], client_id: str, server: Any) -> None:
        torch.set_num_threads(1)
        # its own metrics, summary, checkpoints and adapters, apart from the driver's files
        own = {**tree, "output_dir": str(Path(tree["output_dir"]) / "clients" / client_id)}
        config = build_config(own)
        transport = _RayTransport(server, _limits(config))
        self.agent = ClientAgent(config, client_id, transport, shares_files=True)
        self.limits = _limits(config, self.agent.state_tensors)  # the driver sends it client sides of its size

    def hello(self) -> list[bytes]:
        return encode(self.agent.hello())

    def answer(self, frames: list[bytes]) -> list[bytes]:
        return encode(self.agent.answer(decode(frames, self.limits)))

    def traffic(self) -> tuple[int, int, int, int]:
        meter = self.agent.member.meter
        return meter.up, meter.down, meter.eval_up, meter.eval_down


def _actor_meter(actor: Any) -> ByteMeter:
    """The bytes a client actor's meter counted, read when the driver asks."""
    import ray

    up, down, eval_up, eval_down = ray.get(actor.traffic.remote())
    return ByteMeter(up, down, eval_up, eval_down)


class RayServerProxy:
    """``ServerSurface`` as calls on the server actor (``ServerActorImpl.call``)."""

    def __init__(
        self, actor: Any, limits: Limits, param_count: int, trainable_param_count: int, trunk_layers: list[int]
    ) -> None:
        self.actor = actor
        self.limits = limits  # what the driver accepts from the actor: adapter states of the trunk's size
        self._param_count = param_count
        self._trainable_param_count = trainable_param_count
        self._trunk_layers = list(trunk_layers)

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(self.actor.call.remote(method, *args))

    @property
    def param_count(self) -> int:
        return self._param_count

    @property
    def trainable_param_count(self) -> int:
        return self._trainable_param_count

    def trunk_layers(self) -> list[int]:
        return list(self._trunk_layers)

    def adapter_names(self) -> list[str]:
        return self._call("adapter_names")

    def adapter_of(self, client_id: str) -> str:
        return self._call("adapter_of", client_id)

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        return _tensors(self._call("adapter_state", adapter), self.limits)

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        self._call("load_adapter_state", adapter, _frames(state))

    def set_barrier(self, adapter: str, count: int) -> None:
        self._call("set_barrier", adapter, count)

    def start(self) -> None:
        pass  # the actor's worker runs from setup on

    def stop(self) -> None:
        pass  # stopped with the actor

    def forget(self, client_id: str, wait: bool = True) -> None:
        self._call("forget", client_id, wait)

    def abandon(self) -> None:
        self._call("abandon")

    def snapshot(self) -> int:
        return self._call("snapshot")  # the actor keeps it; its number comes back

    def restore(self, snapshot: int) -> None:
        self._call("restore", snapshot)

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        self._call("save", Path(folder), with_optimizer)

    def load(self, folder: Path) -> None:
        self._call("load", Path(folder))

    def export_adapter(self, adapter: str, path: Path) -> None:
        self._call("export_adapter", adapter, Path(path))

    def serving_stats(self) -> dict[str, Any] | None:
        return self._call("serving_stats")


def run_ray(config: Config, resume: bool = False, started: float | None = None) -> dict[str, Any]:
    """Run a framework with the server and every client as Ray actors."""
    try:
        import ray
    except ImportError:
        raise ConfigError("transport.name=ray needs Ray: pip install 'splitlm[ray]'") from None
    started = time.perf_counter() if started is None else started
    check_placement(config, "ray")
    fw = config.framework
    out = prepare_output(config, resume)
    tree = {**config.model_dump(mode="json"), "output_dir": str(out.resolve())}  # the actors' working folder may differ
    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
        ray.init(address=config.transport.address, include_dashboard=False, log_to_driver=False)
    try:
        server_actor = ray.remote(ServerActorImpl).options(max_concurrency=max(16, 4 * fw.num_clients)).remote(tree)
        actors = [ray.remote(ClientActorImpl).remote(tree, str(i), server_actor) for i in range(fw.num_clients)]
        hellos = [decode(frames) for frames in ray.get([a.hello.remote() for a in actors])]
        client_tensors = [int(hello.meta["state_tensors"]) for hello in hellos]
        members = []
        for index, (actor, hello) in enumerate(zip(actors, hellos, strict=True)):
            limits = _limits(config, client_tensors[index])  # its get_state reply: its own client side

            def send(message: Message, session: str | None, actor: Any = actor, limits: Limits = limits) -> Message:
                reply = decode(ray.get(actor.answer.remote(encode(message))), limits)
                if reply.kind == "error":
                    raise ProtocolError(f"client {message.client_id}: {reply.meta.get('error')}")
                return reply

            proxy = RemoteClientProxy(str(index), send, lambda actor=actor: _actor_meter(actor), shares_files=True)
            members.append(remote_member(index, proxy, hello))

        def remote_server(groups: list[list[int]]) -> RayServerProxy:  # the trunk in its actor
            param_count, trainable_param_count, layers, trunk_tensors = ray.get(server_actor.setup.remote(groups))
            limits = _limits(config, trunk_tensors)
            return RayServerProxy(server_actor, limits, param_count, trainable_param_count, layers)

        fed = build_parties(config, "ray", members=members, remote_server=remote_server)
        summary = drive(fed, out, resume, started)
        for kind in ("save_adapters", "finish"):  # each client actor's own adapters and summary
            for member in members:
                member.client.command(kind)  # type: ignore[attr-defined]
        ray.get(server_actor.call.remote("stop"))
        return summary
    finally:
        if started_here:
            ray.shutdown()
