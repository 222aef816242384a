"""Clients with different cuts and LoRA ranks (``framework.clients``).

The server holds the union of the clients' trunk blocks once; each client loads only its own blocks. The
aggregate averages each LoRA module over the parties that trained it (a client's side, or the blocks its
trunk adapter ran for it), and stacks LoRA pairs of different ranks so that its delta weight is exactly the
weighted mean of the clients' delta weights. With every client holding all the data, a mixed-cut sflv1 run is
the centralized run, client by client and step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitlm.deploy.agent import ClientAgent
from splitlm.errors import ConfigError
from splitlm.frameworks import run_framework
from splitlm.frameworks.aggregate import AggregationError, aggregate, contribution, fedavg, fit
from splitlm.frameworks.base import framework_of
from splitlm.frameworks.federation import build_federation
from splitlm.frameworks.setup import server_spec
from splitlm.models import SplitSpec
from splitlm.transport import InProcessTransport

ALPHA = 8.0
KEY = "model.layers.2.self_attn.q_proj"
# Same tolerances as test_runtime_equivalence: the split forward is bit-identical to the unsplit one; rounding
# in a differently ordered sum moves later losses by far less than 1e-5, adapters by less than 1e-6.
LOSS_ATOL = 1e-5
ADAPTER_ATOL = 1e-6
# tiny-llama has 6 blocks. U-shape: heads of 1, 2, 1 blocks and tails of 1, 1, 2: the server holds blocks 1..4
# once; client 1 runs block 1 itself, client 2 block 4. Vanilla: heads of 1, 2, 3; the server holds blocks 1..5.
CUTS = {
    "ushape": ("split.mode=ushape", "split.head_layers=1", "split.tail_layers=1",
               "framework.clients=[{}, {split: {head_layers: 2}}, {split: {tail_layers: 2}}]"),
    "vanilla": ("split.mode=vanilla", "split.head_layers=1", "split.tail_layers=0",
                "framework.clients=[{}, {split: {head_layers: 2}}, {split: {head_layers: 3}}]"),
}  # fmt: skip
SPECS = {
    "ushape": [SplitSpec("ushape", 1, 1), SplitSpec("ushape", 2, 1), SplitSpec("ushape", 1, 2)],
    "vanilla": [SplitSpec("vanilla", 1, 0), SplitSpec("vanilla", 2, 0), SplitSpec("vanilla", 3, 0)],
}
ROUNDS = ("framework.rounds=2", "train.steps=4")


# --- the aggregate: pure functions on hand-made tensors ------------------------------------------------------


def _pair(rank: int, seed: int, out: int = 6, width: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{KEY}.lora_A.weight": torch.randn(rank, width, generator=g, dtype=torch.float64),
        f"{KEY}.lora_B.weight": torch.randn(out, rank, generator=g, dtype=torch.float64),
    }


def _delta(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft's delta weight of the pair: (alpha / r) B A."""
    a, b = state[f"{KEY}.lora_A.weight"], state[f"{KEY}.lora_B.weight"]
    return (ALPHA / a.shape[0]) * b @ a


def test_mixed_ranks_stack_to_the_weighted_mean_of_the_delta_weights() -> None:
    # Prepare: three clients of ranks 2, 3 and 4, weighted 1, 2, 3.
    states = [_pair(2, 0), _pair(3, 1), _pair(4, 2)]
    weights = [1.0, 2.0, 3.0]
    # Execute
    merged = aggregate(states, weights)
    # Assert: one pair of the stacked rank 9 whose delta is the weighted mean of the clients' deltas.
    assert merged[f"{KEY}.lora_A.weight"].shape == (9, 5)
    assert merged[f"{KEY}.lora_B.weight"].shape == (6, 9)
    expected = sum(w / 6.0 * _delta(s) for s, w in zip(states, weights, strict=True))
    torch.testing.assert_close(_delta(merged), expected, rtol=1e-12, atol=1e-12)


def test_fit_to_a_rank_at_least_the_stacked_one_reproduces_the_delta() -> None:
    merged = aggregate([_pair(2, 0), _pair(3, 1)], [1.0, 1.0])  # stacked rank 5
    for rank in (5, 7):
        like = _pair(rank, 9)
        fitted = fit(like, merged)
        assert {k: v.shape for k, v in fitted.items()} == {k: v.shape for k, v in like.items()}
        torch.testing.assert_close(_delta(fitted), _delta(merged), rtol=1e-12, atol=1e-12)


def test_fit_to_a_smaller_rank_is_the_best_approximation() -> None:
    merged = aggregate([_pair(2, 0), _pair(3, 1)], [1.0, 3.0])  # stacked rank 5, the product of rank 5
    fitted = fit(_pair(3, 9), merged)
    u, s, vh = torch.linalg.svd(_delta(merged))
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]  # Eckart-Young: the truncated SVD
    torch.testing.assert_close(_delta(fitted), best, rtol=1e-10, atol=1e-10)
    a = fitted[f"{KEY}.lora_A.weight"]
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64))  # A's rows: orthonormal, none zero


