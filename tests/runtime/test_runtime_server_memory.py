"""Server memory: adapters offloaded and brought back bit for bit (Menos), pinned adapters that stay, back-pressure
on pending trunk graphs, and the serving statistics."""

from __future__ import annotations

import copy
import gc
import json
import zlib
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

from splitlm.config import Config
from splitlm.errors import ProtocolError
from splitlm.frameworks.setup import build_part, load_source
from splitlm.peft.bank import AdapterBank
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server import SplitServer
from splitlm.transport import Message

B, T = 2, 5
LOWRANK = "split.bottleneck=8"


def _server(config: Config, **options: Any) -> SplitServer:
    trunk, stage = build_part(config, load_source(config), "trunk")
    return SplitServer(trunk, stage, "ushape", lambda p: PartyOptimizer(p, config.train), config.seed, **options)


def _tenants(server: SplitServer, count: int = 3) -> None:
    for index in range(count):
        server.assign(str(index), f"client-{index}", rank=2 if index == 2 else None)  # one with its own rank


class Script:
    """Deterministic inputs for one client's steps: the same for every server a test compares."""

    def __init__(self, server: SplitServer) -> None:
        self.server = server
        self.replies: list[torch.Tensor] = []

    def _tensor(self, client: str, step: int, micro: int, what: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{client}/{step}/{micro}/{what}".encode()))
        return torch.randn(shape, generator=generator)

    def forward(self, client: str, step: int, micro: int = 0) -> None:
        hidden = self._tensor(client, step, micro, 0, (B, T, self.server.hidden_size))
        reply = self.server.handle(Message("forward", client, step, micro, {"hidden": hidden}))
        self.replies.append(reply.tensors["hidden"])

    def backward(self, client: str, step: int, micro: int = 0) -> None:
        shape = self.server.handlers.pending[client, step, micro][1].shape
        grad = self._tensor(client, step, micro, 1, tuple(shape)) * 1e-2
        reply = self.server.handle(Message("backward", client, step, micro, {"grad": grad}))
        self.replies.append(reply.tensors["grad"])

    def step(self, client: str, step: int) -> None:
        self.server.handle(Message("step", client, step, 0, {}, {"grad_sq_norm": 0.0}))

    def train(self, client: str, step: int) -> None:
        self.forward(client, step)
        self.backward(client, step)
        self.step(client, step)


def _optimizer_state(bank: AdapterBank, name: str) -> tuple[dict[int, dict[str, Any]], int, float]:
    optimizer = bank.optimizer(name)
    assert optimizer.optimizer is not None and optimizer.scheduler is not None
    state = copy.deepcopy(optimizer.optimizer.state_dict()["state"])  # the live tensors change in place
    return state, optimizer.scheduler.last_epoch, optimizer.lr()


def _assert_same_optimizer(a: tuple[dict[int, dict[str, Any]], int, float], b: tuple[Any, ...]) -> None:
    assert a[1:] == b[1:]  # scheduler position and learning rate
    assert a[0].keys() == b[0].keys()
    for index, entry in a[0].items():
        assert entry.keys() == b[0][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, b[0][index][key]), (index, key)


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _in_model(server: SplitServer, name: str) -> bool:
    layers = [m for m in server.trunk.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    held = [name in m.lora_A if isinstance(m, LoraLayer) else name in m.modules_to_save for m in layers]
    assert all(held) or not any(held), f"{name} is in some layers only"
    return name in server.trunk.peft_config and all(held)


@pytest.mark.parametrize("codec", [(), (LOWRANK,)], ids=["lora", "lowrank"])
def test_an_offloaded_adapter_leaves_the_model_and_comes_back_bit_for_bit(make_config, tmp_path, codec) -> None:
    server = _server(make_config("run", *codec), max_resident_adapters=1, offload_dir=tmp_path / "offload")
    assert server.bank is not None
    bank = server.bank
    _tenants(server)
    script = Script(server)
    script.train("2", 0)  # client-2: rank 2, trained one step (its optimizer has state)
    tensors, optimizer = bank.state("client-2"), _optimizer_state(bank, "client-2")
    params = sum(p.numel() for p in bank.parameters("client-2"))
    assert bank.numel("client-2") == params == sum(t.numel() for t in tensors.values())
    script.train("0", 0)  # client-2 leaves
    assert bank.resident == ["client-0"]
    assert sorted(bank.names) == ["client-0", "client-1", "client-2", "default"]
    assert not _in_model(server, "client-2") and _in_model(server, "client-0")
    assert bank.parameters("client-2") == [] and "client-2" not in bank.optimizers
    assert {f.name for f in (tmp_path / "offload" / "client-2").iterdir()} >= {"adapter.safetensors", "optimizer.json"}
    _assert_same_tensors(bank.state("client-2"), tensors)  # read where it waits
    assert bank.numel("client-2") == params
    back = _optimizer_state(bank, "client-2")  # brings it back (and client-0 leaves)
    assert _in_model(server, "client-2") and not _in_model(server, "client-0")
    assert server.trunk.peft_config["client-2"].r == 2  # its own config, not the first adapter's
    assert all(p.requires_grad for p in bank.parameters("client-2"))
    _assert_same_tensors(bank.state("client-2"), tensors)
    _assert_same_optimizer(back, optimizer)
    assert back[0]  # AdamW state (exp_avg, exp_avg_sq, step) was there to compare


def test_training_with_one_resident_adapter_gives_the_adapters_of_an_unbounded_server(make_config, tmp_path) -> None:
    config = make_config("run")
    servers = {
        "bounded": _server(config, max_resident_adapters=1, offload_dir=tmp_path / "offload"),
        "unbounded": _server(config),
        "parked": _server(config),
    }
    parked = servers["parked"].bank
    assert parked is not None
    parked._park = True  # as with the trunk on a GPU: idle adapters wait in CPU memory (here: moved in place)
    scripts = {}
    most_resident = 0
    for kind, server in servers.items():
        _tenants(server)
        script = scripts[kind] = Script(server)
        for step in range(3):
            script.train("0", step)
            script.forward("1", step)  # client-1 awaits its backward while 2 and 0 are served
            script.train("2", step)
            if kind == "bounded":
                assert server.bank is not None
                most_resident = max(most_resident, len(server.bank.resident))
                assert "client-1" in server.bank.resident  # pinned by its pending graph
            if kind == "parked":
                assert sorted(parked._parked) == ["client-0", "default"]  # client-1 pinned, client-2 active
            script.backward("1", step)
            script.step("1", step)
    assert most_resident == 2  # the bound was exceeded only while client-1 was pinned
    bounded, unbounded = servers["bounded"].bank, servers["unbounded"].bank
    assert bounded is not None and unbounded is not None
    assert len(bounded.resident) == 1 and len(unbounded.resident) == len(parked.resident) == 4
    assert sorted(parked._parked) == ["client-0", "client-2", "default"]
    for kind in ("bounded", "parked"):
        for a, b in zip(scripts[kind].replies, scripts["unbounded"].replies, strict=True):
            assert torch.equal(a, b)
    for name in unbounded.names:
        for bank in (bounded, parked):
            _assert_same_tensors(bank.state(name), unbounded.state(name))
            _assert_same_optimizer(_optimizer_state(bank, name), _optimizer_state(unbounded, name))


def test_an_adapter_holding_gradients_at_a_barrier_is_never_offloaded(make_config, tmp_path) -> None:
    server = _server(make_config("run"), max_resident_adapters=1, offload_dir=tmp_path / "offload")
    assert server.bank is not None
    server.assign("0", "shared")
    server.assign("1", "shared")
    server.assign("2", "other")
    server.set_barrier("shared", 2)
    script = Script(server)
    script.forward("0", 0)
    script.backward("0", 0)  # client 0's gradients wait for client 1's at the step
    waiting = server.submit(Message("step", "0", 0, 0, {}, {"grad_sq_norm": 0.0}))
    assert not waiting.done()
    script.train("2", 0)
    assert sorted(server.bank.resident) == ["other", "shared"]  # pinned: over the bound for now
    script.train("1", 0)  # the barrier's step releases it
    assert waiting.result().kind == "stepped"
    script.train("2", 1)
    assert server.bank.resident == ["other"]


def test_save_load_snapshot_restore_and_export_see_offloaded_adapters(make_config, tmp_path) -> None:
    config = make_config("run", LOWRANK)
    bounded = _server(config, max_resident_adapters=1, offload_dir=tmp_path / "offload")
    unbounded = _server(config)
    for server in (bounded, unbounded):
        _tenants(server)
        for client in "012":
            Script(server).train(client, 0)
        server.save(tmp_path / ("bounded" if server is bounded else "unbounded"))
    assert bounded.bank is not None
    assert bounded.bank.resident == ["client-2"]
    files = sorted(p.relative_to(tmp_path / "bounded") for p in (tmp_path / "bounded").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "unbounded") for p in (tmp_path / "unbounded").rglob("*.*"))
    for file in files:
        ours, theirs = tmp_path / "bounded" / file, tmp_path / "unbounded" / file
        if file.suffix == ".safetensors":
            _assert_same_tensors(load_file(str(ours)), load_file(str(theirs)))
        else:
            assert json.loads(ours.read_text()) == json.loads(theirs.read_text())
    bounded.export_adapter("client-0", tmp_path / "client-0.safetensors")  # offloaded
    _assert_same_tensors(load_file(str(tmp_path / "client-0.safetensors")), unbounded.adapter_state("client-0"))

    before = {name: bounded.bank.state(name) for name in bounded.bank.names}
    optimizers = {name: _optimizer_state(bounded.bank, name) for name in ("client-0", "client-2")}
    snapshot = bounded.snapshot()  # client-2 resident, the others offloaded
    for client in "20":
        Script(bounded).train(client, 1)
    bounded.restore(snapshot)
    for name, state in before.items():
        _assert_same_tensors(bounded.bank.state(name), state)
    for name, optimizer in optimizers.items():
        _assert_same_optimizer(_optimizer_state(bounded.bank, name), optimizer)
    assert len(list((tmp_path / "offload" / ".snapshots").iterdir())) == 3  # offloaded: copies on disk, not in memory
    del snapshot
    gc.collect()
    assert not list((tmp_path / "offload" / ".snapshots").iterdir())  # deleted with the snapshot

    fresh = _server(config, max_resident_adapters=1, offload_dir=tmp_path / "fresh-offload")
    _tenants(fresh)
    Script(fresh).train("1", 0)  # so that the others are offloaded when the checkpoint is loaded
    fresh.load(tmp_path / "bounded")
    assert fresh.bank is not None
    for name, state in before.items():
        _assert_same_tensors(fresh.bank.state(name), state)
        _assert_same_optimizer(_optimizer_state(fresh.bank, name), _optimizer_state(unbounded.bank, name))


def test_a_bound_without_an_offload_dir_is_refused(make_config) -> None:
    with pytest.raises(ValueError, match="max_resident=2 needs an offload_dir"):
        _server(make_config("run"), max_resident_adapters=2)


# --- back-pressure -------------------------------------------------------------------------------------------


class CountingDict(dict):
    """The handlers' ``pending`` graphs that remembers its largest size."""

    most = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.most = max(self.most, len(self))


def _drained(server: SplitServer) -> None:
    """Return once the worker served everything it may serve now (an internal action runs after those)."""
    server.worker.between_requests(lambda: None)


def test_back_pressure_holds_forwards_until_backwards_free_their_slots(make_config) -> None:
    server = _server(make_config("run"), max_pending=2)
    server.handlers.pending = pending = CountingDict()
    for index in range(5):
        server.assign(str(index), f"client-{index}")
    hidden = torch.randn(B, T, server.hidden_size, generator=torch.Generator().manual_seed(0))
    server.start()
    try:
        futures = {
            (str(c), micro): server.submit(Message("forward", str(c), 0, micro, {"hidden": hidden}))
            for micro in range(2)
            for c in range(5)
        }
        _drained(server)
        done = [key for key, future in futures.items() if future.done()]
        assert done == [("0", 0), ("1", 0)]  # fifo: the first two; the others wait in the queue
        evaluation = server.submit(Message("eval", "4", 0, 0, {"hidden": hidden}))
        assert evaluation.result(timeout=60).kind == "activations"  # other requests are still served
        answered: set[tuple[str, int]] = set()
        while len(answered) < len(futures):
            ready = [key for key, future in futures.items() if future.done() and key not in answered]
            assert ready, "no forward resolved: deadlock"
            for client, micro in ready:
                out = futures[client, micro].result().tensors["hidden"]
                reply = server.submit(Message("backward", client, 0, micro, {"grad": torch.ones_like(out)}))
                assert reply.result(timeout=60).kind == "gradients"
                answered.add((client, micro))
            _drained(server)
            assert len(pending) <= 2
        assert pending.most == 2 and not pending
    finally:
        server.stop()


def test_without_a_worker_a_forward_beyond_the_bound_is_refused(make_config) -> None:
    server = _server(make_config("run"), max_pending=1)
    server.assign("0")
    script = Script(server)
    script.forward("0", 0)
    with pytest.raises(ProtocolError, match=r"1 trunk graphs already wait for their backward \(max_pending=1\)"):
        script.forward("0", 0, micro=1)
    script.forward("0", 0)  # a retry of the waiting forward replaces its graph: no new slot
    script.backward("0", 0)
    script.forward("0", 0, micro=1)


# --- serving statistics --------------------------------------------------------------------------------------


def test_serving_stats_count_each_clients_requests_and_the_idle_time(make_config) -> None:
    server = _server(make_config("run"))
    for index in range(2):
        server.assign(str(index), f"client-{index}")
    assert server.serving_stats() == {"idle_fraction": 0.0, "busy_seconds": 0.0, "idle_seconds": 0.0, "clients": {}}
    hidden = torch.randn(B, T, server.hidden_size, generator=torch.Generator().manual_seed(0))
    server.start()
    try:
        for client, steps in (("0", 2), ("1", 1)):
            for step in range(steps):
                out = server.handle(Message("forward", client, step, 0, {"hidden": hidden})).tensors["hidden"]
                server.handle(Message("backward", client, step, 0, {"grad": torch.ones_like(out) * 1e-3}))
                server.handle(Message("step", client, step, 0, {}, {"grad_sq_norm": 0.0}))
        server.forget("1")  # internal actions are not a client's requests
        stats = server.serving_stats()
    finally:
        server.stop()
    assert {c: s["requests"] for c, s in stats["clients"].items()} == {"0": 6, "1": 3}
    for entry in stats["clients"].values():
        assert entry["wait_seconds"] >= 0
        assert entry["mean_wait_s"] == pytest.approx(entry["wait_seconds"] / entry["requests"])
    assert stats["busy_seconds"] > 0 and stats["idle_seconds"] >= 0
    assert 0 <= stats["idle_fraction"] <= 1
    assert server.serving_stats()["idle_seconds"] >= stats["idle_seconds"]  # frozen at stop, not counting on
