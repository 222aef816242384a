"""``privacy.protocols=[three_tier]``: the aggregator's row mixing is exact (the same losses and adapters as
without it), the server tap records the mixed rows, and a run with nothing to mix is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitlm.errors import SplitLMError
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.privacy.protocols import build_protocols
from splitlm.privacy.protocols.three_tier import ThreeTier
from splitlm.privacy.tap import read_records
from splitlm.transport.messages import Message

MIX = "privacy.protocols.three_tier.seed=3"


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return {
        f"{p.stem}/{k}": v for p in sorted((run / "adapters").glob("*.safetensors")) for k, v in load_file(p).items()
    }


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_mixing_changes_nothing_the_run_learns(fast_config, tmp_path: Path, mode: str) -> None:
    plain = fast_config(tmp_path / "plain", f"split.mode={mode}")
    mixed = fast_config(tmp_path / "mixed", f"split.mode={mode}", MIX)
    run_framework(plain)
    run_framework(mixed)
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "mixed"), rel=1e-5, abs=1e-6)
    a, b = _adapters(tmp_path / "plain"), _adapters(tmp_path / "mixed")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_tap_records_the_mixed_rows(fast_config, tmp_path: Path) -> None:
    tap = ("privacy.tap.enabled=true", "privacy.tap.max_batches=2", "train.steps=2")
    run_framework(fast_config(tmp_path / "plain", *tap))
    run_framework(fast_config(tmp_path / "mixed", *tap, MIX))
    plain = {key: (record, truth) for key, record, truth in read_records(tmp_path / "plain")}
    mixed = {key: (record, truth) for key, record, truth in read_records(tmp_path / "mixed")}
    assert plain.keys() == mixed.keys() and plain
    moved = 0
    for key, (record, truth) in plain.items():
        other, other_truth = mixed[key]
        assert truth is not None and other_truth is not None
        assert torch.equal(truth["input_ids"], other_truth["input_ids"])  # the client's truth is in its own order
        rows, got = record["smashed"].float(), other["smashed"].float()  # (B, T, d)
        # every recorded row is one of the client's rows, and together they are all of them (a permutation)
        match = [int(torch.cdist(g.flatten()[None], rows.flatten(1)).argmin()) for g in got]
        assert sorted(match) == list(range(len(rows)))
        for g, i in zip(got, match, strict=True):
            torch.testing.assert_close(g, rows[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other["attention_mask"][match.index(i)], record["attention_mask"][i])
        moved += match != list(range(len(rows)))
        for name in ("trunk_out", "grad_trunk_out", "grad_smashed"):  # what went back and forth is mixed too
            assert name in other
            assert torch.allclose(other[name].float(), record[name].float()[match], rtol=1e-3, atol=1e-6), name
    assert moved  # with 4 rows a batch, some micro-batch was shuffled


def test_replies_come_back_in_the_clients_order() -> None:
    mixer = ThreeTier(seed=0)
    hidden = torch.arange(24.0).reshape(4, 3, 2)
    seen: list[Message] = []

    def server(message: Message) -> Message:  # a trunk that doubles each row and reports what it saw
        seen.append(message)
        if message.kind == "forward":
            return Message("activations", message.client_id, 0, 0, {"hidden": message.tensors["hidden"] * 2})
        return Message("gradients", message.client_id, 0, 0, {"grad": message.tensors["grad"] + 1})

    forward = Message("forward", "c0", 0, 0, {"hidden": hidden, "attention_mask": torch.ones(4, 3)})
    reply = mixer.serve(forward, server)
    assert isinstance(reply, Message)
    assert not torch.equal(seen[0].tensors["hidden"], hidden)  # the server got them shuffled
    torch.testing.assert_close(reply.tensors["hidden"], hidden * 2)
    back = mixer.serve(Message("backward", "c0", 0, 0, {"grad": hidden}), server)
    assert isinstance(back, Message)
    torch.testing.assert_close(seen[1].tensors["grad"], seen[0].tensors["hidden"])  # same order as the forward
    torch.testing.assert_close(back.tensors["grad"], hidden + 1)
    assert mixer._orders == {}  # the permutation is forgotten once the backward is answered


def test_nothing_to_mix_is_refused_in_one_line() -> None:
    problems = config_problems({"train": {"batch_size": 1}, "privacy": {"protocols": ["three_tier"]}})
    assert len(problems) == 1 and "three_tier" in problems[0] and "\n" not in problems[0]
    assert config_problems({"train": {"batch_size": 4}, "privacy": {"protocols": ["three_tier"]}}) == []
    with pytest.raises(SplitLMError, match="unknown protocol"):
        build_protocols({"three_tierr": {}}, None)
