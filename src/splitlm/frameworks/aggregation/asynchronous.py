"""``async`` (DT-ASFL, SFL-LEO; survey §4.4): no round barrier; each update is mixed into the global model when it
arrives, weighted ``mix x (n_i / mean n) x (1 + s) ** -staleness_exponent``, ``s`` the global versions made since
its client took its model (a soft penalty), and dropped when more than ``max_staleness`` versions stale (the hard
cutoff). ``Asynchronous`` is also what ``semi_async`` shares: the two clocks the clients' loops can run on
(``clock: wall``, ``wall.py``; ``clock: steps``, ``clock.py``), what a checkpoint keeps, and the rules they have in
common (``problems``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from splitlm.frameworks.aggregation import STRATEGIES, Strategy
from splitlm.frameworks.aggregation.scales import scale_of
from splitlm.frameworks.aggregation.updates import staleness_weight
from splitlm.models.lowrank import learned_rank
from splitlm.registry import ComponentSettings

if TYPE_CHECKING:
    from splitlm.frameworks.federation import Federation, Member

STATE = "aggregation"  # the strategy's folder in a checkpoint

Clock = Literal["wall", "steps"]
CLOCK_HELP = (
    "wall: each client's loop on its own thread, in real time (sflv1 in-process; runs differ with timing); steps: "
    "on a virtual clock where a client's local round lasts local_steps x its speed (framework.clients), the units "
    "trained one at a time in its order: reproducible, the same in-process, over gRPC and under Ray, and resumable"
)


class AsyncSettings(ComponentSettings):
    clock: Clock = Field("wall", description=CLOCK_HELP)


class Asynchronous(Strategy):
    """What ``async`` and ``semi_async`` share: the clients' own loops across the driver's rounds."""

    keeps_length = True
    windowed: ClassVar[bool] = False  # updates wait for the end of their window (semi_async)

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.runner: Any = None  # wall.Continuous or clock.Clocked, made at the first round
        self.restored: Path | None = None  # a checkpoint's folder to go on from (clock: steps)

    @property
    def clock(self) -> str:
        return str(self.settings.clock)  # type: ignore[attr-defined]

    # --- what the runners ask ------------------------------------------------------------------------------

    def weigh(self, share: float, staleness: int) -> float | None:
        """An update's weight (None: dropped); ``share``: its samples over the mean client's."""
        return 1.0

    @property
    def window_seconds(self) -> float:
        return 0.0

    def window_steps(self, fed: Federation) -> float:
        return 0.0

    # --- the strategy --------------------------------------------------------------------------------------

    def round(self, fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
        if self.clock == "wall":
            from splitlm.frameworks.aggregation.wall import wall_round

            return wall_round(fed, self, round_index)
        from splitlm.frameworks.aggregation.clock import clock_round

        return clock_round(fed, self, round_index)

    @classmethod
    def networked_problems(cls, settings: Any) -> list[str]:
        if settings.clock != "wall":
            return []
        return [
            f"framework.aggregation.{cls.name}.clock=wall runs every client on a thread of one process; for clients "
            f"in other processes set framework.aggregation.{cls.name}.clock=steps"
        ]

    def settled(self) -> bool:
        return self.clock == "steps" or self.runner is None or self.runner.over

    def summary(self) -> dict[str, object]:
        if self.runner is None:
            return {"mode": self.name}
        return {**self.runner.stats.summary(), "clock": self.clock}

    def save(self, fed: Federation, folder: Path) -> None:
        if self.clock == "steps" and self.runner is not None:
            self.runner.save(folder / STATE)

    def load(self, fed: Federation, folder: Path) -> None:
        if self.clock == "steps" and (folder / STATE).is_dir():
            self.restored, self.runner = folder / STATE, None

    def shutdown(self) -> None:
        if self.runner is not None and hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None:
            return []
        name, fw, key = cls.name, config.framework, f"framework.aggregation={cls.name}"
        if not framework.aggregates:
            return [
                f"{key} mixes the clients' client sides into a global model; framework.name={framework.name} averages "
                "none: set framework.name=sflv1, sflv2 or gsfl, or framework.aggregation=sync"
            ]
        problems = []
        if fw.clients_per_round and fw.clients_per_round < fw.num_clients:
            problems.append(f"framework.clients_per_round: {name} trains every client; set it to 0")
        if fw.leave_out:
            problems.append(f"framework.leave_out: {name} has no rounds to leave a client out of; unset it")
        if config.privacy.guards:
            problems.append(
                f"privacy.guards: {name} trains the clients across rounds, so no round can be rolled back and run "
                "again without a flagged client; set framework.aggregation=sync or unset privacy.guards"
            )
        methods = {part: config.lora.part(part).method for part in ("head", "trunk", "tail")}
        if any(method != "lora" for method in methods.values()):
            problems.append(f"lora: {name} aggregates LoRA adapters; set lora.<part>.method=lora (got {methods})")
        if learned_rank(config) is not None:
            problems.append(f"split.bottleneck: {name} does not aggregate learned bottlenecks; set it to 0")
        scale = scale_of(config)
        if scale.raises_aggregation:
            problems.append(
                f"framework.server_lr_scale={scale.name} steps the client sides' FedAvg further; {key} mixes updates "
                "by its own weights instead: set framework.aggregation=sync or another framework.server_lr_scale"
            )
        if settings.clock == "wall" and (framework.trunk_adapters != "client" or config.transport.name != "inprocess"):
            problems.append(
                f"framework.aggregation.{name}.clock=wall runs each client on a thread of this process with its own "
                f"trunk adapter (sflv1, transport.name=inprocess); with framework.name={framework.name} and "
                f"transport.name={config.transport.name} set framework.aggregation.{name}.clock=steps"
            )
        return problems


@STRATEGIES.component
class Async(Asynchronous):
    name = "async"
    former_keys = (
        ("framework.async_mix", "framework.aggregation.async.mix"),
        ("framework.staleness_exponent", "framework.aggregation.async.staleness_exponent"),
        ("framework.max_staleness", "framework.aggregation.async.max_staleness"),
    )

    class Settings(AsyncSettings):
        mix: float = Field(
            0.5, gt=0, le=1, description="Weight of a fresh update (staleness 0, average size) in the global model."
        )
        staleness_exponent: float = Field(
            0.5, ge=0, description="An update s versions stale is weighted (1 + s) ** -staleness_exponent."
        )
        max_staleness: int = Field(4, ge=0, description="Updates more than this many versions stale are dropped.")

    def weigh(self, share: float, staleness: int) -> float | None:
        return staleness_weight(self.settings, share, staleness)
