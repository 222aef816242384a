"""SplitServer rejects malformed or out-of-order messages with ProtocolError, and they change nothing."""

from __future__ import annotations

import pytest
import torch

from splitlm.errors import ProtocolError
from splitlm.frameworks.federation import build_federation
from splitlm.peft import trainable_parameters, trainable_state
from splitlm.runtime.server import SplitServer
from splitlm.transport import Message

B, T, D = 2, 5, 64  # tiny-llama's hidden size is 64


def _server(make_config, mode: str) -> SplitServer:
    tail = "1" if mode == "ushape" else "0"
    # No warmup: the first optimizer step already has the full learning rate, so a step that applied
    # leftover gradients would show in the weights.
    overrides = (f"split.mode={mode}", f"split.tail_layers={tail}", "train.warmup_steps=0")
    return build_federation(make_config("run", *overrides)).server


def _hidden(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (B, T, D)), generator=torch.Generator().manual_seed(0))


def _mask(batch: int = B, length: int = T) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.long)


def _labels(batch: int = B, length: int = T) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def _forward(hidden: torch.Tensor, step: int = 0, **extra: torch.Tensor) -> Message:
    return Message("forward", "0", step, 0, {"hidden": hidden, "attention_mask": _mask(), **extra})


def _nan_hidden() -> torch.Tensor:
    hidden = _hidden()
    hidden[1, 3, 7] = float("nan")
    return hidden


def _inf_hidden() -> torch.Tensor:
    hidden = _hidden()
    hidden[0, 0, 0] = float("inf")
    return hidden


BAD_COMMON = {
    "wrong hidden size": (lambda: _forward(_hidden(B, T, D - 1), labels=_labels()), r"expected \(batch, tokens, 64\)"),
    "hidden not 3-d": (lambda: _forward(_hidden(B, T * D), labels=_labels()), r"hidden has shape \(2, 320\)"),
    "NaN hidden": (lambda: _forward(_nan_hidden(), labels=_labels()), "NaN or Inf"),
    "Inf hidden": (lambda: _forward(_inf_hidden(), labels=_labels()), "NaN or Inf"),
    "missing hidden": (lambda: Message("forward", "0", 0, 0, {"attention_mask": _mask()}), "missing tensor 'hidden'"),
    "mask of wrong length": (
        lambda: Message("forward", "0", 0, 0, {"hidden": _hidden(), "attention_mask": _mask(B, T + 1)}),
        r"attention_mask has shape \(2, 6\)",
    ),
    "unknown kind": (lambda: Message("frobnicate", "0", 0, 0, {"hidden": _hidden()}), "unknown request kind"),
    "reply kind sent as request": (lambda: Message("activations", "0", 0, 0, {}), "unknown request kind"),
}
BAD_USHAPE = {
    "backward without forward": (
        lambda: Message("backward", "0", 9, 0, {"grad": _hidden()}),
        "no matching forward; send forward first",
    ),
}
BAD_VANILLA = {
    "labels of wrong shape": (lambda: _forward(_hidden(), labels=_labels(B, T - 1)), r"labels have shape \(2, 4\)"),
    "labels of wrong batch": (lambda: _forward(_hidden(), labels=_labels(B + 1, T)), r"labels have shape \(3, 5\)"),
    "missing labels": (lambda: _forward(_hidden()), "missing tensor 'labels'"),
}


def _assert_rejections_change_nothing(server: SplitServer, bad: dict) -> None:
    before = {k: v.clone() for k, v in trainable_state(server.trunk).items()}
    assert before, "the trunk has LoRA adapters to protect"
    for what, (message, match) in bad.items():
        with pytest.raises(ProtocolError, match=match):
            server.handle(message())
        assert all(p.grad is None for p in trainable_parameters(server.trunk)), f"{what} left gradients behind"
    # A later optimizer step has nothing from the rejected messages to apply.
    server.handle(Message("step", "0", 0, 0, {}, {"grad_sq_norm": 0.0}))
    after = trainable_state(server.trunk)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_ushape_server_rejects_bad_messages_and_stays_unchanged(make_config) -> None:
    server = _server(make_config, "ushape")
    _assert_rejections_change_nothing(server, {**BAD_COMMON, **BAD_USHAPE})


def test_vanilla_server_rejects_bad_messages_and_stays_unchanged(make_config) -> None:
    server = _server(make_config, "vanilla")
    _assert_rejections_change_nothing(server, {**BAD_COMMON, **BAD_VANILLA})


def test_ushape_backward_with_wrong_grad_shape_is_rejected(make_config) -> None:
    server = _server(make_config, "ushape")
    server.handle(_forward(_hidden(), step=1))
    with pytest.raises(ProtocolError, match=r"grad has shape \(2, 5, 63\), expected \(2, 5, 64\)"):
        server.handle(Message("backward", "0", 1, 0, {"grad": _hidden(B, T, D - 1)}))
    assert all(p.grad is None for p in trainable_parameters(server.trunk))


def test_valid_messages_do_change_the_trunk(make_config) -> None:
    """Positive control for the tests above: a well-formed forward/backward/step trains the trunk."""
    server = _server(make_config, "ushape")
    before = {k: v.clone() for k, v in trainable_state(server.trunk).items()}
    reply = server.handle(_forward(_hidden()))
    assert reply.kind == "activations" and reply.tensors["hidden"].shape == (B, T, D)
    reply = server.handle(Message("backward", "0", 0, 0, {"grad": torch.ones(B, T, D)}))
    assert reply.kind == "gradients" and reply.tensors["grad"].shape == (B, T, D)
    server.handle(Message("step", "0", 0, 0, {}, {"grad_sq_norm": 0.0}))
    after = trainable_state(server.trunk)
    assert any(not torch.equal(after[k], v) for k, v in before.items())


# --- gaps found while writing these tests (they fail against the current src/) ------------------------


def test_mask_with_wrong_batch_size_is_rejected(make_config) -> None:
    server = _server(make_config, "ushape")
    message = Message("forward", "0", 0, 0, {"hidden": _hidden(), "attention_mask": _mask(B + 1, T)})
    with pytest.raises(ProtocolError, match="attention_mask"):
        server.handle(message)


def test_vanilla_eval_with_labels_of_wrong_shape_is_rejected(make_config) -> None:
    server = _server(make_config, "vanilla")
    message = Message("eval", "0", -1, 0, {"hidden": _hidden(), "attention_mask": _mask(), "labels": _labels(B, T - 1)})
    with pytest.raises(ProtocolError, match="labels"):
        server.handle(message)


def test_nan_gradient_in_backward_is_rejected(make_config) -> None:
    server = _server(make_config, "ushape")
    server.handle(_forward(_hidden()))
    with pytest.raises(ProtocolError, match="NaN"):
        server.handle(Message("backward", "0", 0, 0, {"grad": torch.full((B, T, D), float("nan"))}))
    assert all(p.grad is None for p in trainable_parameters(server.trunk))


def test_rejected_backward_can_be_retried(make_config) -> None:
    server = _server(make_config, "ushape")
    server.handle(_forward(_hidden()))
    with pytest.raises(ProtocolError, match="grad has shape"):
        server.handle(Message("backward", "0", 0, 0, {"grad": _hidden(B, T, D - 1)}))
    reply = server.handle(Message("backward", "0", 0, 0, {"grad": torch.ones(B, T, D)}))
    assert reply.kind == "gradients"
