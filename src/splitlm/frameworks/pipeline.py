"""The one factory of the message pipeline: both sides' mods and the client's plugins, from a config.

Every transport (in-process, gRPC, Ray) gets its chains here, so a run behaves the same however its bytes
travel. The order, from the client's training code to the server's handler::

    client:  [client attacks] -> defenses (smashed data, labels, gradients) -> detectors -> codec -> meter -> [link]
             -> transport
    server:  transport -> codec -> protocols (three_tier) -> tap -> server attack (FSHA) -> the remedies' mods
             -> SplitServer

The meter is the client's last mod, so it counts what travels (encoded bytes); the tap sits after the
server's codec, so attacks read what the server decoded; a detector (SplitGuard) observes gradients after the
codec and before the client's own gradient noise. Token and loss defenses, the detectors' probes and the audit
truth recorder are client plugins (``runtime/plugins.py``), and so is what each of the config's ``remedies``
(``splitlm/remedies/``) adds to a client. A remedy's server mod (e.g. an alignment's running statistics) is the
innermost: it sees the decoded smashed data, and what it adds to the replies the server's codec and the client's
mods pass through untouched.

A malicious client's attacks (``privacy.client_attack``, those whose ``clients`` name it) act as its own code: the
first of its mods and plugins, and they rewrite its training rows before they are packed (``client_attacks``).

Defenses (``privacy.defenses``), detectors (``privacy.detectors``), the server and client attacks
(``privacy.server_attack``, ``privacy.client_attack``) and remedies (``remedies``) are components built by name from
their registries; this module never imports the attacks (their registries name their modules).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitlm.config import Config
from splitlm.config.schema import LINK_DIRECTIONS
from splitlm.frameworks.setup import spec_of
from splitlm.models import ModelSource, Stage, load_stage
from splitlm.privacy.client_attack import ClientAttack, attack_context, build_client_attacks
from splitlm.privacy.defenses import DefenseChain, DefenseContext, build_defenses, token_texts
from splitlm.privacy.detectors import Detector, DetectorContext, build_detectors
from splitlm.privacy.protocols import build_protocols
from splitlm.privacy.server_attack import build_server_attacks
from splitlm.privacy.tap import ServerTap, TruthRecorder
from splitlm.remedies import ClientSetup, build_remedies
from splitlm.runtime.plugins import ClientPlugin, Pace
from splitlm.runtime.rng import derive
from splitlm.transport import MeterMod, Mod, Transport
from splitlm.transport.codecs import CodecMod
from splitlm.transport.link import EmulatedLink, Link

log = logging.getLogger(__name__)


@dataclass
class ClientPipeline:
    """What wraps one client: its mods (request order), its plugins, and its defenses (for the accountant)."""

    mods: list[Mod]
    plugins: list[ClientPlugin]
    defenses: DefenseChain = field(default_factory=lambda: DefenseChain([]))
    attacks: list[ClientAttack] = field(default_factory=list)  # privacy.client_attack: this client is malicious
    detectors: list[Detector] = field(default_factory=list)

    @property
    def alarm_step(self) -> int | None:
        """The first step at which one of this client's hijacking detectors raised its alarm, if any did."""
        return min((d.alarm_step for d in self.detectors if d.alarm_step is not None), default=None)

    def detector_reports(self) -> dict[str, dict[str, Any]]:
        """Each detector's report (its ``alarm_step`` at least), by name."""
        return {d.name: d.report() for d in self.detectors}


def codec_mod(config: Config) -> CodecMod:
    codec = config.transport.codec
    return CodecMod(codec.activations, codec.gradients, error_feedback=codec.error_feedback)


def client_pipeline(
    config: Config,
    source: ModelSource,
    head: Stage,
    truth: TruthRecorder | None = None,
    setup: ClientSetup | None = None,
    attacks: list[ClientAttack] | None = None,
) -> ClientPipeline:
    """One client's mods and plugins; ``truth`` is the recorder shared with a server tap (in-process runs);
    ``setup``: the client's parts and data, for its simulated speed and the plugins of the config's remedies;
    ``attacks``: a malicious client's attacks (``client_attacks``), its innermost mods and first plugins."""
    attacks = list(attacks or [])
    for attack in attacks:  # a malicious client's code may change its own parts (boost)
        attack.context.parts = dict(setup.parts) if setup is not None else {}
    defenses = _defenses(config, source, head, setup)
    mods: list[Mod] = [*attacks, *defenses.mods]
    plugins: list[ClientPlugin] = [*attacks, *defenses.plugins]
    detectors: list[Detector] = []
    if config.privacy.detectors:
        context = DetectorContext(
            vocab_size=int(head.config.vocab_size),
            seed=config.seed,
            mode=config.split.mode,
            parts=dict(setup.parts) if setup is not None else {"head": head},
            public_stage=_public_stages(config, source),
        )
        detectors = build_detectors(config.privacy.detectors, context)
    for detector in detectors:
        mods.append(detector)  # after the defenses on a request, so before them on the reply
        plugins.append(detector)
    if truth is not None:
        plugins.append(truth)
    if setup is not None:
        plugins.append(Pace(config.client(int(setup.client_id)).speed))
        plugins += [p for remedy in build_remedies(config) if (p := remedy.client_plugin(setup)) is not None]
    mods += [codec_mod(config), MeterMod()]
    return ClientPipeline(mods, plugins, defenses, attacks, detectors)


