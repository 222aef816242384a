"""A test-only client attack, as a config plugin (``plugins: [tests/privacy/guard_plugin.py]``):
``privacy.client_attack: {flip_grad: {clients: [1]}}`` makes client 1 send the server ``scale`` times the true
gradient of the trunk's output (step 7; the default -1 turns the trunk's update around: a sign-flipping attack on
the server's part of the model). It keeps no state, so a rolled-back round leaves nothing of it behind."""

from __future__ import annotations

from pydantic import Field

from splitlm.privacy.client_attack import CLIENT_ATTACKS, ClientAttack, ClientAttackSettings
from splitlm.transport import Message


@CLIENT_ATTACKS.component
class FlipGrad(ClientAttack):
    name = "flip_grad"

    class Settings(ClientAttackSettings):
        scale: float = Field(-1.0, description="What the true gradient of the trunk's output is multiplied by.")

    def on_request(self, message: Message) -> Message:
        if message.kind != "backward" or "grad" not in message.tensors:
            return message
        return message.replace({**message.tensors, "grad": message.tensors["grad"] * self.settings.scale})
