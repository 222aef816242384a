"""Link emulation (``transport.link``): the computed delays of the pure model, the emulating transport on
hand-made messages, and a tiny run through a link. Only computed delays are asserted, never wall-clock times."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from splitlm.config import build_config
from splitlm.deploy.remote import RemoteMember
from splitlm.errors import ConfigError, ProtocolError
from splitlm.frameworks import run_framework
from splitlm.frameworks.pipeline import client_link
from splitlm.transport import Channel, InProcessTransport, Message, MeterMod
from splitlm.transport.link import EmulatedLink, Link

N = 1000  # payload bytes of a request: 250 float32 values
SEND_S = N * 8 / (8.0 * 1e6)  # at 8 Mbit/s: 1 ms on the wire


def _request(step: int, values: int = N // 4) -> Message:
    return Message("forward", "0", step, 0, {"hidden": torch.full((values,), float(step))})


def _double(message: Message) -> Message:
    """A server that answers with twice the request's tensor (the same size: a reply of N bytes)."""
    return Message(
        "activations", message.client_id, message.step, message.micro, {"hidden": message.tensors["hidden"] * 2}
    )


class Clock:
    """A clock the test moves by hand (the link's deliveries wait for it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30.0  # only against a hang: nothing here is timed
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.001)


# --- the pure model ------------------------------------------------------------------------------------------


def test_the_delay_of_a_known_payload_is_its_send_time_plus_the_latency() -> None:
    up, down = Link(bandwidth_mbps=8.0, latency_ms=5.0), Link(bandwidth_mbps=80.0, latency_ms=20.0)
    assert up.send(N, at=10.0).seconds == pytest.approx(N * 8 / 8e6 + 0.005, abs=1e-12)
    assert down.send(N, at=10.0).seconds == pytest.approx(N * 8 / 80e6 + 0.020, abs=1e-12)
    assert up.send_seconds(N) == pytest.approx(0.001) and down.send_seconds(N) == pytest.approx(0.0001)


def test_a_message_queues_behind_the_one_on_the_wire() -> None:
    link = Link(bandwidth_mbps=8.0, latency_ms=5.0)
    first, second = link.send(N, at=0.0), link.send(N, at=0.0)
    assert (first.start, first.arrival) == pytest.approx((0.0, SEND_S + 0.005))
    assert second.queued == pytest.approx(SEND_S)  # it starts when the first is sent, not when it arrives
    assert second.seconds == pytest.approx(2 * SEND_S + 0.005)
    late = link.send(N, at=1.0)  # the wire is free again: no queueing
    assert (late.queued, late.seconds) == pytest.approx((0.0, SEND_S + 0.005))
    half = link.send(N, at=1.0 + SEND_S / 2)  # handed over halfway through the previous one
    assert half.seconds == pytest.approx(SEND_S / 2 + SEND_S + 0.005)


def test_unlimited_bandwidth_is_the_latency_only() -> None:
    link = Link(bandwidth_mbps=0.0, latency_ms=3.0)
    assert [link.send(n, at=0.0).seconds for n in (0, N, 10**9)] == pytest.approx([0.003] * 3)
    assert Link().send(10**9, at=2.0).seconds == 0.0


def test_jitter_is_bounded_reproducible_and_keeps_the_order() -> None:
    def arrivals(seed: int) -> list[float]:
        link = Link(bandwidth_mbps=0.0, latency_ms=2.0, jitter_ms=1.5, seed=seed)
        return [link.send(N, at=i * 1e-4).arrival for i in range(200)]

    state = random.getstate()
    first = arrivals(7)
    assert random.getstate() == state  # the link's own generator, never the global one
    assert first == arrivals(7) and first != arrivals(8)
    assert first == sorted(first)  # no overtaking, although the jitter exceeds the spacing
    delays = [a - i * 1e-4 for i, a in enumerate(first)]
    assert all(0.0005 - 1e-12 <= d <= 0.0035 + 1e-12 for d in delays)
    assert max(delays) - min(delays) > 0.001  # it does vary
    clipped = Link(latency_ms=0.5, jitter_ms=2.0, seed=1)
    assert all(clipped.send(N, at=float(i)).seconds >= 0.0 for i in range(100))  # never below 0


def test_a_link_refuses_negative_or_infinite_settings() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        Link(latency_ms=-1.0)
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        Link(bandwidth_mbps=float("inf"))


# --- the emulating transport ---------------------------------------------------------------------------------


def test_sequential_requests_get_their_replies_and_the_computed_delays() -> None:
    seen: list[int] = []
    closed = threading.Event()
    inner = InProcessTransport(lambda m: (seen.append(m.step), _double(m))[1])
    inner.close = closed.set  # type: ignore[method-assign]
    link = EmulatedLink(inner, Link(8.0, 1.0), Link(16.0, 2.0))
    replies = [link.request(_request(step)) for step in range(3)]
    assert seen == [0, 1, 2]
    for step, reply in enumerate(replies):
        assert torch.equal(reply.tensors["hidden"], torch.full((N // 4,), 2.0 * step))
    # One at a time: nothing queues, so each message takes its send time plus the latency.
    meter = link.meter
    assert (meter.up_bytes, meter.down_bytes, meter.up_messages, meter.down_messages) == (3 * N, 3 * N, 3, 3)
    assert meter.up_seconds == pytest.approx(3 * (N * 8 / 8e6 + 0.001), abs=1e-9)
    assert meter.down_seconds == pytest.approx(3 * (N * 8 / 16e6 + 0.002), abs=1e-9)
    assert link.seconds() == pytest.approx(meter.up_seconds + meter.down_seconds)
    link.close()
    assert closed.is_set()
    with pytest.raises(ProtocolError, match="closed"):
        link.submit(_request(3)).result()


def test_requests_in_flight_queue_on_the_link_and_arrive_in_order() -> None:
    clock = Clock()
    seen: list[int] = []
    link = EmulatedLink(
        InProcessTransport(lambda m: (seen.append(m.step), _double(m))[1]), Link(8.0, 5.0), Link(80.0, 1.0), clock
    )
    futures = [link.submit(_request(step)) for step in range(3)]  # all handed over at t=0: submit never waits
    assert link.meter.up_seconds == pytest.approx(6 * SEND_S + 3 * 0.005)  # queued: 1, 2 and 3 send times
    assert seen == [] and not any(f.done() for f in futures)  # nothing arrived yet
    clock.now = 1.0  # every request has arrived: the server answers each at t=1
    _wait_for(lambda: link.meter.down_messages == 3, "answered")
    assert seen == [0, 1, 2] and not any(f.done() for f in futures)  # the replies are on their way
    clock.now = 2.0
    replies = [f.result(timeout=30) for f in futures]
    assert [r.step for r in replies] == [0, 1, 2]
    assert [r.tensors["hidden"][0].item() for r in replies] == [0.0, 2.0, 4.0]
    down_send = N * 8 / 80e6
    assert link.meter.down_seconds == pytest.approx(6 * down_send + 3 * 0.001)
    link.close()


def test_a_server_that_answers_later_and_out_of_order() -> None:
    clock = Clock()
    answers: list[tuple[Message, Future[Message]]] = []

    def queued(message: Message) -> Future[Message]:
        future: Future[Message] = Future()
        answers.append((message, future))
        return future

    link = EmulatedLink(InProcessTransport(queued), Link(0.0, 1.0), Link(0.0, 1.0), clock)
    futures = [link.submit(_request(step)) for step in range(3)]
    clock.now = 1.0
    _wait_for(lambda: len(answers) == 3, "delivered")
    for message, future in reversed(answers):  # the server finishes the last request first
        future.set_result(_double(message))
    clock.now = 2.0
    assert [f.result(timeout=30).step for f in futures] == [0, 1, 2]
    assert link.meter.down_seconds == pytest.approx(3 * 0.001)
    link.close()


def test_errors_cross_the_link_to_the_caller() -> None:
    def refuse_step_1(message: Message) -> Message:
        if message.step == 1:
            raise ProtocolError("step 1 is refused")
        return _double(message)

    link = EmulatedLink(InProcessTransport(refuse_step_1), Link(0.0, 1.0), Link(0.0, 1.0))
    futures = [link.submit(_request(step)) for step in range(3)]
    assert futures[0].result(timeout=30).step == 0 and futures[2].result(timeout=30).step == 2
    with pytest.raises(ProtocolError, match="step 1 is refused"):
        futures[1].result(timeout=30)
    assert link.meter.down_messages == 3 and link.meter.down_bytes == 2 * N  # the error carries no tensors
    link.close()


def test_closing_fails_the_requests_in_flight() -> None:
    clock = Clock()  # never moves: nothing arrives
    link = EmulatedLink(InProcessTransport(_double), Link(0.0, 1.0), Link(0.0, 1.0), clock)
    future = link.submit(_request(0))
    link.close()
    with pytest.raises(ProtocolError, match="in flight"):
        future.result(timeout=30)


def test_the_link_sits_below_the_mods_and_carries_the_encoded_bytes(make_config) -> None:
    config = make_config("run", "transport.link.bandwidth_mbps=8", "transport.codec.activations=fp16")
    inner = InProcessTransport(_double)
    wrapped = client_link(config, inner, "0")
    assert isinstance(wrapped, EmulatedLink) and wrapped.transport is inner
    from splitlm.transport.codecs import CodecMod

    meter = MeterMod()
    channel = Channel(wrapped, [CodecMod("fp16", "none"), meter])
    channel.request(_request(1))
    assert wrapped.meter.up_bytes == N // 2 == meter.meter.up  # float16 on the wire: half the bytes
    wrapped.close()
    assert client_link(make_config("plain"), inner, "0") is inner  # default: no emulation


# --- configuration -------------------------------------------------------------------------------------------


def test_per_direction_settings_override_the_shared_ones() -> None:
    link = build_config(
        {}, ["transport.link.bandwidth_mbps=100", "transport.link.latency_ms=20", "transport.link.up.bandwidth_mbps=10"]
    ).transport.link
    assert link.enabled
    assert link.direction("up") == {"bandwidth_mbps": 10.0, "latency_ms": 20.0, "jitter_ms": 0.0}
    assert link.direction("down") == {"bandwidth_mbps": 100.0, "latency_ms": 20.0, "jitter_ms": 0.0}
    assert not build_config({}, []).transport.link.enabled
    assert build_config({}, ["transport.link.down.jitter_ms=1"]).transport.link.enabled
    with pytest.raises(ConfigError) as error:
        build_config({}, ["transport.link.latency_ms=-1", "transport.link.down.bandwidth_mbps=inf"])
    assert "transport.link.latency_ms" in str(error.value) and "transport.link.down.bandwidth_mbps" in str(error.value)


def test_a_remote_clients_comm_seconds_must_be_a_number() -> None:
    logged: list[dict] = []
    member = RemoteMember(0, SimpleNamespace(client_id="0"), [], None, {})  # type: ignore[arg-type]
    fed = SimpleNamespace(on_step=lambda m, record: logged.append(record))
    record = {"step": 1, "client": "0", "round": 1, "loss": 1.0, "tokens": 8}
    member.progress(fed, dict(record), attempt=0)  # an older client sends none
    member.progress(fed, {**record, "step": 2, "comm_seconds": 0.25}, attempt=0)
    with pytest.raises(ProtocolError, match="comm_seconds"):
        member.progress(fed, {**record, "step": 3, "comm_seconds": "slow"}, attempt=0)
    assert [r["step"] for r in logged] == [1, 2]


# --- a run through a link ------------------------------------------------------------------------------------

FAST_LINK = ("transport.link.bandwidth_mbps=1000", "transport.link.latency_ms=1")


@pytest.mark.parametrize("clients", [1, 2])
def test_a_run_through_a_link_reports_its_link_time_and_learns_the_same(clients, make_config, run_files) -> None:
    common = ("framework.name=sflv1", f"framework.num_clients={clients}", "train.steps=3")
    plain = make_config("plain", *common)
    linked = make_config("linked", *common, *FAST_LINK)
    run_framework(plain)
    summary = run_framework(linked)
    without, through = run_files.metrics(Path(plain.output_dir)), run_files.metrics(Path(linked.output_dir))
    assert len(through) == 3 * clients
    assert all(r["comm_seconds"] > 0 for r in through)
    assert all(r["comm_seconds"] == 0.0 for r in without)
    key = lambda r: (r["client"], r["step"])  # noqa: E731
    assert [(key(r), r["loss"]) for r in sorted(through, key=key)] == [
        (key(r), r["loss"]) for r in sorted(without, key=key)
    ]
    assert [r["bytes_up"] for r in sorted(through, key=key)] == [r["bytes_up"] for r in sorted(without, key=key)]
    link = summary["link"]
    assert link["enabled"] and link["up"] == link["down"] == {
        "bandwidth_mbps": 1000.0,
        "latency_ms": 1.0,
        "jitter_ms": 0.0,
    }
    assert link["comm_seconds"] == pytest.approx(sum(r["comm_seconds"] for r in through))
    # every step sends at least a forward and a backward and gets their replies: four latencies at least
    assert min(r["comm_seconds"] for r in through) >= 4 * 0.001
    assert run_files.summary(Path(plain.output_dir))["link"]["comm_seconds"] == 0.0


def test_the_unsplit_baseline_refuses_a_link(make_config) -> None:
    from splitlm.frameworks.base import framework_of

    config = make_config("run", "framework.name=centralized", *FAST_LINK)
    with pytest.raises(ConfigError, match=r"transport\.link"):
        framework_of(config).check(config)