def client_attacks(config: Config, source: ModelSource, index: int, responses: list[list[int]]) -> list[ClientAttack]:
    """The attacks of ``privacy.client_attack`` that make client ``index`` malicious (none: it is honest);
    ``responses``: classification-style data's candidate responses (``RunData.responses``), empty for other data."""
    if not config.privacy.client_attack:
        return []
    context = attack_context(config, source, index, responses)
    attacks = build_client_attacks(config.privacy.client_attack, context)
    if attacks:
        log.warning("client %d is malicious: %s", index, ", ".join(a.name for a in attacks))
    return attacks


def server_mods(config: Config, source: ModelSource, trunk: Stage, tap: ServerTap | None = None) -> list[Mod]:
    """The server's mods, from the wire inwards; ``tap`` is the run's recorder (in-process runs)."""
    mods: list[Mod] = [codec_mod(config)]
    mods += build_protocols(config.privacy.protocols, config)  # before the tap: it records what the server gets
    if tap is not None:
        mods.append(tap)
    mods += build_server_attacks(config.privacy.server_attack, config, source, trunk)
    # innermost: they see what the server's handler sees, and answer with its replies
    mods += [mod for remedy in build_remedies(config) if (mod := remedy.server_mod(config)) is not None]
    return mods


def client_link(config: Config, transport: Transport, client_id: str) -> Transport:
    """``transport`` behind client ``client_id``'s own emulated link (``transport.link``), or as it is (no
    emulation). Below the mods: the link carries what travels, the encoded bytes."""
    link = config.transport.link
    if not link.enabled:
        return transport
    up, down = (
        Link(**link.direction(name), seed=derive(config.seed, "link", client_id, name)) for name in LINK_DIRECTIONS
    )
    log.info("client %s: emulated link up %s, down %s", client_id, up.settings(), down.settings())
    return EmulatedLink(transport, up, down)


def recorders(config: Config, clients: int) -> tuple[ServerTap | None, TruthRecorder | None]:
    """The server tap and the clients' audit truth recorder, when ``privacy.tap.enabled``."""
    if not config.privacy.tap.enabled:
        return None, None
    window = config.privacy.tap.max_batches
    return ServerTap(window), TruthRecorder(2 * window * clients)


def _public_stages(config: Config, source: ModelSource) -> Callable[[str], Stage]:
    """``public_stage(role)``: a part with the public pretrained weights, loaded once from the model source (on
    first use), frozen, in eval mode, in the client's dtype and on its device."""
    spec = spec_of(config)
    publics: dict[str, Stage] = {}

    def public_stage(role: str) -> Stage:
        if role not in publics:
            stage = load_stage(
                source,
                spec,
                role,  # type: ignore[arg-type]
                dtype=config.model.client_dtype,
                device=config.model.client_device,
                attn_implementation=config.model.attn_implementation,
            )
            publics[role] = stage.requires_grad_(False).eval()
        return publics[role]

    return public_stage


def _defenses(config: Config, source: ModelSource, head: Stage, setup: ClientSetup | None = None) -> DefenseChain:
    """The client's ``privacy.defenses``, built on its own (pretrained) token embeddings; ``setup`` (when known)
    gives the defenses that learn the client's parts and examples."""
    if not config.privacy.defenses:
        return DefenseChain([])
    tokenizer = source.tokenizer()
    public_stage = _public_stages(config, source)
    context = DefenseContext(
        token_embeddings=head.token_embeddings().detach(),
        special_ids=frozenset(int(i) for i in tokenizer.all_special_ids),
        mode=config.split.mode,
        seq_len=config.train.seq_len,
        seed=config.seed,
        parts=dict(setup.parts) if setup is not None else {},
        public_stage=public_stage,
        examples=setup.examples if setup is not None else (),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        cache_dir=Path(config.output_dir) / "cache",
        model_key=f"{config.model.name}@{config.model.revision or ''}",
        token_texts=token_texts(tokenizer),
    )
    chain = build_defenses(config.privacy.defenses, context)
    log.info("defenses: %s", ", ".join(chain.names))
    return chain
