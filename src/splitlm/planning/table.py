"""``splitlm plan``: every cut's predicted step time, memory and traffic, and the fastest cut within each budget.

Clients that differ (``framework.clients``: their speed, link or memory budget) get a table each and a best
cut each; clients alike share one. The best cut is the fastest by the schedule the run uses (pipelined when
``train.pipeline.micro_batches > 1`` with overlap, else serial) among those whose client memory fits the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from splitlm.config import Config
from splitlm.planning.predict import ClientSetting, LinkModel, Prediction, best, predict_all
from splitlm.planning.profile import Profile, profile_model

PIPELINE_DEFAULT = 4  # micro-batches of the pipelined column when the run itself has one


@dataclass(frozen=True)
class Group:
    """Clients alike, their predictions (one per cut) and their best cut (None: none fits the budget)."""

    setting: ClientSetting
    predictions: list[Prediction]
    best: Prediction | None


@dataclass(frozen=True)
class Plan:
    profile: Profile
    micro_batches: int  # of the pipelined column
    by_pipelined: bool  # the best cut is chosen by the pipelined time (the run pipelines)
    groups: list[Group]

    def best_per_client(self) -> dict[int, Prediction | None]:
        return {client: group.best for group in self.groups for client in group.setting.clients}


def client_settings(config: Config) -> list[ClientSetting]:
    """One setting per group of clients alike (every client in one group without ``framework.clients``)."""
    budget = config.plan.client_memory_mb
    by_key: dict[tuple[Any, ...], list[int]] = {}
    views: dict[tuple[Any, ...], ClientSetting] = {}
    clients = range(config.framework.num_clients) if config.framework.clients else range(1)
    for index in clients:
        view, own = config.for_client(index), config.client(index)
        link = view.transport.link
        up, down = (LinkModel(**_link(link.direction(name))) for name in ("up", "down"))
        tail = view.split.tail_layers if view.split.mode == "ushape" else 0
        setting = ClientSetting(
            (index,), own.speed, up, down, own.client_memory_mb or budget, (view.split.head_layers, tail)
        )
        key = (setting.speed, setting.up, setting.down, setting.budget_mb, setting.current)
        by_key.setdefault(key, []).append(index)
        views.setdefault(key, setting)
    if not config.framework.clients:
        only = next(iter(views.values()))
        return [ClientSetting(tuple(range(config.framework.num_clients)), *_fields(only))]
    return [ClientSetting(tuple(by_key[key]), *_fields(setting)) for key, setting in views.items()]


def _link(settings: dict[str, float]) -> dict[str, float]:
    return {"bandwidth_mbps": settings["bandwidth_mbps"], "latency_ms": settings["latency_ms"]}  # jitter: mean 0


def _fields(setting: ClientSetting) -> tuple[Any, ...]:
    return setting.speed, setting.up, setting.down, setting.budget_mb, setting.current


def make_plan(config: Config, profile: Profile | None = None) -> Plan:
    """Profile the config's model (unless given a profile) and predict every cut for every group of clients."""
    profile = profile or profile_model(config)
    pipeline = config.train.pipeline
    micro = pipeline.micro_batches if pipeline.micro_batches > 1 else PIPELINE_DEFAULT
    by_pipelined = pipeline.micro_batches > 1 and pipeline.overlap
    groups = []
    for setting in client_settings(config):
        predictions = predict_all(profile, setting, micro, config.train.grad_accum)
        groups.append(Group(setting, predictions, best(predictions, setting.budget_mb, by_pipelined)))
    return Plan(profile, micro, by_pipelined, groups)


# --- output ----------------------------------------------------------------------------------------------


def _who(clients: tuple[int, ...]) -> str:
    if len(clients) == 1:
        return f"client {clients[0]}"
    return f"clients {', '.join(str(c) for c in clients)}"