def test_keys_held_by_a_subset_are_averaged_over_that_subset() -> None:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 4, generator=g) for _ in range(3)]
    norm = torch.randn(4, generator=g)
    states = [
        {"model.layers.0.w": x[0], "model.norm.weight": norm},
        {"model.layers.0.w": x[1]},
        {"model.layers.1.w": x[2]},
    ]
    merged = aggregate(states, [1.0, 3.0, 5.0])
    torch.testing.assert_close(merged["model.layers.0.w"], (x[0] + 3 * x[1]) / 4)  # states 0 and 1 only
    assert torch.equal(merged["model.layers.1.w"], x[2])
    assert torch.equal(merged["model.norm.weight"], norm)


def test_one_rank_averages_the_factors_exactly_as_fedavg() -> None:
    states = [{k: v.float() for k, v in _pair(4, seed).items()} for seed in range(3)]
    merged, expected = aggregate(states, [1.0, 2.0, 4.0]), fedavg(states, [1.0, 2.0, 4.0])
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert all(torch.equal(v, expected[k]) for k, v in fit(states[0], merged).items())


def test_a_client_contributes_only_the_trunk_blocks_its_cut_leaves_to_the_server() -> None:
    trunk = {f"model.layers.{i}.q.lora_A.weight": torch.full((1,), float(i)) for i in (1, 2, 3, 4)}
    head = {f"model.layers.{i}.q.lora_A.weight": torch.zeros(1) for i in (0, 1)}
    own = contribution(head, trunk, [2, 3, 4])
    assert sorted(own) == sorted(f"model.layers.{i}.q.lora_A.weight" for i in range(5))
    assert torch.equal(own["model.layers.1.q.lora_A.weight"], torch.zeros(1))  # the head's, not the trunk's
    with pytest.raises(AggregationError, match="both hold"):
        contribution(head, trunk, [1, 2])
    with pytest.raises(AggregationError, match="lacks"):
        fit({"model.layers.5.w": torch.zeros(1)}, own)


# --- the parties: who holds which blocks ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_each_client_loads_its_own_blocks_and_the_server_their_union(make_config, mode: str) -> None:
    config = make_config(mode, "framework.name=sflv1", "framework.num_clients=3", *CUTS[mode])
    assert server_spec(config) == SplitSpec(mode, 1, 1 if mode == "ushape" else 0)
    fed = build_federation(config)
    trunk = list(range(1, 5 if mode == "ushape" else 6))
    assert fed.server.stage.layer_indices == trunk
    assert len({p.data_ptr() for p in fed.server.stage.parameters()}) == len(list(fed.server.stage.parameters()))
    for member, spec in zip(fed.members, SPECS[mode], strict=True):
        total = 6
        for role in spec.client_roles():
            stage = member.client.stages[role]
            assert stage.layer_indices == spec.layers(role, total)
            blocks = {int(k.split(".")[2]) for k in stage.state_dict() if k.startswith("model.layers.")}
            assert blocks == set(spec.layers(role, total))  # no other block's weights
        assert fed.server.route_of(member.client_id).blocks == tuple(spec.layers("trunk", total))


def test_per_client_ranks_give_per_client_trunk_adapters_of_those_ranks(make_config) -> None:
    ranks = "framework.clients=[{lora: {rank: 2}}, {lora: {rank: 4}}, {lora: {rank: 8}}]"
    fed = build_federation(make_config("ranks", "framework.name=sflv1", "framework.num_clients=3", ranks))
    for member, rank in zip(fed.members, (2, 4, 8), strict=True):
        head = member.client.state()
        assert {v.shape[0] for k, v in head.items() if "lora_A" in k} == {rank}
        trunk = fed.server.adapter_state(fed.server.adapter_of(member.client_id))
        assert {v.shape[1] for k, v in trunk.items() if "lora_B" in k} == {rank}


@pytest.mark.parametrize("name", ["sl", "gsfl", "centralized"])
def test_frameworks_that_pass_one_client_side_along_refuse_mixed_cuts(make_config, name: str) -> None:
    config = make_config("refused", f"framework.name={name}", "framework.num_clients=3", *CUTS["ushape"])
    with pytest.raises(ConfigError) as error:
        framework_of(config).check(config)
    message = str(error.value)
    assert "\n" not in message
    assert f"framework.clients: framework.name={name}" in message and "same cut and LoRA rank" in message
    same = make_config("same", f"framework.name={name}", "framework.num_clients=3", "framework.clients=[{}, {}, {}]")
    framework_of(same).check(same)  # overrides that change no cut or rank are fine


# --- whole runs ---------------------------------------------------------------------------------------------


def _effective(checkpoint: Path, client: int, spec: SplitSpec) -> dict[str, torch.Tensor]:
    """What client ``client`` computes with: its head [+ tail] and the blocks its trunk adapter runs for it."""
    state: dict[str, torch.Tensor] = {}
    for role in spec.client_roles():
        state.update(load_file(str(checkpoint / f"client-{client}" / f"{role}.safetensors")))
    trunk = load_file(str(checkpoint / "server" / f"trunk-client-{client}.safetensors"))
    route = spec.layers("trunk", 6)
    state.update({k: v for k, v in trunk.items() if int(k.split(".")[2]) in route})
    return state


