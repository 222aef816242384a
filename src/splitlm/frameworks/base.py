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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from splitlm.config import Config
from splitlm.config.schema import value_at
from splitlm.errors import ConfigError
from splitlm.registry import Registry

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
    sequential: bool = False  # passes the client side from one client to the next (sl): train.ema applies
    checks: tuple[Check, ...] = field(default=())  # the framework's own option checks
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

    def server_lr_scale(self, config: Config, groups: list[list[int]]) -> float:
        """``framework.server_lr_scale``: the trunk's learning rate scaled with the number tau of clients sharing it:
        x tau or x sqrt(tau) (SGLR), or / tau (MU-SplitFed: tau unbalanced server steps per client step)."""
        n = self.sharing(config, groups)
        scales = {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n), "mu_splitfed": 1.0 / n}
        return scales[config.framework.server_lr_scale]

    def aggregation_lr(self, config: Config, groups: list[list[int]]) -> float:
        """``framework.aggregation_lr`` (eta_g), the global learning rate of the client sides' FedAvg; unset, 1 (plain
        FedAvg), or sqrt(tau) under server_lr_scale=mu_splitfed, raised to make up for the trunk's smaller steps."""
        fw = config.framework
        if fw.aggregation_lr is not None:
            return fw.aggregation_lr
        return math.sqrt(self.sharing(config, groups)) if fw.server_lr_scale == "mu_splitfed" else 1.0

    # --- what it supports --------------------------------------------------------------------------------

    def check(self, config: Config) -> None:
        """Refuse options this framework cannot honour, with what to change."""
        from splitlm.models.lowrank import problems as bottleneck_problems

        problems = []
        if not self.split:
            if config.privacy.defenses:
                problems.append(f"privacy.defenses: defenses act at the cut; framework.name={self.name} has none")
            if config.transport.name != "inprocess":
                problems.append(f"transport.name: framework.name={self.name} runs in one process; set inprocess")
            if config.transport.link.enabled:
                problems.append(f"transport.link: framework.name={self.name} sends nothing over a link; unset it")
            if config.train.logit_adjustment:
                problems.append(
                    f"train.logit_adjustment: adjusts a split client's loss; framework.name={self.name} has no "
                    "client side, so unset it"
                )
            problems += self._unsplit_problems(config)
        problems += bottleneck_problems(config, cuts=self.split)
        if self.trunk_adapters != "shared" and config.lora.part("trunk").method != "lora":
            problems.append(
                f"framework.name={self.name} keeps one trunk adapter per {self.trunk_adapters}: "
                "set lora.trunk.method=lora"
            )
        if config.privacy.server_attack != "none" and (
            config.framework.num_clients != 1 or config.transport.name != "inprocess" or not self.split
        ):
            problems.append(
                f"privacy.server_attack={config.privacy.server_attack} is simulated for one in-process client: set "
                "framework.num_clients=1 and transport.name=inprocess"
            )
        if config.train.ema and not self.sequential:
            problems.append(
                f"train.ema averages the client side passed from one client to the next; framework.name={self.name} "
                "passes none: set framework.name=sl or train.ema=0"
            )
        problems += self._remedy_problems(config)
        if config.privacy.tap.enabled and config.transport.name != "inprocess":
            problems.append("privacy.tap records in-process runs only: set transport.name=inprocess")
        for check in self.checks:
            try:
                check(config)
            except ConfigError as error:
                problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))

    def _unsplit_problems(self, config: Config) -> list[str]:
        """The non-IID remedies and server settings that act on a split model, for the unsplit baseline."""
        fw, name, problems = config.framework, self.name, []
        if config.train.align_kl:
            problems.append(
                f"train.align_kl: aligns a split client's head output with the server's statistics at the cut; "
                f"framework.name={name} has no cut, so set train.align_kl=0"
            )
        if fw.personalize != "none":
            problems.append(
                f"framework.personalize={fw.personalize}: a split client's early exit on its head's output; "
                f"framework.name={name} has no client side, so set framework.personalize=none"
            )
        if config.server.policy == "dissimilar_first":
            problems.append(
                f"server.policy=dissimilar_first: orders the clients' smashed data waiting at the server; "
                f"framework.name={name} has no server, so set server.policy=fifo"
            )
        if fw.server_lr_scale != "none":
            problems.append(
                f"framework.server_lr_scale={fw.server_lr_scale}: scales the trunk's learning rate on the server; "
                f"framework.name={name} has no server, so set framework.server_lr_scale=none"
            )
        if fw.aggregation_lr is not None:
            problems.append(
                f"framework.aggregation_lr: steps the FedAvg of the clients' client sides; framework.name={name} "
                "trains one unsplit model, so unset framework.aggregation_lr"
            )
        return problems

    def _remedy_problems(self, config: Config) -> list[str]:
        """Remedies (survey §3) that need what this framework's layout lacks: groups of clients (grouping), one
        trunk adapter several clients reach at once (merge, dissimilar_first), FedAvg of client sides
        (mu_splitfed, aggregation_lr). A framework's own ``checks`` add what its fields cannot say."""
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
        if self.split and self.sequential and config.server.policy == "dissimilar_first":
            problems.append(
                f"server.policy=dissimilar_first: reorders the smashed data of clients waiting at once; "
                f"framework.name={name} trains one client at a time: use psl, sflv1 or gsfl, or set server.policy=fifo"
            )
        if self.split and fw.server_lr_scale == "mu_splitfed" and (self.sequential or self.trunk_adapters == "client"):
            why = "gives each client its own trunk adapter"
            if self.sequential:
                why = "passes one client side on instead of averaging them"
            problems.append(
                f"framework.server_lr_scale=mu_splitfed: divides a shared trunk adapter's learning rate by its clients "
                f"and raises the FedAvg of the client sides; framework.name={name} {why}: use sflv2 or gsfl"
            )
        if self.split and self.sequential and fw.aggregation_lr is not None:
            problems.append(
                f"framework.aggregation_lr: steps the FedAvg of the clients' client sides; framework.name={name} "
                "passes one client side on instead: use sflv1, sflv2 or gsfl, or unset framework.aggregation_lr"
            )
        return problems


