"""Protocol changes between the clients and the server (survey §5.2.5), installed by name: ``privacy.protocols``.

A protocol is a server mod (``transport/mods.py``) nearest the wire: after the server's codec and before the tap,
so what the tap records (and an attack reads) is what the server receives once the protocol has acted. It stands
for a party between the clients and the server (e.g. 3-Tier SL's aggregator); in this library it runs in the
server's process, so it simulates that party rather than separate it. Empty (the default): no protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from splitlm.config.schema import as_mapping
from splitlm.errors import PrivacyError
from splitlm.registry import Component, ComponentRegistry
from splitlm.transport import Mod

if TYPE_CHECKING:
    from splitlm.config import Config


class Protocol(Component, Mod):
    """Base of a protocol change: a server mod with its own ``Settings`` and ``problems``."""

    @classmethod
    def create(cls, settings: Any, config: Config) -> Self:
        """The protocol with ``settings`` for the run ``config``."""
        raise NotImplementedError


PROTOCOLS = ComponentRegistry[Protocol](
    "protocol", "privacy.protocols", error=PrivacyError, builtins=("splitlm.privacy.protocols.three_tier",)
)


def build_protocols(spec: Any, config: Config) -> list[Protocol]:
    """The server mods ``spec`` (``privacy.protocols``) names, with their settings, in order from the wire."""
    return PROTOCOLS.build(as_mapping(spec), config)
