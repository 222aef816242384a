"""Aggregation strategies (``framework.aggregation``, ``frameworks/aggregation/``): async and semi_async on sflv2 and
gsfl on the virtual clock (``clock: steps``), whose schedule the config fixes; an interrupted asynchronous run
resumed from its checkpoint ends bit for bit where an uninterrupted one ends; and each strategy's refusals, one line
each."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitlm.config import build_config
from splitlm.errors import ConfigError, Interrupted
from splitlm.frameworks import config_problems, framework_of, run_framework
from splitlm.frameworks.federation import check_placement
from splitlm.runtime.client import SplitClient

COMMON = ("framework.num_clients=3", "framework.rounds=3", "train.steps=6", "data.partition=iid")  # 2 steps a round
SPEEDS = "framework.clients=[{speed: 1}, {speed: 1}, {speed: 2}]"  # client 2's local round lasts twice as long
GROUPS = "framework.groups=[[0, 1], [2]]"  # group 0's round: its two clients one after the other

# The clock's schedule, worked out by hand. sflv2 (units: the clients, rounds of 2, 2 and 4 clock steps): updates
# due at t=2 (client 0, 1), 4 (0, 1, 2), 6 (0, 1), 8 (2), 12 (2). async applies each at once: staleness 0, 1, 1, 1,
# 4 (client 2 took version 0 and hands in after 4 versions), 2, 2, 2, 0. semi_async (windows of 2): windows 1-4
# apply 2, 3, 2, 1 updates and the last window the last one: 5 versions; staleness 0, 0, 1, 1, 2, 2, 2, 0 ... as
# below. gsfl (units: the groups, rounds of 4 and 2): due at t=2 (group 1), 4 (0, 1), 6 (1), 8 (0), 12 (0).
SCHEDULES = {
    ("sflv2", "async"): {"versions": 9, "handed_in": 9, "applied": 9, "max_staleness": 4, "staleness_sum": 13},
    ("sflv2", "semi_async"): {"versions": 5, "handed_in": 9, "applied": 9, "max_staleness": 2, "staleness_sum": 8},
    ("gsfl", "async"): {"versions": 6, "handed_in": 6, "applied": 6, "max_staleness": 2, "staleness_sum": 4},
    ("gsfl", "semi_async"): {"versions": 5, "handed_in": 6, "applied": 6, "max_staleness": 2, "staleness_sum": 6},
}


def _overrides(framework: str, mode: str) -> tuple[str, ...]:
    layout = (SPEEDS,) if framework == "sflv2" else (GROUPS,)
    return (f"framework.name={framework}", *COMMON, *layout, f"framework.aggregation.{mode}.clock=steps")


@pytest.mark.parametrize(("framework", "mode"), list(SCHEDULES))
def test_the_asynchronous_strategies_run_sflv2_and_gsfl_on_the_clock(make_config, framework: str, mode: str) -> None:
    config = make_config(f"{framework}-{mode}", *_overrides(framework, mode))
    summary = run_framework(config)
    aggregation = summary["aggregation"]
    expected = SCHEDULES[(framework, mode)]
    handed_in = expected["handed_in"]
    assert (aggregation["mode"], aggregation["clock"]) == (mode, "steps")
    for key in ("versions", "handed_in", "applied", "max_staleness"):
        assert aggregation[key] == expected[key], key
    assert aggregation["mean_staleness"] == pytest.approx(expected["staleness_sum"] / handed_in)
    assert [c["steps"] for c in summary["clients"]] == [6, 6, 6]  # the same work as a synchronous run
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # After the run every client holds the global model (the last checkpoint's client sides are equal), and with
    # gsfl every group's trunk adapter too.
    last = sorted((Path(config.output_dir) / "checkpoints").glob("step-*"))[-1]
    heads = [load_file(str(last / f"client-{i}" / "head.safetensors")) for i in range(3)]
    assert heads[0] and all(torch.equal(h[k], heads[0][k]) for h in heads[1:] for k in heads[0])


def test_a_resumed_asynchronous_run_equals_the_uninterrupted_one(fast_config, run_files, tmp_path, monkeypatch) -> None:
    """Ctrl-C in round 2 of an async sflv2 run: --resume goes on from round 1's checkpoint, which holds the clock, the
    global model, the version each client trained from and the staleness so far, and ends where the run that was
    never interrupted ends, to the bit."""
    common = _overrides("sflv2", "async")
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(fast_config(a, *common))
    real_step = SplitClient.train_step

    def interrupted(self, step, micro_batches):
        if step == 0 and self.client_id == "2":  # client 2's first update is the 5th due: round 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step, micro_batches)

    with monkeypatch.context() as patch:
        patch.setattr(SplitClient, "train_step", interrupted)
        with pytest.raises(Interrupted, match="continues from the checkpoint of round 1"):
            run_framework(fast_config(b, *common))
    assert [r["round"] for r in run_files.rounds(b)] == [1]
    run_framework(fast_config(b, *common), resume=True)
    ours, theirs = run_files.rounds(b), run_files.rounds(a)
    assert [r["round"] for r in ours] == [1, 2, 3]
    assert [r["eval_loss"] for r in ours] == [r["eval_loss"] for r in theirs]
    assert run_files.summary(b)["aggregation"] == run_files.summary(a)["aggregation"]
    mine, reference = run_files.adapters(b, "head", "tail"), run_files.adapters(a, "head", "tail")
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
    trunk_b, trunk_a = (load_file(str(out / "adapters" / "trunk.safetensors")) for out in (b, a))
    assert all(torch.equal(trunk_b[k], trunk_a[k]) for k in trunk_a)


# --- the strategies' refusals -----------------------------------------------------------------------------------


def problems(*overrides: str) -> str:
    """The error ``splitlm train`` gives before it builds anything ("" when there is none)."""
    try:
        config = build_config({}, ["framework.num_clients=4", "train.steps=4", *overrides], checks=[config_problems])
        framework_of(config).check(config)
    except ConfigError as error:
        return str(error)
    return ""


REFUSALS = {
    ("framework.name=psl", "framework.aggregation=async"): "framework.aggregation=async mixes the clients' client "
    "sides into a global model; framework.name=psl averages none: set framework.name=sflv1, sflv2 or gsfl",
    ("framework.name=sl", "framework.aggregation=semi_async"): "framework.name=sl averages none",
    ("framework.name=sflv2", "framework.aggregation=async"): "framework.aggregation.async.clock=wall runs each client "
    "on a thread of this process with its own trunk adapter (sflv1, transport.name=inprocess); with "
    "framework.name=sflv2 and transport.name=inprocess set framework.aggregation.async.clock=steps",
    ("framework.name=sflv1", "transport.name=ray", "framework.aggregation=semi_async"): "with framework.name=sflv1 "
    "and transport.name=ray set framework.aggregation.semi_async.clock=steps",
    (
        "framework.name=sflv2",
        "framework.server_lr_scale=mu_splitfed",
        "framework.aggregation.async.clock=steps",
    ): "framework.server_lr_scale=mu_splitfed steps the client sides' FedAvg further; framework.aggregation=async "
    "mixes updates by its own weights instead",
    ("framework.name=sflv1", "framework.aggregation.async.clock=steps", "framework.clients_per_round=2"): (
        "framework.clients_per_round: async trains every client; set it to 0"
    ),
    ("framework.name=sflv1", "framework.aggregation=asynch"): "framework.aggregation: unknown aggregation strategy "
    "'asynch'; choose from ['async', 'krum', 'median', 'semi_async', 'splitwiper', 'sync', 'trimmed_mean'] "
    "(did you mean 'async'?)",
    ("framework.name=sflv1", "framework.aggregation.async.max_stale=2"): "framework.aggregation.async.max_stale: "
    "unknown key (did you mean 'max_staleness'?)",
    ("framework.name=sflv1", "framework.aggregation.semi_async.clock=sometimes"): "framework.aggregation.semi_async"
    ".clock: Input should be 'wall' or 'steps'",
    ("framework.name=sflv2", "framework.server_lr_scale=cubic"): "framework.server_lr_scale: unknown server "
    "learning-rate scale 'cubic'",
    ("framework.name=sflv1", "framework.aggregation={sync: {}, async: {}}"): "name exactly one component",
}


@pytest.mark.parametrize("overrides", list(REFUSALS), ids=["-".join(o) for o in REFUSALS])
def test_a_strategy_refuses_what_it_cannot_work_with_in_one_line(overrides: tuple[str, ...]) -> None:
    found = problems(*overrides)
    assert found and "\n" not in found
    assert REFUSALS[overrides] in found, found


@pytest.mark.parametrize(
    "overrides",
    [
        ("framework.name=sflv1", "framework.aggregation=async"),  # the real-time clock: sflv1 in-process
        ("framework.name=gsfl", "framework.aggregation.semi_async.clock=steps", "transport.name=ray"),
        ("framework.name=sflv2", "framework.server_lr_scale=mu_splitfed", "framework.aggregation.sync.lr=1.5"),
    ],
)
def test_the_combinations_that_work_pass(overrides: tuple[str, ...]) -> None:
    assert problems(*overrides) == ""


def test_splitlm_serve_takes_the_clock_and_refuses_the_threads(make_config) -> None:
    common = ("framework.name=sflv2", "framework.num_clients=2")
    check_placement(make_config("steps", *common, "framework.aggregation.semi_async.clock=steps"), "serve")
    with pytest.raises(ConfigError, match=r"clock=wall runs every client on a thread of one process; for clients in"):
        check_placement(
            make_config("wall", "framework.name=sflv1", "framework.num_clients=2", "framework.aggregation=async"),
            "serve",
        )
