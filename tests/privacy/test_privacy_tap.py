"""The server tap records exactly what crossed the cut; the metrics and the accountant behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event
from safetensors.torch import load_file

from splitlm.errors import PrivacyError
from splitlm.privacy.accounting import epsilon, releases
from splitlm.privacy.metrics import rouge_l, token_accuracy
from splitlm.privacy.tap import ServerTap, read_records
from splitlm.transport import server_chain
from splitlm.transport.messages import Message


def test_ushape_tap_keeps_the_last_batches_with_everything_the_server_saw(record_run) -> None:
    run = record_run()
    index = json.loads((run / "tap" / "index.json").read_text())
    assert [(e["client"], e["step"]) for e in index] == [("0", 3), ("0", 4)]  # 5 steps, the last 2 kept
    for key, tap, truth in read_records(run):
        assert set(tap) == {"smashed", "attention_mask", "trunk_out", "grad_trunk_out", "grad_smashed"}
        assert "labels" not in tap  # U-shape: labels stay on the client
        assert truth is not None
        assert torch.equal(truth["attention_mask"], tap["attention_mask"])
        b, t = truth["input_ids"].shape
        assert tap["smashed"].shape == tap["trunk_out"].shape == (b, t, 64)
        assert tap["grad_trunk_out"].abs().sum() > 0 and tap["grad_smashed"].abs().sum() > 0
        # Nothing the server holds is the client's raw text.
        for tensor in tap.values():
            assert tensor.shape != truth["input_ids"].shape or not torch.equal(tensor, truth["input_ids"])
        assert key[0] == "0"


def test_vanilla_tap_records_the_labels_the_server_received(record_run) -> None:
    run = record_run("split.mode=vanilla")
    for _, tap, truth in read_records(run):
        assert truth is not None
        assert "trunk_out" not in tap and "grad_trunk_out" not in tap
        labels, ids, mask = tap["labels"], truth["input_ids"], truth["attention_mask"]
        # A vanilla split sends its labels, which are the text itself: position 0 carries no label.
        real = (labels != -100) & mask.bool()
        assert real.any() and torch.equal(labels[real], ids[real])


class _Server:
    def __init__(self) -> None:
        self.seen: list[Message] = []

    def __call__(self, message: Message) -> Message:
        self.seen.append(message)
        if message.kind == "forward":
            return Message(
                "activations", message.client_id, message.step, message.micro, {"hidden": message.tensors["hidden"] * 2}
            )
        return Message(
            "gradients", message.client_id, message.step, message.micro, {"grad": message.tensors["grad"] + 1}
        )


def test_tap_pairs_requests_and_replies_and_writes_files(tmp_path: Path) -> None:
    server = _Server()
    tap = ServerTap(max_batches=2)
    handle = server_chain([tap], server)  # the tap is a server mod around the handler
    for step in range(3):
        hidden = torch.full((1, 3, 4), float(step))
        handle(
            Message("forward", "c", step, 0, {"hidden": hidden, "attention_mask": torch.ones(1, 3, dtype=torch.long)})
        )
        handle(Message("backward", "c", step, 0, {"grad": torch.zeros(1, 3, 4)}))
    assert len(server.seen) == 6  # the tap passes everything through
    assert tap.keys() == [("c", 1, 0), ("c", 2, 0)]
    keys = tap.write(tmp_path)
    record = load_file(str(tmp_path / "tap" / "c-2-0.safetensors"))
    assert torch.equal(record["smashed"], torch.full((1, 3, 4), 2.0))
    assert torch.equal(record["trunk_out"], torch.full((1, 3, 4), 4.0))
    assert torch.equal(record["grad_trunk_out"], torch.zeros(1, 3, 4))
    assert torch.equal(record["grad_smashed"], torch.ones(1, 3, 4))
    assert keys == [("c", 1, 0), ("c", 2, 0)]


def test_reading_a_run_without_or_with_a_broken_tap_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match=r"privacy\.tap\.enabled=true"):
        read_records(tmp_path)
    (tmp_path / "tap").mkdir()
    (tmp_path / "tap" / "index.json").write_text('[{"client": "0", "step": 1, "micro": 0}]')
    (tmp_path / "tap" / "0-1-0.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PrivacyError, match="not a readable tap record"):
        read_records(tmp_path)
    (tmp_path / "tap" / "index.json").write_text("{oops")
    with pytest.raises(PrivacyError, match="not a tap index"):
        read_records(tmp_path)


def test_rouge_l_and_token_accuracy_on_token_ids() -> None:
    truth = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert rouge_l(truth, truth, mask) == pytest.approx(1.0)
    assert token_accuracy(truth, truth, mask) == pytest.approx(1.0)
    other = torch.tensor([[50, 60, 70, 80, 0], [10, 20, 30, 40, 90]])
    assert rouge_l(truth, other, mask) == 0.0 and token_accuracy(truth, other, mask) == 0.0
    # A padded position never counts; an in-order subsequence counts for ROUGE-L but not position-wise.
    shifted = torch.tensor([[6, 7, 8, 1, 5], [2, 3, 4, 9, 1]])
    assert rouge_l(truth, shifted, mask) == pytest.approx(0.75 * 0.5 + 0.8 * 0.5)
    assert token_accuracy(truth, shifted, mask) == 0.0


def test_accountant_composes_releases_and_reports_none_without_a_mechanism() -> None:
    assert releases(steps=10, batch_size=4, grad_accum=1, num_examples=100) == 1
    assert releases(steps=60, batch_size=8, grad_accum=2, num_examples=100) == 10
    assert epsilon(None, 3, 1e-5) is None
    gaussian = [dp_event.GaussianDpEvent(2.0)]
    once, many = epsilon(gaussian, 1, 1e-5), epsilon(gaussian, 10, 1e-5)
    assert once is not None and many is not None and 0 < once < many
    louder = epsilon([dp_event.GaussianDpEvent(4.0)], 10, 1e-5)
    assert louder is not None and louder < many


def test_multi_client_runs_tap_every_client_and_refuse_a_simulated_attacker(fast_config, tmp_path: Path) -> None:
    from splitlm.errors import ConfigError
    from splitlm.frameworks import run_framework

    config = fast_config(
        tmp_path / "psl", "framework.name=psl", "framework.num_clients=2", "privacy.tap.enabled=true",
        "privacy.tap.max_batches=4", "train.steps=3",
    )  # fmt: skip
    run_framework(config)
    records = read_records(tmp_path / "psl")
    assert {key[0] for key, _, _ in records} == {"0", "1"}
    assert all(truth is not None and "trunk_out" in tap for _, tap, truth in records)
    attacked = fast_config(
        tmp_path / "fsha", "framework.name=sflv2", "framework.num_clients=2", "privacy.server_attack=fsha"
    )
    with pytest.raises(ConfigError, match="simulated for one in-process client"):
        run_framework(attacked)
