"""Per-client held-out sets (``data.client_eval_size``) and the forgetting metric of sequential sl (survey §3.3).

Each client holds out some of its own training examples; after every round the global model (and, in psl, each
client's own model) is evaluated on them. Runs are tiny (2-3 clients, 2 rounds of 2 steps) and made once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitlm.data import Example, eval_batches
from splitlm.errors import ConfigError
from splitlm.frameworks import run_framework
from splitlm.frameworks.driver import CLIENT_EVAL_KEYS
from splitlm.frameworks.federation import Federation, Member, build_federation, hold_out, partition
from splitlm.remedies.multi_exit import early_exit

RUN = ("framework.rounds=2", "train.steps=4")  # 2 local steps per round
HELD = "data.client_eval_size=4"


def tagged(count: int) -> list[Example]:
    """Examples that name their own position (in ``label``)."""
    return [Example([i + 1, i + 2], [i + 1, i + 2], str(i)) for i in range(count)]


def same_batches(a: list[Any], b: list[Any]) -> bool:
    fields = ("input_ids", "attention_mask", "labels")
    return len(a) == len(b) and all(
        torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b, strict=False) for f in fields
    )


# --- the held-out rows -----------------------------------------------------------------------------------------


def test_hold_out_is_a_seeded_disjoint_choice(make_config) -> None:
    config = make_config("c", "data.client_eval_size=5")
    examples = tagged(20)
    train, held = hold_out(config, 0, examples)
    names = {e.label for e in train}, {e.label for e in held}
    assert len(held) == 5 and len(train) == 15
    assert not names[0] & names[1] and names[0] | names[1] == set(map(str, range(20)))  # disjoint, nothing lost
    assert [e.label for e in train] == sorted((e.label for e in train), key=int)  # training rows keep their order
    again = hold_out(config, 0, examples)  # deterministic
    assert [e.label for e in again[0]] == [e.label for e in train] and again[1] == held
    other = {e.label for e in hold_out(config, 1, examples)[1]}
    reseeded = {e.label for e in hold_out(make_config("d", "data.client_eval_size=5", "seed=1"), 0, examples)[1]}
    assert other != names[1] or reseeded != names[1]  # drawn per client and seed
    assert hold_out(make_config("e"), 0, examples) == (examples, [])  # off: every example trains


def test_members_train_on_all_but_their_held_out_rows(make_config) -> None:
    config = make_config("f", "framework.name=sflv1", "framework.num_clients=2", HELD, *RUN)
    fed = build_federation(config)
    assert fed.data is not None
    parts, _ = partition(config, fed.framework, fed.data)
    for member, rows in zip(fed.members, parts, strict=True):
        share = [fed.data.train[i] for i in rows]
        train, held = hold_out(config, member.index, share)
        assert member.examples == train and member.num_examples == len(rows) - 4
        kept = {id(e) for e in member.examples}
        left = [e for e in share if id(e) not in kept]  # the share's rows the member does not train on
        assert [e.input_ids for e in left] == [e.input_ids for e in held] and len(left) == 4
        assert same_batches(member.held_out, eval_batches(held, config.train.batch_size, fed.pad_id))
        assert sum(len(b.input_ids) for b in member.held_out) == 4
    again = build_federation(config)
    for a, b in zip(fed.members, again.members, strict=True):
        assert same_batches(a.held_out, b.held_out) and a.examples == b.examples


def test_too_large_a_client_eval_size_is_a_one_line_error(make_config) -> None:
    config = make_config("big", "framework.name=sflv1", "framework.num_clients=2", "data.client_eval_size=500")
    with pytest.raises(ConfigError, match=r"lower data\.client_eval_size") as error:
        run_framework(config)
    assert "\n" not in str(error.value) and "client_eval_size=500" in str(error.value)


# --- the losses in rounds.jsonl and summary.json ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(fast_config, tmp_path_factory) -> dict[str, Any]:
    """sflv1 and psl with 2 clients, sl with 3 (plain and with remedies.ema), each evaluation on a client's own set
    recorded as (evaluating client, set's client, loss), and each held-out loss (client, loss) as sl notes it."""
    done: dict[str, Any] = {}
    for name, extra in (
        ("sflv1", ("framework.name=sflv1", "framework.num_clients=2")),
        ("psl", ("framework.name=psl", "framework.num_clients=2")),
        ("sl", ("framework.name=sl", "framework.num_clients=3")),
        ("sl_ema", ("framework.name=sl", "framework.num_clients=3", "remedies.ema.decay=0.5")),
    ):
        evaluations: list[tuple[str, str, float]] = []
        noted: list[tuple[str, float]] = []
        evaluate_on, held_out_scores = Member.evaluate_on, Member.held_out_scores

        def spy_evaluate(member: Member, other: Member, calls: list = evaluations, real: Any = evaluate_on) -> Any:
            stats = real(member, other)
            calls.append((member.client_id, other.client_id, stats.loss))
            return stats

        def spy_noted(
            member: Member, fed: Federation, state: Any = None, calls: list = noted, real: Any = held_out_scores
        ) -> tuple[float, float | None]:
            loss, accuracy = real(member, fed, state)
            calls.append((member.client_id, loss))
            return loss, accuracy

        out = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Member, "evaluate_on", spy_evaluate)
            patch.setattr(Member, "held_out_scores", spy_noted)
            summary = run_framework(fast_config(out, *RUN, HELD, *extra))
        done[name] = {"out": out, "summary": summary, "evaluations": evaluations, "noted": noted}
    return done