@pytest.mark.parametrize("mode", ["ushape", "vanilla"])
def test_mixed_cuts_equal_centralized_training(everyone, make_config, run_files, mode: str) -> None:
    # Prepare: three sflv1 clients holding all the data, each with its own cut; the centralized baseline.
    hetero = make_config(f"hetero-{mode}", "framework.name=sflv1", "framework.num_clients=3",
                         f"data.partition={everyone}", *ROUNDS, *CUTS[mode])  # fmt: skip
    central = make_config(f"central-{mode}", "framework.name=centralized", *ROUNDS, *CUTS[mode][:3])
    # Execute
    summary = run_framework(hetero)
    run_framework(central)
    # Assert: each client's per-step losses are the centralized run's.
    expected = [r["loss"] for r in run_files.metrics(Path(central.output_dir))]
    records = run_files.metrics(Path(hetero.output_dir))
    assert len(expected) == 4 and max(expected) - min(expected) > 1e-3
    for client in "012":
        losses = [r["loss"] for r in records if r["client"] == client]
        assert losses[0] == expected[0]
        assert losses == pytest.approx(expected, rel=0, abs=LOSS_ATOL)
    # ...after aggregation every client computes with the same adapters, the centralized run's.
    last = sorted((Path(hetero.output_dir) / "checkpoints").glob("step-*"))[-1]
    states = [_effective(last, i, spec) for i, spec in enumerate(SPECS[mode])]
    reference = run_files.adapters(Path(central.output_dir), "model")
    for state in states:
        assert sorted(state) == sorted(reference)
        for key, value in reference.items():
            assert torch.equal(state[key], states[0][key]), key
            torch.testing.assert_close(state[key], value, rtol=0, atol=ADAPTER_ATOL)
    assert all(reference[k].abs().max() > 1e-4 for k in reference if "lora_B" in k)  # it trained
    assert summary["trunk_layers"] == list(range(1, 5 if mode == "ushape" else 6))


def test_mixed_cuts_and_ranks_train_aggregate_and_assemble(make_config, run_files, assembled_loss) -> None:
    # Prepare: sflv1 with three cuts and ranks 2, 4, 8 on the usual partition.
    clients = ("framework.clients=[{lora: {rank: 2}}, {split: {head_layers: 2}, lora: {rank: 4}}, "
               "{split: {tail_layers: 2}, lora: {rank: 8}}]")  # fmt: skip
    config = make_config("ranks", "framework.name=sflv1", "framework.num_clients=3", *ROUNDS, *CUTS["ushape"][:3],
                         clients)  # fmt: skip
    # Execute
    summary = run_framework(config)
    out = Path(config.output_dir)
    # Assert: it trained; each party keeps its own rank; after the last aggregation the clients agree on every
    # module up to each one's rank (the rank-2 client holds the best rank-2 approximation of the others' sum).
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    states = [_effective(last, i, spec) for i, spec in enumerate(SPECS["ushape"])]
    for state, rank in zip(states, (2, 4, 8), strict=True):
        assert {v.shape[0] for k, v in state.items() if "lora_A" in k} == {rank}
    assert sorted(states[0]) == sorted(states[1]) == sorted(states[2])
    # ``generate`` / ``export`` rebuild client 0 (adapters/): the evaluated model, to merging's rounding.
    assert assembled_loss(out) == pytest.approx(summary["eval_loss_after"], abs=1e-4)


@pytest.mark.parametrize("name", ["sflv2", "psl"])
def test_shared_trunk_frameworks_run_with_mixed_cuts(make_config, name: str) -> None:
    config = make_config(name, f"framework.name={name}", "framework.num_clients=3", *ROUNDS, *CUTS["ushape"])
    summary = run_framework(config)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert [c["steps"] for c in summary["clients"]] == [4, 4, 4]


def test_a_networked_client_says_hello_with_its_own_cut(make_config) -> None:
    """``splitlm serve`` checks each client's hello against that client's cut in ``framework.clients``."""
    config = make_config("hello", "framework.name=sflv1", "framework.num_clients=3", *CUTS["ushape"])
    fed = build_federation(config)
    agent = ClientAgent(config, "2", InProcessTransport(fed.server.submit))
    meta = agent.hello().meta
    assert (meta["mode"], meta["head_layers"], meta["tail_layers"]) == ("ushape", 1, 2)
    assert agent.member.client.stages["tail"].layer_indices == [4, 5]


def test_generate_rebuilds_the_client_whose_side_adapters_hold(make_config, assembled_loss) -> None:
    # Client 0 sits out the last round, so adapters/ holds client 1's side, which has another cut (head 2).
    config = make_config("not-client-0", "framework.name=sflv1", "framework.num_clients=3", *ROUNDS,
                         *CUTS["ushape"], "framework.leave_out={2: ['0']}")  # fmt: skip
    summary = run_framework(config)
    out = Path(config.output_dir)
    assert json.loads((out / "adapters" / "client.json").read_text()) == {"client": 1}
    assert assembled_loss(out) == pytest.approx(summary["eval_loss_after"], abs=1e-4)
