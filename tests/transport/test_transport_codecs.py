"""The wire codecs of ``transport/codecs.py``: round trips within each codec's stated bound, the bytes they send,
chains, malformed payloads, the attention mask that ``CodecMod`` carries over to the backward, error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future

import pytest
import torch

from splitlm.config.load import build_config
from splitlm.errors import ConfigError, ProtocolError
from splitlm.frameworks.base import config_problems
from splitlm.frameworks.pipeline import codec_mod
from splitlm.transport import Channel, InProcessTransport, Message, MeterMod, server_chain
from splitlm.transport.base import Answer
from splitlm.transport.codecs import (
    CODECS,
    MAX_REMEMBERED,
    Codec,
    CodecMod,
    parse_codec,
    wire_limits,
    wire_tensors,
)
from splitlm.transport.wire import Limits, WireError, decode, encode

SHAPES = [(2, 5, 64), (3, 4, 576), (2, 3, 7), (1, 2, 300)]  # d = 7: odd for int4; d = 300: 2-byte indices


def _tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mask(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(B, T) long mask of real tokens (1) followed by padding (0); each row keeps at least one real token."""
    lengths = torch.randint(1, tokens + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long()


def _codec(spec: str) -> Codec:
    codec = parse_codec(spec)
    assert codec is not None and codec.spec == spec
    return codec


def _round_trip(spec: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    codec = _codec(spec)
    parts = codec.encode(x, mask)
    return codec.decode(parts, "test")


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _token_scale(x: torch.Tensor, levels: int) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True) / levels


# ---------------------------------------------------------------- round trips within the stated bounds


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("spec", "levels"), [("int8", 127), ("int4", 7)])
def test_round_to_nearest_is_within_half_a_step(spec: str, levels: int, shape: tuple[int, ...]) -> None:
    x = _tensor(shape)
    back = _round_trip(spec, x)
    assert back.dtype == torch.float32 and back.shape == x.shape
    half_step = _token_scale(x, levels) / 2
    assert bool(((back - x).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
    assert torch.allclose(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)  # the token's largest: exact


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("spec", "levels", "outliers"), [("int8:o8", 127, 8), ("int4:o8", 7, 8), ("int4:o2", 7, 2)])
def test_outliers_travel_exactly_and_the_rest_within_half_a_step_of_their_own_scale(
    spec: str, levels: int, outliers: int, shape: tuple[int, ...]
) -> None:
    x = _tensor(shape)
    x[..., 0] *= 300.0  # a massive-activation dimension, as in LLM hidden states
    back = _round_trip(spec, x)
    kept = min(outliers, shape[-1])
    top = x.abs().topk(kept, dim=-1).indices
    assert torch.equal(back.gather(-1, top), x.gather(-1, top))  # sent exactly (float32)
    rest = x.scatter(-1, top, 0.0)
    half_step = _token_scale(rest, levels) / 2
    assert bool(((back.scatter(-1, top, 0.0) - rest).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
    plain = _round_trip(spec.split(":")[0], x)
    if shape[-1] > outliers:  # without the outliers, the huge dimension sets everyone's step
        assert (back - x).abs().mean() < (plain - x).abs().mean()


def test_outlier_options_combine_with_stochastic_rounding_and_name_themselves() -> None:
    assert _codec("int4:sr:o8").spec == "int4:sr:o8"
    assert parse_codec("int4:o8:sr").spec == "int4:sr:o8"  # one spelling on the wire
    parts = _codec("int4:o8").encode(_tensor((2, 3, 576)))
    assert set(parts) == {"", "scale", "dim", "ovals", "oidx"}
    assert _nbytes(parts) == 2 * 3 * (288 + 4 + 8 * (4 + 2)) + 8  # + the int64 ``dim``


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("spec", "levels"), [("int8:sr", 127), ("int4:sr", 7)])
def test_stochastic_rounding_is_within_one_step(spec: str, levels: int, shape: tuple[int, ...]) -> None:
    x = _tensor(shape, seed=1)
    back = _round_trip(spec, x)
    assert bool(((back - x).abs() < _token_scale(x, levels) * (1 + 1e-5)).all())


@pytest.mark.parametrize("spec", ["int8:sr", "int4:sr", "randtopk:0.25"])
def test_stochastic_codecs_are_reproducible_and_leave_the_global_rng_alone(spec: str) -> None:
    x = _tensor((2, 6, 64), seed=2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = _codec(spec).encode(x), _codec(spec).encode(x.clone())
    assert torch.equal(torch.get_rng_state(), state)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = _codec(spec).encode(_tensor((2, 6, 64), seed=3))
    assert not torch.equal(other[""], first[""])


@pytest.mark.parametrize(("spec", "levels"), [("int8:sr", 127), ("int4:sr", 7)])
def test_stochastic_rounding_is_unbiased(spec: str, levels: int) -> None:
    x = torch.full((1, 4000, 8), 0.3)
    x[..., 0] = 1.0  # absmax 1: 0.3 sits between two levels
    back = _round_trip(spec, x)[..., 1:]
    assert len(back.unique()) == 2  # rounded up or down
    nearest = _round_trip(spec.removesuffix(":sr"), x)[..., 1:]
    assert len(nearest.unique()) == 1  # always the same level: biased by up to half a step
    assert abs(float(back.mean()) - 0.3) < abs(float(nearest.mean()) - 0.3) / 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", ["0.1", "0.5", "1"])
def test_topk_keeps_the_largest_entries_exactly_and_zeros_the_rest(ratio: str, shape: tuple[int, ...]) -> None:
    x = _tensor(shape, seed=4)
    d = shape[-1]
    k = math.ceil(float(ratio) * d - 1e-9)
    back = _round_trip(f"topk:{ratio}", x)
    kept = back != 0
    assert bool((kept.sum(-1) == k).all())
    assert torch.equal(back[kept], x[kept])  # bit-exact
    threshold = x.abs().topk(k, dim=-1).values[..., -1:]  # the k-th largest magnitude of each token
    assert bool((x.abs()[kept.logical_not()] < threshold.expand_as(x)[kept.logical_not()]).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_randtopk_draws_a_share_of_its_slots_from_outside_the_top_k(shape: tuple[int, ...]) -> None:
    x = _tensor(shape, seed=5)
    d = shape[-1]
    k = math.ceil(0.25 * d)
    drawn = min(math.floor(0.1 * k + 0.5), d - k)  # A = 0.1 by default
    back = _round_trip("randtopk:0.25", x)
    kept = back != 0
    assert bool((kept.sum(-1) == k).all()) and torch.equal(back[kept], x[kept])
    top_k = torch.zeros_like(kept).scatter_(-1, x.abs().topk(k, dim=-1).indices, True)
    assert bool(((kept & ~top_k).sum(-1) == drawn).all())  # drawn from outside the top-k set
    top_rest = torch.zeros_like(kept).scatter_(-1, x.abs().topk(k - drawn, dim=-1).indices, True)
    assert bool((kept >= top_rest).all())  # the k - drawn largest are always kept
    assert _codec("randtopk:0.25:0.5").encode(x)[""].shape[-1] == k


def test_unpadded_is_lossless_on_real_tokens_and_zero_at_padding() -> None:
    for shape in SHAPES:
        x = _tensor(shape, seed=6)
        mask = _mask(*shape[:2], seed=6)
        mask[0, -1] = 0  # at least one padding position
        back = _round_trip("unpadded", x, mask)
        assert back.dtype == x.dtype and back.shape == x.shape
        assert torch.equal(back[mask == 1], x[mask == 1])
        assert not back[mask == 0].any()
    x = _tensor((2, 3, 4)).bfloat16()
    assert torch.equal(_round_trip("unpadded", x), x)  # no mask: every token real, the dtype kept


def test_bf16_on_bf16_data_is_lossless() -> None:
    x = _tensor((2, 3, 64)).bfloat16()
    assert torch.equal(_round_trip("bf16", x).bfloat16(), x)


# ---------------------------------------------------------------- chains


@pytest.mark.parametrize("inner", ["int8", "int4", "topk:0.1", "topk:0.1+fp16", "fp16"])
def test_unpadded_chain_equals_its_inner_codec_on_the_real_rows(inner: str) -> None:
    x = _tensor((3, 5, 576), seed=7)
    mask = _mask(3, 5, seed=7)
    back = _round_trip(f"unpadded+{inner}", x, mask)
    expected = torch.zeros_like(x)
    expected[mask == 1] = _round_trip(inner, x[mask == 1])
    assert torch.equal(back, expected)


def test_chain_parts_are_numbered_and_topk_values_can_be_quantized() -> None:
    x = _tensor((2, 4, 64), seed=8)
    parts = _codec("unpadded+topk:0.5+int8").encode(x, _mask(2, 4))
    assert sorted(parts) == ["", "0-keep", "0-shape", "1-dim", "1-idx", "2-scale"]
    back = _round_trip("topk:0.5+int8", x)
    topk = _round_trip("topk:0.5", x)  # int8 quantizes the kept values, token by token
    assert bool(((back != 0) <= (topk != 0)).all())
    assert bool(((back - topk).abs() <= _token_scale(topk, 127) / 2 * (1 + 1e-5) + 1e-7).all())


def test_chain_passes_the_mask_only_to_the_codec_that_uses_it() -> None:
    class Spy:
        spec = "spy"

        def __init__(self) -> None:
            self.seen: list[tuple[int, ...]] = []

        def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:  # a codec that takes no mask
            self.seen.append(tuple(tensor.shape))
            return {"": tensor}

        def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
            return parts[""]

    spy = Spy()
    CODECS.add("spy", lambda argument: spy)
    try:
        x, mask = _tensor((2, 3, 4)), torch.tensor([[1, 1, 0], [1, 0, 0]])
        back = _round_trip("unpadded+spy", x, mask)
    finally:
        CODECS.remove("spy")
    assert spy.seen == [(3, 4)]  # the real rows
    assert torch.equal(back[mask == 1], x[mask == 1])


# ---------------------------------------------------------------- bytes


def test_encoded_sizes_are_what_the_codecs_claim() -> None:
    batch, tokens, d = 4, 128, 576
    x = _tensor((batch, tokens, d), seed=9)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for row, length in enumerate([77, 77, 77, 76]):  # 307 of 512 tokens real (60%)
        mask[row, :length] = 1
    raw, rows, real = x.numel() * 4, batch * tokens, 307
    k = 58  # ceil(0.1 * 576)
    sizes = {spec: _nbytes(_codec(spec).encode(x, mask)) for spec in CODECS_AT_576}
    assert sizes == {
        "fp16": raw // 2,
        "int8": rows * d + rows * 4,  # one float32 scale a token
        "int4": rows * d // 2 + rows * 4 + 8,  # and d
        "topk:0.1": rows * k * (4 + 2) + 8,  # float32 values, 2-byte indices (d > 256)
        "topk:0.1+fp16": rows * k * (2 + 2) + 8,
        "randtopk:0.1": rows * k * (4 + 2) + 8,
        "unpadded": real * d * 4 + rows // 8 + 3 * 8,  # real rows, keep-bits, shape
        "unpadded+int8": real * d + real * 4 + rows // 8 + 3 * 8,
        "unpadded+int4": real * d // 2 + real * 4 + rows // 8 + 3 * 8 + 8,
    }
    assert 3.9 < raw / sizes["int8"] < 4 and 7.8 < raw / sizes["int4"] < 8
    small = _codec("topk:0.1").encode(_tensor((2, 3, 64)))  # d <= 256: one byte an index
    assert small["idx"].shape == (2, 3, 7, 1) and _nbytes(small) == 6 * 7 * 5 + 8


CODECS_AT_576 = [
    "fp16",
    "int8",
    "int4",
    "topk:0.1",
    "topk:0.1+fp16",
    "randtopk:0.1",
    "unpadded",
    "unpadded+int8",
    "unpadded+int4",
]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("topk", "needs the share"),
        ("topk:0", r"must be a number in \(0, 1\]"),
        ("topk:1.5", r"must be a number in \(0, 1\]"),
        ("topk:abc", "must be a number"),
        ("randtopk:0.1:2", r"random share A.*\[0, 1\]"),
        ("int8:x", "stochastic rounding"),
        ("int4:3", "stochastic rounding"),
        ("int4:o0", "outliers per token"),
        ("int4:o300", "outliers per token"),
        ("int4:o8:o4", "outliers per token"),
        ("int8:sr:sr", "outliers per token"),
        ("unpadded:1", "takes no argument"),
        ("lowrank:8", "unknown codec"),  # a learned bottleneck is a model option (split.bottleneck), not a codec
        ("int8+unpadded", "unpadded needs the"),
        ("topk:0.1+unpadded", "unpadded needs the"),
        ("unpadded+unpadded", "unpadded needs the"),
        ("int8+topk:0.1", "can only come last"),
        ("int4+fp16", "can only come last"),
    ],
)
def test_bad_specs_are_config_errors(spec: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_codec(spec)


def test_lowrank_is_no_codec_of_either_channel() -> None:
    for key in ("activations", "gradients"):
        with pytest.raises(ConfigError, match=rf"transport\.codec\.{key}: .*lowrank"):
            build_config({}, [f"transport.codec.{key}=lowrank:8"], checks=[config_problems])


def test_error_feedback_is_off_by_default_and_set_from_the_config() -> None:
    assert not CodecMod("int8", "topk:0.1").error_feedback
    assert not codec_mod(build_config({}, ["transport.codec.gradients=topk:0.1"])).error_feedback
    config = build_config({}, ["transport.codec.gradients=topk:0.1", "transport.codec.error_feedback=true"])
    assert codec_mod(config).error_feedback


# ---------------------------------------------------------------- malformed payloads


def _good(spec: str, shape: tuple[int, ...] = (2, 3, 10)) -> dict[str, torch.Tensor]:
    x = _tensor(shape, seed=10)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]) if shape[:2] == (2, 3) else None
    return _codec(spec).encode(x, mask)


def _with(parts: dict[str, torch.Tensor], **changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``parts`` with some replaced (``None``: dropped); ``_`` stands for the main part ``""``."""
    out = dict(parts)
    for name, value in changes.items():
        key = "" if name == "_" else name
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


Mutation = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
MALFORMED: dict[str, tuple[str, Mutation, str]] = {
    "int8 scale dropped": ("int8", lambda p: _with(p, scale=None), "expected"),
    "int8 extra part": ("int8", lambda p: _with(p, x=torch.ones(1)), r"parts \['', 'scale', 'x'\]"),
    "int8 main float": ("int8", lambda p: _with(p, _=p[""].float()), "dtype float32, expected int8"),
    "int8 main scalar": ("int8", lambda p: _with(p, _=torch.tensor(1, dtype=torch.int8)), "at least 1"),
    "int8 -128": ("int8", lambda p: _with(p, _=torch.full_like(p[""], -128)), "holds -128"),
    "int8 scale too short": ("int8", lambda p: _with(p, scale=p["scale"][:, :2]), r"shape \[2, 2, 1\], expected"),
    "int8 scale fp16": ("int8", lambda p: _with(p, scale=p["scale"].half()), "dtype float16"),
    "int8 scale nan": ("int8", lambda p: _with(p, scale=torch.full_like(p["scale"], math.nan)), "non-finite"),
    "int8 scale negative": ("int8", lambda p: _with(p, scale=-p["scale"]), "negative"),
    "int4 dim dropped": ("int4", lambda p: _with(p, dim=None), "expected"),
    "int4 dim lies": ("int4", lambda p: _with(p, dim=torch.tensor([30])), "needs 15"),
    "int4 dim negative": ("int4", lambda p: _with(p, dim=torch.tensor([-1])), r"expected each in \[0"),
    "int4 dim int32": ("int4", lambda p: _with(p, dim=torch.tensor([10], dtype=torch.int32)), "dtype int32"),
    "int4 dim two values": ("int4", lambda p: _with(p, dim=torch.tensor([10, 10])), "expected 1 to 1 sizes"),
    "int4 nibble -8": ("int4", lambda p: _with(p, _=torch.zeros_like(p[""])), "holds -8"),
    "int4 main int8": ("int4", lambda p: _with(p, _=p[""].to(torch.int8)), "expected uint8"),
    "int4 scale wrong tokens": ("int4", lambda p: _with(p, scale=p["scale"][:1]), "part 'scale' has shape"),
    "outliers dropped": ("int4:o2", lambda p: _with(p, ovals=None), "expected"),
    "outliers idx out of range": ("int4:o2", lambda p: _with(p, oidx=torch.full_like(p["oidx"], 12)), "out of range"),
    "outliers idx repeated": ("int4:o2", lambda p: _with(p, oidx=torch.zeros_like(p["oidx"])), "not increasing"),
    "outliers values fewer": ("int8:o2", lambda p: _with(p, ovals=p["ovals"][..., :1]), "part 'ovals' has shape"),
    "outliers values fp16": ("int8:o2", lambda p: _with(p, ovals=p["ovals"].half()), "dtype float16"),
    "topk idx dropped": ("topk:0.3", lambda p: _with(p, idx=None), "expected"),
    "topk idx out of range": ("topk:0.3", lambda p: _with(p, idx=torch.full_like(p["idx"], 12)), ">= d=10"),
    "topk idx repeated": ("topk:0.3", lambda p: _with(p, idx=torch.zeros_like(p["idx"])), "strictly increasing"),
    "topk idx wide": ("topk:0.3", lambda p: _with(p, idx=p["idx"].repeat(1, 1, 1, 2)), r"expected \[2, 3, 3, 1\]"),
    "topk idx int64": ("topk:0.3", lambda p: _with(p, idx=p["idx"].long()), "dtype int64, expected uint8"),
    "topk idx fewer": ("topk:0.3", lambda p: _with(p, idx=p["idx"][..., :2, :]), "part 'idx' has shape"),
    "topk too many values": ("topk:0.3", lambda p: _with(p, _=torch.ones(2, 3, 4)), "keeps 3 of d=10"),
    "topk dim lies": ("topk:0.3", lambda p: _with(p, dim=torch.tensor([100])), "keeps 30 of d=100"),
    "topk values int": ("topk:0.3", lambda p: _with(p, _=p[""].long()), "dtype int64"),
    "topk dim huge": (
        "topk:1",
        lambda p: _with(p, dim=torch.tensor([1 << 30]), _=torch.ones(4, 0), idx=torch.ones(4, 0, 4, dtype=torch.uint8)),
        "keeps",
    ),
    "unpadded keep dropped": ("unpadded", lambda p: _with(p, keep=None), "expected"),
    "unpadded keep claims more rows": (
        "unpadded",
        lambda p: _with(p, keep=torch.tensor([0b111111], dtype=torch.uint8)),
        "marks 6 real tokens but the main part has 3 rows",
    ),
    "unpadded keep too long": (
        "unpadded",
        lambda p: _with(p, keep=torch.zeros(2, dtype=torch.uint8)),
        r"expected \[1\]",
    ),
    "unpadded bits past the tokens": ("unpadded", lambda p: _with(p, keep=p["keep"] | 0x80), "past its 6 tokens"),
    "unpadded shape too short": ("unpadded", lambda p: _with(p, shape=torch.tensor([6])), "expected 2 to 8 sizes"),
    "unpadded shape disagrees": ("unpadded", lambda p: _with(p, shape=torch.tensor([2, 3, 11])), r"expected \(N, 11\)"),
    "unpadded shape huge": (
        "unpadded",
        lambda p: _with(p, shape=torch.tensor([2, 1 << 40, 10])),
        r"expected each in \[0",
    ),
    "unpadded decodes too big": (
        "unpadded",
        lambda p: _with(
            p, shape=torch.tensor([8, 1, 1 << 30]), _=torch.ones(0, 1 << 30), keep=torch.zeros(1, dtype=torch.uint8)
        ),
        "MAX_DECODED_BYTES",
    ),
    "unpadded main int": ("unpadded", lambda p: _with(p, _=p[""].long()), "dtype int64"),
    "chain part of no codec": ("unpadded+int8", lambda p: _with(p, **{"5-x": torch.ones(1)}), "unexpected parts"),
    "chain empty part name": ("unpadded+int8", lambda p: _with(p, **{"1-": torch.ones(1)}), "names no part"),
    "chain inner part dropped": ("unpadded+int8", lambda p: _with(p, **{"1-scale": None}), "codec int8"),
    "chain outer part dropped": ("unpadded+int8", lambda p: _with(p, **{"0-keep": None}), "codec unpadded"),
    "chain main dropped": ("unpadded+int8", lambda p: _with(p, _=None), "without its main part"),
    "fp16 wrong dtype": ("fp16", lambda p: _with(p, _=p[""].float()), "expected torch.float16"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payloads_are_protocol_errors_naming_codec_and_tensor(case: str) -> None:
    spec, mutate, pattern = MALFORMED[case]
    parts = _good(spec)
    codec = _codec(spec)
    codec.decode(dict(parts), "forward tensor 'hidden'")  # the unmutated parts decode
    with pytest.raises(ProtocolError, match=pattern) as error:
        codec.decode(mutate(parts), "forward tensor 'hidden'")
    assert "forward tensor 'hidden'" in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- CodecMod: the mask across steps


B, T, D = 2, 4, 8
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def _forward(kind: str = "forward", step: int = 1, micro: int = 0) -> Message:
    hidden = _tensor((B, T, D), seed=step * 10 + micro)
    return Message(kind, "c", step, micro, {"hidden": hidden, "attention_mask": MASK.clone()})


def _backward(step: int = 1, micro: int = 0) -> Message:
    return Message("backward", "c", step, micro, {"grad": _tensor((B, T, D), seed=100 + step)})


class Server:
    """An echo server behind a codec mod, reached through the wire; it records what it was handed (decoded)."""

    def __init__(self, mod: CodecMod, reply_kind: str = "activations") -> None:
        self.mod = mod
        self.reply_kind = reply_kind
        self.seen: list[Message] = []
        self.sent: list[Message] = []  # its replies as they went on the wire

    def handle(self, message: Message) -> Message:
        self.seen.append(message)
        if message.kind in ("forward", "eval"):
            name = "grad" if self.reply_kind == "loss" else "hidden"
            return Message(
                self.reply_kind, message.client_id, message.step, message.micro, {name: message.tensors["hidden"] * 2}
            )
        return Message(
            "gradients", message.client_id, message.step, message.micro, {"grad": message.tensors["grad"] + 1}
        )

    def __call__(self, message: Message) -> Answer:
        answer = server_chain([self.mod], self.handle)(decode(encode(message)))
        reply = answer.result() if isinstance(answer, Future) else answer
        self.sent.append(reply)
        return decode(encode(reply))


def test_codec_mod_encodes_the_backward_with_the_mask_of_its_forward() -> None:
    server = Server(CodecMod("unpadded", "unpadded"))
    client = CodecMod("unpadded", "unpadded")
    meter = MeterMod()
    channel = Channel(InProcessTransport(server), [client, meter])
    real = MASK.bool()

    forward = _forward()
    reply = channel.request(forward).reply
    received = server.seen[-1].tensors["hidden"]
    assert torch.equal(received[real], forward.tensors["hidden"][real]) and not received[~real].any()
    assert server.sent[-1].tensors["hidden"].shape == (4, D)  # the reply went unpadded with the request's mask
    assert torch.equal(reply.tensors["hidden"], received * 2)
    assert len(client._masks) == 1 and len(server.mod._masks) == 1  # remembered for the backward

    backward = _backward()
    up_before = meter.meter.up
    reply = channel.request(backward).reply
    assert meter.meter.up - up_before == 4 * D * 4 + 1 + 3 * 8  # 4 real rows of float32, keep-bits, shape
    grad = server.seen[-1].tensors["grad"]
    assert torch.equal(grad[real], backward.tensors["grad"][real]) and not grad[~real].any()
    assert server.sent[-1].tensors["grad"].shape == (4, D)  # the gradients reply: the server's remembered mask
    assert torch.equal(reply.tensors["grad"][real], grad[real] + 1) and not reply.tensors["grad"][~real].any()
    assert len(client._masks) == 0 and len(server.mod._masks) == 0  # dropped after the gradients reply


@pytest.mark.parametrize(("kind", "reply_kind"), [("eval", "activations"), ("forward", "loss")])
def test_codec_mod_drops_the_mask_after_an_eval_or_loss_reply(kind: str, reply_kind: str) -> None:
    server = Server(CodecMod("unpadded+int8", "unpadded+int8"), reply_kind)
    client = CodecMod("unpadded+int8", "unpadded+int8")
    exchange = Channel(InProcessTransport(server), [client]).request(_forward(kind))
    name = "grad" if reply_kind == "loss" else "hidden"
    assert exchange.reply.tensors[name].shape == (B, T, D) and not exchange.reply.tensors[name][~MASK.bool()].any()
    assert len(client._masks) == 0 and len(server.mod._masks) == 0


def test_a_backward_without_a_known_mask_is_sent_as_all_real_tokens() -> None:
    mod = CodecMod("none", "unpadded")
    encoded = mod.encode(_backward())
    assert encoded.tensors["grad"].shape == (B * T, D)
    back = CodecMod("none", "unpadded").decode(encoded)
    assert torch.equal(back.tensors["grad"], _backward().tensors["grad"])
    mismatched = mod.encode(_backward(), mask=torch.ones(3, 3))  # a mask that does not fit: all real, still correct
    assert mismatched.tensors["grad"].shape == (B * T, D)


def test_codec_mod_remembers_a_bounded_number_of_masks() -> None:
    assert MAX_REMEMBERED == 4096
    client, server = CodecMod("unpadded", "unpadded", max_keys=3), CodecMod("unpadded", "unpadded", max_keys=3)
    for step in range(10):  # forwards whose backward never comes
        server.serve(client.on_request(_forward(step=step)), Server(server).handle)
    assert len(client._masks) == 3 and len(server._masks) == 3
    assert client._masks.get(("c", 9, 0)) is not None and client._masks.get(("c", 6, 0)) is None
    backward = client.on_request(_backward(step=9))
    assert backward.tensors["grad"].shape == (4, D)  # the remembered (newest) mask
    assert client.on_request(_backward(step=0)).tensors["grad"].shape == (B * T, D)  # forgotten: all real


# ---------------------------------------------------------------- error feedback


def _gradient_error(error_feedback: bool, steps: int = 40) -> list[float]:
    """|sum of true - sum of decoded gradients| after each step, topk:0.1 on the client's backward."""
    sender, receiver = CodecMod("none", "topk:0.1", error_feedback=error_feedback), CodecMod("none", "topk:0.1")
    true_sum, decoded_sum, errors = torch.zeros(2, 3, 64), torch.zeros(2, 3, 64), []
    for step in range(steps):
        grad = _tensor((2, 3, 64), seed=1000 + step) + 0.5  # a persistent direction topk keeps dropping
        message = Message("backward", "c", step, 0, {"grad": grad})
        decoded = receiver.decode(decode(encode(sender.encode(message)))).tensors["grad"]
        true_sum += grad
        decoded_sum += decoded
        errors.append(float((true_sum - decoded_sum).norm()))
    return errors


def test_error_feedback_keeps_the_accumulated_error_bounded() -> None:
    without, with_feedback = _gradient_error(False), _gradient_error(True)
    assert without[-1] > 3 * without[9]  # grows with the steps without feedback
    assert max(with_feedback[10:]) < 2 * max(with_feedback[:10])  # bounded (one residual) with it
    assert with_feedback[-1] < without[-1] / 4


def test_error_feedback_residual_is_exactly_what_the_codec_dropped_and_is_keyed() -> None:
    mod = CodecMod("none", "topk:0.25", error_feedback=True)
    first, second = _tensor((1, 2, 8), seed=1), _tensor((1, 2, 8), seed=2)
    sent1 = mod.decode(mod.encode(Message("backward", "c", 0, 0, {"grad": first}))).tensors["grad"]
    sent2 = mod.decode(mod.encode(Message("backward", "c", 1, 0, {"grad": second}))).tensors["grad"]
    assert torch.allclose(sent1 + sent2 + mod._residuals.get(("c", "backward", "grad", 0)), first + second)
    other = mod.decode(mod.encode(Message("backward", "c", 1, 1, {"grad": second}))).tensors["grad"]
    assert torch.equal(other, _round_trip("topk:0.25", second))  # another micro-batch: its own residual
    mod.encode(Message("backward", "c", 2, 0, {"grad": _tensor((1, 3, 8))}))  # another shape: the residual resets
    lossless = CodecMod("none", "unpadded", error_feedback=True)
    lossless.encode(Message("backward", "c", 0, 0, {"grad": first}))
    assert len(lossless._residuals) == 0  # nothing is dropped, nothing kept


def test_server_error_feedback_applies_to_its_gradients_replies() -> None:
    server = Server(CodecMod("none", "topk:0.25", error_feedback=True))
    channel = Channel(InProcessTransport(server), [CodecMod("none", "topk:0.25")])
    channel.request(_backward(step=1))
    assert server.mod._residuals.get(("c", "gradients", "grad", 0)) is not None


# ---------------------------------------------------------------- what the wire must let through


@pytest.mark.parametrize(
    "spec", ["none", "fp16", "int8", "int4:sr:o2", "topk:0.5", "unpadded+topk:0.5+int4:o2", "randtopk:0.5+fp16"]
)
def test_wire_tensors_counts_the_parts_a_codec_sends(spec: str) -> None:
    encoded = CodecMod(spec, spec).encode(_forward())
    assert wire_tensors(spec) == len(encoded.tensors) - 1  # all but the attention mask are the hidden's parts


def test_wire_limits_let_a_long_chain_through_and_stay_a_limit() -> None:
    # each topk adds two parts (idx, dim), int4 with outliers four (scale, dim, ovals, oidx): 17 wire tensors
    spec = "+".join(["topk:0.9"] * 6 + ["int4:o2"])
    message = CodecMod(spec).encode(_forward())
    assert len(message.tensors) == 18  # and the attention mask
    with pytest.raises(WireError, match=r"Limits\.max_tensors"):
        decode(encode(message))  # a fixed 16 refused what the run legitimately sends
    limits = wire_limits(spec, "none", state_tensors=40)
    assert limits.max_tensors == 8 + 17 and limits.max_state_tensors == 40
    assert sorted(decode(encode(message), limits).tensors) == sorted(message.tensors)
    assert wire_limits("none", "none", base=Limits(max_header_bytes=123)) == Limits(max_header_bytes=123)
