"""The wire format: round trips for every dtype, and every malformed frame sequence rejected with ``WireError``."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitlm.errors import ProtocolError
from splitlm.transport.codecs import CodecMod
from splitlm.transport.messages import Message
from splitlm.transport.wire import (
    DATA_MAGIC,
    DTYPES,
    HEADER_MAGIC,
    MAX_CHUNK,
    PART,
    PREFIX_BYTES,
    Decoder,
    Limits,
    WireError,
    decode,
    encode,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_tensor_bytes=4096, max_message_bytes=8192)  # fuzzing never allocates much


# ---------------------------------------------------------------- helpers


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) of ``dtype``; bools are 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _assert_same_message(got: Message, want: Message) -> None:
    assert (got.kind, got.client_id, got.step, got.micro) == (want.kind, want.client_id, want.step, want.micro)
    assert got.meta == want.meta
    assert [type(v) for v in got.meta.values()] == [type(v) for v in want.meta.values()]
    assert list(got.tensors) == list(want.tensors)
    for name, tensor in want.tensors.items():
        assert _same_bits(got.tensors[name], tensor.detach()), name


def _frame0(obj: Any, *, length: int | None = None) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return HEADER_MAGIC + struct.pack("<I", len(body) if length is None else length) + body


def _data(index: int, payload: bytes) -> bytes:
    return DATA_MAGIC + struct.pack("<I", index) + payload


def _header(**overrides: Any) -> dict[str, Any]:
    """A valid header for one float32 tensor of shape (2, 2) (16 bytes) in one data frame."""
    header = {
        "kind": "forward",
        "client_id": "c0",
        "step": 0,
        "micro": 0,
        "meta": {},
        "tensors": [{"name": "x", "dtype": "float32", "shape": [2, 2], "nbytes": 16, "codec": "raw"}],
        "frames": 2,
    }
    header.update(overrides)
    return header


def _tensor_entry(**overrides: Any) -> dict[str, Any]:
    entry = {"name": "x", "dtype": "float32", "shape": [2, 2], "nbytes": 16, "codec": "raw"}
    entry.update(overrides)
    return entry


VALID = Message(
    "forward", "client-7", 3, 1, {"h": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"lr": 0.5, "n": 2}
)


def _feed_all(decoder: Decoder, frames: list[bytes]) -> Message | None:
    out = None
    for frame in frames:
        out = decoder.feed(frame)
    return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_round_trip_every_dtype(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    tensor = (torch.arange(24) % 2 == 0) if dtype == torch.bool else (torch.arange(24) - 12).to(dtype)
    tensor = tensor.reshape(2, 3, 4)
    message = Message("forward", "c", 0, 0, {"t": tensor})
    got = decode(encode(message)).tensors["t"]
    assert got.dtype == dtype and got.shape == (2, 3, 4)
    assert torch.equal(got, tensor)


def test_bf16_keeps_every_bit() -> None:
    tensor = torch.randn(5, 7).to(torch.bfloat16)
    got = decode(encode(Message("activations", "c", 1, 0, {"a": tensor}))).tensors["a"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, tensor)


def test_empty_zero_dim_and_no_tensors() -> None:
    message = Message(
        "forward",
        "c",
        0,
        0,
        {"empty": torch.empty(0, 4), "also_empty": torch.empty(3, 0, dtype=torch.int64), "scalar": torch.tensor(2.5)},
    )
    frames = encode(message)
    assert len(frames) == 2  # header + the scalar's 4 bytes
    got = decode(frames)
    _assert_same_message(got, message)
    assert got.tensors["scalar"].shape == () and got.tensors["empty"].shape == (0, 4)

    bare = Message("step", "c", 9, -1, {}, {"done": True})
    frames = encode(bare)
    assert len(frames) == 1
    _assert_same_message(decode(frames), bare)


def test_tensor_bigger_than_chunk_is_split_into_data_frames() -> None:
    tensor = torch.randn(3000)  # 12000 bytes
    message = Message("gradients", "c", 4, 2, {"g": tensor, "ids": torch.arange(7)})
    frames = encode(message, chunk_size=1000)
    total = 12000 + 7 * 8
    assert len(frames) == 1 + math.ceil(total / 1000)
    assert json.loads(frames[0][8:])["frames"] == len(frames)
    for index, frame in enumerate(frames[1:], start=1):
        assert frame[:4] == DATA_MAGIC and struct.unpack("<I", frame[4:8])[0] == index
        assert 1 <= len(frame) - 8 <= 1000
    assert sum(len(f) - 8 for f in frames[1:]) == total == message.payload_bytes()
    decoder = Decoder()
    assert all(decoder.feed(f) is None for f in frames[:-1])
    assert decoder.pending
    _assert_same_message(decoder.feed(frames[-1]), message)
    assert not decoder.pending


def test_default_chunk_is_4_mib() -> None:
    assert MAX_CHUNK == 4 * 1024 * 1024
    frames = encode(Message("forward", "c", 0, 0, {"t": torch.zeros(MAX_CHUNK // 4 + 1)}))
    assert [len(f) - 8 for f in frames[1:]] == [MAX_CHUNK, 4]


def test_meta_round_trip_keeps_types() -> None:
    meta = {"i": 3, "big": 2**70, "f": 1.0, "neg": -0.0, "inf": float("inf"), "s": 'λ\n"x"', "b": False, "t": True}
    got = decode(encode(Message("loss", "c", 0, 0, {}, meta)))
    assert got.meta == meta
    assert {k: type(v) for k, v in got.meta.items()} == {k: type(v) for k, v in meta.items()}


def test_views_grad_and_noncontiguous_tensors_are_sent_as_values() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    message = Message("forward", "c", 0, 0, {"t": base.t()[1:3], "s": base[0, 2:4] * 2})
    got = decode(encode(message))
    assert torch.equal(got.tensors["t"], base.t()[1:3].detach())
    assert torch.equal(got.tensors["s"], (base[0, 2:4] * 2).detach())
    assert not got.tensors["t"].requires_grad


def test_each_message_owns_its_tensors() -> None:
    frames = encode(VALID)
    decoder = Decoder()
    first, second = _feed_all(decoder, frames), _feed_all(decoder, frames)
    first.tensors["h"].add_(100)  # writable, and not shared with the next message
    assert torch.equal(second.tensors["h"], VALID.tensors["h"])


def test_encode_rejects_what_it_cannot_represent() -> None:
    with pytest.raises(WireError, match=r"dtype torch\.complex64"):
        encode(Message("forward", "c", 0, 0, {"z": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(WireError, match=r"meta\['nested'\] is a dict"):
        encode(Message("forward", "c", 0, 0, {}, {"nested": {"a": 1}}))  # type: ignore[dict-item]
    with pytest.raises(WireError, match="kind must have 1 to 32"):
        encode(Message("k" * 33, "c", 0, 0))
    with pytest.raises(ValueError, match="chunk_size"):
        encode(VALID, chunk_size=0)
    assert issubclass(WireError, ProtocolError)


# ---------------------------------------------------------------- malformed input

_GOOD_DATA = _data(1, bytes(16))

MALFORMED: dict[str, tuple[list[bytes], str]] = {
    "bad magic": ([b"SLMX" + bytes(20)], "bad magic"),
    "frame too short": ([b"SLM1\x05"], "too short"),
    "truncated header": ([encode(VALID)[0][:-10]], "says .* header bytes but carries"),
    "header length lie": ([_frame0(_header(), length=40)], "says 40 header bytes"),
    "header over limit": ([_frame0(_header(), length=1 << 20)], "over the limit of 65536"),
    "invalid json": ([_frame0(b'{"kind": "forward",')], "not valid UTF-8 JSON"),
    "invalid utf-8": ([_frame0(b'{"kind": "\xff"}')], "not valid UTF-8 JSON"),
    "deep nesting": ([_frame0(b"[" * 60000)], "not valid UTF-8 JSON"),
    "not an object": ([_frame0([1, 2])], "header must be a JSON object"),
    "missing key": ([_frame0({k: v for k, v in _header().items() if k != "micro"})], r"missing \['micro'\]"),
    "extra key": ([_frame0({**_header(), "evil": 1})], r"unexpected \['evil'\]"),
    "duplicate json key": ([_frame0(b'{"kind": "a", "kind": "b"}')], "repeats the key 'kind'"),
    "kind not str": ([_frame0(_header(kind=5))], "kind must be a string"),
    "kind too long": ([_frame0(_header(kind="k" * 33))], "kind must have 1 to 32"),
    "client_id too long": ([_frame0(_header(client_id="c" * 129))], "client_id must have 1 to 128"),
    "step as str": ([_frame0(_header(step="3"))], "step must be an int"),
    "step as bool": ([_frame0(_header(step=True))], "step must be an int"),
    "micro below -1": ([_frame0(_header(micro=-2))], "micro must be an int"),
    "meta not object": ([_frame0(_header(meta=[1]))], "meta must be a JSON object"),
    "meta nested": ([_frame0(_header(meta={"a": [1]}))], r"meta\['a'\] is a list"),
    "meta null": ([_frame0(_header(meta={"a": None}))], r"meta\['a'\] is a NoneType"),
    "tensors not list": ([_frame0(_header(tensors={}))], "tensors must be a list"),
    "tensor entry keys": ([_frame0(_header(tensors=[{"name": "x"}]))], r"tensors\[0\] has wrong keys"),
    "name empty": ([_frame0(_header(tensors=[_tensor_entry(name="")]))], "name must have 1 to 64"),
    "unknown dtype": ([_frame0(_header(tensors=[_tensor_entry(dtype="complex64")]))], "'complex64' is not supported"),
    "pickled dtype": ([_frame0(_header(tensors=[_tensor_entry(dtype=["torch", "float32"])]))], "is not supported"),
    "codec not a name": ([_frame0(_header(tensors=[_tensor_entry(codec="zs td!")]))], "is not a codec name"),
    "codec not a string": ([_frame0(_header(tensors=[_tensor_entry(codec=3)]))], "is not a codec name"),
    "part of a raw tensor": (
        [_frame0(_header(tensors=[_tensor_entry(name="hidden#scale")]))],
        "is a part of 'hidden', which is not an encoded tensor",
    ),
    "shape not list": ([_frame0(_header(tensors=[_tensor_entry(shape=4)]))], "shape must be a list of ints"),
    "shape of floats": ([_frame0(_header(tensors=[_tensor_entry(shape=[2.0, 2])]))], "shape must be a list of ints"),
    "negative dim": ([_frame0(_header(tensors=[_tensor_entry(shape=[-2, -2])]))], "negative dimension"),
    "too many dims": ([_frame0(_header(tensors=[_tensor_entry(shape=[1] * 9, nbytes=4)]))], "9 dims, limit 8"),
    "nbytes lie": ([_frame0(_header(tensors=[_tensor_entry(nbytes=8)]))], "nbytes is 8 but shape .* needs 16"),
    "nbytes not int": ([_frame0(_header(tensors=[_tensor_entry(nbytes=16.0)]))], "nbytes must be an int"),
    "too many tensors": (
        [_frame0(_header(tensors=[_tensor_entry(name=f"t{i}") for i in range(17)], frames=2))],
        "17 tensors, limit 16",
    ),
    "duplicate names": ([_frame0(_header(tensors=[_tensor_entry(), _tensor_entry()]))], "'x' twice"),
    "frames zero": ([_frame0(_header(frames=0))], "frames must be an int >= 1"),
    "more frames than bytes": ([_frame0(_header(frames=18))], "17 data frames for 16 bytes"),
    "bytes but no frames": ([_frame0(_header(frames=1))], "16 tensor bytes but no data frames"),
    "data before header": ([_GOOD_DATA], "before any header"),
    "data out of order": ([_frame0(_header(frames=3)), _data(2, bytes(8))], "data frame 2 arrived, expected frame 1"),
    "data frame repeated": (
        [_frame0(_header(frames=3)), _data(1, bytes(8)), _data(1, bytes(8))],
        "data frame 1 arrived, expected frame 2",
    ),
    "too much data": ([_frame0(_header()), _data(1, bytes(17))], "carries 17 bytes but only 16"),
    "too little data": ([_frame0(_header()), _data(1, bytes(8))], "leaves 8 of 16 declared bytes missing"),
    "too little left for frames": (
        [_frame0(_header(frames=4)), _data(1, bytes(15))],
        "1 bytes remain for 2 more frames",
    ),
    "empty data frame": ([_frame0(_header()), _data(1, b"")], "data frame 1 is empty"),
    "header while incomplete": ([_frame0(_header()), _frame0(_header())], "new header arrived while message"),
    "bool bytes not 0/1": (
        [_frame0(_header(tensors=[_tensor_entry(dtype="bool", shape=[2], nbytes=2)])), _data(1, b"\x01\x02")],
        "bool tensor 'x' holds bytes other than 0 and 1",
    ),
    "not bytes": ([["SLM1"]], "frame must be bytes"),  # type: ignore[list-item]
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_rejected_and_decoder_recovers(case: str) -> None:
    frames, pattern = MALFORMED[case]
    decoder = Decoder()
    with pytest.raises(WireError, match=pattern) as info:
        _feed_all(decoder, frames)
    assert "\n" not in str(info.value) and str(info.value).startswith("wire: ")
    assert not decoder.pending
    _assert_same_message(_feed_all(decoder, encode(VALID)), VALID)


def test_valid_handmade_frames_decode() -> None:
    """The hand-built header the malformed cases perturb is itself valid."""
    got = _feed_all(Decoder(), [_frame0(_header()), _GOOD_DATA])
    assert torch.equal(got.tensors["x"], torch.zeros(2, 2))


def test_oversized_declaration_is_rejected_before_any_allocation() -> None:
    limits = Limits(max_tensor_bytes=1 << 20)
    header = _header(tensors=[_tensor_entry(shape=[1 << 24], nbytes=1 << 26)], frames=17)  # 64 MiB declared
    decoder = Decoder(limits)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="67108864 bytes, over the limit of 1048576"):
            decoder.feed(_frame0(header))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # A huge declared shape (exabytes) is rejected the same way: sizes are exact Python ints, nothing overflows.
    huge = _header(tensors=[_tensor_entry(shape=[1 << 40, 1 << 40], nbytes=1 << 82)], frames=2)
    with pytest.raises(WireError, match="over the limit"):
        decoder.feed(_frame0(huge))
    many = _header(tensors=[_tensor_entry(name=f"t{i}", shape=[1 << 18], nbytes=1 << 20) for i in range(4)], frames=5)
    with pytest.raises(WireError, match=r"Limits\.max_message_bytes"):
        Decoder(Limits(max_tensor_bytes=1 << 20, max_message_bytes=1 << 21)).feed(_frame0(many))


def test_decode_wants_exactly_one_message() -> None:
    frames = encode(VALID)
    with pytest.raises(WireError, match="ended before"):
        decode(frames[:1])
    with pytest.raises(WireError, match="continue after"):
        decode(frames + frames)


# ---------------------------------------------------------------- property tests

_names = st.text(st.characters(blacklist_characters="#"), min_size=1, max_size=12)  # "#" names an encoded part
_meta_values = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.text(max_size=10), st.booleans()
)  # NaN != NaN; it travels but cannot be compared with ==


@st.composite
def messages(draw: st.DrawFn) -> Message:
    specs = draw(
        st.dictionaries(
            _names,
            st.tuples(st.sampled_from(list(DTYPES.values())), st.lists(st.integers(0, 5), max_size=3)),
            max_size=4,
        )
    )
    seed = draw(st.integers(0, 2**16))
    tensors = {
        name: _random_tensor(dtype, tuple(shape), seed + i) for i, (name, (dtype, shape)) in enumerate(specs.items())
    }
    return Message(
        draw(st.text(min_size=1, max_size=32)),
        draw(st.text(min_size=1, max_size=128)),
        draw(st.integers(-1, 2**63 - 1)),
        draw(st.integers(-1, 2**63 - 1)),
        tensors,
        draw(st.dictionaries(st.text(max_size=10), _meta_values, max_size=4)),
    )


@FUZZ
@given(message=messages(), chunk_size=st.integers(1, 64))
def test_property_decode_inverts_encode(message: Message, chunk_size: int) -> None:
    frames = encode(message, chunk_size=chunk_size)
    assert len(frames) == 1 + math.ceil(message.payload_bytes() / chunk_size)
    _assert_same_message(decode(frames), message)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
_TOP_KEYS = ("kind", "client_id", "step", "micro", "meta", "tensors", "frames")
_ENTRY_KEYS = ("name", "dtype", "shape", "nbytes", "codec")


@st.composite
def perturbed_encodings(draw: st.DrawFn) -> list[bytes]:
    """A valid encoding whose header has up to two fields replaced by arbitrary JSON or nearby ints."""
    return _perturb_header(draw, encode(draw(messages()), chunk_size=draw(st.integers(1, 32))))


def _perturb_header(draw: st.DrawFn, frames: list[bytes]) -> list[bytes]:
    header = json.loads(frames[0][8:])
    for _ in range(draw(st.integers(0, 2))):
        target = header
        keys: tuple[str, ...] = _TOP_KEYS
        if header["tensors"] and isinstance(header["tensors"], list) and draw(st.booleans()):
            target = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
            keys = _ENTRY_KEYS
        if not isinstance(target, dict):
            break
        key = draw(st.sampled_from(keys))
        old = target.get(key)
        if isinstance(old, int) and not isinstance(old, bool) and draw(st.booleans()):
            target[key] = old + draw(st.integers(-3, 3))
        elif isinstance(old, list) and old and draw(st.booleans()):
            target[key] = [*old[:-1], draw(st.integers(-2, 50) | _json)]
        else:
            target[key] = draw(_json)
    return [_frame0(header), *frames[1:]]


_frames = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from([HEADER_MAGIC, DATA_MAGIC]), st.binary(max_size=40)),
    st.builds(_data, st.integers(0, 6), st.binary(max_size=40)),
)


@FUZZ
@given(
    before=st.lists(_frames, max_size=3),
    structured=perturbed_encodings(),
    after=st.lists(_frames, max_size=3),
)
def test_fuzz_arbitrary_frames_raise_only_wire_error(
    before: list[bytes], structured: list[bytes], after: list[bytes]
) -> None:
    decoder = Decoder(SMALL)
    for frame in [*before, *structured, *after]:
        try:
            message = decoder.feed(frame)
        except WireError:
            assert not decoder.pending
            continue
        if message is not None:
            assert all(t.dtype in DTYPES.values() for t in message.tensors.values())


_mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6)),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.integers(0, 10**6)),
)


def _mutate(frames: list[bytes], mutation: tuple[Any, ...]) -> list[bytes]:
    frames = list(frames)
    if not frames:  # everything was dropped already
        return frames
    op, i, *rest = mutation
    i %= len(frames)
    if op == "flip":
        if not frames[i]:  # an earlier truncation emptied it: nothing to flip
            return frames
        frame = bytearray(frames[i])
        pos = rest[0] % len(frame)
        frame[pos] ^= 1 << rest[1]
        frames[i] = bytes(frame)
    elif op == "truncate":
        frames[i] = frames[i][: rest[0] % (len(frames[i]) + 1)]
    elif op == "drop":
        del frames[i]
    elif op == "duplicate":
        frames.insert(i, frames[i])
    else:
        j = rest[0] % len(frames)
        frames[i], frames[j] = frames[j], frames[i]
    return frames


@FUZZ
@given(message=messages(), chunk_size=st.integers(1, 32), mutations=st.lists(_mutations, min_size=1, max_size=3))
def test_fuzz_mutated_encodings_raise_wire_error_or_match_their_header(
    message: Message, chunk_size: int, mutations: list[tuple[Any, ...]]
) -> None:
    frames = encode(message, chunk_size=chunk_size)
    for mutation in mutations:
        if frames:
            frames = _mutate(frames, mutation)
    decoder = Decoder(SMALL)
    last_header = b""
    for frame in frames:
        if frame[:4] == HEADER_MAGIC:
            last_header = frame
        try:
            got = decoder.feed(frame)
        except WireError:
            continue
        if got is None:
            continue
        declared = json.loads(last_header[8:])["tensors"]
        assert [e["name"] for e in declared] == list(got.tensors)
        for entry, tensor in zip(declared, got.tensors.values(), strict=True):
            assert tensor.dtype == DTYPES[entry["dtype"]]
            assert list(tensor.shape) == entry["shape"]
            assert tensor.numel() * tensor.element_size() == entry["nbytes"]
            if tensor.dtype == torch.bool and tensor.numel():
                assert int(tensor.view(torch.uint8).max()) <= 1


# ---------------------------------------------------------------- encoded payloads (transport/codecs.py)

CODEC_SPECS = (
    "fp16",
    "bf16",
    "int8",
    "int8:sr",
    "int4",
    "int4:sr",
    "int4:o2",
    "int8:sr:o3",
    "topk:0.5",
    "randtopk:0.5:0.5",
    "unpadded",
    "unpadded+int8",
    "unpadded+int4",
    "unpadded+topk:0.5+fp16",
    "topk:0.3+int4",
)
_CODEC_TENSORS = (("forward", "hidden"), ("activations", "hidden"), ("backward", "grad"), ("gradients", "grad"))


def _codec_mod(spec: str) -> CodecMod:
    return CodecMod(spec, spec)


@st.composite
def codec_encodings(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """A message whose tensor one codec encoded (a mask with padding where it has tokens), as frames."""
    spec = draw(st.sampled_from(CODEC_SPECS))
    kind, name = draw(st.sampled_from(_CODEC_TENSORS))
    batch, tokens = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    d = draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensor = torch.randn(batch, tokens, d, generator=gen) * draw(st.sampled_from([1e-8, 1.0, 1e4]))
    mask = torch.randint(0, 2, (batch, tokens), generator=gen)
    tensors = {name: tensor, **({"attention_mask": mask} if kind == "forward" else {})}
    encoded = _codec_mod(spec).encode(Message(kind, "c", 1, 0, tensors), mask)
    assert encoded.codecs == {name: spec}
    return spec, encode(encoded, chunk_size=draw(st.integers(1, 64)))


_pokes = st.tuples(st.just("poke"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 255))


def _poke(frames: list[bytes], poke: tuple[Any, ...]) -> list[bytes]:
    """One payload byte of a data frame set to a value: the wire stays valid, the codec's parts do not."""
    _, i, pos, value = poke
    data = [index for index, frame in enumerate(frames) if frame[:4] == DATA_MAGIC and len(frame) > PREFIX_BYTES]
    if not data:
        return frames
    index = data[i % len(data)]
    frame = bytearray(frames[index])
    frame[PREFIX_BYTES + pos % (len(frame) - PREFIX_BYTES)] = value
    return [*frames[:index], bytes(frame), *frames[index + 1 :]]


