"""Codecs: how a tensor that crosses the cut is turned into wire tensors and back (steps 3, 5, 7, 9).

A codec encodes one tensor into *parts* (``{"": main, "scale": ..., ...}``) and decodes them back; it
registers by name in ``CODECS``, and ``transport.codec.activations`` (steps 3 and 5) /
``transport.codec.gradients`` (steps 7 and 9) name one, optionally with an argument (``topk:0.1``), or a
``+``-joined chain applied left to right (``unpadded+int8``). ``none`` sends tensors as they are.

The built-in codecs, for a ``(B, T, d)`` float tensor (a *token* is one last-dim vector of d entries), with
the parts they send and what decoding gives back (float32 unless said otherwise):

- ``fp16``, ``bf16``: the tensor in that dtype; the dtype's rounding (bf16 is exact on bf16 data).
- ``int8``: per-token absmax quantization: int8 main in [-127, 127] and ``scale`` float32 ``(..., 1)``,
  s = absmax / 127; ``|x - x^| <= s/2`` per entry. ``int8:sr``: stochastic rounding (unbiased), ``< s``.
- ``int8:oN``, ``int4:oN`` (also with ``:sr``): each token's N largest-magnitude entries travel exactly (``ovals``
  float32 and ``oidx``, indices packed as for topk) and are left out of the scale, so a few huge entries (LLM hidden
  states have them in fixed dimensions) do not coarsen everyone's step; the rest within half its own step.
- ``int4`` (``int4:sr``): as int8 with s = absmax / 7, two values a byte (uint8 main, ``value + 8``, the
  first in the low nibble) and ``dim`` (d, int64 ``(1,)``); ``<= s/2`` (stochastic: ``< s``).
- ``topk:R`` (R in (0, 1]): each token's ``k = ceil(R * d)`` largest-magnitude entries: values (main, in the
  input's dtype), ``idx`` uint8 ``(..., k, w)`` (each index in w little-endian bytes: 1 for d <= 256, 2 for
  d <= 65536), ``dim``; kept entries exact, the others 0.
- ``randtopk:R`` (``randtopk:R:A``): as topk, but ``round(A * k)`` of the k slots (A = 0.1 by default) are
  drawn uniformly from outside the top-k set (RandTop-k, Zheng et al., IJCAI 2023); same bound.
- ``unpadded``: only the real tokens (attention mask 1): main ``(N, ...)``, ``keep`` (the mask as bits,
  uint8) and ``shape`` (int64); lossless on real tokens (in the input's dtype), 0 at padding.

Encoded bytes of a ``(4, 128, 576)`` float32 tensor with 60% real tokens (raw: 1,179,648): fp16 589,824;
int8 296,960; int4 149,512; topk:0.1 178,184; topk:0.1+fp16 118,792; topk:0.1+int8 91,144; unpadded 707,416;
unpadded+int8 178,148; unpadded+int4 89,740; unpadded+topk:0.1+fp16 71,320.

Values of ``topk`` travel in the input's dtype, so ``topk:0.1+fp16`` or ``topk:0.1+int8`` compress them further;
int8 scales are float32 because gradients are often below float16's range. Stochastic choices (``:sr``,
``randtopk``) use a ``torch.Generator`` seeded from the tensor's bytes: reproducible, and the global RNG (seeded per
step elsewhere) is never touched. (A learned bottleneck at the cut, ``split.bottleneck``, is part of the model
parts, not a codec: what crosses the cut is then K wide, and any codec applies to it.)

Order in a chain: ``unpadded`` first (it needs the ``(B, T, ...)`` tensor and the attention mask, and only it is
given the mask); the codecs that set the wire dtype (``fp16``, ``bf16``, ``int8``, ``int4``) last.

``CodecMod`` applies the configured codecs in the message pipeline: the client encodes its requests and
decodes the replies, the server decodes requests and encodes its replies, whatever transport moves them.
An encoded tensor travels as ``name`` (the main part) and ``name#<part>``, with ``Message.codecs[name]``
(and the wire header's per-tensor ``codec`` field) naming the codec; decoders receive tensors from a peer
and check them before use (part names, dtypes, shapes consistent with each other, index ranges, bit counts,
the decoded size against ``MAX_DECODED_BYTES``), so a malformed or lying payload is a ``ProtocolError``,
never a crash.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import ClassVar, Protocol

import torch

from splitlm.errors import ConfigError, ProtocolError
from splitlm.registry import Registry
from splitlm.transport.base import Answer, Handler, then
from splitlm.transport.messages import Message
from splitlm.transport.mods import Mod
from splitlm.transport.wire import PART as PART_SEPARATOR
from splitlm.transport.wire import Limits

NONE = "none"
MAX_DECODED_BYTES = 1 << 32  # a decoder refuses to rebuild a bigger tensor from a peer's parts (4 GiB)
MAX_DIM = 1 << 31  # largest dimension a peer may declare in a ``dim`` / ``shape`` part
MAX_REMEMBERED = 4096  # message keys whose attention mask a CodecMod remembers (oldest dropped first)
MAX_RESIDUALS = 1024  # error-feedback residuals a CodecMod keeps (oldest dropped first)
RANDTOPK_ALPHA = Fraction(1, 10)  # default share of randtopk's slots drawn from outside the top-k set
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

log = logging.getLogger(__name__)


class Codec(Protocol):
    """Encodes one tensor into named parts (``""`` is the main part) and decodes them back.

    Optional class attributes (read with defaults, so a minimal codec needs none): ``uses_mask`` (False): its
    ``encode`` wants the ``(B, T)`` attention mask (1 = real token; None = every token real); ``lossless``
    (False): decode returns the input exactly (error feedback skips such codecs); ``sets_dtype`` (False): its
    main part's dtype is the wire dtype, so it can only come last in a chain.
    """

    spec: str  # how a config names this codec, e.g. "fp16", "topk:0.1"

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor: ...


CodecFactory = Callable[[str | None], Codec]  # the argument after ":" (None without one)
CODECS = Registry[CodecFactory]("codec", "transport.codec", builtins=("splitlm.transport.codecs",))


def _encode(codec: Codec, tensor: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``codec.encode``, given the mask only if the codec wants one (third-party codecs may take no mask)."""
    return codec.encode(tensor, mask) if getattr(codec, "uses_mask", False) else codec.encode(tensor)


