"""``ServerSurface``: every server a federation can hold offers every call of the surface, with the surface's
parameter names (a missing or renamed method fails here, not in the middle of a run), and Ray's proxy carries each
call to the server in its actor.

The implementations: the in-process ``SplitServer`` (``splitlm serve`` holds one too: its driver runs in the
server's process) and ``RayServerProxy``. The proxy is checked without a Ray cluster: its actor is called in this
process (``ray.get`` of an already computed value), so the proxy and the actor's ``call`` run as under Ray.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from splitlm.deploy.ray import RayServerProxy, ServerActorImpl, _limits
from splitlm.errors import ProtocolError
from splitlm.frameworks.federation import build_federation
from splitlm.runtime.server import ServerSurface, SplitServer
from splitlm.runtime.server.surface import surface_members

IMPLEMENTATIONS = [SplitServer, RayServerProxy]
MISSING = object()


def _compatible(actual: inspect.Signature, expected: inspect.Signature) -> bool:
    """The same parameter names in the same order, each with a default where the surface gives one (a default the
    surface does not give is fine: callers always pass that argument)."""
    ours, theirs = list(actual.parameters.values()), list(expected.parameters.values())
    if [p.name for p in ours] != [p.name for p in theirs]:
        return False
    empty = inspect.Parameter.empty
    return all(p.default is not empty for p, q in zip(ours, theirs, strict=True) if q.default is not empty)


def surface_problems(cls: type) -> list[str]:
    """How ``cls`` falls short of ``ServerSurface``: members missing, properties that are not properties, methods
    whose parameters (names, order, defaults) do not take the surface's calls."""
    problems = []
    for name in surface_members():
        wanted = getattr(ServerSurface, name)
        found = inspect.getattr_static(cls, name, MISSING)
        if found is MISSING:
            problems.append(f"{cls.__name__}.{name} is missing")
        elif isinstance(wanted, property):
            if not isinstance(found, property):
                problems.append(f"{cls.__name__}.{name} is not a property")
        elif not callable(found):
            problems.append(f"{cls.__name__}.{name} is not a method")
        else:
            expected, actual = inspect.signature(wanted), inspect.signature(found)
            if not _compatible(actual, expected):
                problems.append(f"{cls.__name__}.{name}{actual}: expected {expected}")
    return problems


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def test_each_server_offers_the_whole_surface(cls: type) -> None:
    assert surface_problems(cls) == []


def test_the_surface_covers_the_calls_recipes_make() -> None:
    # the calls that replaced direct writes and attribute sniffing are on the surface
    assert {"set_barrier", "adapter_names", "trunk_layers", "serving_stats", "snapshot", "restore"} <= set(
        surface_members()
    )


def test_a_server_missing_a_call_or_naming_a_parameter_otherwise_fails_the_check() -> None:
    class Partial(RayServerProxy):
        set_barrier = None  # type: ignore[assignment]

        def forget(self, client: str, wait: bool = True) -> None:  # type: ignore[override]
            pass

        def save(self, folder: Path, with_optimizer: bool) -> None:  # type: ignore[override]
            pass

    problems = surface_problems(Partial)
    assert len(problems) == 3, problems
    assert "Partial.set_barrier is not a method" in problems
    assert any(p.startswith("Partial.forget(self, client") for p in problems)
    assert any(p.startswith("Partial.save(") for p in problems)


def test_an_in_process_federation_holds_a_server_of_the_surface(make_config) -> None:
    fed = build_federation(make_config("run", "framework.name=psl", "framework.num_clients=2"))
    assert isinstance(fed.server, SplitServer) and isinstance(fed.server, ServerSurface)
    assert fed.server.adapter_names() == ["default"]
    assert fed.server.trunk_layers() == list(fed.server.stage.layer_indices)


class _LocalActor:
    """The server actor, called in this process: ``actor.call.remote(...)`` runs ``ServerActorImpl.call`` now."""

    def __init__(self, impl: ServerActorImpl) -> None:
        self.call = SimpleNamespace(remote=impl.call)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ray_proxy_carries_each_call_to_the_server_in_its_actor(make_config, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get=lambda value: value))
    config = make_config("run", "framework.name=psl", "framework.num_clients=2")
    impl = ServerActorImpl(config.model_dump(mode="json"))
    params, trainable, layers, tensors = impl.setup([])
    server: Any = impl.server
    proxy = RayServerProxy(_LocalActor(impl), _limits(config, tensors), params, trainable, layers)
    try:
        assert (proxy.param_count, proxy.trainable_param_count) == (server.param_count, server.trainable_param_count)
        assert proxy.trunk_layers() == server.trunk_layers() and proxy.adapter_names() == ["default"]
        assert proxy.adapter_of("1") == "default"
        proxy.set_barrier("default", 2)
        assert server.handlers.barrier("default") == 2
        before = proxy.adapter_state("default")
        assert _close(before, server.adapter_state("default"))
        snapshot = proxy.snapshot()
        changed = {k: v + 1 for k, v in before.items()}
        proxy.load_adapter_state("default", changed)
        assert _close(server.adapter_state("default"), changed)
        proxy.restore(snapshot)
        assert _close(server.adapter_state("default"), before)
        with pytest.raises(ProtocolError, match="no server snapshot"):
            proxy.restore(snapshot + 1)
        proxy.save(tmp_path / "server")
        assert (tmp_path / "server" / "trunk.safetensors").is_file()
        proxy.export_adapter("default", tmp_path / "trunk.safetensors")
        assert (tmp_path / "trunk.safetensors").is_file()
        proxy.forget("0")
        proxy.abandon()
        assert set(proxy.serving_stats() or {}) >= {"idle_fraction", "clients"}
        with pytest.raises(ProtocolError, match="unknown server call 'trunk'"):
            impl.call("trunk")  # only the surface is reachable from the driver
    finally:
        impl.call("stop")
