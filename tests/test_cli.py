"""The ``splitlm`` command: one-line errors with exit codes, then train -> generate -> export end to end."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig

from splitlm.cli.main import main, parse_args
from splitlm.frameworks.assemble import assemble, load_run_config
from splitlm.frameworks.federation import build_federation
from splitlm.models import load_full_model, resolve_model
from splitlm.peft import load_trainable

METRIC_KEYS = {"step", "client", "loss", "tokens", "bytes_up", "bytes_down", "seconds"}
SUMMARY_KEYS = {
    "framework", "split_mode", "eval_loss_before", "eval_loss_after", "eval_ppl_before", "eval_ppl_after",
    "bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down", "train_seconds", "wall_seconds",
    "client_param_count", "server_param_count", "format",
}  # fmt: skip
PROMPT = "A three-hour cinema"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splitlm: error: ")
    return lines[0]


# --- errors -------------------------------------------------------------------------------------------


def test_all_config_errors_in_one_line(config_file, capsys, tmp_path: Path) -> None:
    # the schema's problems (a typo'd key, types, values) all at once, before any registry (and torch) is imported
    path = config_file(train={"stepz": 3, "batch_size": "four", "lr": -1.0}, framework={"name": "p2p"})
    assert main(["train", str(path)]) == 2
    line = _one_error_line(capsys)
    for key in ("train.stepz", "train.batch_size", "train.lr"):
        assert key in line, key
    assert "unknown key (did you mean 'steps'?)" in line
    assert not (tmp_path / "run").exists()
    # then the registries' (plugin names, keys that moved), all at once with the schema's own
    path = config_file(train={"align_every": 3, "lr": -1.0}, framework={"name": "p2p"})
    assert main(["train", str(path)]) == 2
    line = _one_error_line(capsys)
    for said in ("train.align_every: moved", "train.lr", "framework.name: unknown framework 'p2p'"):
        assert said in line, said
    assert not (tmp_path / "run").exists()


def test_a_config_typo_is_reported_before_torch_is_imported() -> None:
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    code = (
        "import sys\n"
        "from splitlm.cli.main import main\n"
        f"code = main(['train', {str(config)!r}, 'train.stpes=5', 'train.lr=abc'])\n"
        "print(code, [m for m in ('torch', 'transformers', 'peft', 'grpc', 'datasets') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "splitlm: error: invalid config: train.lr: Input should be a valid number, unable to parse string as a number "
        "(got 'abc'); train.stpes: unknown key (did you mean 'steps'?)"
    ]


def test_bad_override_is_a_config_error(config_file, capsys) -> None:
    assert main(["train", str(config_file()), "train.steps=0", "nosection.key=1"]) == 2
    line = _one_error_line(capsys)
    assert "train.steps" in line and "nosection" in line


def test_missing_config_file(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)


def test_missing_data_file(config_file, capsys) -> None:
    assert main(["train", str(config_file()), "data.name=/nonexistent/x.jsonl"]) == 3
    assert "/nonexistent/x.jsonl" in _one_error_line(capsys)


def test_unsupported_architecture(config_file, capsys, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(bert)
    assert main(["train", str(config_file()), f"model.name={bert}"]) == 4
    line = _one_error_line(capsys)
    assert "'bert' is not supported" in line and "llama" in line


def test_impossible_cut(config_file, capsys) -> None:
    assert main(["train", str(config_file()), "split.head_layers=4", "split.tail_layers=2"]) == 4
    line = _one_error_line(capsys)
    assert "impossible cut" in line and "6 blocks" in line


def test_generate_and_export_need_a_run_directory(capsys, tmp_path: Path) -> None:
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi"]) == 5
    assert "not a run directory" in _one_error_line(capsys)
    assert main(["export", str(tmp_path / "none"), str(tmp_path / "out")]) == 5
    assert "not a run directory" in _one_error_line(capsys)


@pytest.mark.timeout(120)  # it would wait the whole --connect-timeout (600 s) if it retried (nothing timed asserted)
def test_client_with_an_unresolvable_host_says_so_at_once(
    config_file, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    from splitlm.transport.grpc_client import GrpcConnection
    from splitlm.transport.security import make_dev_certs

    tried: list[float] = []

    def no_stream(self: GrpcConnection, timeout: float) -> None:
        tried.append(timeout)
        raise grpc.FutureTimeoutError  # as gRPC does for a name it cannot resolve, each attempt until the deadline

    monkeypatch.setattr(GrpcConnection, "_open", no_stream)
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost"], ["0"])
    argv = ["client", str(config_file()), "--server", "nonexistent.invalid:50051", "--client-id", "0"]
    assert main([*argv, "--certs", str(certs), "--connect-timeout", "600"]) != 0
    line = _one_error_line(capsys)
    assert "cannot connect to nonexistent.invalid:50051: cannot resolve the host name 'nonexistent.invalid'" in line
    assert tried == []  # said before any attempt to open a stream


# --- a successful run, shared by the tests below ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, write_config) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "tiny.yaml", root / "run", train={"steps": 6})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", str(config), "lora.rank=8"])
    assert code == 0
    return root / "run", config, out.getvalue()


def test_train_writes_metrics_and_summary(trained, run_files) -> None:
    run, _, stdout = trained
    assert "held-out perplexity" in stdout
    metrics = run_files.metrics(run)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    for record in metrics:
        assert set(record) >= METRIC_KEYS, METRIC_KEYS - set(record)
        assert record["client"] == "0"
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["tokens"] > 0 and record["bytes_up"] > 0 and record["bytes_down"] > 0
    summary = run_files.summary(run)
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert (summary["framework"], summary["split_mode"]) == ("sl", "ushape")
    assert summary["eval_ppl_before"] == pytest.approx(math.exp(summary["eval_loss_before"]))
    assert summary["eval_ppl_after"] == pytest.approx(math.exp(summary["eval_loss_after"]))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # 6 steps at lr 5e-3 do learn
    # Training traffic is the steps' traffic; evaluation traffic is counted apart.
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in metrics)
    assert summary["eval_bytes_up"] > 0 and summary["eval_bytes_down"] > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in metrics)
    assert summary["client_param_count"] > 0 and summary["server_param_count"] > 0
    assert (run / "config.yaml").is_file()
    assert {p.name for p in (run / "adapters").glob("*.safetensors")} == {
        "head.safetensors", "trunk.safetensors", "tail.safetensors",
    }  # fmt: skip


def _split_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained parts themselves (LoRA not merged), head -> trunk -> tail."""
    fed = build_federation(load_run_config(run))
    parts = {**fed.members[0].client.parts, "trunk": fed.server.trunk}
    for role, part in parts.items():
        load_trainable(part, run / "adapters" / f"{role}.safetensors")
        part.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = parts["head"](input_ids=ids, attention_mask=mask)
        hidden = parts["trunk"](hidden_states=hidden, attention_mask=mask)
        return parts["tail"](hidden_states=hidden, attention_mask=mask)


