"""``build_parties``: the one assembly of a run's parties, whatever their placement (in this process, served over
gRPC, Ray actors, one client of a run served elsewhere). Each placement builds what the in-process run builds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from splitlm.errors import ConfigError
from splitlm.frameworks.federation import build_parties, check_placement
from splitlm.transport import InProcessTransport

SRC = Path(__file__).resolve().parents[2] / "src" / "splitlm"
GSFL = ("framework.name=gsfl", "framework.num_clients=4", "framework.num_groups=2", "train.steps=2")


def _calls(name: str) -> list[str]:
    """Where in src a function named ``name`` is called: ``module.py:enclosing function`` for each call."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for scope in ast.walk(tree):
            if not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(scope):
                func = node.func if isinstance(node, ast.Call) else None
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called == name:
                    found.append(f"{path.relative_to(SRC)}:{scope.name}")
    return sorted(set(found))


def test_one_place_in_src_builds_a_federations_parties() -> None:
    assert _calls("Federation") == ["frameworks/federation.py:build_parties"]
    assert _calls("make_server") == ["frameworks/federation.py:host"]  # build_parties', and Ray's server actor's


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_served_server_is_the_in_process_one(make_config) -> None:
    config = make_config("run", *GSFL, "framework.grouping=label_kmeans")
    local = build_parties(config, "inprocess")
    served = build_parties(config, "serve", members=local.members)  # remote members carry the same histograms
    assert served.framework is local.framework and served.data is None and served.tap is None
    assert served.groups == local.groups and len({tuple(g) for g in local.groups}) == 2
    assert served.handler is not None and served.server_mods
    for member in local.members:
        adapter = local.server.adapter_of(member.client_id)
        assert served.server.adapter_of(member.client_id) == adapter
        assert _states_equal(served.server.adapter_state(adapter), local.server.adapter_state(adapter))


def test_ray_hosts_the_server_elsewhere_for_the_same_groups(make_config) -> None:
    config = make_config("run", *GSFL, "framework.grouping=label_kmeans")
    local = build_parties(config, "inprocess")
    asked: list[list[list[int]]] = []
    proxy = object()

    def remote_server(groups: list[list[int]]) -> object:
        asked.append(groups)
        return proxy

    fed = build_parties(config, "ray", members=local.members, remote_server=remote_server)
    assert asked == [local.groups] and fed.server is proxy and fed.groups == local.groups
    assert fed.handler is None and fed.server_mods == [] and fed.members == local.members


def test_a_client_alone_is_the_in_process_runs_client(make_config) -> None:
    config = make_config("run", "framework.name=sflv1", "framework.num_clients=3", "train.steps=2")
    local = build_parties(config)
    assert local.handler is not None
    alone = build_parties(config, "agent", client=1, transport=InProcessTransport(local.handler))
    assert alone.server is None and alone.data is not None and len(alone.members) == 1
    member, theirs = alone.members[0], local.members[1]
    assert member.client_id == "1" and member.histogram == theirs.histogram and member.examples == theirs.examples
    assert _states_equal(member.client.state(), theirs.client.state())
    assert alone.local_steps == local.local_steps


def test_each_placement_checks_what_it_cannot_do(make_config) -> None:
    unsplit = make_config("run", "framework.name=centralized")
    with pytest.raises(ConfigError, match=r"framework\.name=centralized runs in one process; use `splitlm train`"):
        check_placement(unsplit, "serve")
    with pytest.raises(ConfigError, match=r"runs in one process; set transport\.name=inprocess"):
        check_placement(unsplit, "ray")
    assert check_placement(unsplit, "inprocess").name == "centralized"
    tapped = make_config("tap", "privacy.tap.enabled=true")
    check_placement(tapped, "serve")  # `splitlm serve` records what it receives, for `splitlm audit`
    with pytest.raises(ConfigError, match=r"privacy\.tap records in-process and `splitlm serve` runs, not Ray's"):
        build_parties(tapped, "ray")  # refused before anything is built
    attacked = make_config("fsha", "privacy.server_attack=fsha")
    with pytest.raises(
        ConfigError, match=r"privacy\.server_attack\.fsha: simulates a malicious server in an in-process"
    ):
        check_placement(attacked, "serve")
    linked = make_config("link", "framework.name=centralized", "transport.link.bandwidth_mbps=10")
    with pytest.raises(ConfigError, match=r"transport\.link: framework\.name=centralized sends nothing"):
        check_placement(linked, "inprocess")
    assert check_placement(linked, "agent").name == "centralized"  # a client is told what to do: the server checked
