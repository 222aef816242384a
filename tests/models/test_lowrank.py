"""``split.bottleneck=K``: a learned bottleneck at the cut (an encoder d -> K before it, a decoder K -> d after it).

Runs on tiny-llama (d = 64, 6 blocks; head 1 block, U-shaped tail 1 block): the cuts are in front of blocks 1
and 5, so the head holds ``lowrank.1.encoder``, the trunk ``lowrank.1.decoder`` (and in U-shape
``lowrank.5.encoder``), the tail ``lowrank.5.decoder``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import splitlm.frameworks.aggregate as aggregate_module
import splitlm.models.lowrank as lowrank_module
from helpers import interrupt_run
from message_recorder import Recorder as BaseRecorder
from message_recorder import recorded_run
from splitlm.errors import CheckpointError, ConfigError, ProtocolError
from splitlm.frameworks import framework_of, run_framework
from splitlm.frameworks.aggregate import fedavg
from splitlm.frameworks.assemble import assemble, export
from splitlm.frameworks.checkpoint import prepare_output
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import Federation, build_federation
from splitlm.frameworks.setup import build_part, load_source
from splitlm.models.lowrank import basis
from splitlm.peft import load_trainable, trainable_parameters
from splitlm.peft.lora import ADAPTER
from splitlm.transport import Message

D, K = 64, 8  # tiny-llama's hidden size; the bottleneck's rank
LOWRANK = f"split.bottleneck={K}"
MODES = {
    "ushape": ("split.mode=ushape", "split.tail_layers=1"),
    "vanilla": ("split.mode=vanilla", "split.tail_layers=0"),
}
CUT_TENSORS = {  # what each part's adapter file holds of the bottleneck (U-shape)
    "head": {"lowrank.1.encoder.weight"},
    "trunk": {"lowrank.1.decoder.weight", "lowrank.1.decoder.bias", "lowrank.5.encoder.weight"},
    "tail": {"lowrank.5.decoder.weight", "lowrank.5.decoder.bias"},
}
CUT_TENSORS_VANILLA = {"head": CUT_TENSORS["head"], "trunk": {"lowrank.1.decoder.weight", "lowrank.1.decoder.bias"}}


class Recorder(BaseRecorder):
    """Every (request, reply) pair, and the cut tensors among them."""

    def cut_bytes(self, step: int) -> int:
        """Bytes of the tensors that cross a cut (activations and their gradients) in training step ``step``."""
        total = 0
        for request, reply in self.pairs:
            if request.step == step and request.kind in ("forward", "backward"):
                for message in (request, reply):
                    total += sum(
                        t.numel() * t.element_size() for n, t in message.tensors.items() if n in ("hidden", "grad")
                    )
        return total

    def widths(self) -> set[int]:
        return {
            t.shape[-1]
            for request, reply in self.pairs
            for message in (request, reply)
            for name, t in message.tensors.items()
            if name in ("hidden", "grad")
        }


def _recorded_run(monkeypatch: pytest.MonkeyPatch, config) -> tuple[dict, Recorder]:
    return recorded_run(monkeypatch, config, Recorder)


def _drive(config) -> tuple[Federation, dict]:
    fed = build_federation(config)
    return fed, drive(fed, prepare_output(config, False), False, time.perf_counter())


# --- training and traffic ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_a_lowrank_run_trains_and_its_cut_traffic_is_k_over_d(
    make_config, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    identity, plain = _recorded_run(monkeypatch, make_config("identity", *MODES[mode]))
    summary, lowrank = _recorded_run(monkeypatch, make_config("lowrank", *MODES[mode], LOWRANK))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert plain.widths() == {D} and lowrank.widths() == {K}
    steps = summary["steps"]
    assert steps == 5
    for step in range(steps):  # same data, same batch shapes: only the width of what crosses the cut changes
        assert plain.cut_bytes(step) > 0
        assert lowrank.cut_bytes(step) * D == plain.cut_bytes(step) * K
    # masks (and labels in vanilla) still travel as they are
    saved = sum(plain.cut_bytes(s) - lowrank.cut_bytes(s) for s in range(steps))
    assert identity["bytes_up"] + identity["bytes_down"] - saved == summary["bytes_up"] + summary["bytes_down"]


def test_the_bottleneck_is_a_model_option_the_transport_knows_nothing_of(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, recorder = _recorded_run(monkeypatch, make_config("run", *MODES["ushape"], LOWRANK, "train.steps=1"))
    assert recorder.widths() == {K}
    assert all(not m.codecs for pair in recorder.pairs for m in pair)  # K-wide tensors, sent as they are
    with pytest.raises(ConfigError, match=r"split\.bottleneck"):
        make_config("bad", "split.bottleneck=-1")


def test_a_lowrank_run_chains_with_a_wire_codec(make_config) -> None:
    summary = run_framework(make_config("run", *MODES["ushape"], LOWRANK, "transport.codec.activations=int8"))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


# --- initialisation --------------------------------------------------------------------------------------


def _parts(config, roles=("head", "trunk", "tail")) -> dict:
    """Each part built on its own, as its party would (no basis cached from another part's build)."""
    source = load_source(config)
    parts = {}
    for role in roles:
        lowrank_module._basis.cache_clear()
        parts[role] = build_part(config, source, role)
    return parts


def test_at_init_decode_encode_is_the_orthogonal_projection_on_one_shared_basis(make_config) -> None:
    config = make_config("run", *MODES["ushape"], LOWRANK)
    parts = _parts(config)
    head, trunk, tail = (parts[r][1] for r in ("head", "trunk", "tail"))
    q = basis(load_source(config), head, K).to(torch.float32)  # (d, K)
    assert q.shape == (D, K)
    # the K coordinate axes where the (public) token embedding matrix has its largest entries
    embedding = head.token_embeddings().detach()
    assert set(q.nonzero()[:, 0].tolist()) == set(embedding.abs().amax(dim=0).topk(K).indices.tolist())
    torch.testing.assert_close(q.T @ q, torch.eye(K), rtol=0, atol=1e-6)
    for encoder, decoder in ((head.wire_out, trunk.wire_in), (trunk.wire_out, tail.wire_in)):
        # each side built its half on its own, from the same public weights: the halves match bit for bit
        assert torch.equal(encoder.weight, q.T) and torch.equal(decoder.weight, q)
        assert encoder.bias is None and torch.equal(decoder.bias, torch.zeros(D))
        projection = decoder.weight @ encoder.weight  # D E = Q Q^T
        torch.testing.assert_close(projection @ projection, projection, rtol=0, atol=1e-6)  # idempotent
        torch.testing.assert_close(projection, projection.T, rtol=0, atol=0)  # orthogonal
        assert torch.linalg.matrix_rank(projection).item() == K
        h = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(decoder(encoder(h)), h @ q @ q.T, rtol=0, atol=1e-5)
    assert head.in_width == D and trunk.in_width == K and tail.in_width == K


def test_full_rank_bottleneck_leaves_the_model_unchanged_at_init(make_config) -> None:
    identity = _parts(make_config("a", *MODES["ushape"]))
    full_rank = _parts(make_config("b", *MODES["ushape"], f"split.bottleneck={D}"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = []
    for parts in (identity, full_rank):
        with torch.no_grad():
            head = parts["head"][0](input_ids=ids)
            logits.append(parts["tail"][0](hidden_states=parts["trunk"][0](hidden_states=head)))
    assert head.shape == (2, 16, D)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


def test_rank_above_the_hidden_size_is_a_config_error(make_config) -> None:
    config = make_config("run", *MODES["ushape"], f"split.bottleneck={D + 1}")
    with pytest.raises(ConfigError, match=rf"split\.bottleneck={D + 1} needs 1 <= K <= the hidden size {D}"):
        build_part(config, load_source(config), "head")


# --- what trains ------------------------------------------------------------------------------------------


def test_the_bottleneck_trains_with_every_method(make_config) -> None:
    frozen = _parts(make_config("a", *MODES["ushape"], LOWRANK, "lora.head.method=frozen", "lora.trunk.method=frozen"))
    for role in ("head", "trunk"):  # a frozen part trains its (new) bottleneck halves and nothing else
        part, _ = frozen[role]
        names = {n for n, p in part.named_parameters() if p.requires_grad}
        assert names == CUT_TENSORS[role]
    lora = _parts(make_config("b", *MODES["ushape"], LOWRANK))
    part, _ = lora["trunk"]
    names = {n for n, p in part.named_parameters() if p.requires_grad}
    saved = {n for n in names if "modules_to_save" in n}  # peft's trained copy of each half, per adapter
    assert {n.replace("modules_to_save.default.", "").removeprefix("base_model.model.") for n in saved} == CUT_TENSORS[
        "trunk"
    ]
    assert any("lora_A" in n for n in names)
    full = _parts(make_config("c", *MODES["ushape"], LOWRANK, "lora.tail.method=full"), ("tail",))
    part, _ = full["tail"]
    assert CUT_TENSORS["tail"] <= {n for n, p in part.named_parameters() if p.requires_grad}


def test_a_frozen_client_side_learns_its_bottleneck(make_config, run_files) -> None:
    config = make_config("run", *MODES["ushape"], LOWRANK, "lora.head.method=frozen", "lora.tail.method=frozen")
    summary = run_framework(config)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    out = Path(config.output_dir)
    assert set(run_files.adapters(out, "head", "tail")) == CUT_TENSORS["head"] | CUT_TENSORS["tail"]
    source = load_source(config)
    q = basis(source, build_part(config, source, "head")[1], K).to(torch.float32)
    assert not torch.equal(run_files.adapters(out, "head")["lowrank.1.encoder.weight"], q.T)


# --- the server ------------------------------------------------------------------------------------------


def test_the_server_takes_k_wide_activations_only(make_config) -> None:
    fed = build_federation(make_config("run", *MODES["ushape"], LOWRANK))
    server = fed.server
    mask = torch.ones(2, 4, dtype=torch.long)
    reply = server.handle(Message("eval", "0", -1, 0, {"hidden": torch.randn(2, 4, K), "attention_mask": mask}))
    assert reply.tensors["hidden"].shape == (2, 4, K)  # the trunk's encoder runs before step 5
    with pytest.raises(ProtocolError, match=rf"hidden has shape \(2, 4, {D}\), expected \(batch, tokens, {K}\)"):
        server.handle(Message("eval", "0", -1, 0, {"hidden": torch.randn(2, 4, D), "attention_mask": mask}))


# --- saving, resuming, exporting ---------------------------------------------------------------------------


def test_the_halves_are_saved_with_the_adapters_and_a_resume_reloads_them_bit_for_bit(
    tmp_path: Path, fast_config, run_files
) -> None:
    extra = (*MODES["ushape"], LOWRANK, "train.steps=6", "train.save_every=3")
    a, b = tmp_path / "a", tmp_path / "b"
    run_framework(fast_config(a, *extra))
    interrupt_run(fast_config(b, *extra), 4, hard=True)  # a hard stop in step 5: the resume goes back to step 3
    checkpoint = b / "checkpoints" / "step-000003"
    for folder, role in (("client-0", "head"), ("server", "trunk"), ("client-0", "tail")):
        assert CUT_TENSORS[role] <= set(load_file(str(checkpoint / folder / f"{role}.safetensors"))), role
    run_framework(fast_config(b, *extra), resume=True)

    adapters_a = run_files.adapters(a, "head", "trunk", "tail")  # no tensor name is in two parts' files
    adapters_b = run_files.adapters(b, "head", "trunk", "tail")
    assert set().union(*CUT_TENSORS.values()) <= set(adapters_a)
    assert sorted(adapters_a) == sorted(adapters_b)
    for key, value in adapters_a.items():
        assert torch.equal(adapters_b[key], value), key
    assert [r["loss"] for r in run_files.metrics(b)] == [r["loss"] for r in run_files.metrics(a)]

    # a part rebuilt from the config and loaded from its file runs exactly the saved (trained) halves
    config = fast_config(a, *extra)
    source = load_source(config)
    x = {"encoder": torch.randn(3, D), "decoder": torch.randn(3, K)}
    for role in ("head", "trunk", "tail"):
        part, stage = build_part(config, source, role)
        load_trainable(part, a / "adapters" / f"{role}.safetensors")
        halves = [(f"lowrank.{i}.{half}", cut[half]) for i, cut in stage.lowrank.items() for half in cut]
        assert {f"{name}.weight" for name, _ in halves} == {n for n in CUT_TENSORS[role] if n.endswith("weight")}
        for name, module in halves:
            half = name.rsplit(".", 1)[-1]
            bias = adapters_a.get(f"{name}.bias")
            expected = torch.nn.functional.linear(x[half], adapters_a[f"{name}.weight"], bias)
            with torch.no_grad():
                assert torch.equal(module(x[half]), expected), name


def test_generate_runs_the_bottleneck_and_export_refuses_it(make_config) -> None:
    config = make_config("run", *MODES["ushape"], LOWRANK, "train.steps=2")
    run_framework(config)
    out = Path(config.output_dir)
    model, _, _ = assemble(out)
    source = load_source(config)
    parts = {}
    for role in ("head", "trunk", "tail"):
        parts[role], _ = build_part(config, source, role)
        load_trainable(parts[role], out / "adapters" / f"{role}.safetensors")
        parts[role].eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        split = parts["tail"](hidden_states=parts["trunk"](hidden_states=parts["head"](input_ids=ids)))
        assembled = model(input_ids=ids).logits
    torch.testing.assert_close(assembled, split, rtol=0, atol=1e-4)
    with torch.no_grad():  # generation with a KV cache goes through the bottlenecks too
        generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 16)
    with pytest.raises(CheckpointError, match=rf"rank-{K} bottleneck .* cannot be exported"):
        export(out, out.parent / "exported")


def test_the_unsplit_baseline_refuses_lowrank(make_config) -> None:
    with pytest.raises(
        ConfigError, match=r"split\.bottleneck: a learned bottleneck at the cut; framework\.name=centrali"
    ):
        run_framework(make_config("run", "framework.name=centralized", LOWRANK))


def test_clients_of_different_cuts_or_async_aggregation_refuse_a_bottleneck_before_anything_is_built(
    make_config,
) -> None:
    cuts = make_config(
        "cuts", *MODES["ushape"], LOWRANK, "framework.name=sflv1", "framework.num_clients=2",
        "framework.clients=[{}, {split: {head_layers: 2}}]",
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"split\.bottleneck: a bottleneck is learned at one cut, but framework\.clie"
    ):
        framework_of(cuts).check(cuts)
    same = make_config(  # an entry that repeats the run's cut is no other cut
        "same", *MODES["ushape"], LOWRANK, "framework.name=sflv1", "framework.num_clients=2",
        "framework.clients=[{}, {split: {head_layers: 1}}]",
    )  # fmt: skip
    framework_of(same).check(same)
    asynchronous = make_config(
        "async", *MODES["ushape"], LOWRANK, "framework.name=sflv1", "framework.aggregation=async"
    )
    with pytest.raises(ConfigError, match=r"split\.bottleneck: async does not aggregate learned bottlenecks"):
        framework_of(asynchronous).check(asynchronous)


# --- FedAvg ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sflv1", "sflv2"])
def test_fedavg_averages_the_client_halves_and_the_server_keeps_a_decoder_per_trunk_adapter(
    make_config, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    averaged: list[tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = []

    def recording_fedavg(states, weights):
        result = fedavg(states, weights)
        averaged.append(([dict(s) for s in states], result))
        return result

    monkeypatch.setattr(aggregate_module, "fedavg", recording_fedavg)  # every FedAvg of the run
    config = make_config(
        "run", *MODES["ushape"], LOWRANK, f"framework.name={name}", "framework.num_clients=2",
        "framework.rounds=1", "train.steps=2",
    )  # fmt: skip
    fed, summary = _drive(config)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    client_states, client_average = averaged[0]  # step 11 of the one round: the client sides first
    assert len(client_states) == 2
    for key in CUT_TENSORS["head"] | CUT_TENSORS["tail"]:
        assert not torch.equal(client_states[0][key], client_states[1][key]), key  # they trained apart
        for member in fed.members:  # ... and now hold the average
            assert torch.equal(member.client.state()[key], client_average[key]), key
    source = load_source(config)
    q = basis(source, build_part(config, source, "head")[1], K).to(torch.float32)
    assert not torch.equal(client_average["lowrank.1.encoder.weight"], q.T)

    server = fed.server
    adapters = sorted({server.adapter_of(m.client_id) for m in fed.members})
    assert adapters == (["client-0", "client-1"] if name == "sflv1" else [ADAPTER])
    for adapter in adapters:
        state = server.adapter_state(adapter)
        assert CUT_TENSORS["trunk"] <= set(state)
        assert not torch.equal(state["lowrank.1.decoder.weight"], q)  # trained
    if name == "sflv1":  # the trunk adapters (their decoders with them) are averaged too
        trunk_states, trunk_average = averaged[1]
        assert not torch.equal(trunk_states[0]["lowrank.1.decoder.weight"], trunk_states[1]["lowrank.1.decoder.weight"])
        for adapter in adapters:
            for key in CUT_TENSORS["trunk"]:
                assert torch.equal(server.adapter_state(adapter)[key], trunk_average[key])
    else:
        assert len(averaged) == 1  # sflv2 averages the client sides only


def test_a_new_trunk_adapter_starts_from_the_initial_bottleneck(make_config) -> None:
    fed = build_federation(make_config("run", *MODES["ushape"], LOWRANK, "framework.name=sflv1"))
    server = fed.server
    assert server.bank is not None
    before = server.adapter_state("client-0")
    params = server.bank.parameters("client-0")
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    server.assign("9", "client-9")
    fresh = server.adapter_state("client-9")
    changed = server.adapter_state("client-0")
    for key in CUT_TENSORS["trunk"]:
        assert torch.equal(fresh[key], before[key]), key  # a copy of the initial halves, not of client-0's
        assert not torch.equal(changed[key], before[key]), key
    assert len(params) == len(server.bank.parameters("client-9"))
    assert all(p.requires_grad for p in server.bank.parameters("client-9") + params)
    assert trainable_parameters(server.trunk)
