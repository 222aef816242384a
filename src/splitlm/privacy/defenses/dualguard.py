"""DualGuard (Liu et al., ACL 2025; survey §5.2.2): move the client's parts away from the public pretrained ones while
the task loss keeps their function.

Attacks at the server (SIP, BiSR) start from the public pretrained weights: a head that stays close to them can be
inverted through them. DualGuard moves the client's parameters into a different region first (local warm-up) and
keeps them there during fine-tuning (global retention). Here both are terms of the client's loss, joined to the
head's backward (``head_loss``), while the task loss from the split path keeps the parts useful:

- head (against forward attacks): ``weight * relu(margin - D)`` with ``D`` the mean cosine distance, over the real
  tokens of the micro-batch, between the head's output and the PUBLIC head's output on the same input ids. The
  public head is a frozen copy of the pretrained head loaded from the model source (``DefenseContext.public_stage``),
  never a copy of the possibly resumed or trained one. The hinge stops pushing once ``D`` reaches the margin, so
  the task loss alone shapes the head beyond it;
- tail (U-shape only, against backward attacks that match gradients through the pretrained tail): ``tail_weight *
  relu(tail_margin - R)`` with ``R = ||W - W0|| / ||W0||`` over the tail's adapted weights (parameter space: for
  LoRA ``W - W0`` is the adapter's delta ``B A * scale``, for full tuning the difference from the public tail).

Local warm-up (``local_steps`` > 0, the paper's first phase): before the first split step of a fresh run, the client
trains its head on its own examples through the PUBLIC trunk (loaded on the client for it) and its own tail, on the
task loss plus the head term, with its own Adam (``local_lr``, ``local_batch_size``). The public trunk is what the
server's trunk starts from, so the head it leaves behind still works with it. The chain's token defenses (``tokens``
hooks: dxp, santext, custext) act on its inputs as in training, so a head warmed beside dxp learns from substituted
text; the hooks on word vectors and smashed data (text_obfuscator, noise) do not act in it. Then, for
``warmup_steps`` split steps, both terms keep their full weight (the split path's task loss plus the distance, with
the server's gradient); afterwards they are scaled by ``retention`` (the hinge only acts if training drifts back
within the margin). A resumed run does not warm up again (its head is the trained one), nor does a later step or
micro-batch. Without the local warm-up the very first step's head equals the public one, where the distance has no
gradient; the first task-loss steps break that tie, and 20 split steps move it little (measured below).

The attacker knows the recipe: under the ``public`` threat model the attack context runs the same local warm-up
(``imitate``: these settings, its own seed, its own public text) from the public head and inverts through that
imitation (``AttackContext.imitated_head``). What protects the client is then only how far apart two warm-ups on
different private text and random draws land.

Which parts must be tuned how: LoRA on q/v of a 2-block head barely reshapes its output (the residual stream is
dominated by the token embedding and the unadapted MLPs, as benchmarks/privacy.py notes for NoPeek), so the head
term needs ``lora.head.method=full`` (or a higher rank on every projection, q,k,v,o,gate,up,down) to reach a useful
margin; with LoRA q/v it saturates at a small distance and only adds a constant push. The tail term works with any
trainable tail (LoRA deltas are measured exactly).

Client memory: one frozen copy of the public head, ``bytes = s x (V x d + L_head x P_block)`` (``s`` bytes per
parameter of ``model.client_dtype``, ``V x d`` the token embeddings, ``P_block`` the parameters of one block);
measured on the tiny test model (V=258 byte tokens, d=64, one block of 36,992 parameters, fp32): 214,016 bytes; on
SmolLM2-135M (V=49,152, d=576, 2 blocks of 3,540,096) 35.4 M parameters, about 142 MB in fp32. With full tuning
of the tail a frozen public tail too (``s x (L_tail x P_block + d)``, plus the output matrix when it is not tied).
No extra copy for LoRA tails.
Compute: one extra head forward (no grad) per micro-batch. The local warm-up costs the client, once, the memory of
the public trunk (on SmolLM2-135M 26 blocks of 3,540,096 parameters, about 368 MB in fp32; it stays loaded for
the run) and ``local_steps`` forward and backward passes through the whole model (about 4.5 s a step of 8
sequences of 64 tokens on 2 CPU cores for SmolLM2-135M): the price of not needing the server to move the head.

Measured (default model, the ``base`` settings of benchmarks/privacy.py: PII corpus, 20 split steps at lr 0.001, one
seed, 8 attacked sequences; held-out perplexity 39.2 without a defense):

- without the local warm-up (``lora.head.method=full``, weight 1-10, margin 0.3) the head's cosine distance from the
  public head reached only 0.02-0.03 and SIP stayed at 0.94-0.99;
- with it (``local_steps=60``, lr 3e-4, batches of 8, weight 10): margin 0.5 -> distance 0.58 after the warm-up,
  perplexity 15.0 (-62 %), SIP 0.72 and BiSR(f) 0.72 ROUGE-L, 38 % of the PII entities, against a public attacker
  that did not imitate the warm-up; margin 0.75 -> distance 0.82, perplexity 15.9 (-59 %), SIP 0.72, BiSR(f) 0.75,
  46 % of the entities (every name, 4 of 5 e-mail addresses, no phone, address or account number) against the
  attacker that imitates it. Under ``inside`` (measured at margin 0.5) SIP and BiSR(f) stay at 1.00: the attacker
  holds the head.
- The perplexity gain is, most likely, the warm-up's own training on the client's text (480 sequences against the
  split run's 80); a warm-up without the hinge was not measured. The ROUGE-L left is mostly template text: on this
  corpus (8 sentence templates) a guess that only picks the right template, with no entity in it, scores 0.62.
"""

