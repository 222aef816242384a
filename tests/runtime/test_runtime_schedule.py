"""A client step is a schedule of operations: checked as data, without a model."""

from __future__ import annotations

import pytest
import torch

from splitlm.errors import SplitLMError
from splitlm.runtime.schedule import Op, OpKind, check, pipelined, serial

K = OpKind


def test_serial_ushape_schedule_runs_each_micro_batch_through_the_whole_pipeline() -> None:
    assert serial(2, ushape=True) == [
        Op(K.HEAD_FORWARD, 0), Op(K.SEND_FORWARD, 0), Op(K.AWAIT_FORWARD, 0), Op(K.TAIL, 0),
        Op(K.SEND_BACKWARD, 0), Op(K.AWAIT_BACKWARD, 0), Op(K.HEAD_BACKWARD, 0),
        Op(K.HEAD_FORWARD, 1), Op(K.SEND_FORWARD, 1), Op(K.AWAIT_FORWARD, 1), Op(K.TAIL, 1),
        Op(K.SEND_BACKWARD, 1), Op(K.AWAIT_BACKWARD, 1), Op(K.HEAD_BACKWARD, 1),
        Op(K.STEP),
    ]  # fmt: skip


def test_serial_vanilla_schedule_has_no_tail_and_no_second_round_trip() -> None:
    assert serial(1, ushape=False) == [
        Op(K.HEAD_FORWARD, 0), Op(K.SEND_FORWARD, 0), Op(K.AWAIT_FORWARD, 0), Op(K.HEAD_BACKWARD, 0), Op(K.STEP),
    ]  # fmt: skip


@pytest.mark.parametrize("ushape", [True, False])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_serial_schedules_pass_the_dependency_check(micro_batches: int, ushape: bool) -> None:
    check(serial(micro_batches, ushape), micro_batches, ushape)


def test_an_overlapping_order_is_valid_too() -> None:
    # Micro-batch 1's head forward while micro-batch 0 is on the wire: what a pipelined schedule does.
    ops = [
        Op(K.HEAD_FORWARD, 0), Op(K.SEND_FORWARD, 0), Op(K.HEAD_FORWARD, 1), Op(K.SEND_FORWARD, 1),
        Op(K.AWAIT_FORWARD, 0), Op(K.HEAD_BACKWARD, 0), Op(K.AWAIT_FORWARD, 1), Op(K.HEAD_BACKWARD, 1), Op(K.STEP),
    ]  # fmt: skip
    check(ops, 2, ushape=False)


BROKEN = {
    "await before send": ([Op(K.HEAD_FORWARD, 0), Op(K.AWAIT_FORWARD, 0)], "before \\['send_forward'\\]"),
    "head backward before its gradient": (
        [Op(K.HEAD_FORWARD, 0), Op(K.SEND_FORWARD, 0), Op(K.AWAIT_FORWARD, 0), Op(K.TAIL, 0), Op(K.HEAD_BACKWARD, 0)],
        "before \\['await_backward'\\]",
    ),
    "step too early": ([Op(K.HEAD_FORWARD, 0), Op(K.STEP)], "STEP at position 1"),
    "a repeated op": ([Op(K.HEAD_FORWARD, 0), Op(K.HEAD_FORWARD, 0)], "unknown or repeated"),
    "no step": (serial(1, True)[:-1], "no STEP"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_check_names_what_is_wrong(case: str) -> None:
    ops, pattern = BROKEN[case]
    with pytest.raises(SplitLMError, match=pattern):
        check(ops, 1, ushape=True)


def test_the_client_executes_the_schedule_it_is_given(make_config) -> None:
    """A client built with another (valid) schedule computes the same step as with the serial one."""
    from splitlm.data import DataOrder, collate
    from splitlm.frameworks.federation import build_federation

    def reversed_micro(micro_batches: int, ushape: bool, waits: bool) -> list[Op]:
        ops = serial(micro_batches, ushape, waits)
        by_micro = [[op for op in ops if op.micro == m] for m in range(micro_batches)]
        return [op for group in reversed(by_micro) for op in group] + [Op(K.STEP)]

    config = make_config("run", "train.grad_accum=2", "train.warmup_steps=0")
    first_fed, second_fed = build_federation(config), build_federation(config)
    member = first_fed.members[0]
    order = DataOrder(len(member.examples), config.train.batch_size, config.seed)
    batches = [collate([member.examples[i] for i in order.indices(m)], first_fed.pad_id) for m in range(2)]
    one, two = member.client, second_fed.members[0].client
    two.schedule = reversed_micro
    first, second = one.train_step(0, batches), two.train_step(0, batches)
    assert second.tokens == first.tokens and second.loss == pytest.approx(first.loss, rel=1e-6)
    for key, value in one.state().items():  # the same accumulated gradient, summed in another order
        assert torch.allclose(two.state()[key], value, atol=1e-6), key


@pytest.mark.parametrize("waits", [True, False])
@pytest.mark.parametrize("ushape", [True, False])
@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_pipelined_schedules_pass_the_dependency_check(micro_batches: int, ushape: bool, waits: bool) -> None:
    check(pipelined(micro_batches, ushape, waits), micro_batches, ushape, waits)
    check(serial(micro_batches, ushape, waits), micro_batches, ushape, waits)


def test_pipelined_ushape_sends_every_forward_before_awaiting_any() -> None:
    ops = pipelined(3, ushape=True)
    sends = [i for i, op in enumerate(ops) if op.kind is K.SEND_FORWARD]
    first_await = next(i for i, op in enumerate(ops) if op.kind is K.AWAIT_FORWARD)
    assert sends == [1, 3, 5] and first_await == 6
    # the head's backwards run in micro-batch order, as in the serial schedule (same accumulation order)
    assert [op.micro for op in ops if op.kind is K.HEAD_BACKWARD] == [0, 1, 2]
    # the tail of micro-batch 0 runs while micro-batches 1 and 2 are still in the trunk
    assert ops.index(Op(K.TAIL, 0)) < ops.index(Op(K.AWAIT_FORWARD, 1))


def test_a_step_that_does_not_wait_for_step_9_has_no_await_backward() -> None:
    for schedule in (serial, pipelined):
        kinds = [op.kind for op in schedule(2, True, False)]
        assert K.AWAIT_BACKWARD not in kinds and kinds.count(K.SEND_BACKWARD) == 2
    with pytest.raises(SplitLMError, match="unknown or repeated"):
        check(serial(1, True, True), 1, ushape=True, waits=False)
