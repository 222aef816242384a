"""What an attacker at the server knows without the client's help: its public knowledge.

Both kinds of attacker read it. The honest-but-curious server of ``splitlm attack`` (``privacy.attacks``)
attacks a recorded run offline; the malicious server of FSHA (``privacy.attacks.fsha``) is installed by
name (``privacy.server_attack``) and attacks while the run trains. Each knows the public pretrained weights
of the whole model (not the client's fine-tuned adapters), where the run cuts it, and public auxiliary text
of the same kind as the client's. ``PublicKnowledge`` holds that, loads each pretrained part once and keeps a
cache of what is derived from it.

This module imports only the config, data, models, errors and files layers (never the attacks, frameworks,
runtime, deploy or CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import torch

from splitlm.config import Config, load_config
from splitlm.data import Batch, collate, load_rows, split_rows, tokenize_rows
from splitlm.errors import PrivacyError
from splitlm.models import ModelSource, Stage, load_stage, resolve_model
from splitlm.models.split import Role, SplitSpec


class PublicKnowledge:
    """The attacker's knowledge: the run's config, the pretrained parts, public auxiliary text, a cache.

    ``run_dir`` is the run's output directory when the knowledge was read from one (``from_run``), else
    ``None``; attacks keep what they train under it (``RUN_DIR/attacks/cache``) so that a later process
    reuses it.
    """

    def __init__(
        self, config: Config, source: ModelSource | None = None, device: str = "cpu", run_dir: Path | None = None
    ) -> None:
        self.config = config
        self.source = source or resolve_model(config.model.name, config.model.revision, config.model.trust_remote_code)
        self.tokenizer = self.source.tokenizer()
        self.device = torch.device(device)
        self.spec = SplitSpec(config.split.mode, config.split.head_layers, config.split.tail_layers)
        self.run_dir = run_dir
        self.cache: dict[Any, Any] = {}  # e.g. a trained SIP inverter, shared by BiSR(b)
        self._stages: dict[str, Stage] = {}

    @classmethod
    def from_run(cls, run_dir: Path, device: str = "cpu") -> Self:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise PrivacyError(f"{run_dir} is not a run directory ({path} missing); give the output_dir of a run")
        return cls(load_config(path), device=device, run_dir=run_dir)

    def stage(self, role: Role) -> Stage:
        """A pretrained part (public weights, no adapters), frozen and in eval mode, in float32."""
        if role == "tail" and self.spec.mode != "ushape":
            raise PrivacyError("this attack needs the client's tail, which only a ushape split has")
        if role not in self._stages:
            stage = load_stage(
                self.source, self.spec, role, "float32", self.device, self.config.model.attn_implementation
            )
            self._stages[role] = stage.eval()
        return self._stages[role]

    def token_embeddings(self) -> torch.Tensor:
        return self.stage("head").token_embeddings().detach()  # (V, d)

    def aux_batches(self, rows: int, batch_size: int, name: str | None = None) -> list[Batch]:
        """Public text for the attacker: ``name`` (a data name), else rows of the run's dataset the client
        never trained on (those past ``data.max_rows``, or else its held-out rows)."""
        key = ("aux_batches", rows, batch_size, name)
        if key not in self.cache:  # SIP, the nn dictionary and FSHA read the same public text
            self.cache[key] = self._aux_batches(rows, batch_size, name)
        return self.cache[key]

    def _aux_batches(self, rows: int, batch_size: int, name: str | None) -> list[Batch]:
        data = self.config.data
        if name:
            pool = load_rows(data.model_copy(update={"name": name, "max_rows": None}))
        else:
            everything = load_rows(data.model_copy(update={"max_rows": None}))
            if data.max_rows is not None and len(everything) > data.max_rows:
                pool = everything[data.max_rows :]
            else:
                pool = split_rows(everything, data.eval_size, self.config.seed)[1]
        examples = tokenize_rows(pool[:rows], self.tokenizer, data, self.config.train.seq_len)
        if not examples:
            raise PrivacyError("no auxiliary text for the attacker: pass aux=<data name> with public text")
        pad = int(self.tokenizer.pad_token_id)
        return [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        return self.tokenizer.decode([int(t) for t in ids[mask.bool()]])
