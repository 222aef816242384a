"""The byte meter counts exactly the tensor bytes that cross the cut, and labels stay home in U-shape.

Training traffic and evaluation traffic are counted apart (``snapshot`` / ``eval_snapshot``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from message_recorder import Recorder as BaseRecorder
from message_recorder import recorded_run
from splitlm.data import Batch
from splitlm.frameworks.federation import build_federation
from splitlm.transport import Message

B, T = 4, 32
D = 64  # hidden size of tiny-llama (sources.py: hidden_size=64)
FLOAT32, INT64 = 4, 8  # bytes per element: activations/gradients are float32, masks and labels int64
HIDDEN = B * T * D * FLOAT32
MASK = B * T * INT64


def _size(message: Message) -> int:
    return sum(t.numel() * t.element_size() for t in message.tensors.values())


class Recorder(BaseRecorder):
    """Every (request, reply) pair, and their bytes each way."""

    def up(self, kinds: tuple[str, ...] | None = None) -> int:
        return sum(_size(q) for q, _ in self.pairs if kinds is None or q.kind in kinds)

    def down(self, kinds: tuple[str, ...] | None = None) -> int:
        return sum(_size(r) for q, r in self.pairs if kinds is None or q.kind in kinds)


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (B, T), generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 20:] = 0  # right padding in one row; shapes (and bytes) stay (B, T)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return Batch(ids, mask, labels)


def _client(make_config, mode: str):
    tail = "1" if mode == "ushape" else "0"
    client = build_federation(make_config("run", f"split.mode={mode}", f"split.tail_layers={tail}")).members[0].client
    transport = client.channel.transport
    recorder = Recorder(transport.handler)
    transport.handler = recorder
    return client, recorder


def test_ushape_step_sends_hidden_and_mask_up_and_never_labels(make_config) -> None:
    client, recorder = _client(make_config, "ushape")
    client.train_step(0, [_batch()])
    kinds = [(q.kind, r.kind) for q, r in recorder.pairs]
    assert kinds == [("forward", "activations"), ("backward", "gradients"), ("step", "stepped")]
    forward, backward, step = (q for q, _ in recorder.pairs)
    assert set(forward.tensors) == {"hidden", "attention_mask"}
    assert forward.tensors["hidden"].shape == (B, T, D)
    assert forward.tensors["hidden"].dtype == torch.float32
    assert set(backward.tensors) == {"grad"} and step.tensors == {}
    # Analytic sizes: up = activations (B*T*d float32) + mask (B*T int64) + trunk-output gradient;
    # down = trunk outputs + head-output gradient.
    assert client.meter.snapshot() == (2 * HIDDEN + MASK, 2 * HIDDEN)
    assert (recorder.up(), recorder.down()) == client.meter.snapshot()
    assert client.meter.by_kind["forward"] == HIDDEN + MASK

    client.evaluate([_batch()])
    eval_pair = recorder.pairs[-1]
    assert eval_pair[0].kind == "eval" and set(eval_pair[0].tensors) == {"hidden", "attention_mask"}
    # evaluation is counted apart from training
    assert client.meter.snapshot() == (2 * HIDDEN + MASK, 2 * HIDDEN)
    assert client.meter.eval_snapshot() == (HIDDEN + MASK, HIDDEN)
    assert (recorder.up(("eval",)), recorder.down(("eval",))) == client.meter.eval_snapshot()
    for request, reply in recorder.pairs:
        assert "labels" not in request.tensors and "labels" not in reply.tensors


def test_vanilla_step_sends_labels_up(make_config) -> None:
    client, recorder = _client(make_config, "vanilla")
    batch = _batch()
    client.train_step(0, [batch])
    kinds = [(q.kind, r.kind) for q, r in recorder.pairs]
    assert kinds == [("forward", "loss"), ("step", "stepped")]
    forward = recorder.pairs[0][0]
    assert set(forward.tensors) == {"hidden", "attention_mask", "labels"}
    assert torch.equal(forward.tensors["labels"], batch.labels)
    assert set(recorder.pairs[0][1].tensors) == {"grad"}
    # up = activations + mask + labels (B*T int64); down = the head-output gradient only.
    assert client.meter.snapshot() == (HIDDEN + 2 * MASK, HIDDEN)
    assert (recorder.up(), recorder.down()) == client.meter.snapshot()


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_run_traffic_matches_messages(make_config, run_files, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    tail = "1" if mode == "ushape" else "0"
    config = make_config("run", f"split.mode={mode}", f"split.tail_layers={tail}", "train.grad_accum=2")
    _, recorder = recorded_run(monkeypatch, config, Recorder)
    out = Path(config.output_dir)
    summary, metrics = run_files.summary(out), run_files.metrics(out)
    training = ("forward", "backward", "step")
    assert (summary["bytes_up"], summary["bytes_down"]) == (recorder.up(training), recorder.down(training))
    assert (summary["eval_bytes_up"], summary["eval_bytes_down"]) == (recorder.up(("eval",)), recorder.down(("eval",)))
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    # Each step's line counts its own forward/backward/step messages; evaluation adds the rest.
    for record in metrics:
        pairs = [(q, r) for q, r in recorder.pairs if q.step == record["step"] - 1 and q.kind != "eval"]
        assert len([q for q, _ in pairs if q.kind == "forward"]) == 2  # grad_accum=2
        assert record["bytes_up"] == sum(_size(q) for q, _ in pairs)
        assert record["bytes_down"] == sum(_size(r) for _, r in pairs)
    assert sum(r["bytes_up"] for r in metrics) == summary["bytes_up"]
    assert sum(r["bytes_down"] for r in metrics) == summary["bytes_down"]
    if mode == "ushape":
        assert all("labels" not in q.tensors for q, _ in recorder.pairs)
    else:
        assert all("labels" in q.tensors for q, _ in recorder.pairs if q.kind in ("forward", "eval"))
