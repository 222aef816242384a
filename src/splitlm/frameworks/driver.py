"""The one driver of every run: rounds of a framework's recipe, evaluation, metrics, checkpoints, summary.

Single-client runs, the centralized baseline, in-process federations, Ray and networked servers all run
through ``drive``: it evaluates before training, runs ``framework.rounds`` rounds of the recipe over the
round's participants, evaluates and checkpoints after each round, and writes the adapters and
``summary.json`` at the end. A run stops cleanly on Ctrl-C or SIGTERM: the clients finish the step they are
in, and a run of one client is checkpointed at that step (several clients: at their last round), so
``--resume`` continues it. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splitlm.config import Config
from splitlm.config.schema import LINK_DIRECTIONS
from splitlm.errors import ClientGone, ClientsFlagged, ConfigError, Interrupted
from splitlm.files import write_json
from splitlm.frameworks.aggregation.scales import rates_in_effect
from splitlm.frameworks.checkpoint import load_checkpoint, prepare_output, save_checkpoint
from splitlm.frameworks.federation import Federation, Member, build_parties, participants
from splitlm.privacy.accounting import epsilon, releases
from splitlm.privacy.client_attack import attack_reports
from splitlm.privacy.server_attack import ServerAttack
from splitlm.runtime.server import ServerSurface
from splitlm.runtime.tracking import MetricLogger

SUMMARY_FORMAT = 2  # ``summary.json``'s schema; ``splitlm report`` reads this one
# the last round's losses on the clients' own held-out sets (``data.client_eval_size``; ``client_evaluation``)
CLIENT_EVAL_KEYS = (
    "client_eval_loss", "own_eval_loss", "mean_client_eval_loss", "worst_client_eval_loss", "forgetting",
    "client_accuracy", "own_accuracy", "mean_client_accuracy", "worst_client_accuracy", "accuracy_forgetting",
    "personal_eval_loss", "mean_personal_eval_loss", "personal_accuracy", "mean_personal_accuracy",
    "worst_personal_accuracy",
)  # fmt: skip

log = logging.getLogger(__name__)


def perplexity(loss: float | None) -> float | None:
    if loss is None:  # not evaluated (train.eval_before=false)
        return None
    return math.exp(loss) if loss < 700 else math.inf


def run_framework(config: Config, resume: bool = False, started: float | None = None) -> dict[str, Any]:
    """Train in this process as ``config`` says; ``started``: when the process began (``time.perf_counter``)."""
    started = time.perf_counter() if started is None else started
    if config.transport.name != "inprocess":
        raise ConfigError(
            f"transport.name={config.transport.name}: run it with `splitlm train` (splitlm.deploy.launch); "
            "run_framework trains in this process"
        )
    out = prepare_output(config, resume)
    return drive(build_parties(config, "inprocess"), out, resume, started)


@contextlib.contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C / SIGTERM set ``stop`` (the clients stop after their current step); a second Ctrl-C raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nsplitlm: stopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Progress:
    """The progress bar over every client step of the run, and the metric logger (``metrics.jsonl`` and the
    trackers of ``train.report_to``), which the steps feed."""

    def __init__(self, fed: Federation, logger: MetricLogger, done: int) -> None:
        fw = fed.config.framework
        total = fw.rounds * (fw.clients_per_round or len(fed.members)) * fed.local_steps
        self.fed = fed
        self.logger = logger
        self.lock = threading.Lock()
        self.bar = tqdm(
            total=total, initial=min(done, total), desc=fed.framework.name, unit="step", dynamic_ncols=True,
            disable=not fed.config.train.progress,
        )  # fmt: skip
        self.losses: dict[str, float] = {}
        self.comm_seconds = 0.0  # emulated link time of the steps logged here (rolled-back ones too, like bytes)

    def round(self, round_index: int) -> None:
        rounds = self.fed.config.framework.rounds
        self.bar.set_description(f"{self.fed.framework.name} round {round_index + 1}/{rounds}")

    def step(self, member: Member, record: dict[str, Any]) -> None:
        with self.lock:
            self.logger.step(record)
            self.losses[member.client_id] = record["loss"]
            self.comm_seconds += float(record.get("comm_seconds", 0.0))
            self.bar.update(1)
            shown = sorted(self.losses.items())[:4]  # each client's latest loss (the first four)
            many = " ".join(f"{client}:{loss:.3f}" for client, loss in shown)
            self.bar.set_postfix_str(many if len(shown) > 1 else f"loss={record['loss']:.4f}")

    def rewind(self) -> None:
        """After a round was rolled back: forget the steps the clients no longer have done."""
        with self.lock:
            self.logger.rewind({m.client_id: m.steps_done for m in self.fed.members})
            self.bar.n = sum(m.steps_done for m in self.fed.members)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_round(fed: Federation, round_index: int, chosen: list[Member], progress: _Progress) -> tuple[list, list]:
    """One round of the framework's recipe as a transaction: clients lost during it (networked runs), or flagged by
    a server-side guard once it trained (``privacy.guards``), are rolled back with everything else, and the round
    is done again without them, so it computes what the same round computes with those clients left out
    (``framework.leave_out``). Returns (holders, participants)."""
    wanted = len(chosen)
    chosen = fed.available(chosen, round_index)
    while True:
        fed.check_quorum(chosen, wanted, round_index)
        try:
            snapshot = fed.snapshot(chosen) if fed.can_fail or fed.guards else None
        except ClientGone as gone:  # lost before the round started: nothing to undo
            log.warning("round %d: %s; it is left out", round_index + 1, gone)
            chosen = [m for m in chosen if m.client_id not in gone.client_ids]
            continue
        fed.open_round(round_index, chosen)
        try:
            holders = fed.strategy.round(fed, round_index, chosen)
            fed.check_round(round_index)
            return holders, chosen
        except ClientsFlagged as flagged:
            if snapshot is None:
                raise
            log.warning("round %d: %s; the round starts again without them", round_index + 1, flagged)
            lost = fed.rollback(snapshot, [])
            progress.rewind()
            chosen = [m for m in chosen if m.client_id not in flagged.client_ids and m.client_id not in lost]
        except ClientGone as gone:
            if snapshot is None:
                raise
            if fed.stop.is_set():
                raise Interrupted("training interrupted") from None
            log.warning("round %d: %s; the round starts again without them", round_index + 1, gone)
            lost = fed.rollback(snapshot, gone.client_ids)
            progress.rewind()
            chosen = [m for m in chosen if m.client_id not in lost]


def drive(fed: Federation, out: Path, resume: bool, started: float) -> dict[str, Any]:
    """Run ``fed``'s framework round after round into ``out``; return (and write) the summary."""
    config = fed.config
    progress: dict[str, Any] = {
        "round": 0, "train_seconds": 0.0, "wall_seconds": 0.0,
        "bytes_up": 0, "bytes_down": 0, "eval_bytes_up": 0, "eval_bytes_down": 0, "control_bytes_up": 0,
        "control_bytes_down": 0, "comm_seconds": 0.0,
    }  # fmt: skip
    logger = MetricLogger(config, out, resume=resume)  # metrics.jsonl, rounds.jsonl and train.report_to's trackers
    if fed.server is not None and len(fed.members) > 1:
        fed.server.start()  # clients work at once: the server serves them from its queue
    holders: list[Member] = fed.members[:1]
    base = dict(progress)
    loop_started = time.perf_counter()
    bar: _Progress | None = None

    def account() -> None:
        now = time.perf_counter()
        (up, down), (eval_up, eval_down) = fed.traffic(), fed.eval_traffic()
        control_up, control_down = fed.control_traffic()
        progress.update(
            bytes_up=base["bytes_up"] + up, bytes_down=base["bytes_down"] + down,
            eval_bytes_up=base["eval_bytes_up"] + eval_up, eval_bytes_down=base["eval_bytes_down"] + eval_down,
            control_bytes_up=base.get("control_bytes_up", 0) + control_up,
            control_bytes_down=base.get("control_bytes_down", 0) + control_down,
            train_seconds=base["train_seconds"] + now - loop_started, wall_seconds=base["wall_seconds"] + now - started,
            comm_seconds=base.get("comm_seconds", 0.0) + (bar.comm_seconds if bar is not None else 0.0),
        )  # fmt: skip

    def checkpoint() -> None:
        account()
        fed.last_checkpoint = save_checkpoint(out, fed, sum(m.steps_done for m in fed.members), progress).name

    try:
        if resume:
            progress = load_checkpoint(out, fed)
            fed.last_checkpoint = progress.get("name")
            if reopen(fed):  # its length grew: the one round goes on (its line in rounds.jsonl goes)
                progress["round"] = 0
            logger.rewind({m.client_id: m.steps_done for m in fed.members}, int(progress["round"]))
            base = dict(progress)
        else:
            torch.manual_seed(config.seed)
            if config.train.eval_before:
                before, _ = fed.evaluate(fed.members[:1])
                progress.update(eval_loss_before=before.loss, accuracy_before=fed.members[0].accuracy(fed))
            else:
                progress.update(eval_loss_before=None, accuracy_before=None)
            checkpoint()  # so that --resume works from the start on
        loop_started = time.perf_counter()
        with interruptible(fed.stop):
            bar = _Progress(fed, logger, sum(m.steps_done for m in fed.members))
            fed.on_step = _step_hook(fed, bar, checkpoint)
            try:
                for round_index in range(int(progress["round"]), config.framework.rounds):
                    fed.check_stop()
                    bar.round(round_index)
                    holders, chosen = run_round(fed, round_index, participants(config, fed.members, round_index), bar)
                    holders = fed.reachable(holders, chosen)
                    loss, accuracy, per_client, own_sets = evaluate_round(fed, holders, round_index, progress)
                    progress.update(round=round_index + 1)
                    account()
                    record = {
                        "round": round_index + 1, "participants": [m.client_id for m in chosen],
                        "eval_loss": loss, "eval_ppl": perplexity(loss), "accuracy": accuracy,
                        "per_client_eval_loss": per_client if len(holders) > 1 else None, **own_sets,
                        "bytes_up": progress["bytes_up"], "bytes_down": progress["bytes_down"],
                        "train_seconds": progress["train_seconds"],
                    }  # fmt: skip
                    logger.round(record)
                    if settled(fed):
                        checkpoint()
            finally:
                bar.close()
                fed.on_step = lambda member, record: None
    except Interrupted:
        raise Interrupted(_interrupted(fed, out, progress, checkpoint)) from None
    finally:
        logger.close()
        if fed.server is not None:
            fed.server.stop()
    if fed.tap is not None:
        keys = fed.tap.write(out)
        if fed.truth is not None:
            fed.truth.write(out, keys)
    adapters = out / "adapters"
    adapters.mkdir(exist_ok=True)
    # The model `generate` / `export` rebuild: the global client side (psl: the first client's) and the trunk
    # adapter it was trained with.
    holders[0].client.save(adapters, with_optimizer=False)
    write_json(adapters / "client.json", {"client": holders[0].index})  # whose cut and rank they have
    if fed.server is not None:
        fed.server.export_adapter(fed.server.adapter_of(holders[0].client_id), adapters / "trunk.safetensors")
    account()
    summary = summarize(fed, progress)
    write_json(out / "summary.json", summary)
    return summary


