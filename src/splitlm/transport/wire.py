"""The byte format a ``Message`` travels in over a stream transport (steps 3, 5, 7, 9), independent of gRPC.

A message becomes a list of frames. Frame 0 is the header::

    b"SLM1" | uint32 LE header length | UTF-8 JSON header

with the JSON object ``{"kind", "client_id", "step", "micro", "meta", "tensors", "frames"}``, where each entry of
``tensors`` is ``{"name", "dtype", "shape", "nbytes", "codec"}`` and ``frames`` is the total frame count. ``codec``
is ``"raw"``, or the codec (``transport/codecs.py``) the tensor is a part of: the main part ``name`` and its
other parts ``name#<part>`` carry the same codec, and the receiver's codec mod decodes them.
The tensors' raw bytes (contiguous, CPU, little-endian) follow in header order, cut into data frames of at
most ``chunk_size`` bytes::

    b"SLMD" | uint32 LE frame index (1, 2, ...) | payload (>= 1 byte)

Every dtype, bfloat16 included, travels as raw bytes and is rebuilt with ``torch.frombuffer``. Peer bytes are
never unpickled or evaluated: the ``Decoder`` validates the header completely before it allocates anything,
and allocates exactly the declared tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from splitlm.errors import ProtocolError
from splitlm.transport.messages import STATE_KINDS, Message, Scalar

MAX_CHUNK = 4 * 1024 * 1024  # bytes of tensor data per frame: gRPC's default message limit is 4 MiB
HEADER_MAGIC = b"SLM1"
DATA_MAGIC = b"SLMD"
PREFIX_BYTES = 8  # magic + uint32
MAX_KIND_CHARS = 32
MAX_CLIENT_ID_CHARS = 128
MAX_NAME_CHARS = 64
CODEC = "raw"  # a tensor sent as it is
PART = "#"  # an encoded tensor's other parts travel as "name#part"
MAX_CODEC_CHARS = 64
_CODEC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:+-")
_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_U32 = struct.Struct("<I")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_KEYS = frozenset({"kind", "client_id", "step", "micro", "meta", "tensors", "frames"})
_TENSOR_KEYS = frozenset({"name", "dtype", "shape", "nbytes", "codec"})


class WireError(ProtocolError):
    """Frames that do not form a valid message: the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class Limits:
    """What a ``Decoder`` accepts from a peer; checked on the header before any tensor memory is allocated.

    A message's tensor count is limited by its kind: a state message (``STATE_KINDS``) carries one tensor per
    trained matrix of a model part, so its limit follows from the run's model (``with_states``; a run sets it
    with ``codecs.wire_limits``); any other message carries a few tensors and their codec parts."""

    max_header_bytes: int = 64 * 1024
    max_tensor_bytes: int = 1 << 30
    max_tensors: int = 16  # a message that is not a state: activations, gradients, masks, labels, codec parts
    max_dims: int = 8
    max_message_bytes: int = 1 << 31  # all tensors together
    max_state_tensors: int = 16  # a state message (STATE_KINDS): the largest trainable state the run moves

    def with_states(self, *counts: int) -> Limits:
        """These limits, also taking states of ``counts`` tensors each (never fewer than now)."""
        return replace(self, max_state_tensors=max(self.max_state_tensors, *counts))

    def tensors_of(self, kind: str) -> tuple[int, str]:
        """How many tensors a message of ``kind`` may declare, and the field that says so."""
        if kind in STATE_KINDS:
            return self.max_state_tensors, "max_state_tensors"
        return self.max_tensors, "max_tensors"


# Encoding checks the same fixed rules (string lengths, types, dtypes) but leaves sizes to the receiver.
_NO_LIMITS = Limits(
    max_header_bytes=_UINT32_MAX,
    max_tensor_bytes=1 << 62,
    max_tensors=1 << 31,
    max_dims=64,
    max_message_bytes=1 << 62,
    max_state_tensors=1 << 31,
)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    codec: str = CODEC


@dataclass(frozen=True)
class _Header:
    kind: str
    client_id: str
    step: int
    micro: int
    meta: dict[str, Scalar]
    tensors: tuple[_TensorSpec, ...]
    frames: int

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise WireError(f"wire: the format is little-endian, this host is {sys.byteorder}-endian; not supported")


def _codec_of(message: Message, name: str) -> str:
    """The codec a tensor of ``message`` travels under: its own, or that of the tensor it is a part of."""
    main = name.split(PART, 1)[0]
    return message.codecs.get(name) or message.codecs.get(main) or CODEC


