"""The ``splitlm`` command: train, generate, export, attack, serve, ..."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from splitlm import __version__
from splitlm.errors import ConfigError, SplitLMError

STARTED = time.perf_counter()  # the process's start, as near as splitlm can tell: wall_seconds count from here


def _quiet_libraries() -> None:
    """transformers' warnings and progress bars off. Importing it takes seconds, and a config error is reported
    before anything heavy is imported: set through its environment variables unless it is imported already."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what disable_progress_bar() turns off
    else:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _config_problems(tree: dict) -> list[str]:
    """``frameworks.config_problems``, imported only when a config passes the schema's own checks (or has an unknown
    key that is no typo): it imports every registry, and with them torch."""
    from splitlm.frameworks import config_problems

    return config_problems(tree)


def _load(args: argparse.Namespace):
    """The config from the file and the overrides, every problem reported at once (unknown plugin names too); the
    schema's own problems (unknown keys that are typos, types, values) before anything heavy is imported."""
    from splitlm.config import load_config

    return load_config(args.config, args.overrides, checks=[_config_problems], quick=True)


def _print_summary(summary: dict, output_dir: str) -> None:
    where = f"{summary['framework']}" + (f" ({summary['split_mode']})" if summary["split_mode"] else "")
    if summary["num_clients"] > 1 or summary["rounds"] > 1:
        span = f"{summary['rounds']} rounds ({summary['num_clients']} clients, {summary['steps']} client steps)"
    else:
        span = f"{summary['steps']} steps"
    if summary["eval_loss_before"] is None:  # train.eval_before=false
        print(
            f"{where}: held-out perplexity {summary['eval_ppl_after']:.2f} (loss {summary['eval_loss_after']:.4f}) "
            f"after {span}"
        )
    else:
        print(
            f"{where}: held-out perplexity {summary['eval_ppl_before']:.2f} -> {summary['eval_ppl_after']:.2f} "
            f"(loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}) after {span}"
        )
    if summary.get("accuracy_after") is not None:
        before = summary.get("accuracy_before")
        print(f"held-out accuracy {'' if before is None else f'{before:.3f} -> '}{summary['accuracy_after']:.3f}")
    print(
        f"traffic up {_fmt_bytes(summary['bytes_up'])}, down {_fmt_bytes(summary['bytes_down'])}; "
        f"{summary['train_seconds']:.1f} s training, {summary['wall_seconds']:.1f} s in all; results in {output_dir}/"
    )