def client_evaluation(fed: Federation, holders: list[Member], round_index: int) -> dict[str, Any]:
    """Held-out losses on each client's own held-out set (``data.client_eval_size``; every value None when off).

    ``client_eval_loss``: the global model's (the round's first holder) per client, with its mean and its worst
    (largest) one, so a model that fits the average client but fails one shows it; ``own_eval_loss``: where each
    client keeps its own client side (several holders, psl), that client's own model on its own set.
    ``forgetting`` (sequential frameworks, survey §3.3): ``mean_i (loss_i(end of round) - loss_i(right after i
    trained))`` over the round's clients but the last, where loss_i is client i's held-out loss of the carried
    client side; positive: what the later clients' training made the model forget of the earlier clients' data.
    On classification-style data the same for accuracy on each client's own held-out examples:
    ``client_accuracy`` (mean, worst: lowest), ``own_accuracy`` and ``accuracy_forgetting`` (``mean_i (acc_i(right
    after i trained) - acc_i(end of round))``, positive: forgotten). With a remedy that gives each client a personal
    model (SplitGP), ``personal_eval_loss`` / ``personal_accuracy``: each client's personalized model (its own client
    side through its early exit) on its own held-out set, next to the global model's ``client_eval_loss`` /
    ``client_accuracy``."""
    values: dict[str, Any] = dict.fromkeys(CLIENT_EVAL_KEYS)
    owners = [m for m in fed.members if m.held_out]
    if fed.config.data.client_eval_size == 0 or not owners or not holders:
        return values
    losses = {m.client_id: holders[0].evaluate_on(m).loss for m in owners}
    values.update(
        client_eval_loss=losses, mean_client_eval_loss=sum(losses.values()) / len(losses),
        worst_client_eval_loss=max(losses.values()),
    )  # fmt: skip
    accuracies = {m.client_id: holders[0].accuracy(fed, m.choices) for m in owners if m.choices}
    if accuracies:
        values.update(
            client_accuracy=accuracies, mean_client_accuracy=sum(accuracies.values()) / len(accuracies),
            worst_client_accuracy=min(accuracies.values()),
        )  # fmt: skip
    if len(holders) > 1:
        values["own_eval_loss"] = {m.client_id: m.evaluate_on(m).loss for m in holders if m.held_out}
        if accuracies:
            values["own_accuracy"] = {m.client_id: m.accuracy(fed, m.choices) for m in holders if m.choices}
    personal = {m.client_id: scores for m in owners if (scores := m.personal_scores(fed)) is not None}
    if personal:
        personal_losses = {c: loss for c, (loss, _) in personal.items()}
        personal_accuracy = {c: acc for c, (_, acc) in personal.items() if acc is not None}
        values.update(
            personal_eval_loss=personal_losses,
            mean_personal_eval_loss=sum(personal_losses.values()) / len(personal_losses),
        )
        if personal_accuracy:
            values.update(
                personal_accuracy=personal_accuracy,
                mean_personal_accuracy=sum(personal_accuracy.values()) / len(personal_accuracy),
                worst_personal_accuracy=min(personal_accuracy.values()),
            )
    if fed.framework.sequential:
        trained = sorted(
            (m.fresh[1], m.client_id, m.fresh[2], m.fresh[3]) for m in owners if m.fresh and m.fresh[0] == round_index
        )
        earlier = trained[:-1]  # the last client's end-of-round model is the one it passed on
        if earlier:
            values["forgetting"] = sum(losses[client] - loss for _, client, loss, _ in earlier) / len(earlier)
            drops = [
                acc - accuracies[client] for _, client, _, acc in earlier if acc is not None and client in accuracies
            ]
            if drops:
                values["accuracy_forgetting"] = sum(drops) / len(drops)
    return values


