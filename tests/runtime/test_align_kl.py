"""``remedies: {align_kl: {weight: lambda}}`` (FlexP-SFL): lambda x KL(client's smashed-data Gaussian || server's
running one).

- the statistics and the KL follow their formulas (checked against torch.distributions) on hand-made tensors;
- the server mod's running average is the hand-computed EMA over a scripted sequence of requests, ignores
  evaluation and backward requests, and its tensors survive the codecs of both sides;
- with lambda > 0 the head's gradient is the lambda = 0 one plus lambda x dKL/dtheta (autograd on a reference),
  tail and trunk unchanged (U-shaped and vanilla splits);
- a short sflv1 run with 2 clients trains end to end with it; lambda = 0 adds no server mod.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from helpers import capture_grads
from splitlm.data import DataOrder, collate
from splitlm.frameworks import run_framework
from splitlm.frameworks.federation import build_federation
from splitlm.peft import trainable_parameters
from splitlm.remedies.align_kl import DECAY, EPS, MEAN, VAR, Alignment, AlignStats, feature_moments, gaussian_kl
from splitlm.transport import Channel, InProcessTransport, Message, MeterMod, server_chain
from splitlm.transport.codecs import CodecMod

LAMBDA = 0.7


def _by_hand(hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over the real tokens, by selecting them."""
    real = hidden.reshape(-1, hidden.shape[-1]) if mask is None else hidden[mask.bool()]  # (N, d)
    return real.mean(0), real.var(0, unbiased=False)


def _kl_by_hand(client: tuple[torch.Tensor, torch.Tensor], server: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    (mu_c, var_c), (mu_s, var_s) = client, server
    return kl_divergence(Normal(mu_c, (var_c + EPS).sqrt()), Normal(mu_s, (var_s + EPS).sqrt())).mean()


def test_the_statistics_and_the_kl_follow_their_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, generator=generator) * 2 + 1  # (B, T, d)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean, var = feature_moments(hidden, mask)
    real = torch.stack([hidden[0, 0], hidden[0, 1], hidden[1, 0]])  # the three real tokens
    torch.testing.assert_close(mean, real.mean(0))
    torch.testing.assert_close(var, ((real - real.mean(0)) ** 2).mean(0))
    torch.testing.assert_close(feature_moments(hidden, None)[0], hidden.reshape(-1, 4).mean(0))
    torch.testing.assert_close(feature_moments(hidden, torch.ones(1, 3))[0], hidden.reshape(-1, 4).mean(0))
    assert feature_moments(hidden, torch.zeros(2, 3)) is None

    mu_c, var_c = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 4.0])
    mu_s, var_s = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0])
    kl = gaussian_kl((mu_c, var_c), (mu_s, var_s))
    columns = zip(mu_c.tolist(), mu_s.tolist(), (var_c + EPS).tolist(), (var_s + EPS).tolist(), strict=True)
    by_formula = [0.5 * (math.log(vs / vc) + (vc + (a - b) ** 2) / vs - 1) for a, b, vc, vs in columns]
    assert float(kl) == pytest.approx(sum(by_formula) / 3, rel=1e-6)  # averaged over the features
    torch.testing.assert_close(kl, _kl_by_hand((mu_c, var_c), (mu_s, var_s)))
    assert float(gaussian_kl((mu_c, var_c), (mu_c, var_c))) == pytest.approx(0.0, abs=1e-7)


def _forward(step: int, hidden: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "forward") -> Message:
    tensors = {"hidden": hidden} if mask is None else {"hidden": hidden, "attention_mask": mask}
    return Message(kind, "0", step, 0, tensors)


def _reply(message: Message) -> Message:
    """A stand-in server: U-shaped activations, a vanilla loss (odd steps), a backward's gradients."""
    if message.kind == "backward":
        return Message("gradients", "0", message.step, 0, {"grad": message.tensors["grad"]})
    if message.step % 2:
        return Message("loss", "0", message.step, 0, {}, {"loss_sum": 1.0, "tokens": 1})
    return Message("activations", "0", message.step, 0, {"hidden": message.tensors["hidden"] * 2})


def test_the_server_keeps_an_ema_of_training_forwards_only() -> None:
    generator = torch.Generator().manual_seed(1)
    mod = AlignStats()
    assert mod.decay == DECAY == 0.9
    handler = server_chain([mod], _reply)
    script = [
        _forward(0, torch.randn(2, 5, 3, generator=generator), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])),
        _forward(0, torch.randn(2, 5, 3, generator=generator) + 10, kind="eval"),  # ignored
        _forward(1, torch.randn(1, 4, 3, generator=generator) * 3),  # no mask: every token; a vanilla loss reply
        Message("backward", "0", 1, 0, {"grad": torch.ones(1, 4, 3)}),  # ignored
        _forward(2, torch.randn(3, 2, 3, generator=generator) - 1, torch.tensor([[1, 0], [0, 0], [1, 1]])),
    ]
    expected: tuple[torch.Tensor, torch.Tensor] | None = None
    for message in script:
        reply = handler(message)
        assert isinstance(reply, Message)
        if message.kind != "forward":
            assert MEAN not in reply.tensors and VAR not in reply.tensors
            continue
        batch = _by_hand(message.tensors["hidden"], message.tensors.get("attention_mask"))
        if expected is None:  # the first micro-batch sets the average
            expected = batch
        else:
            expected = tuple(0.9 * old + 0.1 * new for old, new in zip(expected, batch, strict=True))
        torch.testing.assert_close(reply.tensors[MEAN], expected[0])
        torch.testing.assert_close(reply.tensors[VAR], expected[1])
    assert expected is not None
    torch.testing.assert_close(mod.running[3][0], expected[0])
    torch.testing.assert_close(mod.running[3][1], expected[1])