def _expect(parts: dict[str, torch.Tensor], where: str, spec: str, names: set[str]) -> None:
    if set(parts) != names:
        raise ProtocolError(
            f"codec {spec}: {where} arrived with parts {sorted(parts)}, expected {sorted(names)}; "
            "both sides must use the same transport.codec"
        )


def _bad(spec: str, where: str, what: str) -> ProtocolError:
    return ProtocolError(f"codec {spec}: {where} {what}")


def _label(name: str) -> str:
    return "main part" if name == "" else f"part {name!r}"


def _part(
    parts: dict[str, torch.Tensor],
    spec: str,
    where: str,
    name: str,
    dtypes: tuple[torch.dtype, ...],
    min_dims: int = 0,
) -> torch.Tensor:
    """``parts[name]`` after checking its dtype and that it has at least ``min_dims`` dimensions."""
    tensor = parts[name]
    if tensor.dtype not in dtypes:
        expected = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise _bad(
            spec, where, f"{_label(name)} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {expected}"
        )
    if tensor.dim() < min_dims:
        raise _bad(spec, where, f"{_label(name)} has {tensor.dim()} dimensions, expected at least {min_dims}")
    return tensor


def _shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_shape(spec: str, where: str, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if _shape_of(tensor) != expected:
        raise _bad(spec, where, f"{_label(name)} has shape {list(tensor.shape)}, expected {list(expected)}")


def _dims(
    parts: dict[str, torch.Tensor], spec: str, where: str, name: str, min_len: int = 1, max_len: int = 1
) -> tuple[int, ...]:
    """The int64 sizes a ``dim`` / ``shape`` part declares, each in [0, MAX_DIM]."""
    tensor = _part(parts, spec, where, name, (torch.int64,))
    if tensor.dim() != 1 or not min_len <= tensor.numel() <= max_len:
        raise _bad(spec, where, f"{_label(name)} has shape {list(tensor.shape)}, expected {min_len} to {max_len} sizes")
    dims = tuple(int(value) for value in tensor.tolist())
    if any(not 0 <= dim <= MAX_DIM for dim in dims):
        raise _bad(spec, where, f"{_label(name)} declares sizes {list(dims)}, expected each in [0, {MAX_DIM}]")
    return dims


def _check_size(spec: str, where: str, shape: tuple[int, ...], itemsize: int) -> None:
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_DECODED_BYTES:
        raise _bad(
            spec,
            where,
            f"would decode to {nbytes} bytes (shape {list(shape)}), over MAX_DECODED_BYTES={MAX_DECODED_BYTES}",
        )


def _generator(tensor: torch.Tensor) -> torch.Generator:
    """A generator on ``tensor``'s device seeded from its bytes: the same tensor draws the same numbers, and the
    global RNG is left alone."""
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=tensor.device).manual_seed(seed)


