"""Fewer round trips: each client update mode does what it claims, on a tiny U-shaped (or vanilla) run.

- ``frozen_head``: the head never changes, no step-9 gradient crosses the wire, the client never awaits one;
- ``local_loss``: the head trains without any step-9 gradient; with ``align_every`` the gradient comes only on
  alignment steps and trains the auxiliary map, never the head directly;
- ``intermittent: {every: H}``: step-9 gradients only every H-th step, and the head changes only then;
- ``prune: {keep: F}``: only ceil(F * rows) rows of each micro-batch cross the wire, the highest EL2N ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from splitlm.data import DataOrder, collate
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, framework_of
from splitlm.frameworks.federation import build_federation
from splitlm.remedies.prune import el2n_scores, most_informative
from splitlm.remedies.updates import LocalLoss
from splitlm.runtime.loss import logit_lens
from splitlm.runtime.schedule import OpKind


class Spy:
    """Wraps a client's schedule (records the ops it runs) and its meter's gradient replies per step."""

    def __init__(self, client) -> None:
        self.client = client
        self.ops: list[list[OpKind]] = []
        self.schedule = client.schedule
        client.schedule = self._schedule

    def _schedule(self, micro_batches: int, ushape: bool, waits: bool):
        ops = self.schedule(micro_batches, ushape, waits)
        self.ops.append([op.kind for op in ops])
        return ops


def _steps(config, steps: int = 4):
    """Run ``steps`` steps of client 0; per step: the head state after it and the step-9 gradient bytes."""
    fed = build_federation(config)
    member = fed.members[0]
    client = member.client
    spy = Spy(client)
    order = DataOrder(len(member.examples), config.train.batch_size, config.seed)
    heads, grad_bytes = [_head_state(client)], []
    for step in range(steps):
        before = client.meter.by_kind.get("gradients", 0) + client.meter.by_kind.get("loss", 0)
        client.train_step(step, [collate([member.examples[i] for i in order.indices(step)], fed.pad_id)])
        heads.append(_head_state(client))
        grad_bytes.append(client.meter.by_kind.get("gradients", 0) + client.meter.by_kind.get("loss", 0) - before)
    return client, spy, heads, grad_bytes


def _head_state(client) -> dict[str, torch.Tensor]:
    from splitlm.peft import trainable_state

    return {k: v.clone() for k, v in trainable_state(client.parts["head"]).items()}


def _local_loss(client) -> LocalLoss:
    return next(p for p in client.plugins if isinstance(p, LocalLoss))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_split_is_the_reference(make_config) -> None:
    _, spy, heads, grad_bytes = _steps(make_config("split", "train.warmup_steps=0"))
    assert all(OpKind.AWAIT_BACKWARD in ops for ops in spy.ops)
    assert all(b > 0 for b in grad_bytes)
    assert all(not _same(heads[i], heads[i + 1]) for i in range(4))


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_frozen_sends_no_step_9_gradient_and_never_waits(mode: str, make_config) -> None:
    config = make_config("frozen", f"split.mode={mode}", "remedies=[frozen_head]", "train.warmup_steps=0")
    client, spy, heads, grad_bytes = _steps(config)
    assert all(OpKind.AWAIT_BACKWARD not in ops for ops in spy.ops)
    assert grad_bytes == [0, 0, 0, 0]  # replies to step 7 (U-shape) / the loss (vanilla) carry no gradient
    assert all(_same(heads[0], head) for head in heads)
    if mode == "ushape":  # the tail still learns, from its own loss
        assert client.state().keys() - heads[0].keys()


def test_local_loss_trains_the_head_without_step_9(make_config) -> None:
    config = make_config("local", "remedies=[local_loss]", "train.warmup_steps=0")
    client, spy, heads, grad_bytes = _steps(config)
    assert grad_bytes == [0, 0, 0, 0]
    assert all(OpKind.AWAIT_BACKWARD not in ops for ops in spy.ops)
    assert all(not _same(heads[i], heads[i + 1]) for i in range(4))
    update = _local_loss(client)
    assert update.alignment is None  # never aligned
    assert torch.count_nonzero(update.aux.up) == 0


def test_local_loss_aligns_its_auxiliary_map_on_alignment_steps(make_config) -> None:
    config = make_config("aligned", "remedies.local_loss.align_every=2", "train.warmup_steps=0")
    client, spy, _, grad_bytes = _steps(config)
    assert [b > 0 for b in grad_bytes] == [True, False, True, False]
    assert [OpKind.AWAIT_BACKWARD in ops for ops in spy.ops] == [True, False, True, False]
    update = _local_loss(client)
    assert update.alignment is not None and math.isfinite(update.alignment)
    assert torch.count_nonzero(update.aux.up) > 0


def test_local_loss_with_alignment_equals_local_loss_for_the_head_on_the_first_step(make_config) -> None:
    # the server's gradient only trains the auxiliary map: the head's first step is the same with or without it
    plain = _steps(make_config("plain", "remedies=[local_loss]", "train.warmup_steps=0"), steps=1)[2]
    aligned = _steps(
        make_config("aligned", "remedies.local_loss.align_every=1", "train.warmup_steps=0"),
        steps=1,
    )[2]
    for key, value in plain[1].items():
        torch.testing.assert_close(aligned[1][key], value, rtol=1e-5, atol=1e-7)


def test_intermittent_client_updates(make_config) -> None:
    config = make_config("every", "remedies.intermittent.every=2", "train.warmup_steps=0")
    _, spy, heads, grad_bytes = _steps(config)
    assert [b > 0 for b in grad_bytes] == [True, False, True, False]
    assert [OpKind.AWAIT_BACKWARD in ops for ops in spy.ops] == [True, False, True, False]
    changed = [not _same(heads[i], heads[i + 1]) for i in range(4)]
    assert changed == [True, False, True, False]


def test_el2n_prune_sends_only_the_most_informative_rows(make_config) -> None:
    full = _steps(make_config("full", "train.warmup_steps=0"), steps=1)[0]
    pruned = _steps(make_config("pruned", "remedies.prune.keep=0.5", "train.warmup_steps=0"), steps=1)[0]
    assert 0 < pruned.meter.by_kind["forward"] < full.meter.by_kind["forward"]
    assert pruned.meter.by_kind["forward"] <= full.meter.by_kind["forward"] * 0.6


def test_el2n_score_matches_its_formula(make_config) -> None:
    fed = build_federation(make_config("score"))
    client = fed.members[0].client
    tail = client.stages["tail"]
    batch = collate(fed.members[0].examples[:3], fed.pad_id)
    hidden = torch.randn(3, batch.input_ids.shape[1], int(tail.config.hidden_size))
    scores = el2n_scores(tail, hidden, batch.labels)
    probs = torch.softmax(logit_lens(tail, hidden).float(), dim=-1)
    for row in range(3):
        errors = []
        for t in range(batch.labels.shape[1] - 1):
            target = int(batch.labels[row, t + 1])
            if target != -100:
                onehot = torch.zeros(probs.shape[-1])
                onehot[target] = 1
                errors.append(float(torch.linalg.vector_norm(probs[row, t] - onehot)))
        assert float(scores[row]) == pytest.approx(sum(errors) / len(errors), rel=1e-4)


def test_most_informative_keeps_the_top_fraction_in_row_order() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert most_informative(scores, 0.4).tolist() == [1, 3]
    assert most_informative(scores, 0.5).tolist() == [1, 2, 3]  # ceil(2.5) rows
    assert most_informative(scores, 0.01).tolist() == [1]  # at least one row, ties keep the earlier


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["split.mode=vanilla", "remedies=[local_loss]"], "remedies.local_loss: needs split.mode=ushape"),
        (["remedies.local_loss.align_every=-1"], r"remedies\.local_loss\.align_every"),
        (["remedies=[local_loss, frozen_head]"], "local_loss and frozen_head each decide how the client's head"),
        (["remedies.prune.keep=0"], r"remedies\.prune\.keep"),
        (["remedies.prnue.keep=0.5"], "unknown remedy 'prnue'.*did you mean 'prune'"),
        (["split.mode=vanilla", "remedies.prune.keep=0.5"], "split.mode=ushape"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(overrides, message, make_config) -> None:
    config = make_config("bad", *overrides)  # the schema leaves the remedies' names and settings to them
    with pytest.raises(ConfigError, match=message) as error:
        framework_of(config).check(config)  # as every run checks its config before it builds anything
    assert "\n" not in str(error.value)
    assert config_problems(config.model_dump(mode="json"))  # and so does the CLI, before it builds anything
