"""Server-side guards (``privacy.guards``) and SafeSplit: the statistics on hand-made trunk adapter changes, a flagged
client's round rolled back and run again without it (the run equals its ``framework.leave_out`` reference, bit for
bit), no flag on honest tiny runs, and one-line refusals where no client's own change can be watched."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

from splitlm.config import Config
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import config_problems
from splitlm.privacy.guards import GUARDS, Guard
from splitlm.privacy.guards.safesplit import SafeSplit, angle, dct_basis, low_frequencies, modules
from splitlm.registry import ComponentSettings

PLUGIN = Path(__file__).with_name("guard_plugin.py")  # flip_grad: a client that sends the opposite gradients
RUN = ("framework.rounds=3", "train.steps=6", "train.warmup_steps=0")


# --- the statistics -------------------------------------------------------------------------------------------


def test_the_dct_is_orthonormal_and_keeps_the_lowest_frequencies() -> None:
    basis = dct_basis(8, 8)
    assert torch.allclose(basis @ basis.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    constant = torch.full((6, 10), 2.0)  # all of a constant's energy is at frequency (0, 0)
    coefficients = low_frequencies(constant, 3).reshape(3, 3)
    assert coefficients[0, 0].item() == pytest.approx(2.0 * math.sqrt(60))
    assert coefficients.flatten()[1:].abs().max().item() < 1e-12
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert low_frequencies(x, 7).norm().item() == pytest.approx(x.norm().item())  # Parseval, all frequencies kept
    assert low_frequencies(x, 2).shape == (4,)


def test_angles_between_changes() -> None:
    x = torch.tensor([1.0, 2.0, -0.5])
    assert angle(x, 3 * x) == pytest.approx(0.0, abs=1e-7)
    assert angle(x, -x) == pytest.approx(math.pi)
    assert angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(math.pi / 2)
    assert angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1e-6])) == pytest.approx(1e-6, rel=1e-6)  # small: exact
    assert angle(torch.zeros(3), x) == 0.0


def test_lora_factors_are_read_as_one_module() -> None:
    state = {
        "model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
        "model.layers.2.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
        "lm_head.weight": torch.zeros(3, 4),
    }
    assert modules(state) == {
        "lm_head.weight": ("lm_head.weight",),
        "model.layers.2.self_attn.q_proj": (
            "model.layers.2.self_attn.q_proj.lora_A.weight", "model.layers.2.self_attn.q_proj.lora_B.weight",
        ),
    }  # fmt: skip


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{layer}.self_attn.{m}.lora_{f}.weight": torch.randn(*shape, generator=g)
        for layer in (1, 2)
        for m in ("q_proj", "v_proj")
        for f, shape in (("A", (4, 16)), ("B", (16, 4)))
    }


def changes(clients: int, odd: dict[int, float]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A trunk adapter and each client's adapter after training: the same step along a common direction, plus noise
    of its own; client ``i`` in ``odd`` takes ``odd[i]`` times the common step (negative: the opposite way)."""
    before, common = adapter(0), adapter(1)
    afters = []
    for client in range(clients):
        noise = adapter(100 + client)
        scale = odd.get(client, 1.0)
        afters.append({k: before[k] + 0.01 * scale * common[k] + 0.006 * noise[k] for k in before})
    return before, afters


def judge(
    guard: SafeSplit,
    before: dict[str, torch.Tensor],
    afters: list[dict[str, torch.Tensor]],
    sides: tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]] | None = None,
) -> dict[str, str]:
    """One round of ``guard`` over the clients' trunk adapter changes (``before`` -> ``afters``) and, given ``sides``,
    their client sides' changes (the trunk's for the client sides too when not given)."""
    side_before, side_afters = sides or (before, afters)
    guard.open_round(0, [str(i) for i in range(len(afters))])
    for client, after in enumerate(afters):
        shown = guard.watches()
        olds = {p: s for p, s in (("trunk", before), ("client_side", side_before)) if p in shown}
        news = {p: s for p, s in (("trunk", after), ("client_side", side_afters[client])) if p in shown}
        guard.trained(0, str(client), olds, news, steps=2)
    return guard.check(0)


