"""The message pipeline: each mod alone on hand-made messages, the order of a chain, and the codec seam."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from splitlm.errors import ConfigError, ProtocolError
from splitlm.transport import Channel, InProcessTransport, Message, MeterMod, Mod, server_chain
from splitlm.transport.base import Answer, Handler
from splitlm.transport.codecs import CODECS, CodecMod, parse_codec
from splitlm.transport.wire import decode, encode

B, T, D = 2, 3, 4


def _forward(hidden: torch.Tensor | None = None) -> Message:
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0)) if hidden is None else hidden
    return Message("forward", "0", 1, 0, {"hidden": hidden, "attention_mask": torch.ones(B, T, dtype=torch.long)})


def _echo(message: Message) -> Message:
    """A server that answers a forward with twice its hidden states, anything else with a gradient of ones."""
    if message.kind in ("forward", "eval"):
        return Message(
            "activations", message.client_id, message.step, message.micro, {"hidden": message.tensors["hidden"] * 2}
        )
    return Message("gradients", message.client_id, message.step, message.micro, {"grad": torch.ones(B, T, D)})


class Tag(Mod):
    """Appends its name to a trace on every hook it sees (for checking the order of a chain)."""

    def __init__(self, name: str, trace: list[str]) -> None:
        self.name = name
        self.trace = trace

    def on_request(self, message: Message) -> Message:
        self.trace.append(f"{self.name}.request")
        return message.replace(**{f"seen_{self.name}": True})

    def on_reply(self, request: Message, reply: Message) -> Message:
        assert request.meta[f"seen_{self.name}"]  # the request as this mod passed it on
        self.trace.append(f"{self.name}.reply")
        return reply

    def serve(self, message: Message, call_next: Handler) -> Answer:
        self.trace.append(f"{self.name}.serve")
        return call_next(message)


def test_client_chain_runs_requests_in_order_and_replies_in_reverse() -> None:
    trace: list[str] = []
    channel = Channel(InProcessTransport(_echo), [Tag("a", trace), Tag("b", trace), Tag("c", trace)])
    channel.request(_forward())
    assert trace == ["a.request", "b.request", "c.request", "c.reply", "b.reply", "a.reply"]


def test_server_chain_runs_from_the_wire_inwards() -> None:
    trace: list[str] = []

    def handler(message: Message) -> Message:
        trace.append("handler")
        return _echo(message)

    server_chain([Tag("codec", trace), Tag("tap", trace)], handler)(_forward())
    assert trace == ["codec.serve", "tap.serve", "handler"]


def test_channel_keeps_the_last_differentiable_version_of_what_it_sent() -> None:
    class Double(Mod):  # differentiable: the client backpropagates through it
        def on_request(self, message: Message) -> Message:
            return message.replace({**message.tensors, "hidden": message.tensors["hidden"] * 2})

    leaf = torch.ones(B, T, D, requires_grad=True)
    exchange = Channel(InProcessTransport(_echo), [Double(), CodecMod("fp16", "none")]).request(_forward(leaf * 1))
    sent = exchange.sent["hidden"]
    assert sent.requires_grad and sent.dtype == torch.float32  # not the fp16 wire tensor: codecs are straight-through
    sent.backward(torch.ones(B, T, D))
    assert torch.equal(leaf.grad, torch.full((B, T, D), 2.0))


def test_meter_counts_requests_and_replies_under_the_request_kind() -> None:
    meter = MeterMod()
    channel = Channel(InProcessTransport(_echo), [meter])
    channel.request(_forward())
    hidden, mask = B * T * D * 4, B * T * 8
    assert meter.meter.snapshot() == (hidden + mask, hidden)
    channel.request(Message("eval", "0", -1, 0, _forward().tensors))
    assert meter.meter.snapshot() == (hidden + mask, hidden)  # evaluation is counted apart
    assert meter.meter.eval_snapshot() == (hidden + mask, hidden)


def test_meter_after_the_codec_counts_encoded_bytes() -> None:
    plain, encoded = MeterMod(), MeterMod()
    Channel(InProcessTransport(server_chain([CodecMod()], _echo)), [CodecMod(), plain]).request(_forward())
    Channel(InProcessTransport(server_chain([CodecMod("fp16")], _echo)), [CodecMod("fp16"), encoded]).request(
        _forward()
    )
    hidden, mask = B * T * D * 4, B * T * 8
    assert plain.meter.snapshot() == (hidden + mask, hidden)
    assert encoded.meter.snapshot() == (hidden // 2 + mask, hidden // 2)  # fp16 both ways: half the hidden bytes


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_codec_round_trip_within_its_precision(spec: str) -> None:
    codec = parse_codec(spec)
    assert codec is not None and codec.spec == spec
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    parts = codec.encode(x)
    back = codec.decode(parts, "test")
    assert back.dtype == torch.float32 and back.shape == x.shape
    tolerance = 1e-3 if spec == "fp16" else 1e-2  # 11 / 8 significant bits
    assert torch.allclose(back, x, rtol=tolerance, atol=tolerance)


def test_bf16_on_bf16_data_is_lossless() -> None:
    codec = parse_codec("bf16")
    assert codec is not None
    x = torch.randn(B, T, D).bfloat16()
    assert torch.equal(codec.decode(codec.encode(x), "test").bfloat16(), x)


def test_codec_mod_encodes_on_one_side_and_decodes_on_the_other_through_the_wire() -> None:
    client, server = CodecMod("fp16", "fp16"), CodecMod("fp16", "fp16")
    seen: list[Message] = []

    def handler(message: Message) -> Message:
        seen.append(message)
        return _echo(message)

    def wire(message: Message) -> Answer:  # what a stream transport does: frames in, frames out
        answer = server_chain([server], handler)(decode(encode(message)))
        return decode(encode(answer.result() if isinstance(answer, Future) else answer))

    request = _forward()
    exchange = Channel(InProcessTransport(wire), [client]).request(request)
    (received,) = seen
    assert received.codecs == {} and received.tensors["hidden"].dtype == torch.float32  # decoded before the server
    assert torch.allclose(received.tensors["hidden"], request.tensors["hidden"], atol=1e-3)
    assert exchange.reply.codecs == {} and exchange.reply.tensors["hidden"].dtype == torch.float32


def test_codec_mod_leaves_unconfigured_tensors_alone() -> None:
    mod = CodecMod("fp16", "none")
    encoded = mod.encode(Message("backward", "0", 0, 0, {"grad": torch.ones(B, T, D)}))
    assert encoded.codecs == {} and encoded.tensors["grad"].dtype == torch.float32
    forward = mod.encode(_forward())
    assert forward.codecs == {"hidden": "fp16"} and forward.tensors["attention_mask"].dtype == torch.long


BAD_ENCODED = {
    "codec this side does not use": (
        Message("forward", "0", 0, 0, {"hidden": torch.ones(1).half()}, {}, {"hidden": "bf16"}),
        "expects 'fp16'",
    ),
    "wrong dtype for the codec": (
        Message("forward", "0", 0, 0, {"hidden": torch.ones(1)}, {}, {"hidden": "fp16"}),
        "expected torch.float16",
    ),
    "codec on a tensor no setting covers": (
        Message("forward", "0", 0, 0, {"attention_mask": torch.ones(1).half()}, {}, {"attention_mask": "fp16"}),
        "expects 'none'",
    ),
    "main part missing": (
        Message("forward", "0", 0, 0, {"hidden#x": torch.ones(1).half()}, {}, {"hidden": "fp16"}),
        "main part is missing",
    ),
    "stray part": (
        Message(
            "forward", "0", 0, 0, {"hidden": torch.ones(1).half(), "hidden#x": torch.ones(1)}, {}, {"hidden": "fp16"}
        ),
        "parts",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ENCODED))
def test_malformed_encoded_payloads_are_protocol_errors(case: str) -> None:
    message, pattern = BAD_ENCODED[case]
    with pytest.raises(ProtocolError, match=pattern):
        CodecMod("fp16", "none").decode(message)


def test_unknown_codec_is_a_config_error_naming_the_choices() -> None:
    assert {"fp16", "bf16"} <= set(CODECS)
    with pytest.raises(ConfigError, match=r"transport\.codec: unknown codec 'fp61'.*did you mean 'fp16'"):
        parse_codec("fp61")
    with pytest.raises(ConfigError, match="takes no argument"):
        parse_codec("fp16:3")
    with pytest.raises(ConfigError, match="can only come last"):
        parse_codec("fp16+bf16")
    assert parse_codec("none") is None


class SignMagnitude:
    """A test codec with two parts: the magnitudes (main) and the signs (part "sign")."""

    spec = "signmag"

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": tensor.abs(), "sign": tensor.sign().to(torch.int8)}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        if set(parts) != {"", "sign"}:
            raise ProtocolError(f"signmag: {where} has parts {sorted(parts)}")
        return parts[""].float() * parts["sign"].float()


@pytest.fixture
def signmag() -> object:
    CODECS.add("signmag", lambda argument: SignMagnitude())
    yield
    CODECS.remove("signmag")


def test_a_registered_codec_with_parts_chains_and_crosses_the_wire(signmag: object) -> None:
    mod = CodecMod("signmag+fp16")
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    encoded = mod.encode(_forward(x))
    assert sorted(encoded.tensors) == ["attention_mask", "hidden", "hidden#0-sign"]
    assert encoded.tensors["hidden"].dtype == torch.float16 and encoded.tensors["hidden#0-sign"].dtype == torch.int8
    arrived = decode(encode(encoded))  # every part travels under the tensor's codec
    assert arrived.codecs == {"hidden": "signmag+fp16"}
    back = mod.decode(arrived).tensors["hidden"]
    assert torch.allclose(back, x, atol=1e-3)
