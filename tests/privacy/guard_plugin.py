"""A test-only malicious client, as a config plugin (``plugins: [tests/privacy/guard_plugin.py]``): the clients of
``privacy.defenses.poison_grad.clients`` send the server ``scale`` times the true gradient of the trunk's output
(step 7; a negative scale turns the trunk's update around), the others are honest."""

from __future__ import annotations

from pydantic import Field

from splitlm.privacy.defenses.base import DEFENSES, MessageDefense
from splitlm.registry import ComponentSettings
from splitlm.transport import Message


@DEFENSES.component
class PoisonGrad(MessageDefense):
    name = "poison_grad"

    class Settings(ComponentSettings):
        clients: list[int] = Field(default_factory=list)
        scale: float = -1.0

    def on_request(self, message: Message) -> Message:
        chosen = {str(c) for c in self.settings.clients}
        if message.kind != "backward" or "grad" not in message.tensors or message.client_id not in chosen:
            return message
        return message.replace({**message.tensors, "grad": message.tensors["grad"] * self.settings.scale})
