"""Faults across processes: every framework, every fault, against the in-process run that leaves the client out.

    python benchmarks/faults.py [--frameworks sl psl sflv1 sflv2 gsfl] [--faults ...] [--keep DIR]

Each case runs `splitlm serve` and three `splitlm client` processes over gRPC with TLS and tokens on loopback
(tiny model, 3 rounds of 3 steps per client, LoRA dropout 0.05), injects one fault, and compares the run with
its reference: the same config trained in-process with `framework.leave_out` naming the client the fault took
out of round 2 (none for the server's faults). Faults:

- ``client_killed_restarted_in_round``: client 1 is killed (SIGKILL) in the middle of its round-2 steps and
  started again at once.
- ``client_killed_restarted_after_round``: the same, but started again only after round 2 ended.
- ``client_absent_for_a_round``: client 1 is killed right after it wrote its checkpoint of round 1, so it is
  not there when round 2 starts, and started again after round 2.
- ``server_killed_mid_round``: the server is killed in the middle of round 2 and started with ``--resume``.
- ``server_killed_in_checkpoint``: the server is killed while it writes its checkpoint of round 1 (its
  temporary checkpoint folder exists; if the poll missed that moment, of round 2) and started with ``--resume``.

Three more faults leave every process running and cut client 1 off instead (client 1 reaches the server through
a TCP proxy in this process, ``Blackhole``, that can stop forwarding both ways while keeping the sockets open: a
silent partition). By default they run for ``LINK_FAULT_FRAMEWORKS`` (each waits out a partition of about a
minute):

- ``client_cut_off_past_grace``: client 1's link goes silent in the middle of its round-2 steps for
  ``CUT_PAST_GRACE_S``, longer than ``framework.client_grace_s``; the server leaves it out of round 2 and it
  rejoins at round 3 in the same process (reference: left out of round 2).
- ``client_cut_off_within_grace``: the same for ``CUT_WITHIN_GRACE_S``, with a ``framework.client_grace_s``
  longer than the cut: nothing is lost (reference: the clean run).
- ``client_frozen_past_grace``: client 1 is stopped (SIGSTOP) in the middle of its round-2 steps for
  ``CUT_PAST_GRACE_S`` and continued (SIGCONT) (reference: left out of round 2).

Prints one JSON line ``{"cases": [{"framework", "fault", "completed", "equal_to_reference", "lost_steps",
"duplicated_steps", ...}]}``: ``completed`` (every process exited 0), ``equal_to_reference`` (every round's
held-out loss, every client step's loss and the trunk adapter are bit for bit those of the reference),
``lost_steps`` (client steps of the reference missing from the run's metrics) and ``duplicated_steps`` (client
steps the run logged more than once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ["sl", "psl", "sflv1", "sflv2", "gsfl"]
FAULTS = [
    "client_killed_restarted_in_round",
    "client_killed_restarted_after_round",
    "client_absent_for_a_round",
    "server_killed_mid_round",
    "server_killed_in_checkpoint",
]
CLIENTS, ROUNDS, LOCAL_STEPS = 3, 3, 3
OVERRIDES = [
    f"framework.num_clients={CLIENTS}", f"framework.rounds={ROUNDS}", f"framework.local_steps={LOCAL_STEPS}",
    f"train.steps={ROUNDS * LOCAL_STEPS}", "train.seq_len=32", "train.warmup_steps=1", "train.progress=false",
    "data.max_rows=300", "data.eval_size=16", "lora.dropout=0.05", "framework.client_grace_s=3",
    "framework.wait_for_clients_s=120",
]  # fmt: skip
LINK_FAULTS = ["client_cut_off_past_grace", "client_cut_off_within_grace", "client_frozen_past_grace"]
LINK_FAULT_FRAMEWORKS = ["sflv2", "psl", "sflv1"]
# The server counts the grace from a client's last message (clients say they are alive every few seconds): past
# the grace means past framework.client_grace_s=3 (OVERRIDES) ...
CUT_PAST_GRACE_S = 20.0
# ... and within it: long enough that the server notes the silence (at half the grace), shorter than the grace of
# this case's runs (WITHIN_GRACE_S).
CUT_WITHIN_GRACE_S = 25.0
WITHIN_GRACE_S = 40.0
TIMEOUT = 300.0


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitlm.cli.main", "-v", *args]  # -v: the logs of a case show what happened


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def _wait(condition: Any, what: str, timeout: float = TIMEOUT, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


class Blackhole:
    """A TCP proxy in front of the server for one client that can go silent: ``cut()`` stops forwarding bytes both
    ways (the sockets stay open, nothing is closed or reset, new connections are accepted and go nowhere), as a
    network partition does; ``heal()`` forwards again, what was held first, and lets closes through."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    def cut(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.flowing.set()
        for sock in [self.listener, *self.sockets]:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the server is not listening (yet): neither are we, to this client
                downstream.close()
                continue
            self.sockets += [downstream, upstream]
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                self.flowing.wait()  # a cut link holds what was sent, as TCP's retransmissions would
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)
        except OSError:  # one side is gone: so is the other
            source.close()
            target.close()


