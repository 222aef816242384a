"""What a framework is: a round recipe plus the few facts the rest of the system needs about it.

A framework (sequential SL, PSL, SFL-V1, SFL-V2, grouped SFL, the centralized baseline) is an *ordering* of
the pipeline's steps across clients and rounds. Each lives in its own module as a short recipe for one
round, and registers a ``Framework`` that also says how the server lays out its trunk adapters (one shared,
one per client, one per group), whether a step waits for every client (a barrier), whether the model is
split at all, and which options it supports. Nothing outside a framework's own module compares framework
names: the driver, the server and the network layer read these fields.

Adding a framework means one module with its recipe and one ``FRAMEWORKS.register`` line (plus an import in
``frameworks/__init__.py`` for a built-in; a plugin's own module may register itself).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from splitlm.config import Config
from splitlm.config.schema import as_mapping, value_at
from splitlm.errors import ConfigError
from splitlm.registry import ComponentRegistry, Registry
from splitlm.runtime.scheduling import policy_problems

if TYPE_CHECKING:
    from splitlm.config.schema import TrainConfig
    from splitlm.frameworks.federation import Client, Federation, Member
    from splitlm.models import ModelSource

RoundRecipe = Callable[["Federation", int, list["Member"]], list["Member"]]
MakeClient = Callable[[Config, "ModelSource", "TrainConfig"], "Client"]
TrunkAdapters = Literal["shared", "client", "group"]
Check = Callable[[Config], None]


@dataclass(frozen=True)
class Framework:
    """A framework's round recipe and layout.

    ``round(fed, round_index, participants)`` trains the round's participants and aggregates; it returns the
    members whose client side is the global model after the round (one member), or every participant when
    each keeps its own (psl).
    """

    name: str
    round: RoundRecipe
    description: str
    trunk_adapters: TrunkAdapters = "shared"  # one trunk adapter for all, one per client, or one per group
    barrier: bool = False  # one trunk update per synchronised step of all participants (psl)
    split: bool = True  # False: the unsplit baseline (one member, no server, no transport)
    sequential: bool = False  # passes the client side from one client to the next (sl): ``Remedy.passed_on`` applies
    aggregates: bool = False  # averages the clients' client sides (sflv1, sflv2, gsfl): takes any aggregation strategy
    checks: tuple[Check, ...] = field(default=())  # the framework's own option checks
    # a server that serves one client at a time under some settings (sflv2 unless framework.merge): how it does,
    # and what would change that (``one_client_at_a_time``)
    serial: Callable[[Config], tuple[str, str] | None] | None = None
    make_client: MakeClient | None = None  # its own kind of client (config, model source, train settings); None:
    # the split client (head [+ tail] behind its mods)

    # --- the server's layout ---------------------------------------------------------------------------

    def adapter_of(self, index: int, groups: list[list[int]]) -> str:
        """The trunk adapter client ``index`` trains: its own, its group's, or the shared one."""
        if self.trunk_adapters == "client":
            return f"client-{index}"
        if self.trunk_adapters == "group":
            return next(f"group-{g}" for g, group in enumerate(groups) if index in group)
        return "default"

    def sharing(self, config: Config, groups: list[list[int]]) -> int:
        """How many clients feed one trunk adapter in a round."""
        fw = config.framework
        if self.trunk_adapters == "client":
            return 1
        if self.trunk_adapters == "group":
            return max((len(g) for g in groups), default=1)
        return fw.clients_per_round or fw.num_clients

    def server_steps(self, config: Config, groups: list[list[int]]) -> int:
        """Optimizer steps a trunk adapter takes over the run (its learning-rate schedule's length): one per
        client step, except that a barrier makes one step of all participants' steps."""
        per_client = client_steps(config)
        return (
            per_client if self.barrier or self.trunk_adapters == "client" else per_client * self.sharing(config, groups)
        )

    def trunk_lr_scale(self, config: Config, groups: list[list[int]]) -> float:
        """``framework.server_lr_scale``: the trunk's learning rate scaled with the number tau of clients sharing it
        (``aggregation/scales.py``: x tau, x sqrt(tau) (SGLR), or / tau (MU-SplitFed))."""
        from splitlm.frameworks.aggregation.scales import scale_of

        return scale_of(config).trunk(self.sharing(config, groups))

    def global_lr(self, config: Config, groups: list[list[int]]) -> float:
        """The global learning rate (eta_g) of the client sides' FedAvg, as the aggregation strategy and the
        server's scale give it (1: plain FedAvg; ``aggregation/fedavg.py``)."""
        from splitlm.frameworks.aggregation import strategy_of

        return strategy_of(config).global_lr(config, self.sharing(config, groups))

    def one_client_at_a_time(self, config: Config) -> tuple[str, str] | None:
        """Whether the server never has several clients' requests waiting at once under ``config`` (nothing for a
        scheduling policy to reorder): how this framework serves them, and what within it would change that ("":
        nothing); None when several can wait at once."""
        if self.sequential:
            return ("trains one client at a time", "")
        return self.serial(config) if self.serial is not None else None

    # --- what it supports --------------------------------------------------------------------------------

    def check(self, config: Config) -> None:
        """Refuse options this framework cannot honour, with what to change."""
        from splitlm.models.lowrank import problems as bottleneck_problems

        problems = []
        if not self.split:
            if config.transport.name != "inprocess":
                problems.append(f"transport.name: framework.name={self.name} runs in one process; set inprocess")
            if config.transport.link.enabled:
                problems.append(f"transport.link: framework.name={self.name} sends nothing over a link; unset it")
        problems += bottleneck_problems(config, cuts=self.split)
        if self.trunk_adapters != "shared" and config.lora.part("trunk").method != "lora":
            problems.append(
                f"framework.name={self.name} keeps one trunk adapter per {self.trunk_adapters}: "
                "set lora.trunk.method=lora"
            )
        problems += self._remedy_problems(config)
        problems += policy_problems(config, self)
        problems += component_problems(config, self)
        if config.privacy.tap.enabled and config.transport.name != "inprocess":
            problems.append("privacy.tap records in-process runs only: set transport.name=inprocess")
        for check in self.checks:
            try:
                check(config)
            except ConfigError as error:
                problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))

    def _remedy_problems(self, config: Config) -> list[str]:
        """Remedies (survey §3) that need what this framework's layout lacks: groups of clients (grouping), one
        trunk adapter several clients reach at once (merge). A framework's own ``checks`` add what its fields cannot
        say; the aggregation strategies and learning-rate scales say their own (``aggregation/``)."""
        fw, name, problems = config.framework, self.name, []
        # a grouping other than the default, or explicit groups (a resolved config, e.g. a run's config.yaml, spells
        # out the default grouping, and must load again)
        for key in ("grouping", "groups"):
            if getattr(fw, key) != type(fw).model_fields[key].default and self.trunk_adapters != "group":
                problems.append(
                    f"framework.{key}: groups the clients that share a trunk adapter; framework.name={name} keeps "
                    f"none per group: set framework.name=gsfl or unset framework.{key}"
                )
        if fw.merge > 1 and (not self.split or self.sequential or self.trunk_adapters != "shared"):
            why = (
                "has no server" if not self.split
                else "trains one client at a time" if self.sequential
                else f"keeps one trunk adapter per {self.trunk_adapters}"
            )  # fmt: skip
            problems.append(
                f"framework.merge={fw.merge}: concatenates several clients' smashed data into one batch of one shared "
                f"trunk adapter; framework.name={name} {why}: use sflv2 or psl, or set framework.merge=1"
            )
        return problems


