"""The server-side tap: what an honest-but-curious server keeps of a run, for the attacks to read.

``ServerTap`` is a server-side mod (``transport/mods.py``), between the codec and the server: it copies
the tensors of every training ``forward`` request (the smashed data, its mask, and in a vanilla split the
labels), the trunk output the server sent back (U-shape), the gradient the client sent for it (step 7)
and the gradient the server returned for the smashed data (step 9). It keeps the last ``max_batches``
micro-batches and writes each as ``tap/<client>-<step>-<micro>.safetensors``.

Scoring needs the truth, which the server never sees: ``TruthRecorder`` is a client plugin that writes the
true token ids of the same micro-batches to ``truth/`` (an audit file; it holds private text).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitlm.data import Batch
from splitlm.errors import PrivacyError
from splitlm.runtime.plugins import ClientPlugin, Key
from splitlm.transport import Answer, Handler, Message, Mod
from splitlm.transport.base import then

TAP_DIR = "tap"
TRUTH_DIR = "truth"


def record_name(key: Key) -> str:
    client, step, micro = key
    return f"{client}-{step}-{micro}.safetensors"


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _write(folder: Path, key: Key, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / record_name(key)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"client": key[0], "step": str(key[1]), "micro": str(key[2])})
    tmp.replace(path)


class ServerTap(Mod):
    """A server mod; records what crossed the cut for the last ``max_batches`` micro-batches."""

    name = "tap"

    def __init__(self, max_batches: int = 4) -> None:
        self.max_batches = max_batches
        self.records: OrderedDict[Key, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def serve(self, message: Message, call_next: Handler) -> Answer:
        key = message.key
        if message.kind == "forward":
            kept = {"smashed": _keep(message.tensors["hidden"])} if "hidden" in message.tensors else {}
            for name in ("attention_mask", "labels"):
                if name in message.tensors:
                    kept[name] = _keep(message.tensors[name])
            with self._lock:
                self.records[key] = kept
                self.records.move_to_end(key)
                while len(self.records) > self.max_batches:
                    self.records.popitem(last=False)
        elif message.kind == "backward" and "grad" in message.tensors:
            self._add(key, "grad_trunk_out", message.tensors["grad"])
        answer = call_next(message)
        if message.kind in ("forward", "backward"):
            return then(answer, lambda reply: self._note_reply(key, reply))
        return answer

    def _note_reply(self, key: Key, reply: Message) -> Message:
        if reply.kind == "activations" and "hidden" in reply.tensors:
            self._add(key, "trunk_out", reply.tensors["hidden"])
        elif reply.kind in ("gradients", "loss") and "grad" in reply.tensors:
            self._add(key, "grad_smashed", reply.tensors["grad"])
        return reply

    def _add(self, key: Key, name: str, tensor: torch.Tensor) -> None:
        with self._lock:
            if key in self.records:
                self.records[key][name] = _keep(tensor)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self.records)

    def write(self, run_dir: Path) -> list[Key]:
        """Write the kept records under ``run_dir/tap``; returns their keys, oldest first."""
        with self._lock:
            records = list(self.records.items())
        folder = run_dir / TAP_DIR
        for key, tensors in records:
            _write(folder, key, tensors)
        index = [{"client": c, "step": s, "micro": m} for (c, s, m), _ in records]
        (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        return [key for key, _ in records]


class TruthRecorder(ClientPlugin):
    """Client plugin: the true token ids of the latest ``limit`` training micro-batches (at least the tapped
    ones, when ``limit`` covers the tap's window across clients), written only for the tapped ones."""

    name = "truth"

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.batches: OrderedDict[Key, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def on_batch(self, key: Key, batch: Batch) -> None:
        with self._lock:
            self.batches[key] = {"input_ids": _keep(batch.input_ids), "attention_mask": _keep(batch.attention_mask)}
            self.batches.move_to_end(key)
            while len(self.batches) > self.limit:
                self.batches.popitem(last=False)

    def write(self, run_dir: Path, keys: list[Key]) -> None:
        for key in keys:
            if key in self.batches:
                _write(run_dir / TRUTH_DIR, key, self.batches[key])


def read_records(
    run_dir: Path, truth_dir: Path | None = None
) -> list[tuple[Key, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
    """(key, what the server received, the truth or None) for every tapped micro-batch of a run; ``truth_dir``:
    the folder holding ``truth/`` when it is not ``run_dir`` (a networked run: the client's output_dir)."""
    folder = run_dir / TAP_DIR
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise PrivacyError(
            f"{run_dir} has no server tap ({index_path} missing): train it with privacy.tap.enabled=true"
        )
    try:
        index = json.loads(index_path.read_text())
        keys = [(str(e["client"]), int(e["step"]), int(e["micro"])) for e in index]
    except (ValueError, KeyError, TypeError) as error:
        raise PrivacyError(f"{index_path} is not a tap index ({error}); re-run the training with the tap") from None
    out = []
    for key in keys:
        path = folder / record_name(key)
        try:
            tap = load_file(str(path))
        except Exception as error:
            raise PrivacyError(f"{path} is not a readable tap record ({error}); re-run the training") from None
        if "smashed" not in tap or "attention_mask" not in tap:
            raise PrivacyError(f"{path} lacks smashed data or its attention mask; re-run the training")
        truth_path = (truth_dir or run_dir) / TRUTH_DIR / record_name(key)
        truth = load_file(str(truth_path)) if truth_path.is_file() else None
        out.append((key, tap, truth))
    return out