class Case:
    """One networked run with one fault, in its own folder."""

    def __init__(self, framework: str, fault: str, root: Path) -> None:
        self.framework, self.fault, self.root = framework, fault, root
        self.config = ROOT / "configs" / "frameworks" / f"{framework}.yaml"
        self.port = _free_port()
        self.certs = root / "certs"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.overrides = [*OVERRIDES, *case_overrides(fault)]
        self.proxy = Blackhole(self.port) if fault.startswith("client_cut_off") else None

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(_cli(*args), stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.root)
        self.processes.append(process)
        return process

    def server(self, *extra: str) -> subprocess.Popen[bytes]:
        return self._spawn(
            "server", "serve", str(self.config), *self.overrides, f"output_dir={self.root / 'server'}", "--certs",
            str(self.certs), "--address", f"127.0.0.1:{self.port}", *extra,
        )  # fmt: skip

    def client(self, index: int) -> subprocess.Popen[bytes]:
        port = self.proxy.port if self.proxy is not None and index == 1 else self.port  # client 1 may be cut off
        return self._spawn(
            f"client{index}", "client", str(self.config), *self.overrides,
            f"output_dir={self.root / f'client{index}'}", "--server", f"127.0.0.1:{port}", "--client-id", str(index),
            "--certs", str(self.certs), "--connect-timeout", "120",
        )  # fmt: skip

    def server_steps(self, round_number: int, client: str | None = None) -> bool:
        records = _lines(self.root / "server" / "metrics.jsonl")
        return any(r["round"] == round_number and (client is None or r["client"] == client) for r in records)

    def rounds_done(self) -> int:
        return len(_lines(self.root / "server" / "rounds.jsonl"))

    def server_log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def run(self) -> dict[str, Any]:
        from splitlm.transport.security import make_dev_certs

        make_dev_certs(self.certs, ["127.0.0.1"], [str(i) for i in range(CLIENTS)])
        server = self.server()
        clients = [self.client(i) for i in range(CLIENTS)]
        caught = self.inject(server, clients)
        finals = [p for p in self.processes if p.poll() is None or p.returncode != -signal.SIGKILL]
        codes = [p.wait(timeout=TIMEOUT) for p in finals]
        return {"completed": all(code == 0 for code in codes), "fault_hit": caught}

    def inject(self, server: subprocess.Popen[bytes], clients: list[subprocess.Popen[bytes]]) -> bool:
        fault = self.fault
        if fault in LINK_FAULTS:
            return self.cut_off(clients[1])
        if fault.startswith("client_killed"):
            _wait(lambda: self.server_steps(2, "1"), "client 1's steps in round 2")
            clients[1].send_signal(signal.SIGKILL)
            clients[1].wait()
            if fault.endswith("after_round"):
                _wait(lambda: self.rounds_done() >= 2, "round 2 to end")
            self.client(1)
            return True
        if fault == "client_absent_for_a_round":
            checkpoint = self.root / "client1" / "checkpoints" / f"step-{CLIENTS * LOCAL_STEPS:06d}"
            _wait(checkpoint.is_dir, "client 1's checkpoint of round 1", poll=0.005)
            clients[1].send_signal(signal.SIGKILL)
            clients[1].wait()
            _wait(lambda: self.rounds_done() >= 2, "round 2 to end")
            self.client(1)
            return True
        if fault == "server_killed_mid_round":
            _wait(lambda: self.server_steps(2), "a step of round 2")
            hit = True
        else:  # server_killed_in_checkpoint: its temporary checkpoint folder of round 1 (or, missed, 2) exists
            folder = self.root / "server" / "checkpoints"
            hit = False
            for done in range(1, ROUNDS):  # writing a tiny checkpoint takes milliseconds: a poll may miss it
                final = f"step-{done * CLIENTS * LOCAL_STEPS:06d}"  # renamed from the temporary folder when written
                tmp = folder / f".tmp-{final}"
                _wait(lambda tmp=tmp, final=final: tmp.is_dir() or (folder / final).is_dir(), final, poll=0.001)
                hit = tmp.is_dir()
                if hit:
                    break
        server.send_signal(signal.SIGKILL)
        server.wait()
        self.server("--resume")
        return hit

    def cut_off(self, client: subprocess.Popen[bytes]) -> bool:
        """Cut client 1 off (its link silent, or its process stopped) in the middle of its round-2 steps, for a
        while, then let it go on. Hit: the server noticed the break and, past the grace, left client 1 out of
        round 2 (within the grace: noted its silence, and did not)."""
        _wait(lambda: self.server_steps(2, "1"), "client 1's steps in round 2", poll=0.005)
        frozen = self.fault == "client_frozen_past_grace"
        if frozen:
            client.send_signal(signal.SIGSTOP)
        else:
            assert self.proxy is not None
            self.proxy.cut()
        time.sleep(CUT_WITHIN_GRACE_S if self.fault == "client_cut_off_within_grace" else CUT_PAST_GRACE_S)
        log = self.server_log()
        if frozen:
            client.send_signal(signal.SIGCONT)
        else:
            assert self.proxy is not None
            self.proxy.heal()
        noticed = "client 1: nothing received for" in log
        left_out = "round 2: client 1 gone" in log
        return noticed and left_out == self.fault.endswith("past_grace")