FRAMEWORKS = Registry[Framework]("framework", "framework.name", builtins=("splitlm.frameworks",))


def register(framework: Framework) -> Framework:
    """Register a framework under its name (one line per framework module)."""
    FRAMEWORKS.add(framework.name, framework)
    return framework


def framework_of(config: Config) -> Framework:
    return FRAMEWORKS.get(config.framework.name)


# The config keys that select components (``registry.Component``: remedies, defenses, detectors, aggregation
# strategies, server attacks) and the registry that knows each, as "module:attribute", imported when first needed.
# One line per key; the components themselves declare their settings and problems.
COMPONENT_KEYS: dict[str, str] = {
    "privacy.defenses": "splitlm.privacy.defenses:DEFENSES",
    "privacy.detectors": "splitlm.privacy.detectors:DETECTORS",
    "privacy.server_attack": "splitlm.privacy.server_attack:SERVER_ATTACKS",
    "privacy.client_attack": "splitlm.privacy.client_attack:CLIENT_ATTACKS",
    "privacy.protocols": "splitlm.privacy.protocols:PROTOCOLS",
    "privacy.guards": "splitlm.privacy.guards:GUARDS",
    "remedies": "splitlm.remedies.base:REMEDIES",
    "framework.aggregation": "splitlm.frameworks.aggregation:STRATEGIES",
    "framework.server_lr_scale": "splitlm.frameworks.aggregation.scales:SCALES",
    "train.report_to": "splitlm.runtime.tracking:SINKS",
}