def test_generate_prints_the_merged_models_greedy_continuation(trained, capsys) -> None:
    run, _, _ = trained
    assert main(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer, _ = assemble(run)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():  # greedy decoding by hand, without generate()
        for _ in range(8):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert expected.strip()
    assert printed == expected + "\n"


def test_export_loads_in_transformers_with_the_trained_logits(trained, capsys, tmp_path: Path) -> None:
    run, _, _ = trained
    out = tmp_path / "merged"
    assert main(["export", str(run), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assembled, tokenizer, _ = assemble(run)
    ids = tokenizer("It was a dark and stormy night.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
        expected = assembled(input_ids=ids).logits
        base = load_full_model(resolve_model("tiny-llama")).eval()(input_ids=ids).logits
    # Saving and loading float32 safetensors is lossless and the module code is the same.
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    # Merging W + (alpha/r) B A into W reassociates float32 sums: ~1e-6 of logits of size ~1.
    torch.testing.assert_close(logits, _split_logits(run, ids), rtol=0, atol=1e-4)
    # ...and the adapters were merged: the base model's logits differ by far more than that.
    assert (logits - base).abs().max() > 1e-2

    # A second export into the non-empty folder needs --force.
    assert main(["export", str(run), str(out)]) == 5
    assert "--force" in _one_error_line(capsys)
    assert main(["export", str(run), str(out), "--force"]) == 0


def test_second_train_without_resume_leaves_the_run_alone(trained, capsys) -> None:
    run, config, _ = trained
    metrics = (run / "metrics.jsonl").read_bytes()
    stamp = (run / "metrics.jsonl").stat().st_mtime_ns
    saved_config = (run / "config.yaml").read_bytes()
    assert main(["train", str(config), "lora.rank=8"]) == 5
    line = _one_error_line(capsys)
    assert "--resume" in line and str(run) in line
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert (run / "config.yaml").read_bytes() == saved_config


def test_export_of_vanilla_run(config_file, capsys, tmp_path: Path) -> None:
    """A vanilla run with the default split.tail_layers must be exportable (its config.yaml reloads)."""
    config = config_file(split={"mode": "vanilla", "head_layers": 1}, train={"steps": 2})
    config.write_text(config.read_text().replace("  tail_layers: 1\n", ""))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    code = main(["export", str(tmp_path / "run"), str(tmp_path / "merged")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "merged" / "config.json").is_file()


# --- what a new user hit ----------------------------------------------------------------------------------


def test_overrides_may_come_after_the_flags() -> None:
    args = parse_args(["train", "c.yaml", "--resume", "output_dir=x", "train.steps=3"])
    assert args.resume and args.overrides == ["output_dir=x", "train.steps=3"]
    args = parse_args(["attack", "run", "bisr_b", "--batches", "1", "steps=30"])
    assert args.options == ["steps=30"] and args.batches == 1
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--resume", "--frobnicate"])


def test_insecure_off_loopback_is_a_config_error(config_file, capsys) -> None:
    argv = ["serve", str(config_file()), "--insecure", "--tokens", "t.json", "--address", "10.1.2.3:50051"]
    assert main(argv) == 2
    assert "--insecure is only allowed on loopback" in _one_error_line(capsys)


def test_a_misspelt_built_in_model_gets_a_suggestion(config_file, capsys) -> None:
    assert main(["train", str(config_file()), "model.name=tiny-lama"]) == 4
    assert "did you mean 'tiny-llama'" in _one_error_line(capsys)


def test_unknown_plugin_names_are_reported_with_the_choices(config_file, capsys) -> None:
    argv = ["config", str(config_file()), "transport.codec.activations=fp61", "server.policy=lifo"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "transport.codec.activations: unknown codec 'fp61'" in line and "did you mean 'fp16'" in line
    assert "server.policy: unknown policy 'lifo'" in line


def test_santext_has_no_top_k(config_file, capsys) -> None:
    assert main(["config", str(config_file()), "privacy.defenses.santext.top_k=3"]) == 2
    assert "privacy.defenses.santext.top_k: unknown key" in _one_error_line(capsys)


def test_a_client_refused_for_its_token_writes_nothing(config_file, capsys, tmp_path: Path) -> None:
    from splitlm.transport.grpc_server import GrpcServer

    server = GrpcServer(None, {"the-right-token": "0"}, "127.0.0.1:0", None)
    server.start()
    try:
        out = tmp_path / "client-out"
        argv = [
            "client", str(config_file()), "--server", f"127.0.0.1:{server.port}", "--client-id", "0",
            "--insecure", "--token", "a-wrong-token", f"output_dir={out}",
        ]  # fmt: skip
        assert main(argv) == 6
    finally:
        server.stop()
    line = _one_error_line(capsys)
    assert "server refused client 0" in line and "token" in line
    assert not out.exists()  # the token was checked before anything was built or written


def test_eval_before_false_skips_the_untrained_evaluation(config_file, capsys, tmp_path: Path) -> None:
    config = config_file()
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}", "train.eval_before=false"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_before"] is None and summary["eval_ppl_before"] is None
    assert summary["eval_loss_after"] > 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "held-out perplexity" in line)
    assert "->" not in line and "after 5 steps" in line


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    config_file, capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ctrl-C while the model loads: no checkpoint exists, so the line says to start again (which works), not to
    --resume (which would fail); a stop at once after a checkpoint names the one --resume continues from."""
    import splitlm.frameworks.driver as driver
    from splitlm.runtime.client import SplitClient

    config, run = config_file(train={"steps": 4}), tmp_path / "run"

    def loading(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while the model loads

    with monkeypatch.context() as patch:
        patch.setattr(driver, "build_parties", loading)
        assert main(["train", str(config)]) == 130
    line = capsys.readouterr().err.strip()
    assert line == (
        "splitlm: interrupted before the first checkpoint; nothing to resume: run the same command again without "
        "--resume"
    )
    assert main(["train", str(config), "--resume"]) == 5  # indeed nothing to resume
    assert "no checkpoints/step-* folder" in _one_error_line(capsys)

    real_step = SplitClient.train_step

    def second_ctrl_c(self, step, micro_batches):
        if step == 2:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, after the checkpoint of step 0
        return real_step(self, step, micro_batches)

    with monkeypatch.context() as patch:
        patch.setattr(SplitClient, "train_step", second_ctrl_c)
        assert main(["train", str(config)]) == 130  # as the line said: the same command, without --resume
    expected = f"splitlm: interrupted at once; --resume continues from {run}/checkpoints/step-000000"
    assert capsys.readouterr().err.strip() == expected
    assert main(["train", str(config), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_version_and_where_the_keys_are_listed(capsys) -> None:
    import splitlm

    with pytest.raises(SystemExit) as stop:
        parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"splitlm {splitlm.__version__}"
    with pytest.raises(SystemExit):
        parse_args(["train", "--help"])
    assert "splitlm config --keys" in capsys.readouterr().out
