"""Bad frames over TLS get an ``error`` frame, change nothing, and do not disturb other clients; retries replay."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
import torch
from network_support import NetServer, bearer, forward_message, healthy_step

from splitlm.peft.lora import ADAPTER
from splitlm.transport.messages import Message
from splitlm.transport.wire import DATA_MAGIC, HEADER_MAGIC, encode

pytestmark = pytest.mark.timeout(180)


def _header_frame(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return HEADER_MAGIC + struct.pack("<I", len(body)) + body


def _tensor_header(shape: list[int], nbytes: int, frames: int = 2) -> dict:
    tensor = {"name": "hidden", "dtype": "float32", "shape": shape, "nbytes": nbytes, "codec": "raw"}
    counters = {"step": 1, "micro": 0}
    return {"kind": "forward", "client_id": "0", **counters, "meta": {}, "tensors": [tensor], "frames": frames}


def _bad_magic(net: NetServer) -> list[bytes]:
    good = encode(forward_message("0", 1, net.hidden_size))
    return [b"XXXX" + good[0][4:]]


def _truncated_header(net: NetServer) -> list[bytes]:
    good = encode(forward_message("0", 1, net.hidden_size))[0]
    return [good[: len(good) // 2]]


def _short_frame(net: NetServer) -> list[bytes]:
    return [HEADER_MAGIC + b"\x00"]


def _size_lie(net: NetServer) -> list[bytes]:
    shape = [1, 2, net.hidden_size]
    nbytes = 2 * net.hidden_size * 4 + 4  # one float more than the shape holds
    return [_header_frame(_tensor_header(shape, nbytes))]  # refused on the header: no data frame follows


def _over_limit(net: NetServer) -> list[bytes]:
    shape = [1, 1 << 23, net.hidden_size]  # 2 GiB of float32 (hidden size 64): past the 1 GiB tensor limit
    nbytes = (1 << 23) * net.hidden_size * 4
    return [_header_frame(_tensor_header(shape, nbytes))]  # the data never comes: the header alone is refused


def _wrong_hidden_size(net: NetServer) -> list[bytes]:
    message = forward_message("0", 1, net.hidden_size + 1)
    return encode(message)


def _nan_hidden(net: NetServer) -> list[bytes]:
    message = forward_message("0", 1, net.hidden_size)
    message.tensors["hidden"][1, 3, 7] = float("nan")
    return encode(message)


def _backward_without_forward(net: NetServer) -> list[bytes]:
    return encode(Message("backward", "0", 10**6, 0, {"grad": torch.ones(2, 5, net.hidden_size)}))


def _unknown_kind(net: NetServer) -> list[bytes]:
    return encode(Message("frobnicate", "0", 1, 0, {}, {}))


def _data_before_header(net: NetServer) -> list[bytes]:
    return [DATA_MAGIC + struct.pack("<I", 1) + b"\x00" * 16]


BAD_INPUTS: dict[str, tuple[Callable[[NetServer], list[bytes]], str]] = {
    "bad magic": (_bad_magic, "bad magic b'XXXX'"),
    "truncated header": (_truncated_header, "header frame says"),
    "frame shorter than its prefix": (_short_frame, "too short"),
    "size lie": (_size_lie, "nbytes is"),
    "tensor over the limit": (_over_limit, "over the limit"),
    "wrong hidden size": (_wrong_hidden_size, "expected (batch, tokens, {hidden})"),
    "NaN hidden": (_nan_hidden, "NaN or Inf"),
    "backward with no forward": (_backward_without_forward, "has no matching forward"),
    "unknown kind": (_unknown_kind, "unexpected message kind 'frobnicate'"),
    "data frame before any header": (_data_before_header, "before any header"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_an_error_frame_and_changes_nothing(net_server, open_stream, healthy, case) -> None:
    # Prepare: client 0 on a raw stream; client 1 (healthy, its own adapter) trains before the bad input.
    make_frames, expected = BAD_INPUTS[case]
    stream = open_stream(bearer(net_server.tokens["0"], client_header="0"))
    healthy_step(net_server, healthy)
    trunk = net_server.trunk_snapshot()
    pending = set(net_server.split_server.handlers.pending)
    schedule = net_server.split_server.optimizer(ADAPTER).scheduler.last_epoch

    # Execute
    stream.send_frames(make_frames(net_server))
    reply = stream.reply()

    # Assert: a helpful error on the stream; the trunk, its gradients and graphs, and the optimizer unchanged.
    assert reply.kind == "error", reply
    assert reply.client_id == "0"
    assert expected.format(hidden=net_server.hidden_size) in str(reply.meta["error"])
    after = net_server.trunk_snapshot()
    changed = [name for name in trunk if not torch.equal(trunk[name], after[name])]
    assert changed == []
    assert net_server.trunk_grads() == []
    assert set(net_server.split_server.handlers.pending) == pending
    assert net_server.split_server.optimizer(ADAPTER).scheduler.last_epoch == schedule
    assert stream.replies.empty(), "one bad input, one error frame"

    # The other client goes on, and the same stream still serves a good request afterwards.
    healthy_step(net_server, healthy)
    step = next(net_server.steps)
    good = forward_message("0", step, net_server.hidden_size)
    stream.send(Message("eval", "0", step, 0, good.tensors, {}))
    answer = stream.reply()
    assert answer.kind == "activations", answer
    assert answer.tensors["hidden"].shape == (2, 5, net_server.hidden_size)


def _equal(a: Message, b: Message) -> bool:
    same = (a.kind, a.client_id, a.step, a.micro, a.meta) == (b.kind, b.client_id, b.step, b.micro, b.meta)
    tensors = a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    return same and tensors


def test_retried_requests_are_answered_from_the_replay_cache(net_server, open_stream, healthy, monkeypatch) -> None:
    # Prepare: count the requests that reach the server's handler.
    split = net_server.split_server
    submitted: list[tuple[str, str, int]] = []
    submit = net_server.grpc_server.handler

    def counting_submit(message: Message):
        submitted.append((message.kind, message.client_id, message.step))
        return submit(message)

    monkeypatch.setattr(net_server.grpc_server, "handler", counting_submit)
    stream = open_stream(bearer(net_server.tokens["0"], client_header="0"))
    step = next(net_server.steps)
    forward = forward_message("0", step, net_server.hidden_size, seed=step)

    # A forward sent twice: the same activations, one trunk forward.
    stream.send(forward)
    first = stream.reply()
    stream.send(forward)
    second = stream.reply()
    assert first.kind == "activations"
    assert _equal(first, second)
    assert submitted == [("forward", "0", step)]
    assert ("0", step, 0) in split.handlers.pending

    # A backward sent twice: the same gradients, one trunk backward.
    grad = Message("backward", "0", step, 0, {"grad": torch.ones_like(first.tensors["hidden"])})
    stream.send(grad)
    first_grad = stream.reply()
    stream.send(grad)
    second_grad = stream.reply()
    assert first_grad.kind == "gradients"
    assert _equal(first_grad, second_grad)
    assert submitted[1:] == [("backward", "0", step)]

    # A step sent twice: the optimizer steps once.
    before = split.adapter_state(ADAPTER)
    schedule = split.optimizer(ADAPTER).scheduler.last_epoch
    stream.send(Message("step", "0", step, 0, {}, {"grad_sq_norm": 0.0}))
    first_step = stream.reply()
    once = split.adapter_state(ADAPTER)
    stream.send(Message("step", "0", step, 0, {}, {"grad_sq_norm": 0.0}))
    second_step = stream.reply()
    twice = split.adapter_state(ADAPTER)
    assert first_step.kind == "stepped"
    assert _equal(first_step, second_step)
    assert any(not torch.equal(before[k], once[k]) for k in before), "the first step did not train the adapter"
    assert all(torch.equal(once[k], twice[k]) for k in once), "the repeated step moved the adapter again"
    assert split.optimizer(ADAPTER).scheduler.last_epoch == schedule + 1
    assert submitted[2:] == [("step", "0", step)]
    assert stream.replies.empty()
    healthy_step(net_server, healthy)  # the other client is unaffected