def component_registry(key: str) -> ComponentRegistry[Any]:
    module, _, attribute = COMPONENT_KEYS[key].partition(":")
    return getattr(importlib.import_module(module), attribute)


def component_problems(config: Config, framework: Framework | None) -> list[str]:
    """Every configured component's own compatibility rules (``Component.problems``) with ``config`` under
    ``framework``: what ``Framework.check`` and ``config_problems`` add to the other problems of a config."""
    problems: list[str] = []
    for key in COMPONENT_KEYS:
        spec = value_at(config.model_dump(), key)
        problems += component_registry(key).problems(as_mapping(spec), config, framework)
    return problems


def networked_problems(config: Config) -> list[str]:
    """What the configured components cannot do when the clients are other processes (``splitlm serve``)."""
    tree = config.model_dump()
    return [
        p for key in COMPONENT_KEYS for p in component_registry(key).networked_problems(as_mapping(value_at(tree, key)))
    ]


def _moved_keys(tree: dict[str, Any]) -> list[str]:
    """Where the unknown keys of ``tree`` that a component used to live at went (``Component.former_keys``). The
    registries are asked only when the schema finds an unknown key, so a valid config imports no component."""
    try:
        Config.model_validate(tree)
        return []
    except ValidationError as error:
        unknown = [
            ".".join(str(p) for p in item["loc"]) for item in error.errors() if item["type"] == "extra_forbidden"
        ]
    problems = []
    for key in COMPONENT_KEYS if unknown else ():
        registry = component_registry(key)
        for name in registry.names():
            for old, new in registry.get(name).former_keys:
                if any(path == old or path.startswith(f"{old}.") for path in unknown):
                    problems.append(f"{old}: moved; write {new}")
    return problems


def config_problems(tree: dict[str, Any]) -> list[str]:
    """Names a config gives that no registry knows (frameworks, groupings, selections, policies, partitioners,
    defenses, codecs), for ``load_config(..., checks=[config_problems])`` to report with the schema's own problems."""
    from splitlm.data.partition import PARTITIONERS
    from splitlm.frameworks.grouping import GROUPINGS, SELECTIONS
    from splitlm.runtime.scheduling import POLICIES
    from splitlm.transport.codecs import parse_codec

    problems = []
    for key, registry in (
        ("framework.name", FRAMEWORKS),
        ("framework.grouping", GROUPINGS),
        ("framework.selection", SELECTIONS),
        ("server.policy", POLICIES),
        ("data.partition", PARTITIONERS),
    ):
        problem = registry.problem(value_at(tree, key))
        if problem is not None:
            problems.append(problem if problem.startswith(key) else f"{key}: {problem}")
    selection, clients = value_at(tree, "framework.selection"), value_at(tree, "framework.num_clients")
    per_round = value_at(tree, "framework.clients_per_round")
    subset = selection in SELECTIONS and getattr(SELECTIONS.get(selection), "picks_a_subset", False)
    if subset and isinstance(clients, int) and isinstance(per_round, int) and not 0 < per_round < clients:
        problems.append(
            f"framework.selection: {selection} picks framework.clients_per_round of the clients each round; set "
            f"framework.clients_per_round between 1 and framework.num_clients - 1 (got {per_round} of {clients})"
        )
    for key in ("transport.codec.activations", "transport.codec.gradients"):
        spec = value_at(tree, key)
        try:
            parse_codec(spec if isinstance(spec, str) else "")
        except ConfigError as error:
            problems.append(f"{key}: {str(error).removeprefix('transport.codec: ')}")
    problems += _moved_keys(tree)
    for key in COMPONENT_KEYS:
        spec = value_at(tree, key)
        if isinstance(spec, list):  # a list of names: each once (as_mapping would keep one silently)
            problems += [
                f"{key}: {name!r} is listed twice; name each once" for i, name in enumerate(spec) if name in spec[:i]
            ]
        problems += component_registry(key).settings_problems(as_mapping(spec), key)
    if not problems:  # every name is known: the components' own rules, on the validated config
        try:
            config = Config.model_validate(tree)
        except ValueError:
            return problems  # the schema reports its own problems
        problems += component_problems(config, FRAMEWORKS.get(config.framework.name))
    return problems


def client_steps(config: Config) -> int:
    """Optimizer steps of one client over the run (its learning-rate schedule's length)."""
    return config.framework.rounds * config.framework.steps_per_round(config.train.steps)
