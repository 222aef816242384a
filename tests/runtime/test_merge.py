"""Merged trunk passes (``framework.merge``, MiniBatch-SFL / SCALA): the forwards of the clients at a barrier run
through the trunk as one batch, and the barrier's step takes the same update as with one pass per client.

Each test scripts its clients' requests (seeded inputs; a U-shaped client's gradient depends on the trunk output it
got back, as a real tail's does) and runs them against two servers built alike, one merging and one not: every
reply and the trunk adapter after the steps agree to float32 round-off (a batch of several clients runs other
kernels' summation orders than one client's batch, so the comparison is not bit for bit)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch

from splitlm.config import Config
from splitlm.errors import ProtocolError
from splitlm.frameworks.setup import build_part, load_source
from splitlm.peft.lora import ADAPTER
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server import MergedPasses, SplitServer
from splitlm.transport import Message

CLIENTS = ("0", "1", "2")
SAME = {"0": (2, 6), "1": (2, 6), "2": (2, 6)}  # client -> (rows, tokens) of its micro-batches
MIXED = {"0": (2, 6), "1": (1, 4), "2": (3, 5)}  # other lengths: the merged batch is padded
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def _server(config: Config, merge: int = 1, cap: int = 0, barrier: int = len(CLIENTS)) -> SplitServer:
    trunk, stage = build_part(config, load_source(config), "trunk")
    mode = config.split.mode
    mods = [MergedPasses(merge, cap)]
    server = SplitServer(trunk, stage, mode, lambda p: PartyOptimizer(p, config.train), config.seed, mods=mods)
    for client in CLIENTS:
        server.assign(client)
    server.set_barrier(ADAPTER, barrier)
    return server


def _merging(server: SplitServer) -> Any:
    """The server's merged passes (what they hold)."""
    (mod,) = server.handlers.mods
    return mod


def _random(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))


