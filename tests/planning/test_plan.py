"""The cut planner: the predictor against hand-computed steps, budgets, per-client picks and `splitlm plan`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from splitlm.cli.main import main
from splitlm.planning import (
    ClientSetting,
    EndProfile,
    LinkModel,
    PartProfile,
    Profile,
    best,
    candidates,
    make_plan,
    predict,
    predict_all,
    render,
)

LAYERS = 4


def hand_profile(mode: str = "ushape", server_slowdown: float = 1.0) -> Profile:
    """Every block: forward 1 s, backward 2 s (``server_slowdown`` times that on the server), 10 trainable
    parameters, 4 MB of weights, 1 MB of activations; ends and messages as below."""
    part = PartProfile(
        device="cpu",
        forward_s=(1.0,) * LAYERS,
        backward_s=(2.0,) * LAYERS,
        param_bytes=(4_000_000,) * LAYERS,
        trainable=(10,) * LAYERS,
        activation_bytes=(1_000_000,) * LAYERS,
        embed=EndProfile(forward_s=0.1, param_bytes=2_000_000),
        final=EndProfile(forward_s=0.5, backward_s=0.5, param_bytes=2_000_000, activation_bytes=3_000_000),
        optimizer_s_per_param=0.001,
    )
    roles = ("head", "trunk", "tail") if mode == "ushape" else ("head", "trunk")
    sizes = dict.fromkeys(("forward", "forward_reply", "backward", "backward_reply"), 1000)
    if mode == "vanilla":
        sizes.update(backward=0, backward_reply=0)
    parts = dict.fromkeys(roles, part)
    parts["trunk"] = replace(
        part, forward_s=(server_slowdown,) * LAYERS, backward_s=(2 * server_slowdown,) * LAYERS
    )  # fmt: skip
    return Profile("hand", LAYERS, mode, 8, 16, parts, sizes)


LINK = LinkModel(bandwidth_mbps=8.0, latency_ms=10.0)  # 1000 bytes hold it 1 ms


def test_serial_step_is_the_hand_computed_sum() -> None:
    setting = ClientSetting(speed=2.0, up=LINK, down=LINK)
    p = predict(hand_profile(), 1, 1, setting, micro_batches=1)
    client = 2 * ((0.1 + 1.0) + (1.0 + 2.0 + 0.5 + 0.5) + 2.0)  # head fwd, tail fwd+loss+bwd, head bwd; speed 2
    server = 2 * 1.0 + 2 * 2.0  # trunk blocks 1-2 forward, then backward
    links = 4 * (0.001 + 0.010)  # forward, its reply, backward, its reply: 1000 bytes each + latency
    step = 0.010 + 20 * 0.001 + 0.010 + 2 * 20 * 0.001  # step request, server AdamW, reply, client AdamW (speed 2)
    assert p.serial_s == pytest.approx(client + server + links + step)
    assert p.pipelined_s == pytest.approx(p.serial_s)  # one micro-batch: the same schedule
    assert p.bytes_per_step == 4000
    # client: embeddings + head block + tail block + final, state of 20 + 0 trainables, activations of both
    expected_client = 2e6 + 4e6 + 4e6 + 2e6 + 20 * 12 + (1e6 + 1e6 + 3e6)
    assert p.client_mb == pytest.approx(expected_client / 1e6)
    assert p.server_mb == pytest.approx((2 * 4e6 + 20 * 12 + 2 * 1e6) / 1e6)


def test_vanilla_serial_step_runs_the_loss_on_the_server() -> None:
    p = predict(hand_profile("vanilla"), 2, 0, ClientSetting(up=LINK, down=LINK), micro_batches=1)
    client = (0.1 + 2 * 1.0) + 2 * 2.0
    server = 2 * 1.0 + 1.0 + 2 * 2.0  # trunk forward, loss (final forward + backward), trunk backward
    step = 0.010 + 20 * 0.001 + 0.010 + 20 * 0.001
    assert p.serial_s == pytest.approx(client + server + 2 * 0.011 + step)


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
@pytest.mark.parametrize(
    "setting",
    [
        ClientSetting(),
        ClientSetting(speed=4.0, up=LINK, down=LINK),
        ClientSetting(up=LinkModel(0.01, 50.0), down=LinkModel(100.0, 1.0)),  # a very slow uplink
    ],
)
def test_pipelining_is_never_slower_and_equal_with_one_micro_batch(mode: str, setting: ClientSetting) -> None:
    profile = hand_profile(mode)
    for micro in (2, 4, 8):
        for p in predict_all(profile, setting, micro_batches=micro):
            assert p.pipelined_s <= p.serial_s + 1e-9, (p, micro)
    for p in predict_all(profile, setting, micro_batches=1):
        assert p.pipelined_s == pytest.approx(p.serial_s)
    assert any(p.pipelined_s < p.serial_s for p in predict_all(profile, setting, micro_batches=4))


def test_candidates_cover_every_cut_that_leaves_the_server_a_block() -> None:
    assert candidates(4, "ushape") == [(1, 1), (1, 2), (2, 1)]
    assert candidates(4, "vanilla") == [(1, 0), (2, 0), (3, 0)]


def test_the_budget_picks_the_fastest_cut_within_it() -> None:
    slow_client = ClientSetting(speed=8.0)  # the client's compute is dear: the fewest client blocks are fastest
    fastest = best(predict_all(hand_profile(), slow_client, micro_batches=1))
    assert fastest is not None and fastest.cut == (1, 1)
    # A slow server: the most client blocks are fastest, (1, 2) or (2, 1) at 22 MB; only (1, 1) fits 20 MB.
    predictions = predict_all(hand_profile(server_slowdown=3.0), ClientSetting(), micro_batches=1)
    fastest = best(predictions)
    assert fastest is not None and fastest.cut == (1, 2) and fastest.client_mb == pytest.approx(22.00036)
    picked = best(predictions, budget_mb=20)
    assert picked is not None and picked.cut == (1, 1) and picked.serial_s > fastest.serial_s
    assert best(predictions, budget_mb=1.0) is None


def test_no_cut_fits_is_said_plainly(make_config) -> None:
    plan = make_plan(make_config("run", "plan.client_memory_mb=1"), hand_profile())
    assert plan.groups[0].best is None
    text = render(plan)
    assert "no cut fits the budget of 1 MB" in text
    assert "*" not in text.split("head  tail", 1)[1]


def test_per_client_budgets_give_per_client_picks(make_config) -> None:
    clients = json.dumps(
        [{"client_memory_mb": 1000}, {"client_memory_mb": 20, "speed": 4}, {"client_memory_mb": 1000}]
    ).replace('"', "")
    config = make_config("run", "framework.num_clients=3", f"framework.clients={clients}", "framework.name=psl")
    plan = make_plan(config, hand_profile(server_slowdown=3.0))
    picks = plan.best_per_client()
    assert sorted(picks) == [0, 1, 2]
    assert [g.setting.clients for g in plan.groups] == [(0, 2), (1,)]
    assert picks[0] is not None and picks[1] is not None and picks[1].client_mb <= 20
    assert picks[0] == picks[2] and picks[0].cut == (1, 2)
    assert picks[1].cut == (1, 1)
    text = render(plan)
    assert "best cut per client:" in text and "client 1: head 1, tail 1" in text
    assert text.count(": speed ") == 2  # one table per group


def test_splitlm_plan_prints_the_table_and_json(config_file, capsys) -> None:
    path = config_file(plan={"profile_batches": 1, "client_memory_mb": 1000})
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("tiny-llama: 6 blocks, ushape split, batch 4 x 32")
    rows = [line for line in lines if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == len(candidates(6, "ushape"))
    assert sum("*" in row for row in rows) == 1
    assert any(row.endswith("<") for row in rows)  # the config's cut, 1 / 1
    assert main(["plan", str(path), "--json", "split.mode=vanilla"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "vanilla" and result["layers"] == 6
    (group,) = result["groups"]
    assert [(c["head"], c["tail"]) for c in group["candidates"]] == candidates(6, "vanilla")
    assert result["best_per_client"]["0"] == group["best"]
    profile = result["profile"]
    assert profile["trunk"]["block_forward_s"] > 0 and profile["message_bytes"]["forward"] > 0


def test_a_bad_key_is_a_one_line_error(config_file, capsys) -> None:
    path = config_file()
    assert main(["plan", str(path), "plan.budget=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitlm: error: ") and "plan.budget" in err[0]