@pytest.mark.parametrize("name", ["sflv1", "psl"])
def test_rounds_carry_each_clients_loss_on_its_own_set(runs, run_files, name) -> None:
    run = runs[name]
    records = run_files.rounds(run["out"])
    assert len(records) == 2
    for record in records:
        losses = record["client_eval_loss"]
        assert set(losses) == {"0", "1"} and all(v > 0 for v in losses.values())
        assert record["mean_client_eval_loss"] == pytest.approx(sum(losses.values()) / 2)
        assert record["worst_client_eval_loss"] == max(losses.values())
        assert record["forgetting"] is None  # not a sequential framework
    # the global model is the round's first holder: client 0 evaluates every client's set
    for record in records:
        assert all(("0", c, loss) in run["evaluations"] for c, loss in record["client_eval_loss"].items())
    summary = run_files.summary(run["out"])
    assert {k: summary[k] for k in CLIENT_EVAL_KEYS} == {k: records[-1][k] for k in CLIENT_EVAL_KEYS}


def test_psl_also_evaluates_each_clients_own_model(runs, run_files) -> None:
    records = run_files.rounds(runs["psl"]["out"])
    evaluations = runs["psl"]["evaluations"]
    for record in records:
        own = record["own_eval_loss"]
        assert set(own) == {"0", "1"}
        assert all((client, client, loss) in evaluations for client, loss in own.items())
        assert ("1", "1", own["1"]) in evaluations and ("0", "1", record["client_eval_loss"]["1"]) in evaluations
    assert all(r["own_eval_loss"] is None for r in run_files.rounds(runs["sflv1"]["out"]))  # one global model


@pytest.mark.parametrize("name", ["sl", "sl_ema"])
def test_sl_records_forgetting_as_defined(runs, run_files, name) -> None:
    run = runs[name]
    records = run_files.rounds(run["out"])
    noted = run["noted"]
    assert [client for client, _ in noted] == ["0", "1", "2"] * 2  # right after each client trained, in order
    for round_index, record in enumerate(records):
        fresh = dict(noted[3 * round_index : 3 * round_index + 3])
        end = record["client_eval_loss"]
        assert set(end) == {"0", "1", "2"} and record["own_eval_loss"] is None
        expected = ((end["0"] - fresh["0"]) + (end["1"] - fresh["1"])) / 2  # all but the last client
        assert record["forgetting"] == pytest.approx(expected, abs=1e-9)
        assert end["2"] == pytest.approx(fresh["2"], abs=1e-6)  # the last client's model is the end-of-round one
    assert run["summary"]["forgetting"] == records[-1]["forgetting"]


