"""A networked client's steps reach the server's metrics as the client takes them (streamed "progress"
records), and the round's reply repeats them: each step is logged exactly once, and records of a rolled-back
attempt that arrive late are dropped."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from splitlm.deploy.remote import RemoteClientProxy, remote_member
from splitlm.errors import ProtocolError
from splitlm.transport import ByteMeter, Message


def _record(step: int, loss: float) -> dict[str, Any]:
    return {"step": step, "client": "0", "round": 1, "loss": loss, "tokens": 10}


def test_streamed_and_replied_steps_are_logged_once_and_late_ones_of_an_old_attempt_dropped() -> None:
    logged: list[tuple[int, float]] = []
    fed = SimpleNamespace(
        local_steps=2,
        check_stop=lambda: None,
        on_step=lambda member, record: logged.append((record["step"], record["loss"])),
    )
    stale: list[dict[str, Any]] = []

    def send(message: Message, session: str | None) -> Message:
        if message.kind != "cmd:train":
            return Message("done", "0", -1, 0, {}, {})
        attempt = int(message.meta["attempt"])
        first = {**_record(1, 5.0), "attempt": attempt}
        member.progress(fed, dict(first))  # streamed while the client trains
        stale.append(first)
        records = [_record(1, 5.0), _record(2, 4.5)]
        return Message("done", "0", -1, 0, {}, {"records": json.dumps(records)})

    meter = ByteMeter()
    proxy = RemoteClientProxy("0", send, lambda: meter)
    hello = Message("hello", "0", -1, 0, {}, {"histogram": "{}", "examples": 4, "param_count": 1})
    member = remote_member(0, proxy, hello)

    snapshot = member.snapshot()
    member.train_round(fed, 0)  # type: ignore[arg-type]
    assert logged == [(1, 5.0), (2, 4.5)] and member.steps_done == 2 and member.tokens == 20

    member.restore(snapshot)  # the round is rolled back ...
    assert member.steps_done == 0
    member.progress(fed, dict(stale[0]))  # ... and a record of the old attempt still on its way is dropped
    assert logged == [(1, 5.0), (2, 4.5)]

    threads = [threading.Thread(target=member.progress, args=(fed, {**_record(3, 4.0), "attempt": member.attempt}))
               for _ in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert logged == [(1, 5.0), (2, 4.5), (3, 4.0)]  # the same step from several threads: once


def test_a_malformed_step_record_is_refused_and_not_logged() -> None:
    logged: list[dict[str, Any]] = []
    fed = SimpleNamespace(on_step=lambda member, record: logged.append(record))
    meter = ByteMeter()
    proxy = RemoteClientProxy("0", lambda message, session: Message("done", "0", -1, 0, {}, {}), lambda: meter)
    member = remote_member(
        0, proxy, Message("hello", "0", -1, 0, {}, {"histogram": "{}", "examples": 1, "param_count": 1})
    )
    for bad in ({"step": "1"}, {"loss": None}, {"client": "1"}, {"tokens": True}):
        with pytest.raises(ProtocolError, match="step record from client 0"):
            member.progress(fed, {**_record(1, 5.0), **bad})  # type: ignore[arg-type]
    assert logged == []