def evaluate_round(
    fed: Federation, holders: list[Member], round_index: int, progress: dict[str, Any]
) -> tuple[float | None, float | None, dict[str, float] | None, dict[str, Any]]:
    """The global model after round ``round_index`` (into ``progress``): (loss, accuracy, per-client loss, the
    clients' own sets). With ``train.eval_each_round=false`` only the last round is evaluated (all None before)."""
    if not fed.config.train.eval_each_round and round_index + 1 < fed.config.framework.rounds:
        return None, None, None, dict.fromkeys(CLIENT_EVAL_KEYS)
    result, per_client = fed.evaluate(holders)
    accuracy = holders[0].accuracy(fed) if len(holders) == 1 else None
    own_sets = client_evaluation(fed, holders, round_index)
    progress.update(eval_loss_after=result.loss, per_client_eval_loss=per_client, accuracy_after=accuracy, **own_sets)
    return result.loss, accuracy, per_client, own_sets


def reopen(fed: Federation) -> bool:
    """After a resume: a run of one client and one round whose length grew (``checkpoint.length_changes``) goes on
    in that round, up to the new length. Whether the round is open again."""
    config, member = fed.config, fed.members[0]
    one = len(fed.members) == 1 and (config.framework.num_clients == 1 or not fed.framework.split)
    if config.framework.rounds != 1 or not one or member.steps_done >= fed.local_steps:
        return False
    member.round_goal = fed.local_steps
    return True


