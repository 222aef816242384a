"""Asynchronous aggregation (``framework.aggregation``): the weights on hand-made inputs, the staleness cutoff, and
runs in which no client waits for another."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitlm.errors import ConfigError
from splitlm.frameworks import run_framework
from splitlm.frameworks.aggregation.asynchronous import Async
from splitlm.frameworks.aggregation.updates import apply_updates, staleness_weight, window_weights
from splitlm.frameworks.federation import Member


def test_staleness_weight_is_a_soft_penalty_with_a_hard_cutoff() -> None:
    fw = Async.Settings(mix=0.5, staleness_exponent=0.5, max_staleness=4)
    assert staleness_weight(fw, share=1.0, staleness=0) == pytest.approx(0.5)
    assert staleness_weight(fw, share=1.0, staleness=3) == pytest.approx(0.5 / 2)  # (1 + 3) ** -0.5
    assert staleness_weight(fw, share=0.5, staleness=3) == pytest.approx(0.125)  # half the mean client's samples
    assert staleness_weight(fw, share=1.0, staleness=4) == pytest.approx(0.5 / 5**0.5)  # at the cutoff: kept
    assert staleness_weight(fw, share=1.0, staleness=5) is None  # past it: dropped
    assert staleness_weight(fw, share=3.0, staleness=0) == 1.0  # never more than the update itself


def test_window_weights_count_the_windows_a_client_missed() -> None:
    # Two of eight equal clients arrive: one took part in the previous window, one three windows ago.
    assert window_weights([0.125, 0.125], [1, 3]) == pytest.approx([0.25, 0.75])
    assert window_weights([0.25, 0.5], [1, 1]) == pytest.approx([1 / 3, 2 / 3])  # by samples otherwise
    assert window_weights([0.25], [0]) == pytest.approx([1.0])  # a first participation counts once


def test_updates_move_the_global_model_by_weighted_deltas() -> None:
    g = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    one = ({"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([5.0, 5.0])})  # (delta, state): holds only "a"
    two = ({"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([4.0])}, {})
    moved = apply_updates(g, [one, two], [0.25, 0.75])
    assert torch.equal(moved["a"], torch.tensor([1.25, 2.5]))  # 1 + 0.25 * delta_one + 0.75 * delta_two
    assert torch.equal(moved["b"], torch.tensor([4.0]))  # only update two holds "b": its weight rescaled to 1
    assert torch.equal(g["a"], torch.tensor([1.0, 1.0]))  # the input is left as it was
    assert torch.equal(apply_updates(g, [one], [0.5])["b"], g["b"])  # a tensor no update holds stays


def test_an_update_of_another_rank_is_mixed_in_by_its_product() -> None:
    # The global pair has rank 2; the update's rank 1. Its product is mixed in with weight w.
    torch.manual_seed(0)
    g = {"m.0.q.lora_A.weight": torch.randn(2, 3), "m.0.q.lora_B.weight": torch.randn(4, 2)}
    state = {"m.0.q.lora_A.weight": torch.randn(1, 3), "m.0.q.lora_B.weight": torch.randn(4, 1)}
    delta = {k: torch.zeros_like(v) for k, v in state.items()}
    moved = apply_updates(g, [(delta, state)], [0.5])

    def product(s: dict, rank: int) -> torch.Tensor:  # peft's delta weight up to alpha: (B A) / r
        return s["m.0.q.lora_B.weight"] @ s["m.0.q.lora_A.weight"] / rank

    expected = 0.5 * product(g, 2) + 0.5 * product(state, 1)  # rank <= 3: a rank-2 pair can only approximate
    assert moved["m.0.q.lora_A.weight"].shape == (2, 3)
    error = torch.linalg.matrix_norm(product(moved, 2) - expected)
    best = torch.linalg.svdvals(expected)[2]  # the best rank-2 approximation's error (Eckart-Young)
    assert float(error) == pytest.approx(float(best), rel=1e-4, abs=1e-6)


ASYNC = (
    "framework.name=sflv1", "framework.num_clients=3", "framework.rounds=3", "framework.local_steps=2",
    "train.steps=6", "data.partition=iid",
)  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("mode", ["async", "semi_async"])
def test_no_client_waits_for_a_straggler(make_config, monkeypatch, mode: str) -> None:
    # Client 2 cannot finish its first local round until clients 0 and 1 finished all of theirs: with a round
    # barrier anywhere this would never happen (the wait below would time out and the test fail).
    others_done = threading.Event()
    steps: dict[str, int] = {}
    real = Member.train_round
    seen_stuck = threading.Event()

    def train_round(self: Member, fed, round_index: int) -> None:
        if self.client_id == "2" and not others_done.is_set():
            seen_stuck.set()
            assert others_done.wait(timeout=120), "clients 0 and 1 waited for client 2"
        real(self, fed, round_index)
        steps[self.client_id] = self.steps_done
        if steps.get("0") == 6 and steps.get("1") == 6:
            others_done.set()

    monkeypatch.setattr(Member, "train_round", train_round)
    chosen = {
        "async": "framework.aggregation=async",
        "semi_async": "framework.aggregation.semi_async.round_window_s=0.2",
    }
    config = make_config(mode, *ASYNC, chosen[mode])
    summary = run_framework(config)

    assert seen_stuck.is_set()
    assert [c["steps"] for c in summary["clients"]] == [6, 6, 6]  # the same work as a synchronous run
    aggregation = summary["aggregation"]
    assert aggregation["mode"] == mode
    handed_in = aggregation["applied"] + aggregation["dropped"] + aggregation["superseded"]
    assert handed_in == 9  # every local round handed in once
    assert aggregation["versions"] >= 1
    rounds = [json.loads(line) for line in (Path(config.output_dir) / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["eval_loss"] == r["eval_loss"] for r in rounds)  # evaluated (not NaN) at every point


def test_async_drops_updates_past_max_staleness(make_config, monkeypatch) -> None:
    # Client 2 trains its first round from version 0 and hands it in only after the others made 4 versions.
    others_done = threading.Event()
    real = Member.train_round
    steps: dict[str, int] = {}

    def train_round(self: Member, fed, round_index: int) -> None:
        real(self, fed, round_index)
        steps[self.client_id] = self.steps_done
        if self.client_id == "2" and not others_done.is_set():
            assert others_done.wait(timeout=120)
        if steps.get("0") == 6 and steps.get("1") == 6:
            others_done.set()

    monkeypatch.setattr(Member, "train_round", train_round)
    config = make_config(
        "stale", *ASYNC, "framework.aggregation.async.max_staleness=1", "framework.aggregation.async.mix=0.5"
    )
    summary = run_framework(config)
    aggregation = summary["aggregation"]
    assert aggregation["dropped"] >= 1  # client 2's first update: 6 versions old
    assert aggregation["max_staleness"] >= 2
    assert aggregation["applied"] + aggregation["dropped"] == 9
    # After the run every client holds the global model: their client sides are equal (the last checkpoint).
    last = sorted((Path(config.output_dir) / "checkpoints").glob("step-*"))[-1]
    heads = [load_file(str(last / f"client-{i}" / "head.safetensors")) for i in range(3)]
    assert heads[0]
    for other in heads[1:]:
        assert all(torch.equal(other[key], heads[0][key]) for key in heads[0])


def test_async_is_refused_where_it_cannot_work(make_config) -> None:
    with pytest.raises(ConfigError, match=r"framework\.name=sflv1, sflv2 or gsfl"):
        run_framework(
            make_config("refused", "framework.aggregation=async", "framework.name=psl", "framework.num_clients=2")
        )
    with pytest.raises(ConfigError, match="clients_per_round"):
        run_framework(make_config("refused2", *ASYNC, "framework.aggregation=async", "framework.clients_per_round=2"))