# --- off -------------------------------------------------------------------------------------------------------


def metric_values(out: Path, run_files) -> tuple[list[Any], list[Any]]:
    steps = sorted((r["client"], r["step"], r["loss"], r["grad_norm"]) for r in run_files.metrics(out))  # psl: threads
    rounds = [
        (r["eval_loss"], r["per_client_eval_loss"], r["bytes_up"], r["bytes_down"]) for r in run_files.rounds(out)
    ]
    return steps, rounds


@pytest.mark.parametrize("name", ["sl", "psl"])
def test_client_eval_size_zero_changes_nothing(make_config, run_files, name) -> None:
    common = (f"framework.name={name}", "framework.num_clients=2", *RUN)
    plain = make_config("plain", *common)
    off = make_config("off", *common, "data.client_eval_size=0")
    first, second = run_framework(plain), run_framework(off)
    assert metric_values(Path(plain.output_dir), run_files) == metric_values(Path(off.output_dir), run_files)
    assert first["eval_loss_after"] == second["eval_loss_after"]
    assert first["eval_bytes_up"] == second["eval_bytes_up"] and first["bytes_up"] == second["bytes_up"]
    assert all(second[key] is None for key in CLIENT_EVAL_KEYS)
    assert all(r[key] is None for r in run_files.rounds(Path(off.output_dir)) for key in CLIENT_EVAL_KEYS)
    assert set(run_files.rounds(Path(plain.output_dir))[0]) >= set(CLIENT_EVAL_KEYS)  # the keys are always there


# --- accuracy on each client's own held-out examples (classification-style instruction data) -------------------


def test_choice_of_rebuilds_the_choice_tokenize_rows_makes(make_config) -> None:
    from splitlm.frameworks.setup import choice_of, load_source, prepare_data

    config = make_config("choice", "data.format=instruction", "train.seq_len=160")
    data = prepare_data(config, load_source(config).tokenizer())
    assert len(data.responses) == 2 and data.choices  # fresh / rotten
    whole = 0
    for candidates, truth in data.choices:
        rebuilt = choice_of(candidates[truth], data.responses, config.train.seq_len)
        assert rebuilt is not None and rebuilt[1] == truth
        for option, again, response in zip(candidates, rebuilt[0], data.responses, strict=True):
            assert len(again.input_ids) <= config.train.seq_len and again.input_ids[-len(response) :] == response
            assert [t for t, label in zip(again.input_ids, again.labels, strict=True) if label != -100] == response
            if len(candidates[truth].input_ids) < config.train.seq_len:  # nothing cut: the very same choice
                assert (again.input_ids, again.labels) == (option.input_ids, option.labels)
        whole += len(candidates[truth].input_ids) < config.train.seq_len
    assert whole > 0
    prompt_only = Example([5, 6, 7], [-100, -100, -100])
    assert choice_of(prompt_only, data.responses, 24) is None  # no response: no choice


@pytest.fixture(scope="module")
def accuracy_runs(fast_config, tmp_path_factory) -> dict[str, Any]:
    done = {}
    for name, extra in (
        ("sflv1", ("framework.name=sflv1", "framework.num_clients=2")),
        ("psl", ("framework.name=psl", "framework.num_clients=2")),
        ("sl", ("framework.name=sl", "framework.num_clients=3")),
    ):
        out = tmp_path_factory.mktemp(f"acc-{name}")
        config = fast_config(out, *RUN, "data.client_eval_size=6", "data.format=instruction", *extra)
        done[name] = {"out": out, "summary": run_framework(config), "config": config}
    return done


