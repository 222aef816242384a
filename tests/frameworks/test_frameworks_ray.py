"""``transport.name=ray``: the server and every client as Ray actors compute the in-process run bit for bit (LoRA
dropout on), through the same mods (here also the fp16 codec) as in-process; every split framework runs to the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from splitlm.deploy import launch
from splitlm.frameworks import run_framework
from splitlm.frameworks.base import FRAMEWORKS

COMMON = (
    "framework.num_clients=3", "framework.rounds=2", "train.steps=4", "data.partition=dirichlet", "lora.dropout=0.05",
)  # fmt: skip
FP16 = ("transport.codec.activations=fp16", "transport.codec.gradients=fp16")
CASES = {"sflv2": ("sflv2", ()), "psl": ("psl", ()), "sflv2-fp16": ("sflv2", FP16)}
SPLIT_FRAMEWORKS = [name for name in FRAMEWORKS.names() if FRAMEWORKS.get(name).split]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _losses(run_files, out: Path) -> list[tuple[int, str, int, float]]:
    return sorted((r["round"], r["client"], r["step"], r["loss"]) for r in run_files.metrics(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_ray_actors_compute_the_in_process_run(ray_cluster, case, fast_config, run_files, tmp_path) -> None:
    framework, extra = CASES[case]
    local = fast_config(tmp_path / "local", f"framework.name={framework}", *COMMON, *extra)
    actors = fast_config(tmp_path / "ray", f"framework.name={framework}", *COMMON, *extra, "transport.name=ray")
    local_summary = run_framework(local)
    summary = launch(actors)
    ours, theirs = _losses(run_files, tmp_path / "ray"), _losses(run_files, tmp_path / "local")
    # bit for bit, with dropout on: every random draw is seeded by (seed, client, step, micro-batch, part), and
    # psl's barrier sums the clients' trunk gradients in client order, not in the order the actors' requests came
    assert ours == theirs
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "ray" / "adapters" / "head.safetensors").is_file()
    for client in ("0", "1", "2"):  # each client actor writes its own files, apart from the driver's
        own = tmp_path / "ray" / "clients" / client
        assert [r["loss"] for r in run_files.metrics(own)] == [r[3] for r in ours if r[1] == client]
        assert (own / "summary.json").is_file() and (own / "adapters" / "head.safetensors").is_file()
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    # the client actors' meters count what their mods sent: the same bytes as in-process (fp16: half the floats)
    assert (summary["bytes_up"], summary["bytes_down"]) == (local_summary["bytes_up"], local_summary["bytes_down"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("framework", SPLIT_FRAMEWORKS)
def test_every_split_framework_runs_under_ray_to_the_end(
    ray_cluster, framework, fast_config, run_files, tmp_path
) -> None:
    # The tiny model's trunk adapter (4 layers x 3 LoRA modules x A, B: 24 tensors) and client sides cross the
    # actors as state messages: sflv1 and gsfl average trunk adapters, every framework but psl the client sides.
    overrides = (f"framework.name={framework}", "framework.num_clients=2", "framework.rounds=2", "train.steps=2")
    local_summary = run_framework(fast_config(tmp_path / "local", *overrides))
    summary = launch(fast_config(tmp_path / "ray", *overrides, "transport.name=ray"))
    assert summary["steps"] == local_summary["steps"] > 0
    assert summary["rounds"] == 2 and summary["eval_loss_after"] is not None
    assert _losses(run_files, tmp_path / "ray") == _losses(run_files, tmp_path / "local")


# The asynchronous strategies on the virtual clock: the order updates are applied in follows from the config.
CLOCKED = {
    "sflv2-async": (
        "framework.name=sflv2", "framework.clients=[{speed: 1}, {speed: 1}, {speed: 2}]",
        "framework.aggregation.async.clock=steps",
    ),
    "gsfl-semi_async": (
        "framework.name=gsfl", "framework.groups=[[0, 1], [2]]", "framework.aggregation.semi_async.clock=steps",
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(CLOCKED))
def test_the_clocked_strategies_under_ray_compute_the_in_process_run(
    ray_cluster, case, fast_config, run_files, tmp_path
) -> None:
    overrides = ("framework.num_clients=3", "framework.rounds=2", "train.steps=4", *CLOCKED[case])
    local_summary = run_framework(fast_config(tmp_path / "local", *overrides))
    summary = launch(fast_config(tmp_path / "ray", *overrides, "transport.name=ray"))
    assert _losses(run_files, tmp_path / "ray") == _losses(run_files, tmp_path / "local")
    ours, theirs = run_files.rounds(tmp_path / "ray"), run_files.rounds(tmp_path / "local")
    assert [r["eval_loss"] for r in ours] == [r["eval_loss"] for r in theirs]
    assert summary["aggregation"] == local_summary["aggregation"] and summary["aggregation"]["clock"] == "steps"


def test_run_framework_refuses_a_ray_config(fast_config, tmp_path) -> None:
    from splitlm.errors import ConfigError

    with pytest.raises(ConfigError, match="run it with `splitlm train`"):
        run_framework(fast_config(tmp_path / "x", "transport.name=ray"))