@contextlib.contextmanager
def _resumable(output_dir: str) -> Iterator[None]:
    """A stop at once (Ctrl-C while the model loads, or a second Ctrl-C) says whether ``--resume`` can continue."""
    try:
        yield
    except KeyboardInterrupt:
        from splitlm.frameworks.checkpoint import stopped_at_once

        raise KeyboardInterrupt(stopped_at_once(Path(output_dir))) from None


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args)
    from splitlm.deploy import launch

    with _resumable(config.output_dir):
        summary = launch(config, resume=args.resume, started=STARTED)
    _print_summary(summary, config.output_dir)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from splitlm.frameworks.assemble import assemble

    model, tokenizer, _ = assemble(Path(args.run_dir))
    if args.chat:
        if tokenizer.chat_template is None:
            raise SplitLMError("--chat: this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    sampling = args.temperature > 0
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=sampling,
            temperature=args.temperature if sampling else None,
            repetition_penalty=args.repetition_penalty,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from splitlm.frameworks.assemble import export

    out = export(Path(args.run_dir), Path(args.out), force=args.force)
    print(f"wrote {out}/ (load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from splitlm.config.schema import Config, key_reference

    if not args.keys:
        config = _load(args)
    from splitlm.frameworks import framework_of
    from splitlm.frameworks.base import COMPONENT_KEYS, component_registry
    from splitlm.frameworks.pipeline import codec_mod

    if args.keys:
        for key, default, help_text in key_reference(Config):
            print(f"{key} = {default!r}\n    {help_text}")
            if key in COMPONENT_KEYS:  # each registered component's own settings, under its name
                registry = component_registry(key)
                for name in registry.names():
                    for setting, value, text in key_reference(registry.get(name).Settings, f"{key}.{name}."):
                        print(f"{setting} = {value!r}\n    {text}")
        return 0
    framework_of(config).check(config)  # the checks a run makes before it builds anything
    codec_mod(config)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    config = _load(args)
    from splitlm.planning import as_json, make_plan, render

    plan = make_plan(config)
    print(json.dumps(as_json(plan)) if args.json else render(plan))
    return 0


def _certs_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(certs dir or CA file, tokens file) from --certs / --insecure."""
    if args.insecure:
        host = args.address.rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"--insecure is only allowed on loopback, not {host}: use --certs")
        return None, None
    if args.certs is None:
        raise ConfigError("pass --certs DIR (made by `splitlm certs DIR`), or --insecure on loopback")
    return Path(args.certs), Path(args.certs) / "tokens.json"


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    from splitlm.deploy.serve import serve

    certs, tokens = _certs_paths(args)
    tokens_file = Path(args.tokens) if args.tokens else tokens
    if tokens_file is None:
        raise ConfigError("--insecure still needs --tokens FILE: every client authenticates with a bearer token")
    with _resumable(config.output_dir):
        summary = serve(
            config, args.address, certs, tokens_file, mutual_tls=args.mtls, connect_timeout=args.client_timeout,
            resume=args.resume, started=STARTED,
        )  # fmt: skip
    _print_summary(summary, config.output_dir)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    config = _load(args)
    from splitlm.deploy.agent import run_client
    from splitlm.transport.security import token_for

    args.address = args.server
    certs, tokens = _certs_paths(args)
    token = args.token or os.environ.get("SPLITLM_TOKEN")
    if token is None:
        source = Path(args.tokens) if args.tokens else tokens
        if source is None:
            raise ConfigError("pass --token, set SPLITLM_TOKEN, or give --tokens FILE")
        token = token_for(source, args.client_id)
    ca = certs / "ca.pem" if certs is not None else None
    client_cert = None
    if args.mtls and certs is not None:
        client_cert = (certs / f"client-{args.client_id}.pem", certs / f"client-{args.client_id}.key")
    result = run_client(config, args.client_id, args.server, token, ca, client_cert, args.connect_timeout)
    print(
        f"client {result['client']}: {result['steps']} steps, {result['tokens']} tokens, traffic up "
        f"{_fmt_bytes(result['bytes_up'])}, down {_fmt_bytes(result['bytes_down'])}; "
        f"{time.perf_counter() - STARTED:.1f} s; done"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from splitlm.transport.security import add_client, make_dev_certs

    if (args.clients is None) == (args.add_client is None):
        raise ConfigError("pass --clients N to make new certificates, or --add-client ID to add one client")
    if args.add_client is not None:
        add_client(Path(args.out), args.add_client)
        print(f"added client {args.add_client}: {args.out}/client-{args.add_client}.pem/.key and its token")
        return 0
    paths = make_dev_certs(Path(args.out), args.hosts, [str(i) for i in range(args.clients)])
    print(f"wrote a development CA, server and {args.clients} client certificates and {paths['tokens']}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import json

    from splitlm.privacy.attacks import run_attack

    options = {}
    for pair in args.options:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SplitLMError(f"attack option {pair!r}: write options as key=value, e.g. steps=200")
        options[key.strip()] = value.strip()
    if args.attack in INFERENCE_ATTACKS:
        result = _inference(args, options)
        print(json.dumps(result, indent=2))
        return 0
    result = run_attack(
        Path(args.run_dir),
        args.attack,
        options,
        max_batches=args.batches,
        progress=not args.no_progress,
        threat_model=args.threat_model,
        client_dir=Path(args.client_dir) if args.client_dir else None,
    )
    print(json.dumps(result, indent=2))
    return 0


INFERENCE_ATTACKS = ("mia_loss", "mia_ktmia", "mia_observed", "property")


def _inference(args: argparse.Namespace, options: dict[str, str]) -> dict[str, Any]:
    """``splitlm attack RUN_DIR mia_<attack>|property``: membership inference scored on client ``client``'s
    training rows (option ``client=``, default 0) against the run's held-out rows (at most ``rows=`` of each, 0:
    all), or property inference scored against each client's label mix."""
    from splitlm.frameworks.assemble import load_run_config

    run_dir = Path(args.run_dir)
    harness = {key: options.pop(key) for key in ("client", "rows") if key in options}
    try:
        client, rows = int(harness.get("client", 0)), int(harness.get("rows", 0))
    except ValueError:
        raise SplitLMError(f"attack options client= and rows= take whole numbers, got {harness}") from None
    if args.attack == "property":
        from splitlm.privacy.attacks.property import run_property

        return run_property(run_dir, options, progress=not args.no_progress)
    from splitlm.frameworks.rows import client_examples, held_out_examples
    from splitlm.privacy.attacks.membership import run_membership

    config = load_run_config(run_dir)
    members, nonmembers = client_examples(config, client), held_out_examples(config)
    if rows > 0:
        members, nonmembers = members[:rows], nonmembers[:rows]
    return run_membership(
        run_dir, args.attack.removeprefix("mia_"), members, nonmembers, options, threat_model=args.threat_model,
        progress=not args.no_progress,
    )  # fmt: skip


def cmd_audit(args: argparse.Namespace) -> int:
    from splitlm.privacy.audit import audit

    audit(
        Path(args.run_dir),
        client_dir=Path(args.client_dir) if args.client_dir else None,
        attacks=args.attacks,
        batches=args.batches,
        threat_models=tuple(args.threat_models),
        progress=not args.no_progress,
    )
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    import json

    from splitlm.frameworks.unlearn import unlearn

    record = unlearn(
        Path(args.run_dir), args.client, Path(args.out) if args.out else None, full_retrain=args.full_retrain
    )
    print(
        f"client {record['client']} unlearned ({record['mode']}) in {record['seconds']:.1f} s; the new run is in "
        f"{record['output_dir']}/ (unlearn.json)"
    )
    print(json.dumps(record))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from splitlm.metrics.report import write_report

    print(f"report in {write_report([Path(p) for p in args.run_dirs], Path(args.out))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitlm", description="Split learning fine-tuning of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"splitlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with a framework from a YAML config")
    train.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    train.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.steps=10 split.mode=vanilla (`splitlm config --keys` lists every key)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="generate text with a trained run's merged model")
    gen.add_argument("run_dir", help="output_dir of a finished train run")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="write a merged model loadable by transformers")
    exp.add_argument("run_dir", help="output_dir of a finished train run")
    exp.add_argument("out", help="new folder for the merged model")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    exp.set_defaults(func=cmd_export)

    srv = sub.add_parser("serve", help="host the trunk and the aggregator for clients in other processes")
    srv.add_argument("config", help="YAML config (the same the clients use)")
    srv.add_argument("overrides", nargs="*", help="dotted overrides")
    srv.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0: any free)")
    srv.add_argument("--certs", help="folder made by `splitlm certs` (TLS key pair and tokens.json)")
    srv.add_argument("--tokens", help="tokens file (default: CERTS/tokens.json)")
    srv.add_argument("--mtls", action="store_true", help="also require client certificates")
    srv.add_argument("--insecure", action="store_true", help="plain text, loopback only")
    srv.add_argument("--resume", action="store_true", help="continue from the newest round checkpoint")
    srv.add_argument("--client-timeout", type=float, default=600.0, help="seconds to wait for every client to connect")
    srv.set_defaults(func=cmd_serve)

    cli = sub.add_parser("client", help="run one client against a splitlm server")
    cli.add_argument("config", help="YAML config (the same the server uses)")
    cli.add_argument("overrides", nargs="*", help="dotted overrides")
    cli.add_argument("--server", required=True, help="HOST:PORT of the server")
    cli.add_argument("--client-id", required=True, help="this client's id: 0 .. framework.num_clients-1")
    cli.add_argument("--certs", help="folder with ca.pem (and client-ID.pem/.key for --mtls)")
    cli.add_argument("--token", help="bearer token (default: $SPLITLM_TOKEN, else from --tokens / CERTS/tokens.json)")
    cli.add_argument("--tokens", help="tokens file to take this client's token from")
    cli.add_argument("--mtls", action="store_true", help="present this client's certificate")
    cli.add_argument("--insecure", action="store_true", help="plain text, loopback only")
    cli.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="retry connecting for this many seconds (default 30; 0: try once); a host name that does not resolve "
        "or a refused certificate fails at once",
    )
    cli.set_defaults(func=cmd_client)

    crt = sub.add_parser("certs", help="make a development CA, server and client certificates and tokens")
    crt.add_argument("out", help="new folder for the files")
    crt.add_argument("--clients", type=int, help="number of clients (ids 0..N-1), for new certificates")
    crt.add_argument("--add-client", help="issue one more client certificate and token with DIR's CA")
    crt.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"], help="server names / IPs")
    crt.set_defaults(func=cmd_certs)

    atk = sub.add_parser(
        "attack", help="attack a recorded run as an honest-but-curious server (train with privacy.tap.enabled=true)"
    )
    atk.add_argument("run_dir", help="output_dir of a run trained with privacy.tap.enabled=true")
    atk.add_argument(
        "attack",
        help="sip, bisr_b, bisr_f, tag, nn_inversion, eia or pidi (rebuild the text); mia_loss, mia_ktmia or "
        "mia_observed (membership inference on client=ID's training rows, default 0, against the held-out rows); "
        "property (each client's label mix from its smashed data)",
    )
    atk.add_argument("options", nargs="*", help="attack options as key=value, e.g. steps=200 lr=0.01")
    atk.add_argument("--batches", type=int, default=0, help="attack only the last N recorded micro-batches")
    atk.add_argument("--no-progress", action="store_true", help="no progress bars")
    atk.add_argument(
        "--threat-model",
        choices=("public", "inside"),
        default="public",
        help="public: the attacker holds the public pretrained weights (results in RUN_DIR/attacks/); inside: also "
        "the client's current head and tail, from the run's adapters (results in RUN_DIR/attacks/inside/)",
    )
    atk.add_argument(
        "--client-dir",
        help="inside: the client's output folder (or its adapters/ folder) when it is not RUN_DIR (networked runs)",
    )
    atk.set_defaults(func=cmd_attack)

    aud = sub.add_parser(
        "audit",
        help="run the attack suite on a tapped run under both threat models (public, inside) and advise a defense",
    )
    aud.add_argument(
        "run_dir", help="output_dir of a run trained with privacy.tap.enabled=true (networked: the server's)"
    )
    aud.add_argument("--client-dir", help="networked runs: the client's output_dir (its truth/ and its parts)")
    aud.add_argument(
        "--attacks", nargs="+", help="attacks to run (default: sip, bisr_f, bisr_b, pidi where they apply)"
    )
    aud.add_argument("--threat-models", nargs="+", default=["public", "inside"], help="public, inside or both")
    aud.add_argument("--batches", type=int, default=2, help="attack the last N recorded micro-batches (0: all)")
    aud.add_argument("--no-progress", action="store_true", help="no progress bars")
    aud.set_defaults(func=cmd_audit)

    unl = sub.add_parser(
        "unlearn",
        help="take one client's data out of a finished multi-client run, into a new run (retrains only its shard "
        "under framework.aggregation=splitwiper, else from the last checkpoint before it joined)",
    )
    unl.add_argument("run_dir", help="output_dir of a finished train run with several clients")
    unl.add_argument("--client", required=True, help="the client to forget: 0 .. framework.num_clients-1")
    unl.add_argument("--out", help="new folder for the unlearned run (default: RUN_DIR-unlearn-ID)")
    unl.add_argument(
        "--full-retrain", action="store_true", help="train the run again from the start without the client"
    )
    unl.set_defaults(func=cmd_unlearn)

    rep = sub.add_parser("report", help="plots and a markdown comparison of finished runs")
    rep.add_argument("run_dirs", nargs="+", help="output_dir of each run to compare")
    rep.add_argument("--out", required=True, help="folder for loss.png, eval.png, bytes.png and report.md")
    rep.set_defaults(func=cmd_report)

    cfg = sub.add_parser("config", help="validate a config and print it resolved, or list every key")
    cfg.add_argument("config", nargs="?", help="YAML config file (default: the built-in defaults)")
    cfg.add_argument("overrides", nargs="*", help="dotted overrides")
    cfg.add_argument("--keys", action="store_true", help="list every config key with its default and help")
    cfg.set_defaults(func=cmd_config)

    pln = sub.add_parser(
        "plan", help="profile the model and predict every cut's step time and memory; mark the best within budget"
    )
    pln.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    pln.add_argument("overrides", nargs="*", help="dotted overrides, e.g. plan.client_memory_mb=600")
    pln.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pln.set_defaults(func=cmd_plan)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags and ``key=value`` overrides in any order (``train CONFIG --resume output_dir=x`` works)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    pairs = [item for item in rest if "=" in item and not item.startswith("-")]
    unknown = [item for item in rest if item not in pairs]
    target = next((name for name in ("overrides", "options") if hasattr(args, name)), None)
    if unknown or (pairs and target is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown or pairs)}")
    if pairs and target is not None:
        setattr(args, target, [*getattr(args, target), *pairs])
    return args


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (`kill`, a service manager) stops splitlm as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # gRPC's own handshake logging, unless asked for
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    _quiet_libraries()
    try:
        return args.func(args)
    except SplitLMError as error:
        if args.verbose:  # where it came from, for a bug report
            traceback.print_exc()
        print(f"splitlm: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:  # train and serve say whether --resume can continue (``_resumable``)
        print(f"splitlm: {stop.args[0] if stop.args else 'interrupted at once'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