@pytest.mark.parametrize("name", ["sflv1", "psl", "sl"])
def test_rounds_carry_each_clients_accuracy_on_its_own_examples(accuracy_runs, run_files, name) -> None:
    run = accuracy_runs[name]
    records = run_files.rounds(run["out"])
    fed = build_federation(run["config"])
    sizes = {m.client_id: len(m.choices) for m in fed.members}
    assert all(0 < size <= 6 for size in sizes.values())
    for record in records:
        accuracy = record["client_accuracy"]
        assert set(accuracy) == set(sizes)
        # a fraction of each client's own choices
        assert all(round(value * sizes[c]) == pytest.approx(value * sizes[c]) for c, value in accuracy.items())
        assert record["mean_client_accuracy"] == pytest.approx(sum(accuracy.values()) / len(accuracy))
        assert record["worst_client_accuracy"] == min(accuracy.values())
        assert (record["own_accuracy"] is not None) == (name == "psl")
        assert (record["accuracy_forgetting"] is not None) == (name == "sl")
    if name == "sl":  # the last client's accuracy is measured on the model it passed on: nothing forgotten
        assert all(-1 <= r["accuracy_forgetting"] <= 1 for r in records)


def test_client_accuracy_scores_the_members_own_choices(accuracy_runs) -> None:
    """The global model's accuracy on a client's own choices is Member.accuracy over exactly those choices."""
    config = accuracy_runs["sflv1"]["config"]
    fed = build_federation(config)
    member = fed.members[0]
    one_at_a_time = sum(
        int(min(range(len(c)), key=member.client.sequence_losses(c, fed.pad_id).__getitem__) == truth)
        for c, truth in member.choices
    ) / len(member.choices)
    assert member.accuracy(fed, member.choices) == pytest.approx(one_at_a_time)


# --- SplitGP's personalized models (remedies.multi_exit) ----------------------------------------------------------


def test_personal_scores_evaluate_the_clients_own_side_through_its_exit(make_config) -> None:
    config = make_config(
        "personal", "framework.name=sflv1", "framework.num_clients=2", "remedies=[multi_exit]",
        "data.client_eval_size=6", "data.format=instruction",
    )  # fmt: skip
    fed = build_federation(config)
    member = fed.members[0]
    assert not member.remedy_state and member.personal_scores(fed) is None  # nothing trained yet
    own = {k: v.clone() for k, v in member.client.state().items()}
    personal = member.remedy_state["multi_exit"] = {k: v + 0.05 * torch.randn_like(v) for k, v in own.items()}
    loss, accuracy = member.personal_scores(fed)
    assert all(torch.equal(v, own[k]) for k, v in member.client.state().items())  # its own state is back
    member.client.load_state(personal)
    exit_plugin = early_exit(member.client)
    assert exit_plugin is not None
    with exit_plugin.personal():
        expected = member.client.evaluate(member.held_out).loss
    member.client.load_state(own)
    assert loss == pytest.approx(expected) and loss != pytest.approx(member.held_out_scores(fed)[0])
    assert accuracy is not None and 0 <= accuracy <= 1


def test_multi_exit_runs_report_personal_and_global_per_client(fast_config, tmp_path, run_files) -> None:
    extra = ("framework.name=sflv2", "framework.num_clients=2", "remedies=[multi_exit]")
    summary = run_framework(fast_config(tmp_path, *RUN, "data.client_eval_size=6", "data.format=instruction", *extra))
    for record in run_files.rounds(tmp_path):
        assert set(record["personal_eval_loss"]) == set(record["client_eval_loss"]) == {"0", "1"}
        assert set(record["personal_accuracy"]) == set(record["client_accuracy"])
        assert record["mean_personal_accuracy"] == pytest.approx(sum(record["personal_accuracy"].values()) / 2)
        assert record["worst_personal_accuracy"] == min(record["personal_accuracy"].values())
    assert summary["personal_eval_loss"] == run_files.rounds(tmp_path)[-1]["personal_eval_loss"]
    assert all("exit_loss" in r for r in run_files.metrics(tmp_path))
