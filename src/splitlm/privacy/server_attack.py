"""A simulated malicious server, installed by name: the ``ServerAttack`` interface and its registry.

``privacy.server_attack`` names the attack with its settings (``{fsha: {lr: 1e-3}}``, or a bare ``fsha``; several
are stacked from the wire inwards); empty, the server is honest. An attack is a server mod (``transport/mods.py``)
around the honest server, built from the run's config, the model's public source and the trunk. The attacks
themselves live in ``privacy.attacks`` (FSHA in ``privacy/attacks/fsha.py``, SplitSpy in
``privacy/attacks/splitspy.py``), which the training code (frameworks, runtime, transport) never imports: this
registry names their modules as strings (``builtins``), so the pipeline asks it for an attack by name and the
import-linter contracts hold by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from splitlm.config.schema import as_mapping
from splitlm.errors import PrivacyError
from splitlm.registry import Component, ComponentRegistry
from splitlm.transport import Mod

if TYPE_CHECKING:
    from splitlm.config import Config
    from splitlm.models import ModelSource, Stage


class ServerAttack(Component, Mod):
    """Base of a simulated malicious server: a server mod with its own ``Settings`` and ``problems``."""

    @classmethod
    def create(cls, settings: Any, config: Config, source: ModelSource, trunk: Stage) -> Self:
        """The attack with ``settings`` for the run ``config`` (the trunk it wraps, the model's public source)."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the run's ``summary.json`` keeps of it (``privacy.server_attacks``), e.g. the attacker's losses."""
        return {}

    @classmethod
    def networked_problems(cls, settings: Any) -> list[str]:
        return [
            f"privacy.server_attack.{cls.name}: simulates a malicious server in an in-process run; drop it from the "
            "server's config"
        ]


SERVER_ATTACKS = ComponentRegistry[ServerAttack](
    "server attack",
    "privacy.server_attack",
    error=PrivacyError,
    builtins=("splitlm.privacy.attacks.fsha", "splitlm.privacy.attacks.splitspy"),
)


def build_server_attacks(spec: Any, config: Config, source: ModelSource, trunk: Stage) -> list[ServerAttack]:
    """The server mods ``spec`` (``privacy.server_attack``) names, with their settings: none for an honest server."""
    return SERVER_ATTACKS.build(as_mapping(spec), config, source, trunk)
