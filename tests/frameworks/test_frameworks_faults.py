"""One rule for a fault: a client lost during a round has all of that round's work undone, on both sides, and
the round runs again without it, which is exactly what ``framework.leave_out`` computes. Checked in-process
with a client that is made to vanish (the networked faults are in benchmarks/faults.py and its slow test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitlm.errors import ClientGone, ConfigError, ProtocolError
from splitlm.frameworks.checkpoint import prepare_output
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import Federation, Member, build_federation

COMMON = (
    "framework.num_clients=3", "framework.rounds=3", "framework.local_steps=2", "train.steps=6",
    "lora.dropout=0.05",
)  # fmt: skip


def _vanishing(fed: Federation, client: str, round_number: int, after_steps: int) -> None:
    """Make ``client`` fail once, ``after_steps`` steps into its turn of round ``round_number``, as a networked
    client whose process died would (its commands raise ``ClientGone``)."""
    member = next(m for m in fed.members if m.client_id == client)
    real = member.train_round
    failed: list[bool] = []

    def train_round(fed: Federation, round_index: int) -> None:
        if round_index + 1 != round_number or failed:
            return real(fed, round_index)
        goal = member.steps_done + fed.local_steps
        member.round_goal = member.steps_done + after_steps
        real(fed, round_index)  # some of its steps happen (and reach the shared trunk adapter) ...
        member.round_goal = goal
        failed.append(True)
        raise ClientGone([client], "killed for the test")  # ... then it is gone

    member.train_round = train_round  # type: ignore[method-assign]
    member.client.can_fail = True  # type: ignore[attr-defined]  (as a networked client's proxy says)


def _run(make_config, name: str, *overrides: str, vanish: tuple[str, int, int] | None = None) -> Path:
    config = make_config(name, *COMMON, *overrides)
    fed = build_federation(config)
    if vanish is not None:
        _vanishing(fed, *vanish)
    drive(fed, prepare_output(config, resume=False), resume=False, started=0.0)
    return Path(config.output_dir)


def _same_run(run_files, ours: Path, theirs: Path) -> None:
    def steps(run: Path) -> list[tuple[int, str, int, float]]:
        return sorted((r["round"], r["client"], r["step"], r["loss"]) for r in run_files.metrics(run))

    assert steps(ours) == steps(theirs)
    ours_rounds, theirs_rounds = run_files.rounds(ours), run_files.rounds(theirs)
    assert [r["participants"] for r in ours_rounds] == [r["participants"] for r in theirs_rounds]
    assert [r["eval_loss"] for r in ours_rounds] == [r["eval_loss"] for r in theirs_rounds]
    for part in ("head", "tail", "trunk"):
        expected, actual = run_files.adapters(theirs, part), run_files.adapters(ours, part)
        assert all(bool((actual[k] == v).all()) for k, v in expected.items()), part


@pytest.mark.parametrize("framework", ["sl", "psl", "sflv1", "sflv2", "gsfl"])
def test_a_client_lost_mid_turn_equals_leaving_it_out(framework: str, make_config, run_files) -> None:
    reference = _run(make_config, "reference", f"framework.name={framework}", "framework.leave_out={2: ['1']}")
    faulty = _run(make_config, "faulty", f"framework.name={framework}", vanish=("1", 2, 1))
    _same_run(run_files, faulty, reference)
    assert [r["participants"] for r in run_files.rounds(faulty)] == [["0", "1", "2"], ["0", "2"], ["0", "1", "2"]]
    steps = [(r["client"], r["step"]) for r in run_files.metrics(faulty)]
    assert len(steps) == len(set(steps))  # the rolled-back steps were taken out of metrics.jsonl again


def test_leave_out_leaves_out(make_config, run_files) -> None:
    run = _run(make_config, "left", "framework.name=sflv2", "framework.leave_out={1: ['0', '2'], 3: ['1']}")
    assert [r["participants"] for r in run_files.rounds(run)] == [["1"], ["0", "1", "2"], ["0", "2"]]
    per_client = {c: [r["step"] for r in run_files.metrics(run) if r["client"] == c] for c in "012"}
    assert per_client == {"0": [1, 2, 3, 4], "1": [1, 2, 3, 4], "2": [1, 2, 3, 4]}


def test_too_few_clients_left_is_an_error(make_config) -> None:
    config = make_config("few", *COMMON, "framework.name=sflv2", "framework.min_clients=3")
    fed = build_federation(config)
    _vanishing(fed, "2", 1, 1)
    with pytest.raises(ProtocolError, match=r"only 2 of 3 clients are left, fewer than framework\.min_clients=3"):
        drive(fed, prepare_output(config, resume=False), resume=False, started=0.0)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [("{4: ['0']}", "round 4 is not in 1..3"), ("{1: ['7']}", r"clients \['7'\] are not in 0..2")],
)
def test_leave_out_is_checked(make_config, value: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make_config("bad", *COMMON, f"framework.leave_out={value}")


def test_in_process_runs_repeat_exactly_with_dropout(make_config, run_files) -> None:
    """Every random draw comes from a stream fixed by (seed, client, step, micro-batch, part): with dropout on,
    parallel clients on threads and the server's worker give the same numbers every time."""
    first = _run(make_config, "a", "framework.name=sflv1")
    second = _run(make_config, "b", "framework.name=sflv1")
    _same_run(run_files, first, second)
    losses = [r["loss"] for r in run_files.metrics(first)]
    without = _run(make_config, "c", "framework.name=sflv1", "lora.dropout=0.0")
    assert losses != [r["loss"] for r in run_files.metrics(without)]  # dropout does change the run


def test_member_rollback_restores_every_field(make_config) -> None:
    fed = build_federation(make_config("m", *COMMON, "framework.name=sflv2"))
    member: Member = fed.members[0]
    snapshot = member.snapshot()
    before = {k: v.clone() for k, v in member.client.state().items()}
    fed.server.start()
    try:
        fed.local_training(member, 0)
    finally:
        fed.server.stop()
    assert member.steps_done == 2 and any(not (member.client.state()[k] == v).all() for k, v in before.items())
    member.restore(snapshot)
    assert member.steps_done == 0 and member.tokens == 0
    assert all(bool((member.client.state()[k] == v).all()) for k, v in before.items())