FRAMEWORKS = Registry[Framework]("framework", "framework.name", builtins=("splitlm.frameworks",))


def one_client_at_a_time(config: Config) -> None:
    """A framework check (``Framework.checks``) for a server that serves one client at a time (sflv2 unless
    ``framework.merge`` trains K at once): nothing waits at the server for dissimilar_first to reorder."""
    if config.server.policy == "dissimilar_first" and config.framework.merge <= 1:
        raise ConfigError(
            f"server.policy=dissimilar_first: reorders the smashed data of clients waiting at once; "
            f"framework.name={config.framework.name} serves one client at a time: set framework.merge>1, use psl, "
            "sflv1 or gsfl, or set server.policy=fifo"
        )


def keeps_own_client_sides(config: Config) -> None:
    """A framework check (``Framework.checks``) for clients that each keep their own client side (psl): no FedAvg of
    client sides for framework.aggregation_lr to step, nor for mu_splitfed to raise."""
    fw, problems = config.framework, []
    if fw.server_lr_scale == "mu_splitfed":
        problems.append(
            f"framework.server_lr_scale=mu_splitfed: divides a shared trunk adapter's learning rate by its clients and "
            f"raises the FedAvg of the client sides; framework.name={fw.name} averages no client sides: use sflv2 or "
            "gsfl"
        )
    if fw.aggregation_lr is not None:
        problems.append(
            f"framework.aggregation_lr: steps the FedAvg of the clients' client sides; framework.name={fw.name} lets "
            "each client keep its own: use sflv1, sflv2 or gsfl, or unset framework.aggregation_lr"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def register(framework: Framework) -> Framework:
    """Register a framework under its name (one line per framework module)."""
    FRAMEWORKS.add(framework.name, framework)
    return framework


def framework_of(config: Config) -> Framework:
    return FRAMEWORKS.get(config.framework.name)


def config_problems(tree: dict[str, Any]) -> list[str]:
    """Names a config gives that no registry knows (frameworks, groupings, selections, policies, partitioners,
    defenses, codecs), for ``load_config(..., checks=[config_problems])`` to report with the schema's own problems."""
    from splitlm.data.partition import PARTITIONERS
    from splitlm.frameworks.grouping import GROUPINGS, SELECTIONS
    from splitlm.privacy.defenses import DEFENSES
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
    defenses = value_at(tree, "privacy.defenses")
    for name in defenses if isinstance(defenses, list) else []:
        problem = DEFENSES.problem(name)
        if problem is not None:
            problems.append(problem)
    for key in ("transport.codec.activations", "transport.codec.gradients"):
        spec = value_at(tree, key)
        try:
            parse_codec(spec if isinstance(spec, str) else "")
        except ConfigError as error:
            problems.append(f"{key}: {str(error).removeprefix('transport.codec: ')}")
    return problems


def client_steps(config: Config) -> int:
    """Optimizer steps of one client over the run (its learning-rate schedule's length)."""
    return config.framework.rounds * config.framework.steps_per_round(config.train.steps)
