"""``remedies: {multi_exit: {exit_weight: w}}`` (SplitGP): the client minimizes (1 - w) x global loss + w x exit loss.

- the head's and tail's gradients are (1 - w) x the plain run's plus w x the early exit's, computed by hand
  with autograd on a fresh copy of the same model (one micro-batch, two serial, two pipelined);
- the trunk's gradient is (1 - w) x the plain one; the reported loss stays the global one;
- a frozen head: the tail still learns its exit;
- ``personal()`` evaluates tail(head(x)) without any request to the server; an exit without a tail has none;
- without the remedy the client has none of it.
"""

from __future__ import annotations

import pytest
import torch

from helpers import capture_grads
from splitlm.data import Batch, DataOrder, collate
from splitlm.errors import ConfigError
from splitlm.frameworks.federation import Federation, build_federation
from splitlm.peft import trainable_parameters
from splitlm.remedies.multi_exit import MultiExit, early_exit
from splitlm.runtime.client import SplitClient
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.schedule import pipelined

W = 0.3
BASE = ("train.warmup_steps=0", "train.batch_size=4")


def _micro_batches(fed: Federation, micro: int) -> list[Batch]:
    """The first training batch of client 0, as ``micro`` micro-batches of equal size."""
    member = fed.members[0]
    rows = DataOrder(len(member.examples), fed.config.train.batch_size, fed.config.seed).indices(0)
    size = len(rows) // micro
    return [collate([member.examples[i] for i in rows[k * size : (k + 1) * size]], fed.pad_id) for k in range(micro)]


def _first_step(config, micro: int = 1, pipeline: bool = False):
    """Client 0's first step: its stats, and the client's and the trunk's gradients it stepped on."""
    fed = build_federation(config)
    client = fed.members[0].client
    if pipeline:
        client.schedule = pipelined
    client_grads: list[torch.Tensor | None] = []
    trunk_grads: list[torch.Tensor | None] = []
    capture_grads(client.optimizer, client_grads)
    capture_grads(fed.server.optimizer(fed.server.adapter_of(client.client_id)), trunk_grads)
    stats = client.train_step(0, _micro_batches(fed, micro))
    return stats, client_grads, trunk_grads


def _early_exit(client: SplitClient, batch: Batch) -> torch.Tensor:
    """tail(head(x)) by hand: the logits (B, T, V)."""
    hidden = client.parts["head"](input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return client.parts["tail"](hidden_states=hidden, attention_mask=batch.attention_mask)


def _exit_reference(config, micro: int) -> tuple[list[torch.Tensor], float]:
    """By hand, on a fresh copy of the same model: the gradient of the mean over micro-batches of the early exit's
    per-token loss, loss(tail(head(x))), for the client's parameters (head then tail), and that mean loss."""
    fed = build_federation(config)
    client = fed.members[0].client
    params = [p for part in client.parts.values() for p in trainable_parameters(part)]
    total_loss, values = 0.0, []
    for batch in _micro_batches(fed, micro):
        total, count = causal_lm_loss(_early_exit(client, batch), batch.labels)
        total_loss = total_loss + total / count / micro
        values.append(total.item() / count)
    grads = torch.autograd.grad(total_loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)], sum(values) / micro


def _zeros_for_none(grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, like, strict=True)]


@pytest.mark.parametrize(("micro", "pipeline"), [(1, False), (2, False), (2, True)])
def test_gradients_are_the_weighted_sum_of_global_and_exit_paths(make_config, micro: int, pipeline: bool) -> None:
    plain_config = make_config("plain", *BASE)
    multi_config = make_config("multi", *BASE, f"remedies.multi_exit.exit_weight={W}")
    plain, plain_client, plain_trunk = _first_step(plain_config, micro, pipeline)
    multi, multi_client, multi_trunk = _first_step(multi_config, micro, pipeline)
    exit_grads, exit_loss = _exit_reference(plain_config, micro)

    assert len(multi_client) == len(plain_client) == len(exit_grads)
    plain_client = _zeros_for_none(plain_client, exit_grads)
    for got, global_path, exit_path in zip(multi_client, plain_client, exit_grads, strict=True):
        assert got is not None
        torch.testing.assert_close(got, (1 - W) * global_path + W * exit_path, rtol=1e-5, atol=1e-7)
    assert any(bool(g.abs().sum() > 0) for g in exit_grads)  # the exit path does reach the client's parameters
    for got, reference in zip(multi_trunk, plain_trunk, strict=True):
        if reference is None:
            assert got is None
        else:
            torch.testing.assert_close(got, (1 - W) * reference, rtol=1e-5, atol=1e-8)
    assert any(g is not None for g in plain_trunk)
    assert multi.loss == plain.loss  # the reported loss stays the global one
    assert "exit_loss" not in plain.metrics
    assert multi.metrics["exit_loss"] == pytest.approx(exit_loss, rel=1e-6)