def test_safesplit_flags_a_malicious_change_and_no_honest_one() -> None:
    guard = SafeSplit(SafeSplit.Settings(parts=["trunk"]))
    assert judge(guard, *changes(6, {})) == {}  # honest clients: nothing flagged
    honest = guard.report()["rounds"][-1]
    static, angles = honest["static"]["trunk"], honest["angle"]["trunk"]
    assert honest["judged"] and max(static.values()) < 2 and max(angles.values()) < 60
    flagged = judge(guard, *changes(6, {4: -1.0}))  # client 4 goes the opposite way
    assert list(flagged) == ["4"] and "turns" in flagged["4"]
    angles = guard.report()["rounds"][-1]["angle"]["trunk"]
    assert angles["4"] > 90 > max(v for c, v in angles.items() if c != "4")
    assert guard.report()["flags"][-1]["client"] == "4" and guard.report()["flags"][-1]["part"] == "trunk"


def test_the_static_check_catches_a_change_far_too_large_and_rule_both_needs_both() -> None:
    before, afters = changes(6, {2: 20.0})  # client 2 goes the majority's way, 20 times as far
    any_ = SafeSplit()
    assert list(judge(any_, before, afters)) == ["2"]
    round_ = any_.report()["rounds"][-1]
    assert round_["static"]["trunk"]["2"] > 3 and round_["angle"]["trunk"]["2"] < 90  # the static check alone
    assert judge(SafeSplit(SafeSplit.Settings(rule="both")), before, afters) == {}


def test_a_client_side_boosted_far_past_the_others_is_caught_where_its_trunk_change_looks_honest() -> None:
    trunk = changes(6, {})  # every client's trunk adapter change is an honest one
    sides = changes(6, {3: 12.0})  # client 3's client side goes the majority's way, 12 times as far (boost)
    both = SafeSplit()
    flagged = judge(both, *trunk, sides=sides)
    assert list(flagged) == ["3"] and "client side change" in flagged["3"]
    round_ = both.report()["rounds"][-1]
    assert max(round_["static"]["trunk"].values()) < 2  # the trunk gave nothing away
    assert (
        round_["static"]["client_side"]["3"]
        > 3
        > max(v for c, v in round_["static"]["client_side"].items() if c != "3")
    )
    assert both.report()["flags"] == [
        {"round": 1, "client": "3", "part": "client_side", "static": round_["static"]["client_side"]["3"],
         "angle": round_["angle"]["client_side"]["3"]}
    ]  # fmt: skip
    trunk_only = SafeSplit(SafeSplit.Settings(parts=["trunk"]))  # the paper's view
    assert trunk_only.watches() == {"trunk"} and judge(trunk_only, *trunk, sides=sides) == {}


def test_a_round_of_too_few_clients_is_not_judged() -> None:
    guard = SafeSplit()
    assert judge(guard, *changes(2, {1: -1.0})) == {}
    assert guard.report()["rounds"] == [{"round": 1, "clients": ["0", "1"], "judged": False}]
    restored = SafeSplit()
    restored.load_state(guard.state())  # a checkpoint keeps what the guard reported
    assert restored.report() == guard.report()


# --- rollback and rerun ------------------------------------------------------------------------------------------


class FlagOnce(Guard):
    """A test's guard: flags one client in one round (once it trained), whatever its change."""

    name = "flag_once"

    class Settings(ComponentSettings):
        client: str = "1"
        round: int = Field(2, ge=1)

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.trained_now: set[str] = set()
        self.flags: list[dict[str, Any]] = []

    def open_round(self, round_index: int, client_ids: list[str]) -> None:
        self.trained_now = set()

    def trained(self, round_index: int, client_id: str, before: Any, after: Any, steps: int) -> None:
        assert before.keys() == {"trunk"}, "a guard is shown the trunk adapter alone unless it asks for more"
        trunk, trained = before["trunk"], after["trunk"]
        assert steps > 0 and any(not torch.equal(trunk[k], trained[k]) for k in trunk), "saw no change"
        self.trained_now.add(client_id)

    def check(self, round_index: int) -> dict[str, str]:
        s = self.settings
        if round_index + 1 == s.round and s.client in self.trained_now:
            self.flags.append({"round": round_index + 1, "client": s.client})
            return {s.client: "the test says so"}
        return {}

    def report(self) -> dict[str, Any]:
        return {"flags": self.flags}

    def state(self) -> dict[str, Any]:
        return self.report()

    def load_state(self, state: dict[str, Any]) -> None:
        self.flags = list(state["flags"])


