"""SplitSpy (Fu et al., NDSS 2023; the survey's §5.1.1 and §5.2.3): FSHA that a label-probing detector does not see.

SplitGuard (``splitlm.privacy.detectors.splitguard``) catches FSHA because FSHA's forged gradients ignore the labels:
a probe batch with random labels gets the same kind of gradient as any other. SplitSpy keeps a *shadow* of the
legitimate model to tell the client's fake batches from its real ones, answers the fake ones with the honest
gradient (so they react to their labels, as SplitGuard expects) and the real ones with FSHA's forged gradient (so
the hijacking goes on). The paper's shadow is a model trained on the task; its fake samples are those with the
highest loss. For an LM the shadow is public: the pretrained model and public text (``PublicKnowledge``). It
judges each *row* of a micro-batch (SplitGuard fakes whole batches; a row is the paper's sample):

- the candidate labels: the ``frequent`` most frequent tokens of the public auxiliary text (the same text FSHA trains
  its pilot on) and, in U-shape, the ``predicted`` tokens the shadow tail ranks highest at each position;
- vanilla split: the server sees the labels. A row's *coverage* is the share of its labels among the frequent tokens
  (real text is mostly frequent tokens; uniformly random labels almost never are): the shadow's loss, made robust;
- U-shape: the labels stay on the client, but before answering the server receives the client's gradient of its
  trunk output, g_t = J_t^T (p_t - e_{y_t}) / N at each position (J_t: the tail's Jacobian, p_t its softmax, y_t the
  label of the next token). With the public tail as the shadow (the client's tail starts from it: its LoRA
  adapters start at zero), the server forms the same gradient for each candidate label c,
  J_t^T (p_t - e_c) = J_body^T (W^T p_t - W_c) (W: the LM head; one backward of the tail's blocks per candidate),
  and a position counts as covered when one candidate's gradient points the same way as g_t (cosine >=
  ``match_cosine``): its label was recovered among the candidates. The coverage is the covered positions' share of
  the row's gradient norm (a position without a label of its own, e.g. in an instruction's prompt, gets only what the
  tail's attention carries back from later positions: a small norm, and no candidate matches it).

A row whose coverage is below ``threshold`` is a probe. The default threshold sits halfway between the frequent
tokens' share of the public text and their share under uniformly random labels (``frequent / vocab``), both known to
the server: nothing is tuned on the client's data. Everything else is FSHA's (``splitlm.privacy.attacks.fsha``, which
this class extends): the pilot, decoder and discriminator train on every batch; only the gradient returned for
the probe rows is the honest one. ``report`` adds the rows judged and flagged.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from splitlm.config import Config
from splitlm.data.batch import IGNORE_INDEX
from splitlm.models import ModelSource, Stage
from splitlm.models.families import get_module
from splitlm.privacy.attacks.fsha import Fsha, FshaSettings
from splitlm.privacy.server_attack import SERVER_ATTACKS
from splitlm.privacy.tap import Key
from splitlm.transport import Answer, Handler, Message
from splitlm.transport.base import then

log = logging.getLogger(__name__)


class SplitSpySettings(FshaSettings):
    frequent: int = Field(32, ge=1, description="Most frequent public tokens among the candidate labels.")
    predicted: int = Field(
        8, ge=0, description="U-shape: the shadow tail's top predictions at each position added to the candidates."
    )
    match_cosine: float = Field(
        0.9,
        gt=0,
        le=1,
        description="U-shape: a position's label counts as recovered when a candidate's gradient has at least this "
        "cosine with the client's gradient of the trunk output.",
    )
    threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="A row whose coverage (share of its labels among the candidates) is below this is taken for a "
        "fake probe row; default: halfway between the public text's coverage and random labels'.",
    )


@SERVER_ATTACKS.component
class SplitSpy(Fsha):
    """FSHA with a shadow model: honest gradients for the rows it takes for SplitGuard's probes, forged ones else."""

    name = "splitspy"
    former_keys = ()
    Settings = SplitSpySettings

    @classmethod
    def problems(cls, settings: SplitSpySettings, config: Config, framework: Any) -> list[str]:
        found = [p.replace("privacy.server_attack.fsha", "privacy.server_attack.splitspy")
                 for p in super().problems(settings, config, framework)]  # fmt: skip
        if config.split.mode == "ushape" and config.split.bottleneck:
            found.append(
                "privacy.server_attack.splitspy: its shadow is the public tail, which a learned bottleneck at the cut "
                "(split.bottleneck) does not fit: drop one of them"
            )
        return found

    @classmethod
    def create(cls, settings: SplitSpySettings, config: Config, source: ModelSource, trunk: Stage) -> SplitSpy:
        return cls(settings, config, source, trunk)

    def __init__(self, settings: SplitSpySettings, config: Config, source: ModelSource, trunk_stage: Stage) -> None:
        super().__init__(settings, config, source, trunk_stage)
        self.settings: SplitSpySettings = settings
        self.mode = config.split.mode
        labels = torch.cat([b.labels[b.labels.ne(IGNORE_INDEX)].flatten().cpu() for b in self.aux])
        vocab = int(self.knowledge.token_embeddings().shape[0])
        counts = torch.bincount(labels, minlength=vocab)
        k = min(settings.frequent, vocab)
        self.frequent = counts.topk(k).indices.to(self.device)  # (K,)
        public_coverage = float(counts[self.frequent.cpu()].sum()) / max(int(counts.sum()), 1)
        self.public_coverage = public_coverage
        self.threshold = settings.threshold if settings.threshold is not None else (public_coverage + k / vocab) / 2
        self.shadow: Stage | None = self.knowledge.public_stage("tail") if self.mode == "ushape" else None
        self._trunk_out: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}  # U-shape: trunk output and mask
        self._probe_rows: dict[Key, torch.Tensor] = {}  # (B,) bool: rows taken for probes
        self.rows_judged = 0
        self.rows_flagged = 0
        self.flagged_by_step: dict[int, list[int]] = {}  # step (from 1) -> [rows flagged, rows judged]
        self._judge_lock = threading.Lock()
        log.info(
            "SplitSpy: %d frequent public tokens cover %.0f%% of public text; rows below %.2f coverage are taken for "
            "probes", k, 100 * public_coverage, self.threshold,
        )  # fmt: skip

    # --- the wrapper ---------------------------------------------------------------------------------------

    def serve(self, message: Message, call_next: Handler) -> Answer:
        key = message.key
        if message.kind == "forward" and "labels" in message.tensors:  # vanilla: the labels come along
            self._remember(key, self.judge_labels(message.tensors["labels"]))
        elif message.kind == "backward" and "grad" in message.tensors:  # U-shape: the client's gradient
            with self._judge_lock:
                kept = self._trunk_out.pop(key, None)
            if kept is not None:
                self._remember(key, self.judge_gradient(message.tensors["grad"], *kept))
        if message.kind == "forward" and self.mode == "ushape" and "hidden" in message.tensors:
            mask = message.tensors.get("attention_mask")

            def keep_output(inner: Message) -> Answer:
                return then(call_next(inner), lambda reply: self._keep(key, reply, mask))

            return super().serve(message, keep_output)
        return super().serve(message, call_next)

    def _keep(self, key: Key, reply: Message, mask: torch.Tensor | None) -> Message:
        if reply.kind == "activations" and "hidden" in reply.tensors:
            hidden = reply.tensors["hidden"].detach()
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long)
            with self._judge_lock:
                self._trunk_out[key] = (hidden, mask)
                while len(self._trunk_out) > 64:
                    self._trunk_out.pop(next(iter(self._trunk_out)))
        return reply

    def _remember(self, key: Key, rows: torch.Tensor) -> None:
        with self._judge_lock:
            self.rows_judged += int(rows.numel())
            self.rows_flagged += int(rows.sum())
            counts = self.flagged_by_step.setdefault(key[1] + 1, [0, 0])
            counts[0] += int(rows.sum())
            counts[1] += int(rows.numel())
            self._probe_rows[key] = rows
            while len(self._probe_rows) > 64:
                self._probe_rows.pop(next(iter(self._probe_rows)))

    def _forge(self, key: Key, reply: Message) -> Message:
        forged = super()._forge(key, reply)
        if forged is reply or reply.kind not in ("gradients", "loss"):
            return forged
        with self._judge_lock:
            rows = self._probe_rows.pop(key, None)
        if rows is None or not bool(rows.any()):
            return forged
        honest, fake = reply.tensors["grad"], forged.tensors["grad"]
        if rows.numel() != honest.shape[0]:
            return forged
        grad = torch.where(rows.to(honest.device).view(-1, *([1] * (honest.dim() - 1))), honest, fake)
        return Message(forged.kind, forged.client_id, forged.step, forged.micro, {**forged.tensors, "grad": grad},
                       dict(forged.meta))  # fmt: skip

    # --- the shadow ------------------------------------------------------------------------------------------

    def judge_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Vanilla: (B,) True for the rows of (B, T) labels that look like fake ones."""
        labels = labels.to(self.device)[:, 1:]  # the loss's targets
        real = labels.ne(IGNORE_INDEX)
        covered = torch.isin(labels, self.frequent) & real
        coverage = covered.sum(1).float() / real.sum(1).clamp_min(1).float()  # (B,)
        return (coverage < self.threshold) & real.any(1)

    def judge_gradient(self, grad: torch.Tensor, trunk_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """U-shape: (B,) True for the rows whose gradient of the trunk output (B, T, d) answers to labels the shadow
        cannot recover among its candidates."""
        return self.coverage(grad, trunk_out, mask) < self.threshold

    def coverage(self, grad: torch.Tensor, trunk_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) share of each row's gradient (positions weighted by their gradient's norm) whose label the shadow
        recovers."""
        assert self.shadow is not None
        shadow = self.shadow
        head = get_module(shadow, shadow.family.final[-1])  # the LM head: logits = h W^T
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        g = grad.detach().to(self.device, torch.float32)  # (B, T, d)
        try:
            with torch.enable_grad():
                x = trunk_out.detach().to(self.device, shadow.dtype).requires_grad_(True)
                logits = shadow(hidden_states=x, attention_mask=mask.to(self.device)).float()  # (B, T, V)
        finally:
            hook.remove()
        h = captured[0]  # (B, T, d): the input of the LM head
        weight = head.weight.float()  # (V, d)
        with torch.no_grad():
            p_w = torch.softmax(logits, dim=-1) @ weight  # (B, T, d): W^T p
            ranked = logits.topk(min(self.settings.predicted, logits.shape[-1]), dim=-1).indices  # (B, T, P)
        active = g.norm(dim=-1) > 0  # (B, T)
        if mask is not None:
            active &= mask.to(self.device).bool()
        best = torch.full(active.shape, -1.0, device=self.device)
        candidates = [self.frequent[i].expand(active.shape) for i in range(len(self.frequent))]
        candidates += [ranked[..., i] for i in range(ranked.shape[-1])]
        for index, candidate in enumerate(candidates):
            vector = (p_w - weight[candidate]).to(h.dtype)  # (B, T, d): dLoss/dh for that label, up to a scale
            (expected,) = torch.autograd.grad(h, x, vector, retain_graph=index < len(candidates) - 1)
            best = torch.maximum(best, F.cosine_similarity(expected.float(), g, dim=-1))
        covered = (best >= self.settings.match_cosine) & active
        weight = g.norm(dim=-1) * active  # (B, T): positions without a label of their own (a prompt's) get only
        return (weight * covered).sum(1) / weight.sum(1).clamp_min(1e-30)  # the tail's attention's small share

    def report(self) -> dict[str, Any]:
        by_step = {str(step): counts for step, counts in sorted(self.flagged_by_step.items())}
        return {**super().report(), "rows_judged": self.rows_judged, "rows_flagged": self.rows_flagged,
                "flagged_by_step": by_step}  # fmt: skip
