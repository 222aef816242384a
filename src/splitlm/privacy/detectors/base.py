"""The ``Detector`` interface and its registry: the client's watch over a server that may be malicious.

A detector is a client plugin (it may swap in a batch's labels, keep a step from training the client's parts,
check after each step) and a client mod (it sees each request and the server's reply), placed after the
defenses on a request (so before them on the reply: it observes the gradients as the server sent them). It
raises ``HijackAlarm`` to stop training, and keeps the step of its alarm in ``alarm_step`` (``summary.json``).

A detector is a ``registry.Component`` configured under ``privacy.detectors`` (``{splitguard: {probe_every: 4}}``);
one module declares its ``name``, ``Settings``, ``problems`` and hooks, and registers it with
``@DETECTORS.component``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from splitlm.config.schema import as_mapping
from splitlm.errors import PrivacyError
from splitlm.registry import Component, ComponentRegistry
from splitlm.runtime.plugins import ClientPlugin
from splitlm.transport import Mod

if TYPE_CHECKING:
    from torch import nn

    from splitlm.models import Stage


@dataclass(frozen=True)
class DetectorContext:
    """What a client-side detector may use: the model's vocabulary, the run's seed and split mode, the client's
    own parts (``head`` [+ ``tail``], as they train) and the public pretrained parts (``public_stage(role)``:
    frozen, loaded once; the whole pretrained model is public, so a client may run the trunk itself)."""

    vocab_size: int  # the model's vocabulary (fake labels are drawn from it)
    seed: int
    mode: str = "ushape"  # split.mode: vanilla (the server takes the loss) or ushape (the client's tail does)
    parts: Mapping[str, nn.Module] = field(default_factory=dict)
    public_stage: Callable[[str], Stage] | None = None


class Detector(Component, ClientPlugin, Mod):
    """Base of every detector: a client plugin and a client mod. ``alarm_step``: the step (1-based, as
    ``metrics.jsonl`` counts) at which it concluded the server is malicious, or None."""

    alarm_step: int | None = None

    def report(self) -> dict[str, Any]:
        """What the run's ``summary.json`` keeps of it (``privacy.detectors``): at least its ``alarm_step``."""
        return {"alarm_step": self.alarm_step}

    @classmethod
    def create(cls, settings: Any, context: DetectorContext) -> Self:
        """The detector with ``settings`` (its validated ``Settings``) for a client described by ``context``."""
        return cls(settings)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is not None and not framework.split:
            return [
                f"privacy.detectors.{cls.name}: watches the server's replies at the cut; framework.name="
                f"{framework.name} has none"
            ]
        return []


DETECTORS = ComponentRegistry[Detector](
    "detector", "privacy.detectors", error=PrivacyError, builtins=("splitlm.privacy.detectors",)
)


def build_detectors(spec: Any, context: DetectorContext) -> list[Detector]:
    """The detectors ``spec`` (``privacy.detectors``: ``{name: settings}``) names, in order, with their settings."""
    return DETECTORS.build(as_mapping(spec), context)
