"""Codecs: how a tensor that crosses the cut is turned into wire tensors and back (steps 3, 5, 7, 9).

A codec encodes one tensor into *parts* (``{"": main, "scale": ..., ...}``) and decodes them back; it
registers by name in ``CODECS``, and ``transport.codec.activations`` (steps 3 and 5) /
``transport.codec.gradients`` (steps 7 and 9) name one, optionally with an argument (``topk:0.1``), or a
``+``-joined chain applied left to right (``unpadded+int8``). ``none`` sends tensors as they are.

``CodecMod`` applies the configured codecs in the message pipeline: the client encodes its requests and
decodes the replies, the server decodes requests and encodes its replies, whatever transport moves them.
An encoded tensor travels as ``name`` (the main part) and ``name#<part>``, with ``Message.codecs[name]``
(and the wire header's per-tensor ``codec`` field) naming the codec; decoders receive tensors from a peer
and check them before use, so a malformed or lying payload is a ``ProtocolError``, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from splitlm.errors import ConfigError, ProtocolError
from splitlm.registry import Registry
from splitlm.transport.base import Answer, Handler, then
from splitlm.transport.messages import Message
from splitlm.transport.mods import Mod
from splitlm.transport.wire import PART as PART_SEPARATOR

NONE = "none"


class Codec(Protocol):
    """Encodes one tensor into named parts (``""`` is the main part) and decodes them back."""

    spec: str  # how a config names this codec, e.g. "fp16", "topk:0.1"

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor: ...


CodecFactory = Callable[[str | None], Codec]  # the argument after ":" (None without one)
CODECS = Registry[CodecFactory]("codec", "transport.codec", builtins=("splitlm.transport.codecs",))


def _expect(parts: dict[str, torch.Tensor], where: str, spec: str, names: set[str]) -> None:
    if set(parts) != names:
        raise ProtocolError(
            f"codec {spec}: {where} arrived with parts {sorted(parts)}, expected {sorted(names)}; "
            "both sides must use the same transport.codec"
        )


@dataclass(frozen=True)
class Cast:
    """A float cast: the tensor travels in ``dtype`` and is rebuilt as float32 (the receiver casts it further)."""

    spec: str
    dtype: torch.dtype

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
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


@dataclass(frozen=True)
class Chain:
    """Codecs applied left to right; each encodes the previous one's main part."""

    spec: str
    codecs: tuple[Codec, ...]

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        main = tensor
        for index, codec in enumerate(self.codecs):
            encoded = codec.encode(main)
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
            main = self.codecs[index].decode({"": main, **own}, where)
        if remaining:
            raise ProtocolError(f"codec {self.spec}: {where} has unexpected parts {sorted(remaining)[:3]}")
        return main


def _chain_part(index: int, name: str) -> str:
    return f"{index}-{name}"


def parse_codec(spec: str) -> Codec | None:
    """The codec a config names (``none`` -> None); ``ConfigError`` for an unknown name or a bad argument."""
    spec = spec.strip()
    if spec in ("", NONE):
        return None
    codecs = []
    for item in spec.split("+"):
        name, _, argument = item.strip().partition(":")
        codecs.append(CODECS.get(name)(argument or None))
    if any(isinstance(codec, Cast) for codec in codecs[:-1]):
        raise ConfigError(f"transport.codec {spec!r}: a cast (fp16, bf16) sets the wire dtype and can only come last")
    return codecs[0] if len(codecs) == 1 else Chain(spec, tuple(codecs))


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
    """Encodes what this side sends and decodes what it receives, per ``CHANNELS``."""

    name = "codec"

    def __init__(self, activations: str = NONE, gradients: str = NONE) -> None:
        self.specs = {"activations": activations, "gradients": gradients}
        self.codecs = {channel: parse_codec(spec) for channel, spec in self.specs.items()}

    def __bool__(self) -> bool:
        return any(codec is not None for codec in self.codecs.values())

    def names(self) -> dict[str, str]:
        return dict(self.specs)

    def encode(self, message: Message) -> Message:
        tensors = dict(message.tensors)
        codecs = dict(message.codecs)
        for name, tensor in message.tensors.items():
            channel = CHANNELS.get((message.kind, name))
            codec = self.codecs.get(channel) if channel else None
            if codec is None or name in message.codecs:
                continue
            del tensors[name]
            for part, value in codec.encode(tensor).items():
                tensors[f"{name}{PART_SEPARATOR}{part}" if part else name] = value
            codecs[name] = codec.spec
        encoded = message.replace(tensors)
        encoded.codecs = codecs
        return encoded

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

    # client side
    def on_request(self, message: Message) -> Message:
        return self.encode(message)

    def on_reply(self, request: Message, reply: Message) -> Message:
        return self.decode(reply)

    # server side
    def serve(self, message: Message, call_next: Handler) -> Answer:
        return then(call_next(self.decode(message)), self.encode)
