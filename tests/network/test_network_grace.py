"""A client cut off from the server without restarting: left out of the round like a lost process, it is rolled
back and rejoins at the next round; the grace period runs from its last message; the straggler note says how
long the server has waited; SIGTERM stops a waiting server like Ctrl-C. (The runs across processes, a client cut
off or frozen past the grace and within it, are cases of benchmarks/faults.py: test_network_faults.py.)"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from network_support import NetServer, RawStream, bearer

from splitlm.deploy.remote import RemoteClientProxy, remote_member
from splitlm.errors import ClientGone
from splitlm.transport import ByteMeter, Message
from splitlm.transport import grpc_server as grpc_server_module
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import CHANNEL_OPTIONS, GrpcServer


def test_a_client_left_out_of_a_round_rejoins_from_its_checkpoint_even_without_restarting() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def send(message: Message, session: str | None) -> Message:
        sent.append((message.kind, dict(message.meta)))
        if message.kind == "cmd:restore":  # the client went back to its checkpoint of round 1
            return Message("done", "1", -1, 0, {}, {"steps_done": 3, "tokens": 30, "restored": "step-000009"})
        return Message("done", "1", -1, 0, {}, {})

    meter = ByteMeter()
    proxy = RemoteClientProxy(
        "1", send, lambda: meter, session=lambda: "same-process", wait_connected=lambda timeout: True
    )
    member = remote_member(
        1, proxy, Message("hello", "1", -1, 0, {}, {"histogram": "{}", "examples": 4, "param_count": 1})
    )
    member.steps_done, member.tokens = 3, 30
    fed = SimpleNamespace(last_checkpoint="step-000009")
    saved = member.snapshot()
    sent.clear()
    member.steps_done, member.tokens = 5, 50  # in the middle of round 2 when the server lost it ...
    member.restore(saved, gone=True)  # ... so the round is rolled back without it
    assert member.steps_done == 3

    # Until it rejoins, nothing reaches it: neither the round's broadcast nor a checkpoint of its half-done state.
    with pytest.raises(ClientGone, match="left out"):
        proxy.command("checkpoint", name="step-000015")
    assert member.ready(fed, time.monotonic(), rejoin=False) is False  # (not a holder of the global model)
    assert sent == []

    # Back, the same process (same session): at the next round it rejoins from its checkpoint, then works again.
    assert member.ready(fed, time.monotonic()) is True  # type: ignore[arg-type]
    assert [kind for kind, _ in sent] == ["cmd:restore"] and sent[0][1]["name"] == "step-000009"
    assert member.stale and member.steps_done == 3 and member.tokens == 30
    proxy.command("snapshot")
    assert [kind for kind, _ in sent] == ["cmd:restore", "cmd:snapshot"]
    assert member.ready(fed, time.monotonic()) is True  # type: ignore[arg-type]
    assert len(sent) == 2  # rejoined once


def test_a_client_left_out_of_the_last_round_and_back_ends_with_the_global_client_side() -> None:
    from splitlm.deploy.serve import _catch_up

    sent: list[str] = []

    def send(message: Message, session: str | None) -> Message:
        sent.append(message.kind)
        meta = {"steps_done": 6, "tokens": 60, "restored": "step-000018"} if message.kind == "cmd:restore" else {}
        return Message("done", "1", -1, 0, {}, meta)

    meter = ByteMeter()
    proxy = RemoteClientProxy("1", send, lambda: meter, session=lambda: "s", wait_connected=lambda timeout: True)
    member = remote_member(
        1, proxy, Message("hello", "1", -1, 0, {}, {"histogram": "{}", "examples": 4, "param_count": 1})
    )
    fed = SimpleNamespace(last_checkpoint="step-000027", carry={"w": torch.ones(2)}, fitted=lambda m, state: state)
    _catch_up(fed, member)  # type: ignore[arg-type]
    assert sent == []  # a client that worked to the end needs nothing
    member.restore(member.snapshot(), gone=True)  # left out of the last round
    sent.clear()
    _catch_up(fed, member)  # type: ignore[arg-type]
    assert sent == ["cmd:restore", "cmd:set_state"]  # back from its checkpoint, then the global client side


def test_the_straggler_note_says_how_long_the_server_has_waited(
    net_server: NetServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(grpc_server_module, "STRAGGLER_NOTE_S", 2.0)
    client = GrpcConnection(net_server.address, "0", net_server.tokens["0"], ca=net_server.certs / "ca.pem")
    try:
        # the client never answers: one note after 2 s, then it is gone at 3 s
        expected = pytest.raises(ClientGone, match="did not answer cmd:snapshot within 3 s")
        with caplog.at_level(logging.WARNING, logger="splitlm.transport.grpc_server"), expected:
            net_server.grpc_server.command("0", Message("cmd:snapshot", "0", -1), timeout=3.0)
    finally:
        client.close()
    notes = [r.getMessage() for r in caplog.records if "still waiting for client 0" in r.getMessage()]
    assert len(notes) == 1, notes
    waited = re.search(r"cmd:snapshot, (\d+) s\)", notes[0])
    assert waited is not None and int(waited.group(1)) >= 2, notes  # it has waited at least the 2 s it says


def test_a_client_silent_for_the_grace_period_is_gone_though_its_stream_looks_open(net_server: NetServer) -> None:
    """A link cut off without a word (or a stopped process) breaks no stream for a long while: the server counts
    the grace period from the client's last message, fails its commands and drops its stream."""
    server = GrpcServer(None, {t: c for c, t in net_server.tokens.items()}, "127.0.0.1:0", net_server.certs,
                        client_grace_s=2.0)  # fmt: skip
    server.start()
    channels: list[grpc.Channel] = []
    resent: list[Message] = []  # commands the server sent again on a new stream

    def stream() -> RawStream:
        channel = grpc.secure_channel(f"127.0.0.1:{server.port}", net_server.credentials(), options=CHANNEL_OPTIONS)
        channels.append(channel)
        opened = RawStream(channel, bearer(net_server.tokens["0"], "0"))
        opened.send(Message("hello", "0", -1, 0, {}, {"session": "one-process", "ready": True}))
        while (reply := opened.reply()).kind != "welcome":
            resent.append(reply)
        return opened

    outcome: list[Message | BaseException] = []

    def command() -> None:
        try:
            outcome.append(server.command("0", Message("cmd:snapshot", "0", -1)))
        except ClientGone as gone:
            outcome.append(gone)

    try:
        silent = stream()  # says nothing more (a raw stream sends no heartbeat) and never answers
        worker = threading.Thread(target=command, daemon=True)
        worker.start()
        assert silent.reply().kind == "cmd:snapshot"
        worker.join(timeout=15)
        assert len(outcome) == 1 and isinstance(outcome[0], ClientGone), outcome
        silence = re.search(r"nothing received from it for (\d+) s", str(outcome[0]))
        assert silence is not None and int(silence.group(1)) >= 2, outcome  # (at least the grace, as it says)
        with pytest.raises(AssertionError, match="ended the stream"):
            silent.reply(timeout=10)  # its stream was dropped
        back = stream()  # the same process, back: welcome, and the failed command is not sent again
        assert resent == []
        back.close()
    finally:
        server.stop()
        for channel in channels:
            channel.close()


