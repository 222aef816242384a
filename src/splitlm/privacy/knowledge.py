"""What an attacker at the server knows without the client's help: its public knowledge, per threat model.

Both kinds of attacker read it. The honest-but-curious server of ``splitlm attack`` (``privacy.attacks``)
attacks a recorded run offline; the malicious server of FSHA (``privacy.attacks.fsha``) is installed by
name (``privacy.server_attack``) and attacks while the run trains. Each knows where the run cuts the model,
public auxiliary text of the same kind as the client's, and the run's config (its defenses and their settings
included). What it knows of the client's parts depends on the threat model (``THREAT_MODELS``):

- ``public``: only the public pretrained weights of the whole model (not the client's fine-tuned adapters);
- ``inside``: also the client's *current* parts, head (and tail in U-shape): the pretrained parts with the run's
  adapters (``RUN_DIR/adapters``) merged in, as a server that colludes with the fed server or with one client
  in SFL (every client receives the aggregated client side) or with the next client in sequential SL holds them.
  The trunk is the server's own either way.

``PublicKnowledge`` holds that, loads each part once and keeps a cache of what is derived from it.

This module imports only the config, data, models, peft, errors and files layers (never the attacks,
frameworks, runtime, deploy or CLI).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Self

import torch

from splitlm.config import Config, load_config
from splitlm.data import Batch, Example, collate, load_rows, split_rows, tokenize_rows
from splitlm.errors import CheckpointError, PrivacyError
from splitlm.models import ModelSource, Stage, load_stage, resolve_model
from splitlm.models.lowrank import add_bottleneck, learned_rank
from splitlm.models.split import Role, SplitSpec
from splitlm.peft import adapters_client, load_trainable, make_trainable, merged, trainable_parameters

ThreatModel = Literal["public", "inside"]
THREAT_MODELS: tuple[ThreatModel, ...] = ("public", "inside")


class PublicKnowledge:
    """The attacker's knowledge: the run's config, its parts per threat model, public auxiliary text, a cache.

    ``run_dir`` is the run's output directory when the knowledge was read from one (``from_run``), else
    ``None``; attacks keep what they train under it (``RUN_DIR/attacks/cache``) so that a later process
    reuses it. ``threat_model`` (``THREAT_MODELS``) says which client parts ``stage`` gives; under ``inside``
    they are read from ``client_dir/adapters`` (or ``client_dir`` itself when it holds the adapter files),
    by default ``run_dir/adapters``: a networked run's client writes its adapters in its own output folder.
    """

    def __init__(
        self,
        config: Config,
        source: ModelSource | None = None,
        device: str = "cpu",
        run_dir: Path | None = None,
        threat_model: str = "public",
        client_dir: Path | None = None,
    ) -> None:
        if threat_model not in THREAT_MODELS:
            raise PrivacyError(f"unknown threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
        self.config = config
        self.source = source or resolve_model(config.model.name, config.model.revision, config.model.trust_remote_code)
        self.tokenizer = self.source.tokenizer()
        self.device = torch.device(device)
        self.spec = SplitSpec(config.split.mode, config.split.head_layers, config.split.tail_layers)
        self.run_dir = run_dir
        self.threat_model: ThreatModel = threat_model  # type: ignore[assignment]
        self.client_dir = client_dir
        self.cache: dict[Any, Any] = {}  # e.g. a trained SIP inverter, shared by BiSR(b)
        self._stages: dict[str, Stage] = {}
        self._public: dict[str, Stage] = {}
        self._trunks: dict[Path, Stage] = {}
        self._fingerprint: str | None = None
        # inside: found now, so a context that cannot know the client's parts fails at once, in one line
        self._adapters = self._find_adapters() if threat_model == "inside" else None

    @classmethod
    def from_run(
        cls, run_dir: Path, device: str = "cpu", threat_model: str = "public", client_dir: Path | None = None
    ) -> Self:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise PrivacyError(f"{run_dir} is not a run directory ({path} missing); give the output_dir of a run")
        return cls(load_config(path), device=device, run_dir=run_dir, threat_model=threat_model, client_dir=client_dir)

    def adapters_dir(self) -> Path:
        """The folder with the client's adapter files (``head.safetensors``, ``tail.safetensors``), for ``inside``."""
        return self._adapters if self._adapters is not None else self._find_adapters()

    def _find_adapters(self) -> Path:
        base = self.client_dir if self.client_dir is not None else self.run_dir
        if base is None:
            raise PrivacyError(
                "the inside threat model needs the client's adapters: read the context from a run directory "
                "(from_run) or pass client_dir"
            )
        for folder in (base / "adapters", base):
            if (folder / "head.safetensors").is_file() or (folder / "client.json").is_file():
                return folder
        raise PrivacyError(
            f"the inside threat model needs the client's adapters, but {base} has no adapters/ with head.safetensors "
            "(the run did not finish, or its client wrote them elsewhere: pass --client-dir with the client's output)"
        )

    def public_stage(self, role: Role) -> Stage:
        """A pretrained part (public weights, no adapters), frozen and in eval mode, in float32."""
        if role == "tail" and self.spec.mode != "ushape":
            raise PrivacyError("this attack needs the client's tail, which only a ushape split has")
        if role not in self._public:
            stage = load_stage(
                self.source, self.spec, role, "float32", self.device, self.config.model.attn_implementation
            )
            self._public[role] = stage.eval()
        return self._public[role]

    def stage(self, role: Role) -> Stage:
        """The attacker's copy of a part, frozen and in eval mode, in float32: under ``public`` the pretrained
        part; under ``inside`` the client's head and tail are its current ones (adapters merged), the trunk
        stays public."""
        if self.threat_model == "public" or role == "trunk":
            return self.public_stage(role)
        if role == "tail" and self.spec.mode != "ushape":
            raise PrivacyError("this attack needs the client's tail, which only a ushape split has")
        if role not in self._stages:
            self._stages[role] = client_stage(self.config, self.source, role, self.adapters_dir(), self.device)
        return self._stages[role]

    def trained_trunk(self, path: Path | None = None) -> Stage:
        """The server's own trained trunk, frozen and in eval mode, in float32: the pretrained trunk with the trunk
        adapter ``path`` (default ``RUN_DIR/adapters/trunk.safetensors``, the adapter the run's global client side
        trained with; a checkpoint's ``server/trunk-NAME.safetensors`` for another) merged in. The server holds it
        under every threat model: it trained it."""
        if path is None:
            if self.run_dir is None:
                raise PrivacyError("the server's trained trunk is read from a run directory: use from_run or pass path")
            path = self.run_dir / "adapters" / "trunk.safetensors"
        if not path.is_file():
            raise PrivacyError(
                f"{path} not found: the run did not finish or trained no trunk adapter (lora.trunk.method=frozen); "
                "membership inference needs the server's trained trunk"
            )
        if path not in self._trunks:
            owner = adapters_client(path.parent) if (path.parent / "client.json").is_file() else 0
            own = self.config.for_client(owner)
            if self.config.framework.clients and own.split != self.config.split:
                raise PrivacyError(
                    "the clients of this run have their own cuts (framework.clients): the server's trunk covers "
                    "blocks the attacker's public parts also hold; attack a run with one cut"
                )
            last: CheckpointError | None = None
            # a shared trunk adapter has the run's LoRA rank, one of a client's own that client's
            for config in (self.config, own) if own is not self.config else (self.config,):
                try:
                    self._trunks[path] = rebuilt_stage(config, self.source, "trunk", path, self.device)
                    break
                except CheckpointError as error:
                    last = error
            else:
                raise PrivacyError(f"{path} does not fit this run's trunk ({last})")
        return self._trunks[path]

    def client_fingerprint(self) -> str | None:
        """Under ``inside``, a hash of the client's adapter files (what the attacker's parts are made of, and any
        saved defense state beside them); ``None`` under ``public``."""
        if self.threat_model == "public":
            return None
        if self._fingerprint is None:
            digest = hashlib.sha256()
            folder = self.adapters_dir()
            for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("client.json")):
                if path.name in ("trunk.safetensors", "optimizer.safetensors"):
                    continue  # the server's own part, and the client's optimizer, shape nothing the attacker uses
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def token_embeddings(self) -> torch.Tensor:
        return self.stage("head").token_embeddings().detach()  # (V, d): the client's own under inside

    def aux_batches(self, rows: int, batch_size: int, name: str | None = None) -> list[Batch]:
        """Public text for the attacker: ``name`` (a data name), else rows of the run's dataset the client
        never trained on (those past ``data.max_rows``, or else its held-out rows)."""
        key = ("aux_batches", rows, batch_size, name)
        if key not in self.cache:  # SIP, the nn dictionary and FSHA read the same public text
            examples = self.aux_examples(rows, name)
            pad = int(self.tokenizer.pad_token_id)
            self.cache[key] = [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
        return self.cache[key]

    def aux_examples(self, rows: int, name: str | None = None) -> list[Example]:
        """The first ``rows`` rows of the attacker's public text (``aux_batches``), tokenized as the run tokenizes
        (each with its class label where the data has one)."""
        key = ("aux_examples", rows, name)
        if key not in self.cache:
            self.cache[key] = self._aux_examples(rows, name)
        return self.cache[key]

    def _aux_examples(self, rows: int, name: str | None) -> list[Example]:
        data = self.config.data
        if name:
            pool = load_rows(data.model_copy(update={"name": name, "max_rows": None}), self.config.seed)
        else:
            everything = load_rows(data.model_copy(update={"max_rows": None}), self.config.seed)
            if data.max_rows is not None and len(everything) > data.max_rows:
                pool = everything[data.max_rows :]
            else:
                pool = split_rows(everything, data.eval_size, self.config.seed)[1]
        if not pool[:rows]:
            raise PrivacyError("no auxiliary text for the attacker: pass aux=<data name> with public text")
        return tokenize_rows(pool[:rows], self.tokenizer, data, self.config.train.seq_len)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        return self.tokenizer.decode([int(t) for t in ids[mask.bool()]])


def client_stage(config: Config, source: ModelSource, role: Role, adapters: Path, device: torch.device) -> Stage:
    """The client's current ``role`` part (head or tail) in float32: its pretrained part, made trainable as in
    training (``lora.<role>``, a ``split.bottleneck``'s half at its cut), the adapter from ``adapters`` loaded and
    merged in (peft's merge), frozen and in eval mode. ``adapters/client.json`` says whose side it is (a client
    of ``framework.clients`` may have its own cut and rank); ``splitlm generate`` rebuilds parts the same way."""
    own = config.for_client(adapters_client(adapters))
    return rebuilt_stage(own, source, role, adapters / f"{role}.safetensors", device)


def rebuilt_stage(config: Config, source: ModelSource, role: Role, path: Path, device: torch.device) -> Stage:
    """A trained part rebuilt from its adapter file ``path`` in float32: its pretrained part cut as ``config`` says,
    made trainable as in training (``lora.<role>``, a ``split.bottleneck``'s halves at its cuts), the adapter loaded
    and merged in (peft's merge), frozen and in eval mode."""
    tail = config.split.tail_layers if config.split.mode == "ushape" else 0
    spec = SplitSpec(config.split.mode, config.split.head_layers, tail)
    stage = load_stage(source, spec, role, "float32", device, config.model.attn_implementation)
    rank = learned_rank(config)
    if rank is not None:
        add_bottleneck(stage, source, rank)
    part = make_trainable(
        stage, config.lora.part(role), stage.family.lora_targets, config.seed, role, stage.bottleneck_modules()
    )
    if trainable_parameters(part):
        load_trainable(part, path)
    plain = merged(part)
    if not isinstance(plain, Stage):
        raise PrivacyError(f"the {role} did not rebuild into a stage (got {type(plain).__name__})")
    plain.requires_grad_(False)
    return plain.eval()