def _tensor_bytes(name: str, tensor: torch.Tensor) -> tuple[str, memoryview]:
    """The dtype name and the raw little-endian bytes of one tensor (copied to CPU / contiguous if needed)."""
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"wire: tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
    if tensor.layout != torch.strided:
        raise WireError(f"wire: tensor {name!r} has layout {tensor.layout}; only dense tensors can be sent")
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise WireError(
            f"wire: tensor {name!r} has dtype {tensor.dtype}; supported: {', '.join(DTYPES)} (cast it before sending)"
        )
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    return dtype_name, memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(message: Message, chunk_size: int = MAX_CHUNK) -> list[bytes]:
    """Frames that carry ``message``: a header frame, then its tensor bytes in data frames of <= ``chunk_size``.

    Raises ``WireError`` if the message cannot be represented (unsupported dtype, nested meta, ...) and
    ``ValueError`` if ``chunk_size`` is not a positive int.
    """
    _check_little_endian()
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    views: list[memoryview] = []
    entries: list[dict[str, Any]] = []
    for name, tensor in message.tensors.items():
        dtype_name, data = _tensor_bytes(name, tensor)
        views.append(data)
        entries.append(
            {
                "name": name,
                "dtype": dtype_name,
                "shape": list(tensor.shape),
                "nbytes": data.nbytes,
                "codec": _codec_of(message, name),
            }
        )
    total = sum(view.nbytes for view in views)
    frames = 1 + math.ceil(total / chunk_size)
    if frames - 1 > _UINT32_MAX:
        raise WireError(f"wire: {total} bytes in chunks of {chunk_size} need more than 2**32 frames; raise chunk_size")
    header = {
        "kind": message.kind,
        "client_id": message.client_id,
        "step": message.step,
        "micro": message.micro,
        "meta": dict(message.meta),
        "tensors": entries,
        "frames": frames,
    }
    _validate_header(header, _NO_LIMITS)  # the peer would reject it anyway: fail here, where the bug is
    try:
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:  # pragma: no cover - validated above
        raise WireError(f"wire: header is not JSON-serialisable: {exc}") from None
    out = [HEADER_MAGIC + _U32.pack(len(header_bytes)) + header_bytes]
    for index, pieces in enumerate(_chunks(views, chunk_size), start=1):
        out.append(b"".join([DATA_MAGIC, _U32.pack(index), *pieces]))
    return out