@FUZZ
@given(
    encoding=codec_encodings(),
    perturb=st.booleans(),
    data=st.data(),
    mutations=st.lists(_mutations | _pokes, max_size=3),
)
def test_fuzz_encoded_payloads_raise_only_protocol_errors(
    encoding: tuple[str, list[bytes]], perturb: bool, data: st.DataObject, mutations: list[tuple[Any, ...]]
) -> None:
    spec, frames = encoding
    intact = not perturb and not mutations
    if perturb:
        frames = _perturb_header(data.draw, frames)
    for mutation in mutations:
        if frames:
            frames = _poke(frames, mutation) if mutation[0] == "poke" else _mutate(frames, mutation)
    decoder = Decoder(SMALL)
    decoded = []
    for frame in frames:
        try:
            message = decoder.feed(frame)
            if message is not None:
                decoded.append((set(message.codecs), _codec_mod(spec).decode(message)))
        except ProtocolError:  # WireError included
            assert not intact, "an intact encoding must decode"
    for encoded, message in decoded:
        assert all(PART not in name for name in message.tensors) and not message.codecs
        assert all(message.tensors[name].dtype.is_floating_point for name in encoded)
    assert decoded or not intact


# ---------------------------------------------------------------- how many tensors a message may declare


def _state(count: int) -> dict[str, torch.Tensor]:
    """A trainable state of ``count`` tensors, as a client side or a trunk adapter carries it (LoRA A and B)."""
    return {f"model.layers.{i // 2}.self_attn.q_proj.lora_{'AB'[i % 2]}.weight": torch.ones(2, 3) for i in range(count)}


@pytest.mark.parametrize("kind", ["cmd:set_state", "done", "state"])
def test_a_state_message_is_limited_by_the_largest_state_of_the_run(kind: str) -> None:
    # a client side of 2 layers x 4 LoRA modules x (A, B) in head and tail: more than a training message carries
    message = Message(kind, "0", -1, 0, _state(32))
    with pytest.raises(WireError, match=r"declares 32 tensors, limit 16 \(Limits\.max_state_tensors\)"):
        decode(encode(message))
    limits = Limits().with_states(32)
    got = decode(encode(message), limits)
    assert sorted(got.tensors) == sorted(message.tensors)
    with pytest.raises(WireError, match=r"declares 33 tensors, limit 32 \(Limits\.max_state_tensors\)"):
        decode(encode(Message(kind, "0", -1, 0, _state(33))), limits)  # still a limit: one more is refused


def test_room_for_states_leaves_training_messages_at_their_own_limit() -> None:
    limits = Limits().with_states(1000)
    assert limits.with_states(8) == limits  # never lowered
    with pytest.raises(WireError, match=r"'forward' message declares 17 tensors, limit 16 \(Limits\.max_tensors\)"):
        decode(encode(Message("forward", "0", 1, 0, _state(17))), limits)
