"""Forgetting remedies (survey §3.3): SLwF's decelerated update of the carried client side (``remedies.ema``,
sequential sl) and MultiSFL-style replay of earlier rounds' samples (``remedies.replay``).

Each run is tiny (2-3 clients, 2-3 rounds of 2 steps); the runs a module's tests share are made once.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splitlm.errors import ConfigError
from splitlm.frameworks import federation as federation_module
from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import Federation, Member
from splitlm.remedies import ema as ema_module
from splitlm.remedies.ema import decelerated
from splitlm.remedies.replay import with_replay

EMA_RUN = ("framework.num_clients=3", "framework.rounds=2", "train.steps=4")
REPLAY_RUN = ("framework.num_clients=2", "framework.rounds=3", "train.steps=6")  # 2 local steps per round


def losses(metrics: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    return [(r["client"], r["round"], r["loss"]) for r in metrics]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adapter_files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(str(path)) for path in sorted((out / "adapters").glob("*.safetensors"))}


def assert_same_adapters(a: Path, b: Path) -> None:
    first, second = adapter_files(a), adapter_files(b)
    assert first and first.keys() == second.keys()
    for name, tensors in first.items():
        assert tensors.keys() == second[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, second[name][key]), f"{name}: {key}"


# --- remedies.ema ---------------------------------------------------------------------------------------------


def test_decelerated_is_the_moving_average_in_each_tensors_dtype() -> None:
    previous = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0], dtype=torch.bfloat16), "c": torch.ones(3)}
    trained = {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([0.0], dtype=torch.bfloat16), "c": torch.zeros(2)}
    mixed = decelerated(previous, trained, 0.25)
    assert torch.equal(mixed["a"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2]))
    assert mixed["b"].dtype == torch.bfloat16 and mixed["b"].item() == 1.0
    assert torch.equal(mixed["c"], trained["c"])  # a tensor of another shape: the trained one
    first = decelerated(None, trained, 0.25)  # the very first client: its trained state
    assert first.keys() == trained.keys() and all(first[k] is trained[k] for k in trained)
    assert previous["a"].tolist() == [1.0, 2.0]  # pure: its inputs stay as they were


@pytest.fixture(scope="module")
def ema_runs(fast_config, tmp_path_factory) -> dict[str, Any]:
    """sl with 3 clients: without the key, with ema 0, and with ema 0.5 (its carries recorded)."""
    done: dict[str, Any] = {}
    for name, extra in (("plain", ()), ("ema0", ("remedies.ema.decay=0",))):
        out = tmp_path_factory.mktemp(name)
        run_framework(fast_config(out, *EMA_RUN, *extra))
        done[name] = out
    passed: list[tuple[str, dict[str, torch.Tensor]]] = []  # (client, its trained state) at each pass_on
    calls: list[tuple[Any, ...]] = []  # decelerated's (previous, trained, ema, result)
    pass_on, average = Federation.pass_on, ema_module.decelerated

    def spy_pass_on(fed: Federation, member: Member) -> None:
        pass_on(fed, member)
        passed.append((member.client_id, dict(fed.carry or {})))

    def spy_average(previous: Any, trained: Any, ema: float) -> dict[str, torch.Tensor]:
        result = average(previous, trained, ema)
        calls.append((previous, trained, ema, result))
        return result

    out = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Federation, "pass_on", spy_pass_on)
        patch.setattr(ema_module, "decelerated", spy_average)
        run_framework(fast_config(out, *EMA_RUN, "remedies.ema.decay=0.5"))
    done.update(ema=out, passed=passed, calls=calls)
    return done


def test_carry_is_the_moving_average_of_the_previous_carry_and_the_trained_state(ema_runs) -> None:
    passed, calls = ema_runs["passed"], ema_runs["calls"]
    assert [client for client, _ in passed] == ["0", "1", "2"] * 2
    assert len(calls) == len(passed) - 1  # the very first client's carry is its own trained state
    carry = passed[0][1]
    for (_, trained), (previous, given, ema, result) in zip(passed[1:], calls, strict=True):
        assert ema == 0.5 and same(given, trained) and same(previous, carry)
        for key, tensor in trained.items():
            expected = (0.5 * carry[key].double() + 0.5 * tensor.double()).to(tensor.dtype)
            assert torch.equal(result[key], expected), key
        assert result.keys() == trained.keys()
        carry = result


def test_ema_leaves_the_server_and_the_first_clients_steps_alone(ema_runs, run_files) -> None:
    plain, ema = run_files.metrics(ema_runs["ema0"]), run_files.metrics(ema_runs["ema"])
    # clients 0 and 1 start from the same client side either way (no carry yet, then client 0's own): their
    # steps, trunk updates included, are the same; client 2 starts from the average
    same = [r for r in losses(plain) if r[1] == 1 and r[0] in ("0", "1")]
    assert same == [r for r in losses(ema) if r[1] == 1 and r[0] in ("0", "1")] and len(same) == 4
    assert losses(plain)[4:] != losses(ema)[4:]
    # what is averaged is the client side only: none of the trunk adapter's tensors
    trunk = run_files.adapters(ema_runs["ema"], "trunk")
    assert trunk and not set(trunk) & {key for _, state in ema_runs["passed"] for key in state}


def test_ema_zero_is_bit_identical_to_no_ema(ema_runs, run_files) -> None:
    assert losses(run_files.metrics(ema_runs["plain"])) == losses(run_files.metrics(ema_runs["ema0"]))
    assert_same_adapters(ema_runs["plain"], ema_runs["ema0"])


def test_ema_is_refused_where_no_client_side_is_passed_on(make_config) -> None:
    with pytest.raises(ConfigError, match=r"remedies\.ema") as error:
        run_framework(make_config("sflv1", "framework.name=sflv1", "framework.num_clients=2", "remedies.ema.decay=0.5"))
    assert "\n" not in str(error.value) and "framework.name=sflv1" in str(error.value)


# --- remedies.replay ------------------------------------------------------------------------------------------


def test_with_replay_replaces_that_fraction_of_the_rows_from_the_kept_ones() -> None:
    rows, kept = [10, 11, 12, 13], [1, 2, 3]
    out = with_replay(rows, kept, 0.5, random.Random(7))
    assert out == with_replay(rows, kept, 0.5, random.Random(7))  # deterministic for one seed
    replaced = [i for i, (a, b) in enumerate(zip(rows, out, strict=True)) if a != b]
    assert len(replaced) == 2 and all(out[i] in kept for i in replaced) and len(set(out)) == 4
    assert with_replay(rows, [], 0.5, random.Random(7)) == rows  # nothing kept yet: unchanged
    assert sorted(with_replay(rows, [5], 1.0, random.Random(7))) == [5, 5, 5, 5]  # too few kept: with repeats
    assert rows == [10, 11, 12, 13]


@pytest.fixture(scope="module")
def replay_runs(fast_config, tmp_path_factory) -> dict[str, Any]:
    """sl with 2 clients, 3 rounds: without the key, with replay 0, and with replay 0.5 (its batches recorded)."""
    done: dict[str, Any] = {}
    for name, extra in (("plain", ()), ("replay0", ("remedies.replay.fraction=0",))):
        out = tmp_path_factory.mktemp(name)
        run_framework(fast_config(out, *REPLAY_RUN, *extra))
        done[name] = out
    batches: list[tuple[str, int, list[int], list[int]]] = []  # (client, step, rows collated, the order's rows)
    current: list[Member] = []
    train_round, collate = Member.train_round, federation_module.collate

    def spy_round(member: Member, fed: Federation, round_index: int) -> None:
        current.append(member)
        try:
            train_round(member, fed, round_index)
        finally:
            current.pop()

    def spy_collate(examples: list[Any], pad_id: int) -> Any:
        member = current[-1]
        where = {id(example): i for i, example in enumerate(member.examples)}
        assert member.order is not None
        step = member.steps_done
        batches.append((member.client_id, step, [where[id(e)] for e in examples], member.order.indices(step)))
        return collate(examples, pad_id)

    out = tmp_path_factory.mktemp("replay")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Member, "train_round", spy_round)
        patch.setattr(federation_module, "collate", spy_collate)
        run_framework(fast_config(out, *REPLAY_RUN, "remedies.replay.fraction=0.5"))
    done.update(replay=out, batches=batches)
    return done


def test_from_the_second_round_half_of_each_batch_is_replayed(replay_runs) -> None:
    batches = replay_runs["batches"]
    assert len(batches) == 2 * 3 * 2  # 2 clients, 3 rounds, 2 steps (one micro-batch each)
    for client in ("0", "1"):
        earlier: set[int] = set()  # the examples the data order dealt this client in its earlier rounds
        for round_start in (0, 2, 4):
            this_round = [b for b in batches if b[0] == client and round_start <= b[1] < round_start + 2]
            assert len(this_round) == 2
            for _, _, rows, fresh in this_round:
                assert len(rows) == len(fresh) == 4
                if round_start == 0:
                    assert rows == fresh  # the first round is as without replay
                    continue
                # every fresh row is new to the client (its first epoch), so exactly the replaced ones are old
                assert not earlier & set(fresh)
                replayed = [i for i, row in enumerate(rows) if row in earlier]
                assert len(replayed) == 2
                assert all(rows[i] == fresh[i] for i in range(4) if i not in replayed)
            earlier |= {row for *_, fresh in this_round for row in fresh}


def test_replay_leaves_the_first_round_alone_and_changes_later_ones(replay_runs, run_files) -> None:
    plain, replay = losses(run_files.metrics(replay_runs["plain"])), losses(run_files.metrics(replay_runs["replay"]))
    assert [r for r in plain if r[1] == 1] == [r for r in replay if r[1] == 1]
    assert [r for r in plain if r[1] > 1] != [r for r in replay if r[1] > 1]


def test_replay_zero_is_bit_identical_to_no_replay(replay_runs, run_files) -> None:
    assert losses(run_files.metrics(replay_runs["plain"])) == losses(run_files.metrics(replay_runs["replay0"]))
    assert_same_adapters(replay_runs["plain"], replay_runs["replay0"])