@pytest.fixture
def flag_once() -> Iterator[type[FlagOnce]]:
    GUARDS.component(FlagOnce)
    try:
        yield FlagOnce
    finally:
        GUARDS.remove(FlagOnce.name)


def same_run(run: Path, reference: Path, run_files: Any) -> None:
    """Every client step's loss, every round's held-out loss and participants, and the final adapters equal."""
    key = lambda r: (r["round"], r["client"], r["step"])  # noqa: E731
    steps = sorted((key(r), r["loss"]) for r in run_files.metrics(run))
    assert steps == sorted((key(r), r["loss"]) for r in run_files.metrics(reference))
    rounds = [(r["eval_loss"], r["participants"]) for r in run_files.rounds(run)]
    assert rounds == [(r["eval_loss"], r["participants"]) for r in run_files.rounds(reference)]
    for name in ("trunk", "head", "tail"):
        ours, theirs = (load_file(str(p / "adapters" / f"{name}.safetensors")) for p in (run, reference))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.parametrize("framework", ["sflv1", "sflv2", "sl", "gsfl"])
def test_a_flagged_clients_round_is_rolled_back_and_run_again_without_it(
    framework: str, flag_once: type[FlagOnce], make_config: Callable[..., Config], run_files: Any
) -> None:
    setup = (f"framework.name={framework}", "framework.num_clients=3", "lora.dropout=0.05", *RUN)
    if framework == "gsfl":
        setup += ("framework.groups=[[0, 1], [2]]",)
    guarded = make_config("guarded", *setup, "privacy.guards.flag_once.client=1")
    summary = run_framework(guarded)
    assert summary["privacy"]["guards"] == {"flag_once": {"flags": [{"round": 2, "client": "1"}]}}
    reference = make_config("reference", *setup, "framework.leave_out={2: ['1']}")
    run_framework(reference)
    same_run(Path(guarded.output_dir), Path(reference.output_dir), run_files)
    assert [r["participants"] for r in run_files.rounds(Path(guarded.output_dir))][1] == ["0", "2"]


def test_a_resumed_run_keeps_the_flags_raised_before(
    flag_once: type[FlagOnce], make_config: Callable[..., Config], run_files: Any
) -> None:
    setup = ("framework.name=sflv1", "framework.num_clients=3", "privacy.guards.flag_once.round=1")
    first = make_config("run", *setup, "framework.rounds=2", "train.steps=4")
    assert run_framework(first)["privacy"]["guards"]["flag_once"]["flags"] == [{"round": 1, "client": "1"}]
    resumed = run_framework(make_config("run", *setup, "framework.rounds=3", "train.steps=6"), resume=True)
    assert resumed["privacy"]["guards"]["flag_once"]["flags"] == [{"round": 1, "client": "1"}]  # from the checkpoint
    assert [r["participants"] for r in run_files.rounds(Path(first.output_dir))] == [["0", "2"], *[["0", "1", "2"]] * 2]


# --- SafeSplit in a run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "seed"), [("sflv1", 1), ("sflv2", 2), ("sl", 3)])
def test_safesplit_flags_no_honest_client(
    framework: str, seed: int, make_config: Callable[..., Config], run_files: Any
) -> None:
    config = make_config(
        "honest", f"framework.name={framework}", "framework.num_clients=4", f"seed={seed}", *RUN,
        "privacy.guards=[safesplit]",
    )  # fmt: skip
    report = run_framework(config)["privacy"]["guards"]["safesplit"]
    assert report["flags"] == []
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and all(r["judged"] for r in report["rounds"])
    for round_ in report["rounds"]:
        assert round_["angle"].keys() == {"trunk", "client_side"}, round_
        assert all(0 < a < 90 for part in round_["angle"].values() for a in part.values()), round_