def test_a_queued_forward_updates_the_average_when_served() -> None:
    mod = AlignStats()
    waiting: Future[Message] = Future()
    message = _forward(0, torch.arange(6.0).reshape(1, 2, 3))
    answer = mod.serve(message, lambda m: waiting)
    assert isinstance(answer, Future) and not mod.running  # not served yet
    waiting.set_result(_reply(message))
    torch.testing.assert_close(answer.result().tensors[MEAN], torch.tensor([1.5, 2.5, 3.5]))
    failed: Future[Message] = Future()
    refused = mod.serve(_forward(2, torch.zeros(1, 2, 3)), lambda m: failed)
    failed.set_exception(RuntimeError("refused"))
    with pytest.raises(RuntimeError, match="refused"):
        refused.result()
    torch.testing.assert_close(mod.running[3][0], torch.tensor([1.5, 2.5, 3.5]))  # a refused forward counts not


@pytest.mark.parametrize("codec", ["none", "fp16"])
def test_the_statistics_survive_both_sides_codecs_and_meter(codec: str) -> None:
    mod = AlignStats()
    server = server_chain([CodecMod(codec, codec), mod], _reply)
    channel = Channel(InProcessTransport(server), [CodecMod(codec, codec), MeterMod()])
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    reply = channel.request(_forward(0, hidden, torch.ones(2, 3, dtype=torch.long))).reply
    assert set(reply.tensors) == {"hidden", MEAN, VAR}
    assert reply.tensors[MEAN].dtype == torch.float32
    torch.testing.assert_close(reply.tensors[MEAN], mod.running[4][0])
    torch.testing.assert_close(reply.tensors[VAR], mod.running[4][1])
    assert Alignment(LAMBDA).reference(reply) is not None


SEED_MEAN, SEED_VAR = 0.3, 2.0  # the server's average before the step (as if other clients had come first)


def _first_step(config):
    """Client 0's first step (the server's average seeded first, when it has one): the batch, the client's and the
    trunk's gradients."""
    fed = build_federation(config)
    client = fed.members[0].client
    mods = [m for m in fed.server_mods if isinstance(m, AlignStats)]
    assert len(mods) == (1 if "align_kl" in config.remedies else 0)
    width = fed.server.hidden_size
    for mod in mods:
        mod.update((torch.full((width,), SEED_MEAN), torch.full((width,), SEED_VAR)))
    member = fed.members[0]
    rows = DataOrder(len(member.examples), config.train.batch_size, config.seed).indices(0)
    batch = collate([member.examples[i] for i in rows], fed.pad_id)
    client_grads: list[torch.Tensor | None] = []
    trunk_grads: list[torch.Tensor | None] = []
    capture_grads(client.optimizer, client_grads)
    capture_grads(fed.server.optimizer(fed.server.adapter_of(client.client_id)), trunk_grads)
    client.train_step(0, [batch])
    return batch, client_grads, trunk_grads


def _kl_gradient(config, batch) -> list[torch.Tensor]:
    """By hand, on a fresh copy of the model: d KL / d theta for the head's parameters, against the average the
    server holds after this batch (0.9 x the seed + 0.1 x the batch's statistics, a constant)."""
    client = build_federation(config).members[0].client
    params = trainable_parameters(client.parts["head"])
    hidden = client.parts["head"](input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    moments = _by_hand(hidden.float(), batch.attention_mask)
    seed = (torch.full_like(moments[0], SEED_MEAN), torch.full_like(moments[1], SEED_VAR))
    server = tuple(0.9 * s + 0.1 * m.detach() for s, m in zip(seed, moments, strict=True))
    grads = torch.autograd.grad(_kl_by_hand(moments, server), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_the_head_gets_lambda_times_the_kl_gradient_more(make_config, mode: str) -> None:
    common = (f"split.mode={mode}", "train.warmup_steps=0")
    plain_config = make_config("plain", *common)
    batch, plain_client, plain_trunk = _first_step(plain_config)
    _, aligned_client, aligned_trunk = _first_step(
        make_config("aligned", *common, f"remedies.align_kl.weight={LAMBDA}")
    )
    kl_grads = _kl_gradient(plain_config, batch)
    heads = len(kl_grads)
    assert any(bool(g.abs().sum() > 0) for g in kl_grads)
    for got, plain, kl in zip(aligned_client[:heads], plain_client[:heads], kl_grads, strict=True):
        assert got is not None
        plain = torch.zeros_like(kl) if plain is None else plain
        torch.testing.assert_close(got - plain, LAMBDA * kl, rtol=1e-4, atol=1e-8)
    for got, plain in zip(aligned_client[heads:] + aligned_trunk, plain_client[heads:] + plain_trunk, strict=True):
        assert (got is None and plain is None) or torch.equal(got, plain)  # the tail and the trunk: bit for bit


@pytest.mark.parametrize("extra", [(), ("remedies.multi_exit={}",)], ids=["align", "align+multi_exit"])
def test_an_sflv1_run_with_two_clients_trains_with_it(make_config, run_files, tmp_path, caplog, extra) -> None:
    config = make_config(
        "sflv1", "framework.name=sflv1", "framework.num_clients=2", "framework.rounds=2", "train.steps=4",
        "remedies.align_kl.weight=0.5", *extra,
    )  # fmt: skip
    run_framework(config)
    assert "running statistics" not in caplog.text  # every training reply carried them
    losses = [r["loss"] for r in run_files.metrics(tmp_path / "sflv1") if "loss" in r and "client" in r]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    assert {r["client"] for r in run_files.metrics(tmp_path / "sflv1") if "client" in r} == {"0", "1"}