def _link_text(link: LinkModel) -> str:
    rate = f"{link.bandwidth_mbps:g} Mbit/s" if link.bandwidth_mbps > 0 else "unlimited"
    return f"{rate}, {link.latency_ms:g} ms"


def _cut(p: Prediction | None, by_pipelined: bool) -> str:
    if p is None:
        return "none fits"
    seconds = p.pipelined_s if by_pipelined else p.serial_s
    return f"head {p.head}, tail {p.tail} ({seconds:.3f} s a step, client {p.client_mb:.0f} MB)"


def render(plan: Plan) -> str:
    """The plan as aligned text: a header, then per group of clients a line and a table (one row per cut)."""
    profile = plan.profile
    chosen = f"pipelined over {plan.micro_batches} micro-batches" if plan.by_pipelined else "serial"
    lines = [
        f"{profile.model}: {profile.layers} blocks, {profile.mode} split, batch {profile.batch_size} x "
        f"{profile.seq_len}; profiled in {profile.seconds:.1f} s ({profile.setups} setup"
        f"{'s' if profile.setups > 1 else ''}); best = fastest {chosen} step within the client memory budget",
        "* best cut   < the config's cut",
    ]
    header = (
        "head",
        "tail",
        "serial s",
        f"pipelined s (x{plan.micro_batches})",
        "client MB",
        "server MB",
        "MB/step",
        "",
    )
    for group in plan.groups:
        s = group.setting
        budget = f"{s.budget_mb:g} MB" if s.budget_mb > 0 else "none"
        lines += [
            "",
            f"{_who(s.clients)}: speed {s.speed:g}, link up {_link_text(s.up)}, down {_link_text(s.down)}, "
            f"client memory budget {budget}",
        ]
        if group.best is None:
            smallest = min(group.predictions, key=lambda p: p.client_mb)
            lines.append(
                f"no cut fits the budget of {s.budget_mb:g} MB: the smallest client side needs {smallest.client_mb:.0f}"
                f" MB (head {smallest.head}, tail {smallest.tail}); raise the budget or shorten train.batch_size / "
                "train.seq_len"
            )
        else:
            lines.append(f"best: {_cut(group.best, plan.by_pipelined)}")
        rows = [header]
        for p in group.predictions:
            mark = ("*" if group.best is not None and p.cut == group.best.cut else "") + (
                "<" if p.cut == s.current else ""
            )
            rows.append(
                (
                    str(p.head), str(p.tail), f"{p.serial_s:.3f}", f"{p.pipelined_s:.3f}", f"{p.client_mb:.0f}",
                    f"{p.server_mb:.0f}", f"{p.bytes_per_step / 1e6:.2f}", mark,
                )
            )  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if len(plan.groups) > 1:
        lines += ["", "best cut per client:"]
        for client, p in sorted(plan.best_per_client().items()):
            lines.append(f"  client {client}: {_cut(p, plan.by_pipelined)}")
    return "\n".join(lines)


def as_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-able object (for scripts)."""
    profile = plan.profile

    def cut(p: Prediction | None) -> dict[str, Any] | None:
        return None if p is None else p.as_dict()

    return {
        "model": profile.model,
        "layers": profile.layers,
        "mode": profile.mode,
        "batch_size": profile.batch_size,
        "seq_len": profile.seq_len,
        "micro_batches": plan.micro_batches,
        "chosen_by": "pipelined_s" if plan.by_pipelined else "serial_s",
        "profile": profile.summary(),
        "groups": [
            {
                "clients": list(g.setting.clients),
                "speed": g.setting.speed,
                "link": {"up": asdict(g.setting.up), "down": asdict(g.setting.down)},
                "client_memory_mb": g.setting.budget_mb,
                "current": list(g.setting.current) if g.setting.current else None,
                "best": cut(g.best),
                "candidates": [p.as_dict() for p in g.predictions],
            }
            for g in plan.groups
        ],
        "best_per_client": {str(client): cut(p) for client, p in sorted(plan.best_per_client().items())},
    }