def case_overrides(fault: str) -> list[str]:
    """A case's settings beyond ``OVERRIDES`` (none that change what is computed)."""
    return [f"framework.client_grace_s={WITHIN_GRACE_S:g}"] if fault == "client_cut_off_within_grace" else []


def leaves_out_client(fault: str) -> bool:
    """Whether the fault takes client 1 out of round 2 (else the run must equal the clean one)."""
    return fault.startswith("client") and fault != "client_cut_off_within_grace"


def reference(framework: str, fault: str, out: Path) -> Path:
    """The in-process run the faulty one must equal: client 1 left out of round 2 for the clients' faults (but
    a cut within the grace, which loses nothing)."""
    left = ["framework.leave_out={2: ['1']}"] if leaves_out_client(fault) else []
    config = ROOT / "configs" / "frameworks" / f"{framework}.yaml"
    subprocess.run(
        _cli("train", str(config), *OVERRIDES, *case_overrides(fault), *left, f"output_dir={out}"), env=_env(),
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    return out


def compare(run: Path, ref: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    ours, theirs = _lines(run / "metrics.jsonl"), _lines(ref / "metrics.jsonl")
    steps = Counter((r["client"], r["step"]) for r in ours)
    expected = {(r["client"], r["step"]) for r in theirs}
    lost = len(expected - set(steps))
    duplicated = sum(count - 1 for count in steps.values() if count > 1)
    key = lambda r: (r["round"], r["client"], r["step"])  # noqa: E731
    same_steps = sorted((key(r), r["loss"]) for r in ours) == sorted((key(r), r["loss"]) for r in theirs)
    rounds_ours, rounds_theirs = _lines(run / "rounds.jsonl"), _lines(ref / "rounds.jsonl")
    same_rounds = [(r["eval_loss"], r["participants"]) for r in rounds_ours] == [
        (r["eval_loss"], r["participants"]) for r in rounds_theirs
    ]
    trunk, trunk_ref = (load_file(str(p / "adapters" / "trunk.safetensors")) for p in (run, ref))
    same_trunk = trunk.keys() == trunk_ref.keys() and all(bool((trunk[k] == trunk_ref[k]).all()) for k in trunk)
    return {
        "equal_to_reference": same_steps and same_rounds and same_trunk,
        "lost_steps": lost,
        "duplicated_steps": duplicated,
        "same_step_losses": same_steps,
        "same_rounds": same_rounds,
        "same_trunk_adapter": same_trunk,
    }


def run_case(framework: str, fault: str, root: Path) -> dict[str, Any]:
    """One case, in ``root`` (made if needed); the processes are killed whatever happens."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = {"framework": framework, "fault": fault}
    case = Case(framework, fault, root)
    try:
        result.update(case.run())
        result.update(compare(root / "server", reference(framework, fault, root / "reference")))
    except Exception as error:  # reported, not raised: the other cases still run
        result.update(completed=False, equal_to_reference=False, lost_steps=None, duplicated_steps=None)
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        for process in case.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a stopped process cannot die
                process.kill()
                process.wait()
        if case.proxy is not None:
            case.proxy.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", default=FRAMEWORKS, choices=FRAMEWORKS)
    parser.add_argument(
        "--faults",
        nargs="+",
        choices=FAULTS + LINK_FAULTS,
        help=f"default: all (the link faults for {', '.join(LINK_FAULT_FRAMEWORKS)})",
    )
    parser.add_argument("--keep", help="keep every case's folder (logs, metrics) under this folder")
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitlm-faults-"))
    chosen = [
        (framework, fault) for framework in args.frameworks for fault in (args.faults or FAULTS + LINK_FAULTS)
        if args.faults or fault in FAULTS or framework in LINK_FAULT_FRAMEWORKS
    ]  # fmt: skip
    cases = []
    try:
        for framework, fault in chosen:
            cases.append(run_case(framework, fault, base / f"{framework}-{fault}"))
            print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
