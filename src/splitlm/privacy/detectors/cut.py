"""What the passive detectors watch: the server's gradient of each training micro-batch at the cut, token by token,
with the label each token's gradient answers to.

``CutWatcher`` is the common part of the passive detectors (``scrutinizer``, ``splitout``): as a client plugin it
keeps the labels each training micro-batch is trained on (as every plugin's ``labels`` left them, so a SplitGuard
probe's fake labels, which are the ones the loss sees; read in the ``rows`` hook, which comes after them); as a
client mod it keeps the smashed data and mask of each ``forward`` and hands each ``gradients``/``loss`` reply to
``gradient`` as ``CutTokens``: one row per real token, its gradient and its *label*, the next token (a causal LM's
loss at position t is on the token at t+1; the gradient that reaches position t through the residual stream mostly
answers to that term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitlm.data.batch import IGNORE_INDEX
from splitlm.privacy.detectors.base import Detector
from splitlm.runtime.plugins import Micro
from splitlm.transport import Message

Key = tuple[int, int]  # (step, micro-batch)


@dataclass
class CutTokens:
    """One micro-batch's tokens at the cut: ``grads`` (n, d) float32, ``labels`` (n,) the next token of each,
    ``positions`` (n, 2) their (row, position); ``hidden`` (B, T, d) and ``mask`` (B, T) are the whole micro-batch
    (what the client sent) and ``batch_labels`` (B, T) its labels; ``grad`` (B, T, d) the whole reply."""

    step: int
    micro: int
    grads: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor
    batch_labels: torch.Tensor
    grad: torch.Tensor


def cut_tokens(
    step: int, micro: int, grad: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> CutTokens:
    """The real tokens of a (B, T, d) gradient whose next token has a label and whose gradient is not zero."""
    grad = grad.detach().float().cpu()
    mask, labels = mask.detach().cpu().bool(), labels.detach().cpu()
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]  # (B, T): the label of the token after each position
    keep = mask & following.ne(IGNORE_INDEX) & grad.norm(dim=-1).gt(0)
    return CutTokens(
        step, micro, grad[keep], following[keep], keep.nonzero(), hidden.detach().cpu(), mask, labels, grad
    )


class CutWatcher(Detector):
    """A detector that sees every training micro-batch's gradient at the cut as ``CutTokens`` (``gradient``)."""

    def __init__(self) -> None:
        self._labels: dict[Key, torch.Tensor] = {}
        self._sent: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- as a plugin and a mod ----------------------------------------------------------------------------

    def rows(self, micro: Micro) -> torch.Tensor | None:
        if micro.labels is not None:  # the labels as every plugin's ``labels`` left them: what the loss sees
            self._labels[micro.key[1], micro.key[2]] = micro.labels.detach()
            _trim(self._labels)
        return None

    def on_request(self, message: Message) -> Message:
        if message.kind == "forward" and "hidden" in message.tensors and "attention_mask" in message.tensors:
            self._sent[message.step, message.micro] = (message.tensors["hidden"], message.tensors["attention_mask"])
            _trim(self._sent)
        return message

    def on_reply(self, request: Message, reply: Message) -> Message:
        if reply.kind in ("gradients", "loss") and "grad" in reply.tensors:
            key = (request.step, request.micro)
            sent, labels = self._sent.pop(key, None), self._labels.pop(key, None)
            if sent is not None and labels is not None and labels.shape == sent[1].shape:
                hidden, mask = sent
                self.gradient(cut_tokens(request.step, request.micro, reply.tensors["grad"], hidden, mask, labels))
        return reply

    def after_step(self, step: int) -> None:
        self.check(step)

    # --- for the detector ---------------------------------------------------------------------------------

    def gradient(self, tokens: CutTokens) -> None:
        """The server's gradient of one training micro-batch."""
        raise NotImplementedError

    def check(self, step: int) -> None:
        """After the step's optimizer step: score it, and raise ``HijackAlarm`` once alarmed (when told to stop)."""
        raise NotImplementedError


def _trim(pending: dict[Key, object]) -> None:
    while len(pending) > 64:  # forwards whose gradient never came back (want_grad=False, a dropped row)
        pending.pop(next(iter(pending)))