def test_a_connected_client_idle_for_longer_than_the_grace_period_is_not_gone(net_server: NetServer) -> None:
    server = GrpcServer(None, {t: c for c, t in net_server.tokens.items()}, "127.0.0.1:0", net_server.certs,
                        client_grace_s=1.0)  # fmt: skip
    server.start()
    client = GrpcConnection(f"127.0.0.1:{server.port}", "0", net_server.tokens["0"], ca=net_server.certs / "ca.pem")
    try:
        time.sleep(3.0)  # nothing to do for three grace periods: its heartbeats keep it
        asked: list[Message] = []

        def answer() -> None:
            command = client.commands.get(timeout=10)
            assert isinstance(command, Message)
            asked.append(command)
            client.send(Message("done", "0", -1, 0, {}, {"seq": command.meta["seq"]}))

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        assert server.command("0", Message("cmd:snapshot", "0", -1)).kind == "done"
        answering.join(timeout=10)
        assert [m.kind for m in asked] == ["cmd:snapshot"]
    finally:
        client.close()
        server.stop()


@pytest.mark.slow  # a server process: it loads the model first (seconds)
@pytest.mark.timeout(120)
def test_sigterm_stops_a_server_waiting_for_clients_like_ctrl_c(tmp_path: Path) -> None:
    from splitlm.transport.security import make_dev_certs

    certs = tmp_path / "certs"
    make_dev_certs(certs, ["127.0.0.1"], ["0", "1"])
    config = Path(__file__).resolve().parents[2] / "configs" / "frameworks" / "sflv1.yaml"
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "splitlm.cli.main", "serve", str(config), "framework.num_clients=2",
             f"output_dir={tmp_path / 'run'}", "--certs", str(certs), "--address", "127.0.0.1:0"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "waiting for clients" not in log.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    text = log.read_text()
    assert code == 130, text  # as Ctrl-C (not 143, killed by the signal)
    last = text.strip().splitlines()[-1]
    assert last.startswith("splitlm: error: interrupted before training started"), text
    assert "no checkpoint was written" in last