def settled(fed: Federation) -> bool:
    """Whether no client is in the middle of its training now (asynchronous aggregation lets them train across
    the driver's rounds): only then is the state a checkpoint that ``--resume`` can continue exactly."""
    return bool(fed.strategy.settled())


def _step_hook(fed: Federation, bar: _Progress, checkpoint: Any) -> Any:
    """After each client step: evaluate when ``train.eval_every`` says, log, and (one client) checkpoint when
    ``train.save_every`` says."""
    train = fed.config.train
    total = fed.config.framework.rounds * fed.local_steps

    def hook(member: Member, record: dict[str, Any]) -> None:
        step = member.steps_done
        if fed.data is not None:  # else the step ran on a remote client, which evaluated there
            evaluate_now(fed, member, record)
        bar.step(member, record)
        if train.save_every and len(fed.members) == 1 and step % train.save_every == 0 and step < total:
            checkpoint()

    return hook


def evaluate_now(fed: Federation, member: Member, record: dict[str, Any]) -> None:
    """Add held-out loss and perplexity to a step's record when ``train.eval_every`` says (not at the end)."""
    every, step = fed.config.train.eval_every, member.steps_done
    if every and step % every == 0 and step < fed.config.framework.rounds * fed.local_steps:
        result = member.evaluate(fed)
        record.update(eval_loss=result.loss, eval_ppl=perplexity(result.loss))