def test_a_frozen_head_still_trains_its_tail_on_the_exit(make_config) -> None:
    frozen = ("remedies.frozen_head={}", f"remedies.multi_exit.exit_weight={W}")
    plain_config = make_config("plain", *BASE)
    _, plain_client, _ = _first_step(plain_config)
    stats, multi_client, _ = _first_step(make_config("multi", *BASE, *frozen))
    exit_grads, _ = _exit_reference(plain_config, 1)
    client = build_federation(plain_config).members[0].client
    heads = len(trainable_parameters(client.parts["head"]))
    assert all(g is None for g in multi_client[:heads])  # the head learns nothing
    for got, global_path, exit_path in zip(multi_client[heads:], plain_client[heads:], exit_grads[heads:], strict=True):
        assert got is not None and global_path is not None
        torch.testing.assert_close(got, (1 - W) * global_path + W * exit_path, rtol=1e-5, atol=1e-7)
    assert stats.metrics["exit_loss"] is not None


def _no_requests(client: SplitClient) -> None:
    def refuse(message):
        raise AssertionError(f"the early exit sent a {message.kind} request")

    client.channel.submit = refuse  # type: ignore[method-assign]


def test_personal_evaluates_the_early_exit_without_the_server(make_config) -> None:
    fed = build_federation(make_config("multi", *BASE, "remedies=[multi_exit]"))
    client = fed.members[0].client
    plugin = early_exit(client)
    assert plugin is not None
    batches = fed.data.eval[:2]
    examples = fed.members[0].examples[:3]
    split = client.evaluate(batches)  # the global model, through the server
    sent = client.meter.eval_snapshot()
    assert sent[0] > 0

    submit = client.channel.submit
    _no_requests(client)
    with plugin.personal() as same:
        assert same is plugin
        personal = client.evaluate(batches)
        rows = client.sequence_losses(examples, fed.pad_id)
    client.channel.submit = submit  # type: ignore[method-assign]
    assert client.meter.eval_snapshot() == sent  # not a byte

    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for part in client.parts.values():
            part.eval()
        for batch in batches:
            total, count = causal_lm_loss(_early_exit(client, batch), batch.labels)
            loss_sum, tokens = loss_sum + float(total), tokens + count
        batch = collate(examples, fed.pad_id)
        expected_rows = row_losses(_early_exit(client, batch), batch.labels)
    assert personal.tokens == tokens
    assert personal.loss_sum == pytest.approx(loss_sum, rel=1e-6)
    assert rows == pytest.approx([float(x) for x in expected_rows], rel=1e-6)
    assert personal.loss_sum != split.loss_sum  # skipping the trunk is another model
    assert client.evaluate(batches).loss == split.loss  # outside, the split path again
    assert client.meter.eval_snapshot()[0] > sent[0]


def test_an_exit_without_a_tail_has_nothing_to_evaluate() -> None:
    with pytest.raises(ConfigError, match="no early exit"), MultiExit(W).personal():
        pass


def test_none_leaves_the_client_as_it_was(make_config) -> None:
    fed = build_federation(make_config("plain", *BASE))
    client = fed.members[0].client
    assert early_exit(client) is None and not fed.remedies
    stats = client.train_step(0, _micro_batches(fed, 1))
    assert "exit_loss" not in stats.metrics