def _forward(
    server: SplitServer, client: str, step: int, shape: tuple[int, int], micro: int = 0, extras: bool = False
) -> Message:
    """A training forward; ``extras``: client 0 sends position ids of one row (offset, as a packed sequence's
    continuation), client 2 a one-row mask and client 1 none."""
    rows, tokens = shape
    hidden = _random(f"{client}/{step}/{micro}/hidden", (rows, tokens, server.hidden_size))
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[0, tokens - 1 :] = 0  # the client's own padding stays its own
    tensors = {"hidden": hidden, "attention_mask": mask}
    if extras:
        tensors = {"hidden": hidden}
        if client == "0":
            tensors["position_ids"] = torch.arange(3, 3 + tokens).unsqueeze(0)
        if client == "2":
            tensors["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    if server.mode == "vanilla":
        vocab = int(server.stage.config.vocab_size)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{client}/{step}/{micro}/labels".encode()))
        labels = torch.randint(0, vocab, (rows, tokens), generator=generator)
        labels[mask == 0] = -100
        tensors["labels"] = labels
    return Message("forward", client, step, micro, tensors, {"scale": 0.5 if client == "1" else 1.0})


def _client(
    server: SplitServer, client: str, steps: int, shape: tuple[int, int], extras: bool = False
) -> list[torch.Tensor]:
    """A client's ``steps`` steps; what it got back (trunk outputs or losses, and gradients at the cut)."""
    got: list[torch.Tensor] = []
    for step in range(steps):
        reply = server.handle(_forward(server, client, step, shape, extras=extras))
        if server.mode == "ushape":
            out = reply.tensors["hidden"]
            target = _random(f"{client}/{step}/target", tuple(out.shape))
            grad = (out - target) * 1e-2  # like a tail's: depends on what the trunk returned
            back = server.handle(Message("backward", client, step, 0, {"grad": grad}))
            got += [out, back.tensors["grad"]]
        else:
            got += [
                torch.tensor(reply.meta["loss_sum"]),
                torch.tensor(float(reply.meta["tokens"])),
                reply.tensors["grad"],
            ]
        server.handle(Message("step", client, step, 0, {}, {"grad_sq_norm": 0.0}))
    return got


def _train(
    server: SplitServer, shapes: dict[str, tuple[int, int]], steps: int = 2, extras: bool = False
) -> dict[str, list[torch.Tensor]]:
    """Every client's steps at once (threads), as parallel clients at a barrier run them."""
    server.start()
    try:
        with ThreadPoolExecutor(len(CLIENTS)) as pool:
            futures = {c: pool.submit(_client, server, c, steps, shapes[c], extras) for c in CLIENTS}
            return {c: f.result(timeout=120) for c, f in futures.items()}
    finally:
        server.stop()


def _trunk_passes(server: SplitServer) -> list[tuple[int, int]]:
    """Records (rows, tokens) of every training trunk pass the server runs."""
    passes: list[tuple[int, int]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if torch.is_grad_enabled():
            passes.append(tuple(kwargs["hidden_states"].shape[:2]))

    server.stage.register_forward_hook(hook, with_kwargs=True)
    return passes


def _backward_passes(server: SplitServer) -> list[int]:
    """Counts the trunk backward passes: a LoRA matrix used once per pass gets its gradient once per backward."""
    count: list[int] = []
    server.optimizer(ADAPTER).params[0].register_hook(lambda grad: count.append(1))
    return count


def _assert_same(reference: SplitServer, merged: SplitServer, a: dict[str, list[torch.Tensor]], b: Any) -> None:
    for client in CLIENTS:
        assert len(a[client]) == len(b[client])
        for x, y in zip(a[client], b[client], strict=True):
            torch.testing.assert_close(y, x, **TOLERANCE)
    expected, actual = reference.adapter_state(ADAPTER), merged.adapter_state(ADAPTER)
    assert expected.keys() == actual.keys()
    assert any(v.abs().sum() > 0 for k, v in actual.items() if "lora_B" in k)  # the steps trained it
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE)
    assert merged.optimizer(ADAPTER).lr() == reference.optimizer(ADAPTER).lr()  # as many steps, one per step


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
@pytest.mark.parametrize("shapes", [SAME, MIXED], ids=["same-lengths", "padded"])
def test_a_merged_step_is_the_sum_of_the_clients_steps(make_config, mode: str, shapes) -> None:
    config = make_config("run", f"split.mode={mode}")
    reference, merged = _server(config), _server(config, merge=3)
    passes, backwards = _trunk_passes(merged), _backward_passes(merged)
    plain_passes = _trunk_passes(reference)
    a, b = _train(reference, shapes), _train(merged, shapes)
    _assert_same(reference, merged, a, b)
    # one trunk pass (and one backward) per step for the three clients, over their rows padded to the longest
    rows, longest = sum(r for r, _ in shapes.values()), max(t for _, t in shapes.values())
    assert passes == [(rows, longest)] * 2 and len(backwards) == 2
    assert sorted(plain_passes) == sorted([shapes[c] for c in CLIENTS] * 2)


def test_position_ids_and_one_row_masks_are_merged_too(make_config) -> None:
    config = make_config("run")
    reference, merged = _server(config), _server(config, merge=3)
    passes = _trunk_passes(merged)
    a, b = _train(reference, MIXED, extras=True), _train(merged, MIXED, extras=True)
    _assert_same(reference, merged, a, b)
    assert passes == [(6, 6)] * 2


def test_a_token_cap_splits_a_merge_into_passes_of_whole_requests(make_config) -> None:
    config = make_config("run")
    # client order: 0 (2 x 6 = 12 tokens) and 1 (1 row: 3 x 6 = 18 <= 20) share a pass; 2 (3 x 5) would make
    # 6 x 6 = 36 > 20, so it runs alone (a pass holds at least one request even above the cap)
    reference, merged = _server(config), _server(config, merge=3, cap=20)
    passes, backwards = _trunk_passes(merged), _backward_passes(merged)
    a, b = _train(reference, MIXED), _train(merged, MIXED)
    _assert_same(reference, merged, a, b)
    assert passes == [(3, 6), (3, 5)] * 2 and len(backwards) == 4


def test_a_merge_of_k_fewer_than_the_barrier(make_config) -> None:
    # K = 2 of 3 clients: the first two to arrive share a pass; the third, the last one this step, runs alone
    config = make_config("run")
    reference, merged = _server(config), _server(config, merge=2)
    passes = _trunk_passes(merged)
    a, b = _train(reference, SAME), _train(merged, SAME)
    _assert_same(reference, merged, a, b)
    assert passes == [(4, 6), (2, 6)] * 2


# --- held requests never block the worker, and are dropped cleanly --------------------------------------------


def _held_server(make_config: Callable[..., Config]) -> SplitServer:
    """Clients 0 and 1 merge two at a time at the default adapter's barrier; client 2 trains an adapter alone."""
    server = _server(make_config("run"), merge=2, barrier=2)
    server.assign("2", "solo")
    server.start()
    return server


def _wait(future: Future[Message]) -> Message:
    return future.result(timeout=60)


def test_a_held_forward_does_not_stop_other_requests(make_config) -> None:
    server = _held_server(make_config)
    try:
        held = server.submit(_forward(server, "0", 0, (2, 6)))
        solo = _wait(server.submit(_forward(server, "2", 0, (2, 6))))  # another adapter's forward...
        shape = tuple(solo.tensors["hidden"].shape)
        back = server.submit(Message("backward", "2", 0, 0, {"grad": torch.ones(shape) * 1e-3}))
        assert "grad" in _wait(back).tensors  # ...and backward are served
        evaluated = server.submit(Message("eval", "1", -1, 0, {"hidden": torch.randn(1, 3, server.hidden_size)}))
        assert tuple(_wait(evaluated).tensors["hidden"].shape) == (1, 3, server.hidden_size)  # evals too
        assert server.snapshot()  # and internal actions
        assert not held.done()
        other = server.submit(_forward(server, "1", 0, (1, 4)))  # the second client: the merge runs
        assert tuple(_wait(held).tensors["hidden"].shape) == (2, 6, server.hidden_size)
        assert tuple(_wait(other).tensors["hidden"].shape) == (1, 4, server.hidden_size)
    finally:
        server.stop()


def test_a_held_backward_does_not_stop_other_requests(make_config) -> None:
    server = _held_server(make_config)
    try:
        first = server.submit(_forward(server, "0", 0, (2, 6)))
        second = server.submit(_forward(server, "1", 0, (1, 4)))
        out0, out1 = _wait(first).tensors["hidden"], _wait(second).tensors["hidden"]
        held = server.submit(Message("backward", "0", 0, 0, {"grad": torch.ones_like(out0) * 1e-3}))
        assert "hidden" in _wait(server.submit(_forward(server, "2", 0, (2, 6)))).tensors
        assert not held.done()
        rest = server.submit(Message("backward", "1", 0, 0, {"grad": torch.ones_like(out1) * 1e-3}))
        assert tuple(_wait(held).tensors["grad"].shape) == (2, 6, server.hidden_size)
        assert tuple(_wait(rest).tensors["grad"].shape) == (1, 4, server.hidden_size)
        assert not _merging(server)._merged and not _merging(server)._held
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["abandon", "forget", "restore"])
def test_held_requests_fail_when_the_round_stops(make_config, how: str) -> None:
    server = _held_server(make_config)
    try:
        snapshot = server.snapshot()
        first = server.submit(_forward(server, "0", 0, (2, 6)))
        second = server.submit(_forward(server, "1", 0, (1, 4)))
        out0 = _wait(first).tensors["hidden"]
        _wait(second)
        backward = server.submit(Message("backward", "0", 0, 0, {"grad": torch.ones_like(out0)}))  # held
        forward = server.submit(_forward(server, "0", 1, (2, 6), micro=1))  # held: another micro-batch
        stop: dict[str, Callable[[], None]] = {
            "abandon": server.abandon,
            "forget": lambda: server.forget("1"),
            "restore": lambda: server.restore(snapshot),
        }
        stop[how]()
        for future in (backward, forward):
            with pytest.raises(ProtocolError, match="abandoned"):
                _wait(future)
        merging = _merging(server)
        assert not merging._held and not merging._merged and not merging._fed
        late = server.submit(Message("backward", "1", 0, 0, {"grad": torch.ones(1, 4, server.hidden_size)}))
        with pytest.raises(ProtocolError, match="no matching forward"):
            _wait(late)
    finally:
        server.stop()


def test_a_client_at_its_step_is_not_waited_for(make_config) -> None:
    # three clients at the barrier, merging three at a time; client 2 steps without a forward of micro-batch 1,
    # so the merge of micro-batch 1 goes with the two clients that sent one
    server = _server(make_config("run"), merge=3)
    server.start()
    try:
        replies = [server.submit(_forward(server, c, 0, (1, 4))) for c in CLIENTS]
        outs = {c: _wait(r).tensors["hidden"] for c, r in zip(CLIENTS, replies, strict=True)}
        done = [server.submit(Message("backward", c, 0, 0, {"grad": outs[c] * 0})) for c in CLIENTS]
        for future in done:
            _wait(future)
        steps = [server.submit(Message("step", "2", 0, 0, {}, {"grad_sq_norm": 0.0}))]
        late = [server.submit(_forward(server, c, 0, (1, 4), micro=1)) for c in ("0", "1")]
        for future in late:
            assert "hidden" in _wait(future).tensors
        assert not steps[0].done()
    finally:
        server.abandon()
        server.stop()


def test_the_server_refuses_a_bad_merge_setting(make_config) -> None:
    with pytest.raises(ValueError, match="merge=0"):
        _server(make_config("run"), merge=0)