def _interrupted(fed: Federation, out: Path, progress: dict[str, Any], checkpoint: Any) -> str:
    """Checkpoint what can be resumed exactly and say where ``--resume`` will continue."""
    if len(fed.members) == 1:
        checkpoint()
        return (
            f"interrupted after step {fed.members[0].steps_done}; checkpoint written: continue with the same command "
            "and --resume"
        )
    return (
        f"interrupted in round {int(progress['round']) + 1}; --resume continues from the checkpoint of round "
        f"{progress['round']} in {out}/checkpoints"
    )


def summarize(fed: Federation, progress: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` (format ``SUMMARY_FORMAT``): the same keys for every framework and transport."""
    config = fed.config
    fw = config.framework
    per_client = progress.get("per_client_eval_loss") or {}
    server = fed.server
    tokens = sum(m.tokens for m in fed.members)
    first = fed.members[0]
    return {
        "format": SUMMARY_FORMAT,
        "framework": fw.name,
        "split_mode": config.split.mode if fed.framework.split else None,
        "model": config.model.name,
        "num_clients": len(fed.members),
        "rounds": fw.rounds,
        "local_steps": fed.local_steps,
        "partition": config.data.partition,
        "steps": sum(m.steps_done for m in fed.members),
        "tokens": tokens,
        "eval_loss_before": progress["eval_loss_before"],
        "eval_loss_after": progress["eval_loss_after"],
        "eval_ppl_before": perplexity(progress["eval_loss_before"]),
        "eval_ppl_after": perplexity(progress["eval_loss_after"]),
        **{key: progress.get(key) for key in CLIENT_EVAL_KEYS},
        "accuracy_before": progress.get("accuracy_before"),
        "accuracy_after": progress.get("accuracy_after"),
        "bytes_up": progress["bytes_up"],
        "bytes_down": progress["bytes_down"],
        "eval_bytes_up": progress["eval_bytes_up"],
        "eval_bytes_down": progress["eval_bytes_down"],
        "control_bytes_up": progress.get("control_bytes_up", 0),
        "control_bytes_down": progress.get("control_bytes_down", 0),
        "codecs": {"activations": config.transport.codec.activations, "gradients": config.transport.codec.gradients},
        "link": link_summary(config, progress),
        "train_seconds": progress["train_seconds"],
        "wall_seconds": progress["wall_seconds"],
        "train_tokens_per_s": tokens / progress["train_seconds"] if progress["train_seconds"] else 0.0,
        **first.info(),
        "server_param_count": server.param_count if server is not None else 0,
        "server_trainable_param_count": server.trainable_param_count if server is not None else 0,
        "trunk_layers": server.trunk_layers() if server is not None else [],
        "server_adapters": server.adapter_names() if server is not None else [],
        "groups": fed.groups or None,
        **rates_in_effect(fed),
        "server": serving_summary(server),
        "aggregation": fed.strategy.summary(),
        "clients": [
            {
                "client": m.client_id,
                **client_setup(config, m),
                "examples": m.num_examples,
                "label_histogram": m.histogram,
                "steps": m.steps_done,
                "tokens": m.tokens,
                "last_loss": m.last_loss,
                "bytes_up": m.meter.up,
                "bytes_down": m.meter.down,
                "eval_loss": per_client.get(m.client_id, progress["eval_loss_after"]),
            }
            for m in fed.members
        ],
        "privacy": privacy_summary(config, fed) if fed.framework.split else None,
    }


def client_setup(config: Config, member: Member) -> dict[str, Any]:
    """A client's own cut, LoRA rank, simulated speed and link (``framework.clients``)."""
    own = config.for_client(member.index)
    return {
        "head_layers": own.split.head_layers,
        "tail_layers": own.split.tail_layers if own.split.mode == "ushape" else 0,
        "lora_rank": own.lora.rank,
        "speed": config.client(member.index).speed,
        "link_mbps": {name: own.transport.link.direction(name)["bandwidth_mbps"] for name in LINK_DIRECTIONS},
    }


def serving_summary(server: ServerSurface | None) -> dict[str, Any] | None:
    """The server's idle fraction and each client's time queued (None without a server)."""
    return server.serving_stats() if server is not None else None


def link_summary(config: Config, progress: dict[str, Any]) -> dict[str, Any]:
    """The emulated link's settings per direction and the link time of every step (``transport.link``)."""
    link = config.transport.link
    directions = {name: link.direction(name) for name in LINK_DIRECTIONS}
    return {"enabled": link.enabled, **directions, "comm_seconds": progress.get("comm_seconds", 0.0)}


def defense_reports(config: Config, fed: Federation) -> dict[str, dict[str, float | None]]:
    """Each configured defense (in order) with its ``report``: per number, the largest among the clients that ran
    it here (the client that leaks most); empty for a defense that reports nothing or runs elsewhere."""
    reports: dict[str, dict[str, float | None]] = {name: {} for name in config.privacy.defenses}
    for m in fed.members:
        for name, report in ({} if m.pipeline is None else m.pipeline.defenses.reports()).items():
            merged = reports.setdefault(name, {})
            for key, value in report.items():
                known = [v for v in (merged.get(key), value) if v is not None]
                merged[key] = max(known) if known else None
    return reports


def privacy_summary(config: Config, fed: Federation) -> dict[str, Any]:
    """The defenses every client ran, each with its report, and the largest epsilon among the clients (each
    sends its own data).

    ``client_attacks``: each attack of ``privacy.client_attack`` that a malicious client ran here, with its ``report``.
    A networked or Ray server holds proxies of clients whose defenses and attacks run elsewhere: its epsilon is null
    (and each client's own ``summary.json`` has its attacks).
    """
    train = config.train
    values, counts = [], []
    for m in fed.members:
        count = releases(m.steps_done, train.batch_size, train.grad_accum, max(m.num_examples, 1))
        counts.append(count)
        events = None if m.pipeline is None else m.pipeline.defenses.dp_events()
        values.append(None if m.pipeline is None else epsilon(events, count, config.privacy.delta))
    known = [v for v in values if v is not None]
    return {
        "defenses": defense_reports(config, fed),
        "guards": {guard.name: guard.report() for guard in fed.guards},
        "client_attacks": attack_reports([m.pipeline.attacks for m in fed.members if m.pipeline is not None]),
        "epsilon": max(known) if known and len(known) == len(values) else None,
        "delta": config.privacy.delta,
        "releases": max(counts, default=0),
        "alarm_step": fed.members[0].pipeline.alarm_step if fed.members[0].pipeline is not None else None,
        "detectors": fed.members[0].pipeline.detector_reports() if fed.members[0].pipeline is not None else {},
        "server_attacks": {mod.name: mod.report() for mod in fed.server_mods if isinstance(mod, ServerAttack)},
    }