def test_safesplit_catches_a_client_that_turns_the_trunk_around_and_the_run_equals_its_leave_out_reference(
    make_config: Callable[..., Config], run_files: Any
) -> None:
    poison = (f"plugins=[{PLUGIN}]", "privacy.client_attack={flip_grad: {clients: [1]}}")
    setup = ("framework.name=sflv1", "framework.num_clients=4", "lora.dropout=0.05", *RUN, *poison)
    guarded = make_config("guarded", *setup, "privacy.guards=[safesplit]")
    report = run_framework(guarded)["privacy"]["guards"]["safesplit"]
    flagged = sorted({flag["round"] for flag in report["flags"]})
    assert flagged and {flag["client"] for flag in report["flags"]} == {"1"}, report
    reference = make_config(
        "reference", *setup, "framework.leave_out={" + ", ".join(f"{r}: ['1']" for r in flagged) + "}"
    )
    run_framework(reference)
    same_run(Path(guarded.output_dir), Path(reference.output_dir), run_files)


@pytest.mark.parametrize("framework", ["sflv2", "sflv1"])
def test_safesplit_catches_a_boosted_client_side_and_the_run_equals_its_leave_out_reference(
    framework: str, make_config: Callable[..., Config], run_files: Any
) -> None:
    boost = "privacy.client_attack={boost: {clients: [2], factor: 12}}"  # model replacement: client 2's update x12
    setup = (f"framework.name={framework}", "framework.num_clients=4", "lora.dropout=0.05", *RUN, boost)
    guarded = make_config("guarded", *setup, "privacy.guards=[safesplit]")
    report = run_framework(guarded)["privacy"]["guards"]["safesplit"]
    flagged = sorted({flag["round"] for flag in report["flags"]})
    assert flagged and {flag["client"] for flag in report["flags"]} == {"2"}, report
    first = report["rounds"][0]  # its first attempt: the client side gives it away, not its trunk adapter change
    assert first["flagged"] == ["2"] and report["flags"][0]["part"] == "client_side", first
    assert first["static"]["client_side"]["2"] > 3 > first["static"]["trunk"]["2"], first
    reference = make_config(
        "reference", *setup, "framework.leave_out={" + ", ".join(f"{r}: ['2']" for r in flagged) + "}"
    )
    run_framework(reference)
    same_run(Path(guarded.output_dir), Path(reference.output_dir), run_files)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"framework": {"name": "psl", "num_clients": 4}}, "framework.name=psl takes one trunk step from all"),
        ({"framework": {"name": "sflv2", "num_clients": 4, "merge": 2}}, "framework.merge=2 trains several clients"),
        ({"framework": {"name": "sflv1", "num_clients": 2}}, "a round has 2; set framework.num_clients"),
        ({"framework": {"name": "sflv1", "num_clients": 4, "clients_per_round": 2}}, "a round has 2"),
        (
            {"framework": {"name": "sflv1", "num_clients": 4}, "lora": {"trunk": {"method": "full"}}},
            "lora.trunk.method",
        ),
        ({"framework": {"name": "centralized"}}, "framework.name=centralized has no server"),
        (
            {"framework": {"name": "sflv1", "num_clients": 4, "clients": [{"lora": {"rank": 2}}, {}, {}, {}]}},
            "their own cut or LoRA rank",
        ),
        (
            {"framework": {"name": "sflv1", "num_clients": 4, "aggregation": "async"}},
            "privacy.guards: async trains the clients across rounds",
        ),
        (
            {"framework": {"name": "psl", "num_clients": 4}, "parts": ["client_side"]},
            "framework.name=psl keeps each client's side on the client",
        ),
    ],
)
def test_safesplit_refuses_what_it_cannot_watch_in_one_line(tree: dict[str, Any], expected: str) -> None:
    tree = dict(tree)
    settings = {"parts": tree.pop("parts")} if "parts" in tree else {}
    problems = config_problems({**tree, "privacy": {"guards": {"safesplit": settings}}})
    assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0], problems
    assert (
        config_problems({"framework": {"name": "sflv1", "num_clients": 4}, "privacy": {"guards": ["safesplit"]}}) == []
    )