@dataclass(frozen=True)
class Cast:
    """A float cast: the tensor travels in ``dtype`` and is rebuilt as float32 (the receiver casts it further)."""

    spec: str
    dtype: torch.dtype
    sets_dtype: ClassVar[bool] = True
    lossless: ClassVar[bool] = False

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"": tensor.detach().to(self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        _expect(parts, where, self.spec, {""})
        main = parts[""]
        if main.dtype != self.dtype:
            raise ProtocolError(f"codec {self.spec}: {where} has dtype {main.dtype}, expected {self.dtype}")
        return main.to(torch.float32)


@CODECS.register("fp16")
def _fp16(argument: str | None) -> Codec:
    _no_argument("fp16", argument)
    return Cast("fp16", torch.float16)


@CODECS.register("bf16")
def _bf16(argument: str | None) -> Codec:
    _no_argument("bf16", argument)
    return Cast("bf16", torch.bfloat16)


def _no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise ConfigError(f"transport.codec: {name} takes no argument, got {name}:{argument}")


# ---------------------------------------------------------------- int8 / int4


@dataclass(frozen=True)
class Quantize:
    """Per-token absmax quantization to ``bits`` (8 or 4) signed levels, symmetric around 0.

    Each token's scale ``s = absmax / L`` (L = 127 or 7) travels as float32 ``scale`` ``(..., 1)``; entries become
    ``round(x / s)`` (or, ``stochastic``, ``floor(x / s + u)`` with u uniform in [0, 1): unbiased) in [-L, L].
    int4 packs two values a byte (``value + 8``, the first in the low nibble) and sends ``dim`` (d, which the
    packing hides when it is odd). Decoding gives float32 with ``|x - x^| <= s/2`` (stochastic: ``< s``).
    """

    spec: str
    bits: int
    stochastic: bool = False
    outliers: int = 0  # entries per token sent exactly (float32 value + index) and left out of the scale
    sets_dtype: ClassVar[bool] = True
    lossless: ClassVar[bool] = False

    @property
    def levels(self) -> int:
        return 127 if self.bits == 8 else 7

    def names(self) -> set[str]:
        base = {"", "scale"} if self.bits == 8 else {"", "scale", "dim"}
        return base | ({"ovals", "oidx"} if self.outliers else set())

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = tensor.detach().to(torch.float32)  # (..., d)
        if x.dim() == 0:
            raise ValueError(f"codec {self.spec}: needs a tensor of tokens (..., d), got a scalar")
        d = x.shape[-1]
        extra: dict[str, torch.Tensor] = {}
        if self.outliers:  # LLM hidden states have a few huge entries per token: they travel exactly
            kept = min(self.outliers, d)
            index = x.abs().topk(kept, dim=-1).indices.sort(-1).values  # (..., o)
            extra = {"ovals": x.gather(-1, index), "oidx": _pack_indices(index, d)}
            x = x.scatter(-1, index, 0.0)
        absmax = x.abs().amax(-1, keepdim=True) if d else x.new_zeros((*x.shape[:-1], 1))
        scale = absmax / self.levels  # (..., 1)
        scaled = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.stochastic:
            noise = torch.rand(x.shape, generator=_generator(tensor), device=x.device)
            q = torch.floor(scaled + noise)
        else:
            q = torch.round(scaled)
        q = q.clamp(-self.levels, self.levels)
        if self.bits == 8:
            return {"": q.to(torch.int8), "scale": scale, **extra}
        dim = torch.tensor([d], dtype=torch.int64, device=x.device)
        return {"": _pack_nibbles(q), "scale": scale, "dim": dim, **extra}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        _expect(parts, where, self.spec, self.names())
        if self.bits == 8:
            q = _part(parts, self.spec, where, "", (torch.int8,), min_dims=1)
            if bool((q == -128).any()):
                raise _bad(self.spec, where, "main part holds -128, outside int8's [-127, 127]")
        else:
            packed = _part(parts, self.spec, where, "", (torch.uint8,), min_dims=1)
            (d,) = _dims(parts, self.spec, where, "dim")
            if (d + 1) // 2 != packed.shape[-1]:
                raise _bad(
                    self.spec,
                    where,
                    f"main part packs {packed.shape[-1]} bytes a token, but d={d} needs {(d + 1) // 2}",
                )
            _check_size(self.spec, where, (*packed.shape[:-1], d), 4)
            q = _unpack_nibbles(packed, d)
            if bool((q == -8).any()):
                raise _bad(self.spec, where, "main part holds -8, outside int4's [-7, 7]")
        scale = _part(parts, self.spec, where, "scale", (torch.float32,))
        _check_shape(self.spec, where, "scale", scale, (*q.shape[:-1], 1))
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise _bad(
                self.spec, where, "part 'scale' holds negative or non-finite values (inf/nan in the sender's tensor?)"
            )
        x = q.to(torch.float32) * scale
        if self.outliers:
            x = self._put_outliers(parts, where, x)
        return x

    def _put_outliers(self, parts: dict[str, torch.Tensor], where: str, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        kept = min(self.outliers, d)
        values = _part(parts, self.spec, where, "ovals", (torch.float32,))
        _check_shape(self.spec, where, "ovals", values, (*x.shape[:-1], kept))
        packed = _part(parts, self.spec, where, "oidx", (torch.uint8,))
        _check_shape(self.spec, where, "oidx", packed, (*x.shape[:-1], kept, _index_width(d)))
        index = _unpack_indices(packed)
        if kept and (bool((index >= d).any()) or bool((index[..., 1:] <= index[..., :-1]).any())):
            raise _bad(self.spec, where, f"part 'oidx' holds indices out of range 0..{d - 1} or not increasing")
        return x.scatter(-1, index, values)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., d) integers in [-7, 7] -> (..., ceil(d / 2)) uint8, ``value + 8``, the first of a pair low."""
    biased = (q + 8).to(torch.uint8)
    if biased.shape[-1] % 2:
        biased = torch.cat([biased, torch.full_like(biased[..., :1], 8)], -1)
    pairs = biased.reshape(*biased.shape[:-1], biased.shape[-1] // 2, 2)  # no -1: tensors may be empty
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, d: int) -> torch.Tensor:
    """(..., m) uint8 -> (..., d) int8 in [-8, 7] (the inverse of ``_pack_nibbles``)."""
    pairs = torch.stack([packed & 0xF, packed >> 4], -1)  # (..., m, 2)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :d].to(torch.int8) - 8


def _quantize_factory(bits: int) -> CodecFactory:
    name = f"int{bits}"

    def factory(argument: str | None) -> Codec:
        options = [] if argument is None else argument.split(":")
        stochastic = "sr" in options
        outliers = [o for o in options if o != "sr"]
        valid = len(outliers) <= 1 and options.count("sr") <= 1
        if valid and outliers:
            count = outliers[0]
            valid = count.startswith("o") and count[1:].isdigit() and 0 < int(count[1:]) <= 256
        if not valid:
            raise ConfigError(
                f"transport.codec: {name} takes 'sr' (stochastic rounding) and/or 'oN' (N outliers per token sent "
                f"exactly, 1..256), e.g. {name}:o8 or {name}:sr:o8; got {name}:{argument}"
            )
        count = int(outliers[0][1:]) if outliers else 0
        spec = ":".join([name, *(["sr"] if stochastic else []), *([f"o{count}"] if count else [])])
        return Quantize(spec, bits, stochastic, count)

    return factory


CODECS.add("int8", _quantize_factory(8))
CODECS.add("int4", _quantize_factory(4))


# ---------------------------------------------------------------- topk / randtopk


@dataclass(frozen=True)
class TopK:
    """Keeps the ``k = ceil(ratio * d)`` largest-magnitude entries of each token (``randtopk``: ``round(alpha * k)``
    of them drawn uniformly from outside the top-k set instead, as in RandTop-k) and zeros the rest.

    Parts: the kept values (main, ``(..., k)`` in the input's dtype, so a cast or int8 after it compresses them),
    ``idx`` uint8 ``(..., k, w)``: each index in ``w`` little-endian bytes (1 for d <= 256, 2 for d <= 65536, ...),
    increasing along the token, and ``dim`` (d). Decoding gives float32: kept entries exact, the others 0.
    """

    spec: str
    ratio: Fraction
    alpha: Fraction = Fraction(0)
    lossless: ClassVar[bool] = False

    def kept(self, d: int) -> int:
        return math.ceil(self.ratio * d)

    def random_slots(self, k: int, d: int) -> int:
        return min(math.floor(self.alpha * k + Fraction(1, 2)), d - k)

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = tensor.detach()  # (..., d)
        if x.dim() == 0 or not x.is_floating_point():
            raise ValueError(
                f"codec {self.spec}: needs a float tensor of tokens (..., d), got {x.dtype} {list(x.shape)}"
            )
        d = x.shape[-1]
        k = self.kept(d)
        index = x.abs().topk(k, dim=-1).indices  # (..., k), largest first
        slots = self.random_slots(k, d)
        if slots:
            scores = torch.rand(x.shape, generator=_generator(x), device=x.device)
            scores.scatter_(-1, index, -1.0)  # the top-k set is never drawn
            index = torch.cat([index[..., : k - slots], scores.topk(slots, dim=-1).indices], -1)
        index = index.sort(-1).values
        packed = _pack_indices(index, d)
        return {"": x.gather(-1, index), "idx": packed, "dim": torch.tensor([d], dtype=torch.int64, device=x.device)}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        _expect(parts, where, self.spec, {"", "idx", "dim"})
        values = _part(parts, self.spec, where, "", FLOATS, min_dims=1)  # (..., k)
        (d,) = _dims(parts, self.spec, where, "dim")
        k = values.shape[-1]
        if k != self.kept(d):
            raise _bad(
                self.spec, where, f"main part has {k} values a token, but {self.spec} keeps {self.kept(d)} of d={d}"
            )
        width = _index_width(d)
        packed = _part(parts, self.spec, where, "idx", (torch.uint8,))
        _check_shape(self.spec, where, "idx", packed, (*values.shape, width))
        shape = (*values.shape[:-1], d)
        _check_size(self.spec, where, shape, 4)
        index = _unpack_indices(packed)
        if k and bool((index[..., -1] >= d).any()):
            raise _bad(self.spec, where, f"part 'idx' holds indices >= d={d}")
        if k > 1 and bool((index[..., 1:] <= index[..., :-1]).any()):
            raise _bad(self.spec, where, "part 'idx' is not strictly increasing along a token (repeated indices?)")
        out = torch.zeros(shape, dtype=torch.float32, device=values.device)
        return out.scatter_(-1, index, values.to(torch.float32))


def _pack_indices(index: torch.Tensor, d: int) -> torch.Tensor:
    """(..., k) indices into d entries -> (..., k, w) uint8, each index in w little-endian bytes."""
    return torch.stack([(index >> (8 * byte)) & 0xFF for byte in range(_index_width(d))], -1).to(torch.uint8)


def _unpack_indices(packed: torch.Tensor) -> torch.Tensor:
    """(..., k, w) uint8 -> (..., k) int64 (the inverse of ``_pack_indices``)."""
    index = packed[..., 0].to(torch.int64)
    for byte in range(1, packed.shape[-1]):
        index |= packed[..., byte].to(torch.int64) << (8 * byte)
    return index


def _index_width(d: int) -> int:
    """Bytes an index into d entries needs (at least 1)."""
    return max(1, math.ceil((d - 1).bit_length() / 8)) if d > 1 else 1


def _fraction(name: str, text: str, what: str, low_open: bool) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or value > 1 or value < 0 or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"transport.codec: {name}'s {what} must be a number in {interval}, got {text!r}")
    return value


@CODECS.register("topk")
def _topk(argument: str | None) -> Codec:
    if argument is None:
        raise ConfigError("transport.codec: topk needs the share of entries to keep, e.g. topk:0.1")
    return TopK(f"topk:{argument}", _fraction("topk", argument, "ratio R (topk:R)", low_open=True))


@CODECS.register("randtopk")
def _randtopk(argument: str | None) -> Codec:
    if argument is None:
        raise ConfigError(
            "transport.codec: randtopk needs the share of entries to keep, e.g. randtopk:0.1 or randtopk:0.1:0.2"
        )
    ratio, _, alpha = argument.partition(":")
    return TopK(
        f"randtopk:{argument}",
        _fraction("randtopk", ratio, "ratio R (randtopk:R[:A])", low_open=True),
        _fraction("randtopk", alpha, "random share A (randtopk:R:A)", low_open=False) if alpha else RANDTOPK_ALPHA,
    )


# ---------------------------------------------------------------- unpadded


@dataclass(frozen=True)
class Unpadded:
    """Sends only the real tokens of a ``(B, T, ...)`` tensor: main ``(N, ...)``, ``keep`` (the (B, T) mask as bits,
    token ``8i + j`` in bit j of byte i) and ``shape``; decoding puts them back, zeros at padding (lossless)."""

    spec: str = "unpadded"
    uses_mask: ClassVar[bool] = True
    lossless: ClassVar[bool] = True

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = tensor.detach()
        if x.dim() < 2:
            raise ValueError(f"codec unpadded: needs a (B, T, ...) tensor, got shape {list(x.shape)}")
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device) != 0
        if keep.shape != x.shape[:2]:
            raise ValueError(f"codec unpadded: mask of shape {list(keep.shape)} for a tensor of shape {list(x.shape)}")
        shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
        return {"": x[keep], "keep": _pack_bits(keep.reshape(-1)), "shape": shape}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        _expect(parts, where, self.spec, {"", "keep", "shape"})
        shape = _dims(parts, self.spec, where, "shape", min_len=2, max_len=8)
        main = _part(parts, self.spec, where, "", FLOATS, min_dims=1)  # (N, ...)
        if _shape_of(main)[1:] != shape[2:]:
            raise _bad(
                self.spec,
                where,
                f"main part has shape {list(main.shape)}, expected (N, {', '.join(map(str, shape[2:]))})",
            )
        tokens = shape[0] * shape[1]
        bits = _part(parts, self.spec, where, "keep", (torch.uint8,))
        _check_shape(self.spec, where, "keep", bits, ((tokens + 7) // 8,))
        _check_size(self.spec, where, shape, main.element_size())
        keep = _unpack_bits(bits)
        if bool(keep[tokens:].any()):
            raise _bad(self.spec, where, f"part 'keep' sets bits past its {tokens} tokens")
        keep = keep[:tokens]
        real = int(keep.sum())
        if real != main.shape[0]:
            raise _bad(
                self.spec, where, f"part 'keep' marks {real} real tokens but the main part has {main.shape[0]} rows"
            )
        out = main.new_zeros(shape)
        out.view(tokens, *shape[2:])[keep] = main
        return out


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """(n,) bool -> (ceil(n / 8),) uint8, flag ``8i + j`` in bit j of byte i."""
    padded = torch.cat([flags, flags.new_zeros((-flags.numel()) % 8)]).reshape((flags.numel() + 7) // 8, 8)
    weights = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=flags.device)
    return (padded.to(torch.uint8) * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(m,) uint8 -> (8m,) bool (the inverse of ``_pack_bits``, padding included)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(packed.numel(), 1) >> shifts) & 1).reshape(-1).bool()


@CODECS.register("unpadded")
def _unpadded(argument: str | None) -> Codec:
    _no_argument("unpadded", argument)
    return Unpadded()


# ---------------------------------------------------------------- chains


@dataclass(frozen=True)
class Chain:
    """Codecs applied left to right; each encodes the previous one's main part. Only the codecs that use the
    attention mask (``unpadded``, which ``parse_codec`` keeps ahead of every codec that changes the shape) get it."""

    spec: str
    codecs: tuple[Codec, ...]

    @property
    def uses_mask(self) -> bool:
        return any(getattr(codec, "uses_mask", False) for codec in self.codecs)

    @property
    def lossless(self) -> bool:
        return all(getattr(codec, "lossless", False) for codec in self.codecs)

    def encode(self, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        main = tensor
        for index, codec in enumerate(self.codecs):
            encoded = _encode(codec, main, mask)
            main = encoded.pop("")
            parts.update({_chain_part(index, name): value for name, value in encoded.items()})
        return {"": main, **parts}

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        remaining = dict(parts)
        if "" not in remaining:
            raise ProtocolError(f"codec {self.spec}: {where} arrived without its main part")
        main = remaining.pop("")
        for index in reversed(range(len(self.codecs))):
            prefix = _chain_part(index, "")
            own = {n.removeprefix(prefix): remaining.pop(n) for n in list(remaining) if n.startswith(prefix)}
            if "" in own:
                raise ProtocolError(f"codec {self.spec}: {where} has a part named {prefix!r}, which names no part")
            main = self.codecs[index].decode({"": main, **own}, where)
        if remaining:
            raise ProtocolError(f"codec {self.spec}: {where} has unexpected parts {sorted(remaining)[:3]}")
        return main


def _chain_part(index: int, name: str) -> str:
    return f"{index}-{name}"


def parse_codec(spec: str) -> Codec | None:
    """The codec a config names (``none`` -> None); ``ConfigError`` for an unknown name, a bad argument or an
    order a chain cannot have."""
    spec = spec.strip()
    if spec in ("", NONE):
        return None
    codecs = []
    for item in spec.split("+"):
        name, _, argument = item.strip().partition(":")
        codecs.append(CODECS.get(name)(argument or None))
    canonical = "+".join(codec.spec for codec in codecs)
    if any(isinstance(codec, Unpadded) for codec in codecs[1:]):
        raise ConfigError(f"transport.codec {canonical!r}: unpadded needs the (B, T, d) tensor and can only come first")
    if any(getattr(codec, "sets_dtype", False) for codec in codecs[:-1]):
        raise ConfigError(
            f"transport.codec {canonical!r}: a cast (fp16, bf16) or quantizer (int8, int4) sets the wire dtype and "
            "can only come last"
        )
    return codecs[0] if len(codecs) == 1 else Chain(canonical, tuple(codecs))


# Raw tensors a training message may carry beside its one coded tensor (attention mask, labels, a reply's row
# losses or feature moments, ...): with the coded tensor's parts, what ``wire_limits`` lets a message declare.
DATA_TENSORS = 8


def wire_tensors(spec: str) -> int:
    """How many wire tensors one tensor becomes under codec ``spec`` (its main part and every other part)."""
    codec = parse_codec(spec)
    if codec is None:
        return 1
    d = 64
    sample = torch.linspace(-1.0, 1.0, 2 * d).reshape(1, 2, d)  # (B, T, d): two tokens, both real
    return len(_encode(codec, sample, torch.ones(1, 2, dtype=torch.long)))


def wire_limits(activations: str, gradients: str, state_tensors: int = 0, base: Limits | None = None) -> Limits:
    """What a run's decoders accept: ``base``, with room for a training message's tensors under the run's codecs
    (``transport.codec.activations`` / ``.gradients``) and for states of ``state_tensors`` tensors (the largest
    trainable state that crosses this decoder: a client side, a trunk adapter)."""
    base = base or Limits()
    data = DATA_TENSORS + max(wire_tensors(activations), wire_tensors(gradients))
    return replace(base, max_tensors=max(base.max_tensors, data)).with_states(state_tensors)


# Which tensors of which messages each setting covers: activations at steps 3 and 5, gradients at 7 and 9.
CHANNELS: dict[tuple[str, str], str] = {
    ("forward", "hidden"): "activations",
    ("eval", "hidden"): "activations",
    ("activations", "hidden"): "activations",
    ("backward", "grad"): "gradients",
    ("gradients", "grad"): "gradients",
    ("loss", "grad"): "gradients",
}


class CodecMod(Mod):
    """Encodes what this side sends and decodes what it receives, per ``CHANNELS``.

    The attention mask (for ``unpadded``): a ``forward`` / ``eval`` request carries it (``attention_mask``, never
    encoded) and its reply (``activations``, ``loss``) is encoded with it. A ``backward`` request (step 7) and its
    ``gradients`` reply (step 9) carry none, so both halves remember the mask of each forward by message key
    (client, step, micro) and use it for that key's backward and gradients; a key is dropped after its gradients,
    loss or eval reply, and at most ``max_keys`` are kept (oldest dropped: a client that never sends its backward
    cannot grow the memory). Without a known mask a tensor is encoded as all real tokens (still correct).

    ``error_feedback``: for a lossy gradients codec, the side that encodes a gradient (the client its ``backward``
    grad, the server its ``gradients`` / ``loss`` grad) keeps what the codec dropped (the residual, 0 at padding)
    per (client, message kind, tensor name, micro) and adds it to the next gradient it encodes under that key,
    so that over steps the decoded gradients sum to the true ones up to one residual. A residual whose shape
    differs from the next gradient's is dropped; at most ``max_residuals`` are kept (oldest dropped).
    """

    name = "codec"

    def __init__(
        self,
        activations: str = NONE,
        gradients: str = NONE,
        error_feedback: bool = False,
        max_keys: int = MAX_REMEMBERED,
        max_residuals: int = MAX_RESIDUALS,
    ) -> None:
        self.specs = {"activations": activations, "gradients": gradients}
        self.codecs = {channel: parse_codec(spec) for channel, spec in self.specs.items()}
        self.error_feedback = error_feedback
        self._masks: _Bounded = _Bounded(max_keys)
        self._residuals: _Bounded = _Bounded(max_residuals)

    def __bool__(self) -> bool:
        return any(codec is not None for codec in self.codecs.values())

    def names(self) -> dict[str, str]:
        return dict(self.specs)

    def encode(self, message: Message, mask: torch.Tensor | None = None) -> Message:
        """``message`` with its covered tensors encoded; ``mask``: the (B, T) attention mask they belong to."""
        tensors = dict(message.tensors)
        codecs = dict(message.codecs)
        for name, tensor in message.tensors.items():
            channel = CHANNELS.get((message.kind, name))
            codec = self.codecs.get(channel) if channel else None
            if codec is None or name in message.codecs:
                continue
            token_mask = mask if mask is not None and tuple(mask.shape) == tuple(tensor.shape[:2]) else None
            if mask is not None and token_mask is None:
                log.debug(
                    "codec: %s tensor %r of shape %s does not fit its mask; sent as all real tokens",
                    message.kind,
                    name,
                    list(tensor.shape),
                )
            if self.error_feedback and channel == "gradients" and not getattr(codec, "lossless", False):
                parts = self._encode_with_feedback(codec, message, name, tensor, token_mask)
            else:
                parts = _encode(codec, tensor, token_mask)
            del tensors[name]
            for part, value in parts.items():
                tensors[f"{name}{PART_SEPARATOR}{part}" if part else name] = value
            codecs[name] = codec.spec
        encoded = message.replace(tensors)
        encoded.codecs = codecs
        return encoded

    def _encode_with_feedback(
        self, codec: Codec, message: Message, name: str, tensor: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        key = (message.client_id, message.kind, name, message.micro)
        target = tensor.detach().to(torch.float32)
        residual = self._residuals.pop(key)
        if residual is not None and residual.shape == target.shape and residual.device == target.device:
            target = target + residual
        parts = _encode(codec, target.to(tensor.dtype), mask)
        residual = target - codec.decode(dict(parts), f"{message.kind} tensor {name!r}").to(torch.float32)
        if mask is not None:
            residual = residual * (mask.to(residual.device) != 0).reshape(*mask.shape, *[1] * (residual.dim() - 2))
        self._residuals.put(key, residual)
        return parts

    def decode(self, message: Message) -> Message:
        if not message.codecs:
            return message
        tensors = dict(message.tensors)
        for name, spec in message.codecs.items():
            where = f"{message.kind} tensor {name!r}"
            channel = CHANNELS.get((message.kind, name))
            codec = self.codecs.get(channel) if channel else None
            if codec is None or codec.spec != spec:
                expected = codec.spec if codec is not None else NONE
                raise ProtocolError(
                    f"{where} arrived encoded with {spec!r}, but this side expects {expected!r} there; "
                    "use the same transport.codec settings on client and server"
                )
            prefix = f"{name}{PART_SEPARATOR}"
            parts = {"": tensors.pop(name)} if name in tensors else {}
            for key in [k for k in tensors if k.startswith(prefix)]:
                parts[key.removeprefix(prefix)] = tensors.pop(key)
            if "" not in parts:
                raise ProtocolError(f"{where}: encoded with {spec!r} but its main part is missing")
            tensors[name] = codec.decode(parts, where)
        stray = [k for k in tensors if PART_SEPARATOR in k]
        if stray:
            raise ProtocolError(f"{message.kind}: tensors {stray[:3]} belong to no encoded tensor")
        decoded = message.replace(tensors)
        decoded.codecs = {}
        return decoded

    def _mask_of(self, request: Message) -> torch.Tensor | None:
        """The mask a request's tensors and its reply's are encoded with; a forward's is remembered for later."""
        if request.kind in ("forward", "eval"):
            mask = request.tensors.get("attention_mask")
            if mask is not None:
                self._masks.put(request.key, mask.detach())
            return mask
        return self._masks.get(request.key)

    def _done(self, request: Message, reply: Message) -> None:
        if request.kind == "eval" or reply.kind in ("gradients", "loss"):
            self._masks.pop(request.key)

    # client side
    def on_request(self, message: Message) -> Message:
        return self.encode(message, self._mask_of(message))

    def on_reply(self, request: Message, reply: Message) -> Message:
        decoded = self.decode(reply)
        self._done(request, reply)
        return decoded

    # server side
    def serve(self, message: Message, call_next: Handler) -> Answer:
        request = self.decode(message)
        mask = self._mask_of(request)

        def encode(reply: Message) -> Message:
            encoded = self.encode(reply, mask)
            self._done(request, reply)
            return encoded

        return then(call_next(request), encode)


class _Bounded:
    """A thread-safe map that keeps the ``limit`` most recently stored keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            return self._items.get(key)

    def pop(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)