from __future__ import annotations

import logging
from typing import Self

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from splitlm.data import collate
from splitlm.errors import PrivacyError
from splitlm.models.lowrank import learned_rank
from splitlm.privacy.defenses.base import DEFENSES, DefenseContext, InputDefense
from splitlm.registry import ComponentSettings
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.plugins import Micro

log = logging.getLogger(__name__)


def cosine_distance(hidden: torch.Tensor, public: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of 1 - cos(hidden, public), both (B, T, d); in [0, 2]."""
    real = mask.bool()
    return (1.0 - F.cosine_similarity(hidden[real].float(), public[real].float(), dim=-1)).mean()


def parameter_distance(part: nn.Module, public: nn.Module | None) -> torch.Tensor | None:
    """``||W - W0|| / ||W0||`` over ``part``'s adapted weights (differentiable), or None when nothing is trained.

    LoRA layers (peft) give their delta exactly; any other trainable parameter is compared with the parameter of the
    same name in ``public`` (the pretrained part), which full tuning needs."""
    delta_sq: list[torch.Tensor] = []
    ref_sq: list[torch.Tensor] = []
    lora_params: set[int] = set()
    for module in part.modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            for adapter in getattr(module, "active_adapters", ()):
                if adapter not in module.lora_A:
                    continue
                lora_params.update(id(p) for p in module.lora_A[adapter].parameters())
                lora_params.update(id(p) for p in module.lora_B[adapter].parameters())
                delta_sq.append(module.get_delta_weight(adapter).float().pow(2).sum())
                ref_sq.append(module.get_base_layer().weight.detach().float().pow(2).sum())
    others = [(n, p) for n, p in part.named_parameters() if p.requires_grad and id(p) not in lora_params]
    if others:
        if public is None:
            raise PrivacyError("dualguard: the tail is fully trained but the public tail is unknown")
        reference = dict(public.named_parameters())
        for name, p in others:
            base = reference.get(name)
            if base is not None and base.shape == p.shape:
                delta_sq.append((p.float() - base.detach().float()).pow(2).sum())
                ref_sq.append(base.detach().float().pow(2).sum())
    if not delta_sq:
        return None
    return (torch.stack(delta_sq).sum() / torch.stack(ref_sq).sum().clamp_min(1e-12)).clamp_min(1e-20).sqrt()


@DEFENSES.component
class DualGuard(InputDefense):
    name = "dualguard"

    class Settings(ComponentSettings):
        weight: float = Field(1.0, ge=0, description="Weight of the head term during the warm-up.")
        margin: float = Field(
            0.3,
            gt=0,
            le=2,
            description="Target mean cosine distance between the head's output and the public head's (hinge).",
        )
        warmup_steps: int = Field(20, ge=0, description="Steps of local warm-up, with the terms at full weight.")
        retention: float = Field(
            0.2, ge=0, description="Factor of both terms after the warm-up (global retention; 0: none)."
        )
        tail_weight: float | None = Field(
            None,
            ge=0,
            description="Weight of the tail term (U-shape only); default: 1.0 in a ushape split, none in vanilla.",
        )
        tail_margin: float = Field(
            0.05, gt=0, description="Target relative distance ||W - W0|| / ||W0|| of the tail's adapted weights."
        )
        local_steps: int = Field(
            0,
            ge=0,
            description="Steps of the paper's LOCAL warm-up before split training: the client trains its head on its "
            "own examples through the public trunk (loaded on the client once) and its tail, with the task loss plus "
            "the head term; 0: none (the warm-up is the first warmup_steps of split training only).",
        )
        local_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the local warm-up.")
        local_batch_size: int = Field(8, ge=1, description="Sequences per local warm-up step.")

    @classmethod
    def problems(cls, settings: Settings, config: object, framework: object) -> list[str]:
        found = super().problems(settings, config, framework)
        if found or config is None:
            return found
        prefix = f"privacy.defenses.{cls.name}"
        mode = config.split.mode  # type: ignore[attr-defined]
        if settings.tail_weight and mode != "ushape":
            found.append(
                f"{prefix}.tail_weight: a {mode} split has no client tail; drop tail_weight or set split.mode=ushape"
            )
        if learned_rank(config) is not None:  # type: ignore[arg-type]
            found.append(
                f"{prefix}: compares the head's output with the public head's, which split.bottleneck changes in "
                "width; drop split.bottleneck or dualguard"
            )
        if config.lora.part("head").method == "frozen" and settings.weight > 0:  # type: ignore[attr-defined]
            found.append(f"{prefix}: moves the head, but lora.head.method=frozen; set it to full or lora")
        return found

    @classmethod
    def create(cls, settings: Settings, context: DefenseContext) -> Self:
        return cls(context, settings)

    def __init__(self, context: DefenseContext, settings: Settings) -> None:
        self.context = context
        self.settings = settings
        tail = settings.tail_weight if settings.tail_weight is not None else (1.0 if context.mode == "ushape" else 0.0)
        self.tail_weight = float(tail) if context.mode == "ushape" and "tail" in context.parts else 0.0
        self.head_distances: list[float] = []
        self.tail_distance: float | None = None
        self.local_distance: float | None = None  # the head's distance after the local warm-up (None: none ran)

    def factor(self, step: int) -> float:
        return 1.0 if step < self.settings.warmup_steps else self.settings.retention

    def public_head(self) -> nn.Module:
        """The frozen public head (built only where the defense trains: an attacker's copy of the defenses, which
        runs only their message hooks, never needs it)."""
        if self.context.public_stage is None:
            raise PrivacyError("dualguard: this client has no public pretrained head to move away from")
        return self.context.public_stage("head")

    def on_forward(self, key: tuple[str, int, int], training: bool) -> None:
        """Before the first training forward of a fresh run (step 0, micro-batch 0), the local warm-up."""
        ctx = self.context  # an attacker's copy of the defenses has no parts: its imitation is ``imitate``
        fresh = training and key[1:] == (0, 0) and self.local_distance is None and bool(self.settings.local_steps)
        if fresh and "head" in ctx.parts and ctx.public_stage is not None and ctx.examples:
            self.local_distance = self.local_warmup(ctx)

    def imitate(self, context: DefenseContext) -> bool:
        """The defense-aware public attacker runs the same local warm-up (these settings) from the public head on its
        own public text (``context``: a trainable copy of the public head, the public tail, public examples)."""
        if not self.settings.local_steps:
            return False
        self.local_warmup(context)
        return True

    def local_warmup(self, ctx: DefenseContext) -> float:
        """The paper's local warm-up: ``local_steps`` Adam steps on the trainable parameters of ``ctx.parts["head"]``,
        on ``ctx.examples`` through the PUBLIC trunk and the context's tail (both frozen here), minimising the task
        loss plus ``weight * relu(margin - D)``. The head leaves the public one while the public trunk still reads
        it, so the split training that follows starts from a head the public weights do not describe. Returns the
        head's distance ``D`` at the last step."""
        head = ctx.parts["head"]
        trainable = [p for p in head.parameters() if p.requires_grad]
        if not trainable or ctx.public_stage is None:
            raise PrivacyError(
                "dualguard: local_steps trains the head through the public trunk, but the head has nothing "
                "trainable or the trunk is unknown; set lora.head.method=full"
            )
        public_head, trunk = ctx.public_stage("head"), ctx.public_stage("trunk")
        tail = ctx.parts.get("tail") if ctx.mode == "ushape" else None
        device = trainable[0].device
        size, total_examples = self.settings.local_batch_size, len(ctx.examples)
        order = torch.randperm(total_examples, generator=ctx.generator(_WARMUP_SALT)).tolist()
        optimizer = torch.optim.Adam(trainable, lr=self.settings.local_lr)
        distance = torch.zeros(())
        was_training = head.training
        head.train()
        for step in range(self.settings.local_steps):
            picked = [ctx.examples[order[(step * size + j) % total_examples]] for j in range(size)]
            batch = collate(picked, ctx.pad_id).to(device)
            mask = batch.attention_mask
            ids = batch.input_ids if ctx.tokens is None else ctx.tokens(batch.input_ids, mask, "local", step)
            with torch.no_grad():
                public = public_head(input_ids=ids, attention_mask=mask)
            hidden = head(input_ids=ids, attention_mask=mask)  # on the ids the token defenses let through (dxp)
            out = trunk(hidden_states=hidden, attention_mask=mask)  # loaded in the head's dtype
            if tail is not None:
                out = tail(hidden_states=out, attention_mask=mask)
            total, count = causal_lm_loss(out, batch.labels)
            distance = cosine_distance(hidden, public, mask)
            loss = total / max(count, 1) + self.settings.weight * F.relu(self.settings.margin - distance)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)  # the trunk and tail keep no gradient
            for p, g in zip(trainable, grads, strict=True):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0 or step == self.settings.local_steps - 1:
                task = float(total.detach()) / max(count, 1)
                log.info(
                    "dualguard: local warm-up step %d/%d: task loss %.3f, head distance %.3f",
                    step + 1, self.settings.local_steps, task, float(distance.detach()),
                )  # fmt: skip
        head.train(was_training)
        return float(distance.detach())

    def report(self) -> dict[str, float | None]:
        return {"local_distance": self.local_distance}

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        hidden, batch = micro.hidden, micro.batch
        if hidden is None or not hidden.requires_grad:
            return None
        factor = self.factor(micro.step)
        mask = batch.attention_mask.to(hidden.device)
        with torch.no_grad():
            public = self.public_head()(input_ids=batch.input_ids.to(hidden.device), attention_mask=mask)
        distance = cosine_distance(hidden, public, mask)
        self.head_distances.append(float(distance.detach()))
        terms = [self.settings.weight * factor * F.relu(self.settings.margin - distance)]
        if self.tail_weight > 0 and micro.key[2] == 0:  # a parameter term: once per step
            tail = self.context.parts["tail"]
            public_tail = self.context.public_stage("tail") if _fully_trained(tail) else None  # type: ignore[misc]
            r = parameter_distance(tail, public_tail)
            if r is not None:
                self.tail_distance = float(r.detach())
                terms.append(self.tail_weight * factor * F.relu(self.settings.tail_margin - r))
        term = terms[0] * micro.scale
        if len(terms) > 1:
            term = term + terms[1]
        return term if term.requires_grad else None

    def step_metrics(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.head_distances:
            out["dualguard_head_distance"] = sum(self.head_distances) / len(self.head_distances)
            self.head_distances = []
        if self.tail_distance is not None:
            out["dualguard_tail_distance"] = self.tail_distance
            self.tail_distance = None
        return out


_WARMUP_SALT = 0x6477  # the warm-up's own random stream (the order of the client's examples)


def _fully_trained(part: nn.Module) -> bool:
    """Whether ``part`` trains weights other than LoRA adapters (then its distance needs the public part)."""
    return any(p.requires_grad and "lora_" not in name for name, p in part.named_parameters())
