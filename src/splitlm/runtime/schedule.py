"""The order of a client's operations in one optimizer step, as data (DeepSpeed's pipe schedules).

A schedule is a list of ``Op``s over the step's micro-batches; ``SplitClient`` executes it and tests check
it without a model. Sending and waiting are separate operations, so a schedule decides what overlaps:
between ``SEND_FORWARD k`` and ``AWAIT_FORWARD k`` micro-batch k is on the wire or in the trunk, and the
client is free to work on another micro-batch.

| op              | pipeline step | what the client does                                                |
|-----------------|---------------|---------------------------------------------------------------------|
| HEAD_FORWARD k  | 2             | head forward of micro-batch k                                       |
| SEND_FORWARD k  | 3             | send its activations (+ labels in a vanilla split)                  |
| AWAIT_FORWARD k | 5 / 9         | wait for the trunk output (U-shape) or the loss and gradient (vanilla) |
| TAIL k          | 6             | tail forward, loss, backward to the trunk output (U-shape)          |
| SEND_BACKWARD k | 7             | send the gradient of the trunk output (U-shape)                     |
| AWAIT_BACKWARD k| 9             | wait for the gradient of the head output (U-shape)                  |
| HEAD_BACKWARD k | 10            | head backward (gradient accumulates over the step's micro-batches)  |
| STEP            | 10            | clip by the global norm and step, together with the server          |

A step whose client does not wait for the server's gradient (``waits=False``: a frozen head, a local loss,
an intermittent update) has no ``AWAIT_BACKWARD``: in a U-shaped split the client sends step 7 and moves on.

``serial`` runs one micro-batch after another; ``pipelined`` (PiPar, survey §4.5) sends every micro-batch's
activations as soon as its head forward is done, so the client computes micro-batch k+1 while k is on the
wire or in the trunk, and the server computes k while k+1 is on its way. Both accumulate the head's gradient
over the micro-batches in the same order, so they compute the same step.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from splitlm.errors import SplitLMError


class OpKind(StrEnum):
    HEAD_FORWARD = "head_forward"
    SEND_FORWARD = "send_forward"
    AWAIT_FORWARD = "await_forward"
    TAIL = "tail"
    SEND_BACKWARD = "send_backward"
    AWAIT_BACKWARD = "await_backward"
    HEAD_BACKWARD = "head_backward"
    STEP = "step"


class Op(NamedTuple):
    kind: OpKind
    micro: int = -1  # the micro-batch it works on (-1 for STEP)

    def __repr__(self) -> str:
        return f"{self.kind.value}({self.micro})" if self.micro >= 0 else self.kind.value


# What each op needs done first, on the same micro-batch.
REQUIRES: dict[OpKind, tuple[OpKind, ...]] = {
    OpKind.HEAD_FORWARD: (),
    OpKind.SEND_FORWARD: (OpKind.HEAD_FORWARD,),
    OpKind.AWAIT_FORWARD: (OpKind.SEND_FORWARD,),
    OpKind.TAIL: (OpKind.AWAIT_FORWARD,),
    OpKind.SEND_BACKWARD: (OpKind.TAIL,),
    OpKind.AWAIT_BACKWARD: (OpKind.SEND_BACKWARD,),
    OpKind.HEAD_BACKWARD: (OpKind.AWAIT_FORWARD,),
}


def micro_ops(ushape: bool, waits: bool = True) -> tuple[OpKind, ...]:
    """The ops of one micro-batch, in dependency order (``waits``: the client waits for the step-9 gradient)."""
    if ushape:
        return (
            OpKind.HEAD_FORWARD, OpKind.SEND_FORWARD, OpKind.AWAIT_FORWARD, OpKind.TAIL, OpKind.SEND_BACKWARD,
            *((OpKind.AWAIT_BACKWARD,) if waits else ()), OpKind.HEAD_BACKWARD,
        )  # fmt: skip
    return OpKind.HEAD_FORWARD, OpKind.SEND_FORWARD, OpKind.AWAIT_FORWARD, OpKind.HEAD_BACKWARD


def serial(micro_batches: int, ushape: bool, waits: bool = True) -> list[Op]:
    """One micro-batch at a time, each through the whole pipeline, then the optimizer step: nothing overlaps."""
    return [Op(kind, m) for m in range(micro_batches) for kind in micro_ops(ushape, waits)] + [Op(OpKind.STEP)]


def pipelined(micro_batches: int, ushape: bool, waits: bool = True) -> list[Op]:
    """PiPar's order: every head forward is sent as soon as it is done; then, as replies come back in order, the
    tails (U-shape) and their gradients go out; then the head backwards, in micro-batch order."""
    ops = [Op(kind, m) for m in range(micro_batches) for kind in (OpKind.HEAD_FORWARD, OpKind.SEND_FORWARD)]
    if ushape:
        ops += [
            Op(kind, m) for m in range(micro_batches)
            for kind in (OpKind.AWAIT_FORWARD, OpKind.TAIL, OpKind.SEND_BACKWARD)
        ]  # fmt: skip
        back = (OpKind.AWAIT_BACKWARD, OpKind.HEAD_BACKWARD) if waits else (OpKind.HEAD_BACKWARD,)
    else:
        back = (OpKind.AWAIT_FORWARD, OpKind.HEAD_BACKWARD)
    ops += [Op(kind, m) for m in range(micro_batches) for kind in back]
    return [*ops, Op(OpKind.STEP)]


def check(ops: list[Op], micro_batches: int, ushape: bool, waits: bool = True) -> None:
    """Raise ``SplitLMError`` unless ``ops`` runs every op of every micro-batch once, each after what it needs
    (in a U-shaped split the head's backward also waits for its gradient), and ends with one STEP."""
    needed = {Op(kind, m) for m in range(micro_batches) for kind in micro_ops(ushape, waits)}
    done: set[Op] = set()
    for position, op in enumerate(ops):
        if op.kind is OpKind.STEP:
            if position != len(ops) - 1 or done != needed:
                raise SplitLMError(f"schedule: STEP at position {position} before every micro-batch finished")
            return
        if op not in needed or op in done:
            raise SplitLMError(f"schedule: {op!r} is unknown or repeated")
        waits_here = ushape and waits and op.kind is OpKind.HEAD_BACKWARD
        requires = REQUIRES[op.kind] + ((OpKind.AWAIT_BACKWARD,) if waits_here else ())
        missing = [kind.value for kind in requires if Op(kind, op.micro) not in done]
        if missing:
            raise SplitLMError(f"schedule: {op!r} runs before {missing} of micro-batch {op.micro}")
        done.add(op)
    raise SplitLMError("schedule: no STEP at the end")