def _chunks(views: list[memoryview], chunk_size: int) -> Iterable[list[memoryview]]:
    """The tensors' bytes, back to back, as chunks of ``chunk_size`` (the last may be shorter); no extra copy."""
    pieces: list[memoryview] = []
    filled = 0
    for view in views:
        pos = 0
        while pos < view.nbytes:
            take = min(view.nbytes - pos, chunk_size - filled)
            pieces.append(view[pos : pos + take])
            pos += take
            filled += take
            if filled == chunk_size:
                yield pieces
                pieces, filled = [], 0
    if pieces:
        yield pieces


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise WireError(f"wire: header JSON repeats the key {duplicate[:40]!r}; each key must appear once")
    return dict(pairs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_str(where: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise WireError(f"wire: header {where} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= max_chars:
        raise WireError(f"wire: header {where} must have 1 to {max_chars} characters, got {len(value)}")
    return value


def _check_keys(where: str, obj: Any, expected: frozenset[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise WireError(f"wire: {where} must be a JSON object, got {type(obj).__name__}")
    if set(obj) != expected:
        missing = sorted(expected - set(obj))
        extra = sorted(key[:40] for key in set(obj) - expected)[:5]
        raise WireError(
            f"wire: {where} has wrong keys (missing {missing}, unexpected {extra}); expected {sorted(expected)}"
        )
    return obj


def _validate_tensor(index: int, entry: Any, limits: Limits) -> _TensorSpec:
    where = f"tensors[{index}]"
    entry = _check_keys(f"header {where}", entry, _TENSOR_KEYS)
    name = _check_str(f"{where}.name", entry["name"], MAX_NAME_CHARS)
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        shown = dtype_name[:40] if isinstance(dtype_name, str) else dtype_name
        raise WireError(f"wire: header {where}.dtype {shown!r} is not supported; expected one of {', '.join(DTYPES)}")
    codec = entry["codec"]
    if not isinstance(codec, str) or not 1 <= len(codec) <= MAX_CODEC_CHARS or not set(codec) <= _CODEC_CHARS:
        shown = codec[:40] if isinstance(codec, str) else codec
        raise WireError(
            f"wire: header {where}.codec {shown!r} is not a codec name (1 to {MAX_CODEC_CHARS} letters, digits "
            "or _.:+-)"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
        raise WireError(f"wire: header {where}.shape must be a list of ints")
    if len(shape) > limits.max_dims:
        raise WireError(f"wire: header {where}.shape has {len(shape)} dims, limit {limits.max_dims} (Limits.max_dims)")
    if any(dim < 0 for dim in shape):
        raise WireError(f"wire: header {where}.shape {shape} has a negative dimension; dims must be >= 0")
    nbytes = entry["nbytes"]
    if not _is_int(nbytes):
        raise WireError(f"wire: header {where}.nbytes must be an int, got {type(nbytes).__name__}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize  # exact Python ints: no overflow
    if nbytes != expected:
        raise WireError(
            f"wire: header {where}.nbytes is {nbytes} but shape {shape} of {dtype_name} needs {expected} bytes"
        )
    if nbytes > limits.max_tensor_bytes:
        raise WireError(
            f"wire: tensor {name!r} declares {nbytes} bytes, over the limit of {limits.max_tensor_bytes} "
            "(Limits.max_tensor_bytes); send smaller tensors or raise the limit"
        )
    return _TensorSpec(name, dtype, tuple(shape), nbytes, codec)


def _validate_header(obj: Any, limits: Limits) -> _Header:
    """A checked ``_Header`` from a parsed JSON value, or ``WireError`` naming the first field that is wrong."""
    obj = _check_keys("header", obj, _HEADER_KEYS)
    kind = _check_str("kind", obj["kind"], MAX_KIND_CHARS)
    client_id = _check_str("client_id", obj["client_id"], MAX_CLIENT_ID_CHARS)
    counters = {}
    for key in ("step", "micro"):
        value = obj[key]
        if not _is_int(value) or not -1 <= value <= _INT64_MAX:
            raise WireError(f"wire: header {key} must be an int in [-1, 2**63), got {str(value)[:40]!r}")
        counters[key] = value
    meta = obj["meta"]
    if not isinstance(meta, dict):
        raise WireError(f"wire: header meta must be a JSON object, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise WireError(f"wire: header meta keys must be strings, got {type(key).__name__}")
        if not isinstance(value, int | float | str | bool):
            raise WireError(
                f"wire: header meta[{key[:40]!r}] is a {type(value).__name__}; values must be int, float, str or bool"
            )
    entries = obj["tensors"]
    if not isinstance(entries, list):
        raise WireError(f"wire: header tensors must be a list, got {type(entries).__name__}")
    limit, field = limits.tensors_of(kind)
    if len(entries) > limit:
        raise WireError(
            f"wire: header of a {kind!r} message declares {len(entries)} tensors, limit {limit} (Limits.{field})"
        )
    specs = tuple(_validate_tensor(i, entry, limits) for i, entry in enumerate(entries))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise WireError(f"wire: header names the tensor {duplicate!r} twice; names must be unique")
    codecs = {spec.name: spec.codec for spec in specs}
    for spec in specs:
        main, dot, _ = spec.name.partition(PART)
        if dot and codecs.get(main, CODEC) == CODEC:
            raise WireError(f"wire: tensor {spec.name!r} is a part of {main!r}, which is not an encoded tensor")
        if dot and spec.codec != codecs[main]:
            raise WireError(
                f"wire: tensor {spec.name!r} has codec {spec.codec!r} but its main part {main!r} has {codecs[main]!r}"
            )
    total = sum(spec.nbytes for spec in specs)
    if total > limits.max_message_bytes:
        raise WireError(
            f"wire: message declares {total} tensor bytes, over the limit of {limits.max_message_bytes} "
            "(Limits.max_message_bytes)"
        )
    frames = obj["frames"]
    if not _is_int(frames) or frames < 1:
        raise WireError(f"wire: header frames must be an int >= 1, got {str(frames)[:40]!r}")
    if frames - 1 > min(total, _UINT32_MAX):
        raise WireError(f"wire: header declares {frames - 1} data frames for {total} bytes; each carries >= 1 byte")
    if total > 0 and frames == 1:
        raise WireError(f"wire: header declares {total} tensor bytes but no data frames")
    return _Header(kind, client_id, counters["step"], counters["micro"], dict(meta), specs, frames)


def _parse_header(frame: memoryview, limits: Limits) -> _Header:
    length = _U32.unpack_from(frame, 4)[0]
    if length > limits.max_header_bytes:
        raise WireError(
            f"wire: header of {length} bytes is over the limit of {limits.max_header_bytes} (Limits.max_header_bytes)"
        )
    if length != len(frame) - PREFIX_BYTES:
        raise WireError(f"wire: header frame says {length} header bytes but carries {len(frame) - PREFIX_BYTES}")
    try:
        text = bytes(frame[PREFIX_BYTES:]).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WireError(f"wire: header is not valid UTF-8 JSON ({reason})") from None
    return _validate_header(obj, limits)


class Decoder:
    """Rebuilds messages from frames fed one at a time, in order, for one stream.

    After any ``WireError`` the decoder drops the partial message and is ready for the next header frame.
    """

    def __init__(self, limits: Limits = Limits()) -> None:
        _check_little_endian()
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        """Drop any partial message."""
        self._header: _Header | None = None
        self._buffers: list[bytearray] = []
        self._next_index = 1
        self._received = 0
        self._slot = 0  # index into _buffers of the tensor being filled
        self._offset = 0  # bytes filled in that tensor

    @property
    def pending(self) -> bool:
        """Whether a header has arrived and its data frames have not all arrived yet."""
        return self._header is not None

    def feed(self, frame: bytes) -> Message | None:
        """Take the next frame; return the ``Message`` when its last frame arrives, else ``None``."""
        try:
            return self._feed(frame)
        except WireError:
            self.reset()
            raise

    def _feed(self, frame: bytes) -> Message | None:
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise WireError(f"wire: a frame must be bytes, got {type(frame).__name__}")
        view = memoryview(frame).cast("B")
        if len(view) < PREFIX_BYTES:
            raise WireError(f"wire: frame of {len(view)} bytes is too short; every frame starts with 8 bytes")
        magic = bytes(view[:4])
        if magic == HEADER_MAGIC:
            if self._header is not None:
                raise WireError(
                    f"wire: a new header arrived while message {self._header.kind!r} still expects "
                    f"frame {self._next_index} of {self._header.frames}; the previous message was dropped"
                )
            header = _parse_header(view, self.limits)
            self._header = header
            # Allocate only now, exactly what the validated header declares; one buffer per tensor keeps each
            # tensor aligned and lets each message's tensors own their memory.
            self._buffers = [bytearray(spec.nbytes) for spec in header.tensors if spec.nbytes > 0]
            return self._finish(header) if header.frames == 1 else None
        if magic != DATA_MAGIC:
            raise WireError(f"wire: bad magic {magic!r}; expected {HEADER_MAGIC!r} or {DATA_MAGIC!r}")
        if self._header is None:
            raise WireError("wire: a data frame arrived before any header frame")
        header = self._header
        index = _U32.unpack_from(view, 4)[0]
        if index != self._next_index:
            raise WireError(f"wire: data frame {index} arrived, expected frame {self._next_index} of {header.frames}")
        payload = view[PREFIX_BYTES:]
        if len(payload) == 0:
            raise WireError(f"wire: data frame {index} is empty; every data frame carries >= 1 byte")
        remaining = header.total_bytes - self._received
        if len(payload) > remaining:
            raise WireError(
                f"wire: data frame {index} carries {len(payload)} bytes but only {remaining} of the declared "
                f"{header.total_bytes} remain"
            )
        frames_left = header.frames - 1 - index
        if remaining - len(payload) < frames_left:
            raise WireError(
                f"wire: after data frame {index}, {remaining - len(payload)} bytes remain for {frames_left} more "
                "frames of >= 1 byte each"
            )
        if frames_left == 0 and len(payload) != remaining:
            raise WireError(
                f"wire: last data frame {index} leaves {remaining - len(payload)} of {header.total_bytes} "
                "declared bytes missing"
            )
        self._copy(payload)
        self._received += len(payload)
        self._next_index += 1
        return self._finish(header) if frames_left == 0 else None

    def _copy(self, payload: memoryview) -> None:
        pos = 0
        while pos < len(payload):
            buffer = self._buffers[self._slot]
            take = min(len(payload) - pos, len(buffer) - self._offset)
            buffer[self._offset : self._offset + take] = payload[pos : pos + take]
            pos += take
            self._offset += take
            if self._offset == len(buffer):
                self._slot += 1
                self._offset = 0

    def _finish(self, header: _Header) -> Message:
        buffers = iter(self._buffers)
        tensors: dict[str, torch.Tensor] = {}
        for spec in header.tensors:
            if spec.nbytes == 0:
                tensors[spec.name] = torch.empty(spec.shape, dtype=spec.dtype)
                continue
            raw = torch.frombuffer(next(buffers), dtype=torch.uint8)
            if spec.dtype == torch.bool and int(raw.max()) > 1:
                raise WireError(f"wire: bool tensor {spec.name!r} holds bytes other than 0 and 1")
            tensors[spec.name] = raw.view(spec.dtype).reshape(spec.shape)
        self.reset()
        codecs = {spec.name: spec.codec for spec in header.tensors if spec.codec != CODEC and PART not in spec.name}
        return Message(header.kind, header.client_id, header.step, header.micro, tensors, dict(header.meta), codecs)


def decode(frames: Iterable[bytes], limits: Limits = Limits()) -> Message:
    """The one message that ``frames`` carry (all of them, nothing more), or ``WireError``."""
    decoder = Decoder(limits)
    message: Message | None = None
    for frame in frames:
        if message is not None:
            raise WireError("wire: frames continue after a complete message; expected exactly one message")
        message = decoder.feed(frame)
    if message is None:
        raise WireError("wire: frames ended before the message was complete")
    return message
