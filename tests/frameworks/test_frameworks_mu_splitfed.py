"""MU-SplitFed (survey §3.2.2): ``framework.server_lr_scale=mu_splitfed`` divides the trunk's learning rate by the
number tau of clients sharing its adapter, and the sync aggregation's ``lr`` (eta_g; sqrt(tau) by default under
mu_splitfed) steps the client sides' FedAvg from the global client side the round started from. The step on
hand-made states, the scales a config gives, and tiny sflv2 / gsfl runs (straight, rolled back, resumed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import interrupt_run
from splitlm.frameworks import run_framework
from splitlm.frameworks.aggregate import fedavg, global_step
from splitlm.frameworks.base import framework_of
from splitlm.frameworks.checkpoint import prepare_output
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import Federation, build_federation

SFLV2 = ("framework.name=sflv2", "framework.num_clients=4", "framework.rounds=2", "train.steps=4")
PARTS = ("head", "tail", "trunk")


# --- the aggregation step on hand-made states -------------------------------------------------------------------


def _states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """The round's starting global model and two clients' trained states, all values exact in binary."""
    old = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
    a = {"w": torch.tensor([[2.0, 2.0], [3.0, 8.0]]), "b": torch.tensor([1.5, -0.5])}
    b = {"w": torch.tensor([[0.0, 6.0], [7.0, 4.0]]), "b": torch.tensor([0.5, 3.5])}
    return old, [a, b], [3.0, 1.0]


def test_eta_one_is_plain_fedavg_bit_for_bit() -> None:
    old, states, weights = _states()
    average = fedavg(states, weights)
    stepped = global_step(old, average, 1.0)
    assert set(stepped) == set(average)
    assert all(torch.equal(stepped[k], average[k]) and stepped[k].dtype == average[k].dtype for k in average)


def test_eta_two_doubles_the_step_from_the_old_global_model() -> None:
    # Prepare: the average is (3 a + b) / 4: w = [[1.5, 3], [4, 7]], b = [1.25, 0.5].
    old, states, weights = _states()
    average = fedavg(states, weights)
    torch.testing.assert_close(average["w"], torch.tensor([[1.5, 3.0], [4.0, 7.0]]), rtol=0, atol=0)
    # Execute
    stepped = global_step(old, average, 2.0)
    # Assert: old + 2 (average - old) = 2 average - old
    torch.testing.assert_close(stepped["w"], torch.tensor([[2.0, 4.0], [5.0, 10.0]]), rtol=0, atol=0)
    torch.testing.assert_close(stepped["b"], torch.tensor([2.0, 1.5]), rtol=0, atol=0)
    half = global_step(old, average, 0.5)  # and half of it
    torch.testing.assert_close(half["w"], torch.tensor([[1.25, 2.5], [3.5, 5.5]]), rtol=0, atol=0)


def test_a_tensor_the_old_model_lacks_or_shapes_otherwise_is_the_average() -> None:
    old = {"w": torch.zeros(3)}
    average = {"w": torch.ones(2), "new": torch.full((2,), 4.0, dtype=torch.float16), "count": torch.tensor([3])}
    stepped = global_step(old, average, 2.0)
    assert all(torch.equal(stepped[k], average[k]) for k in average)
    assert stepped["new"].dtype == torch.float16
    stepped["w"].add_(1.0)  # a copy, not the average's tensor
    assert torch.equal(average["w"], torch.ones(2))


# --- the scales a config gives ----------------------------------------------------------------------------------


def test_sflv2_with_four_clients_divides_the_trunk_lr_by_four_and_raises_the_aggregation_lr(make_config) -> None:
    config = make_config("run", *SFLV2, "framework.server_lr_scale=mu_splitfed")
    framework = framework_of(config)
    assert framework.trunk_lr_scale(config, []) == 0.25
    assert framework.global_lr(config, []) == 2.0  # sqrt(4)
    explicit = make_config("run", *SFLV2, "framework.server_lr_scale=mu_splitfed", "framework.aggregation.sync.lr=1.5")
    assert framework.global_lr(explicit, []) == 1.5
    partial = make_config("run", *SFLV2, "framework.server_lr_scale=mu_splitfed", "framework.clients_per_round=3")
    assert framework.trunk_lr_scale(partial, []) == pytest.approx(1 / 3)
    plain = make_config("run", *SFLV2)
    assert (framework.trunk_lr_scale(plain, []), framework.global_lr(plain, [])) == (1.0, 1.0)


def test_gsfl_tau_is_the_largest_group(make_config) -> None:
    config = make_config(
        "run", "framework.name=gsfl", "framework.num_clients=4", "framework.server_lr_scale=mu_splitfed"
    )
    framework = framework_of(config)
    assert framework.trunk_lr_scale(config, [[0, 1, 2], [3]]) == pytest.approx(1 / 3)
    assert framework.global_lr(config, [[0, 1, 2], [3]]) == pytest.approx(math.sqrt(3))


def test_the_server_is_built_with_a_quarter_of_the_learning_rate(make_config) -> None:
    config = make_config("run", *SFLV2, "framework.server_lr_scale=mu_splitfed")
    fed = build_federation(config)
    trunk = fed.server.optimizer(fed.server.adapter_of("0")).optimizer
    assert trunk.param_groups[0]["initial_lr"] == pytest.approx(config.train.lr / 4)


# --- runs ---------------------------------------------------------------------------------------------------------


def test_an_sflv2_run_with_mu_splitfed_steps_from_the_round_start(make_config, run_files, monkeypatch) -> None:
    """Every round's new global client side is the round-start one plus sqrt(4) = 2 times the FedAvg's step."""
    config = make_config("mu", *SFLV2, "framework.server_lr_scale=mu_splitfed")
    seen: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (round-start global, new global)
    real = Federation.broadcast

    def broadcast(fed: Federation, state: dict[str, torch.Tensor]) -> None:
        seen.append(({k: v.clone() for k, v in fed.carry.items()}, state))
        real(fed, state)

    monkeypatch.setattr(Federation, "broadcast", broadcast)
    averages: list[dict[str, torch.Tensor]] = []
    real_fedavg = fedavg

    def recording_fedavg(states, weights):
        averages.append(real_fedavg(states, weights))
        return averages[-1]

    monkeypatch.setattr("splitlm.frameworks.aggregate.fedavg", recording_fedavg)  # every FedAvg of the run
    summary = run_framework(config)
    assert (summary["server_lr_scale"], summary["aggregation_lr"]) == (0.25, 2.0)
    assert math.isfinite(summary["eval_loss_after"]) and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert len(seen) == len(averages) == 2  # one FedAvg per round
    for (start, new), average in zip(seen, averages, strict=True):
        for key, value in new.items():
            expected = start[key].double() + 2.0 * (average[key].double() - start[key].double())
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert seen[1][0].keys() == seen[0][1].keys()
    assert all(torch.equal(seen[1][0][k], seen[0][1][k]) for k in seen[0][1])  # round 2 starts from round 1's global


def test_aggregation_lr_one_is_the_run_without_it(make_config, run_files) -> None:
    runs = {}
    for name, extra in (("plain", ()), ("one", ("framework.aggregation.sync.lr=1",))):
        config = make_config(name, *SFLV2, *extra)
        run_framework(config)
        runs[name] = Path(config.output_dir)
    assert [r["loss"] for r in run_files.metrics(runs["one"])] == [r["loss"] for r in run_files.metrics(runs["plain"])]
    ours, theirs = run_files.adapters(runs["one"], *PARTS), run_files.adapters(runs["plain"], *PARTS)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    summary = run_files.summary(runs["plain"])
    assert (summary["server_lr_scale"], summary["aggregation_lr"]) == (1.0, 1.0)


@pytest.mark.parametrize("framework", ["sflv2", "gsfl"])
def test_a_client_lost_in_the_first_round_equals_leaving_it_out(framework: str, make_config, run_files) -> None:
    """The round-start global client side of the first round is taken again from the clients that are left."""
    from test_frameworks_faults import _vanishing  # the fault tests' vanishing client

    common = (
        f"framework.name={framework}", "framework.num_clients=3", "framework.rounds=2", "framework.local_steps=2",
        "train.steps=4", "framework.server_lr_scale=mu_splitfed", "framework.aggregation.sync.lr=3",
    )  # fmt: skip

    def run(name: str, *extra: str, vanish: tuple[str, int, int] | None = None) -> Path:
        config = make_config(name, *common, *extra)
        fed = build_federation(config)
        if vanish is not None:
            _vanishing(fed, *vanish)
        drive(fed, prepare_output(config, resume=False), resume=False, started=0.0)
        return Path(config.output_dir)

    reference = run("reference", "framework.leave_out={1: ['1']}")
    faulty = run("faulty", vanish=("1", 1, 1))
    assert [r["participants"] for r in run_files.rounds(faulty)] == [["0", "2"], ["0", "1", "2"]]
    assert [r["eval_loss"] for r in run_files.rounds(faulty)] == [r["eval_loss"] for r in run_files.rounds(reference)]
    ours, theirs = run_files.adapters(faulty, *PARTS), run_files.adapters(reference, *PARTS)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_a_resumed_mu_splitfed_run_ends_as_an_uninterrupted_one(tmp_path, fast_config, run_files) -> None:
    """The round-start global client side travels in the round's checkpoint (the carry)."""
    common = (*SFLV2, "framework.server_lr_scale=mu_splitfed")
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(fast_config(a, *common))
    # client 1's first step of round 2
    interrupt_run(fast_config(b, *common), 2, "1", match="continues from the checkpoint of round 1")
    run_framework(fast_config(b, *common), resume=True)
    assert run_files.rounds(b)[-1]["eval_loss"] == run_files.rounds(a)[-1]["eval_loss"]
    ours, theirs = run_files.adapters(b, *PARTS), run_files.adapters(a, *PARTS)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
