"""Helpers for the network tests: the in-test server's handle, raw byte streams, client 1's healthy step."""

from __future__ import annotations

import itertools
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from splitlm.runtime.server import SplitServer
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import HEADER_LIMIT, METHOD, GrpcServer
from splitlm.transport.messages import Message
from splitlm.transport.security import make_dev_certs
from splitlm.transport.wire import Decoder, Limits, encode

CLIENTS = ["0", "1"]
HEALTHY_ADAPTER = "healthy"  # client 1 trains its own trunk adapter, so its steps leave client 0's untouched
REPLY_TIMEOUT = 30.0
_END = object()


@dataclass
class NetServer:
    grpc_server: GrpcServer
    split_server: SplitServer
    certs: Path
    tokens: dict[str, str]  # client id -> token
    address: str
    hidden_size: int
    steps: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=(self.certs / "ca.pem").read_bytes())

    def trunk_snapshot(self) -> dict[str, torch.Tensor]:
        """Every trunk tensor (frozen base and all adapters), copied."""
        return {name: p.detach().clone() for name, p in self.split_server.trunk.named_parameters()}

    def trunk_grads(self) -> list[str]:
        """Names of trunk parameters that hold a gradient (none should, between requests)."""
        return [name for name, p in self.split_server.trunk.named_parameters() if p.grad is not None]


class RawStream:
    """One bidirectional stream of raw frames: send any bytes, read the server's replies as messages."""

    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self._outgoing: queue.Queue[bytes | object] = queue.Queue()
        self.replies: queue.Queue[Message | BaseException | object] = queue.Queue()
        self._call = channel.stream_stream(METHOD)(iter(self._outgoing.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        decoder = Decoder(Limits(max_header_bytes=HEADER_LIMIT))
        try:
            for frame in self._call:
                message = decoder.feed(frame)
                if message is not None:
                    self.replies.put(message)
        except BaseException as error:  # the test reads it from the queue
            self.replies.put(error)
        finally:
            self.replies.put(_END)

    def send_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._outgoing.put(frame)

    def send(self, message: Message) -> None:
        self.send_frames(encode(message))

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Message:
        item = self.replies.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Message), "the server ended the stream without a reply"
        return item

    def close(self) -> None:
        self._outgoing.put(_END)
        self._call.cancel()
        self._reader.join(timeout=10)


def bearer(token: str, client_header: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata: ``authorization: Bearer TOKEN`` [+ ``x-splitlm-client``]."""
    pairs = [("authorization", f"Bearer {token}")]
    if client_header is not None:
        pairs.append(("x-splitlm-client", client_header))
    return tuple(pairs)


def hidden(batch: int, tokens: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(seed))


def forward_message(client_id: str, step: int, size: int, seed: int = 0, batch: int = 2, tokens: int = 5) -> Message:
    tensors = {
        "hidden": hidden(batch, tokens, size, seed),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
    }
    return Message("forward", client_id, step, 0, tensors, {"scale": 1.0, "want_grad": True})


def healthy_step(net: NetServer, connection: GrpcConnection) -> None:
    """One full U-shaped training step of client 1 through the server: forward, backward, optimizer step."""
    step = next(net.steps)
    before = net.split_server.adapter_state(HEALTHY_ADAPTER)
    out = connection.request(forward_message("1", step, net.hidden_size, seed=step))
    assert out.kind == "activations" and out.tensors["hidden"].shape == (2, 5, net.hidden_size)
    grads = connection.request(Message("backward", "1", step, 0, {"grad": torch.ones_like(out.tensors["hidden"])}))
    assert grads.kind == "gradients" and grads.tensors["grad"].shape == (2, 5, net.hidden_size)
    stepped = connection.request(Message("step", "1", step, 0, {}, {"grad_sq_norm": 0.0}))
    assert stepped.kind == "stepped"
    after = net.split_server.adapter_state(HEALTHY_ADAPTER)
    assert any(not torch.equal(before[k], after[k]) for k in before), "client 1's step did not train its adapter"


LISTENING = re.compile(r"splitlm server listening on 127\.0\.0\.1:(\d+)")
NETWORK_TIMEOUT = 200.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", *args]


def pump_lines(stream: Any, lines: queue.Queue[str | None], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        lines.put(line)
    lines.put(None)


def serve_over_network(
    root: Path, config: Path, overrides: list[str], count: int, env: dict[str, str] | None = None
) -> None:
    """`splitlm serve` ``config`` to ``count`` `splitlm client` processes (TLS, dev certificates) into
    ``root/server`` and ``root/client<i>``; raise with their logs if any fails. ``env`` adds to the environment."""
    certs = root / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], [str(i) for i in range(count)])
    assert os.environ.get("SPLITLM_CACHE"), "the session fixture should have set SPLITLM_CACHE"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    out: list[str] = []
    server = subprocess.Popen(
        cli("serve", str(config), *overrides, f"output_dir={root / 'server'}", "--certs", str(certs),
             "--address", "127.0.0.1:0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
    )  # fmt: skip
    clients: list[subprocess.Popen] = []
    logs = [(root / f"client{i}.log").open("w") for i in range(count)]
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=pump_lines, args=(server.stdout, lines, out), daemon=True).start()
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            found = LISTENING.search(line)
            port = int(found.group(1)) if found else None
        assert port is not None, "".join(out)
        for i in range(count):
            command = cli(
                "client", str(config), *overrides, f"output_dir={root / f'client{i}'}", "--server", f"127.0.0.1:{port}",
                "--client-id", str(i), "--certs", str(certs),
            )  # fmt: skip
            clients.append(subprocess.Popen(command, stdout=logs[i], stderr=subprocess.STDOUT, text=True, env=env))
        rcs = [proc.wait(timeout=NETWORK_TIMEOUT) for proc in (server, *clients)]
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for handle in logs:
            handle.close()
    said = "".join(out) + "".join((root / f"client{i}.log").read_text()[-2000:] for i in range(count))
    assert rcs == [0] * (count + 1), said
