"""A server handler wrapper that keeps every (request, reply) pair, and a run recorded through it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

import splitlm.frameworks.federation as federation_module
from splitlm.frameworks import run_framework
from splitlm.transport import InProcessTransport, Message


class Recorder:
    """Wraps a server handler and keeps every (request, reply) pair it sees."""

    def __init__(self, handler: Callable[[Message], Message]) -> None:
        self.handler = handler
        self.pairs: list[tuple[Message, Message]] = []

    def __call__(self, message: Message) -> Message:
        reply = self.handler(message)
        if isinstance(reply, Future):  # a server with a request queue answers with a future
            reply = reply.result()
        self.pairs.append((message, reply))
        return reply


def recorded_run(monkeypatch: pytest.MonkeyPatch, config: Any, kind: type[Recorder] = Recorder) -> tuple[dict, Any]:
    """Run ``config`` in-process with its one server handler wrapped by a ``kind`` recorder: (summary, recorder)."""
    recorders: list[Recorder] = []

    class RecordingTransport(InProcessTransport):
        def __init__(self, handler: Callable[[Message], Message]) -> None:
            recorders.append(kind(handler))
            super().__init__(recorders[-1])

    with monkeypatch.context() as patch:
        patch.setattr(federation_module, "InProcessTransport", RecordingTransport)
        summary = run_framework(config)
    (recorder,) = recorders
    return summary, recorder
