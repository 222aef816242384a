"""Predicted step time, memory and traffic of every cut (survey §4.1 split-point selection, §4.6 joint optimisation).

A step is simulated, not summed by a closed formula: the client's operations run in the order of a schedule of
``runtime/schedule.py`` (``serial``, or ``pipelined`` over micro-batches) over four FIFO resources, the client's
compute, the uplink, the server and the downlink. A message of n bytes holds its link for n*8/bandwidth s and
arrives ``latency`` later (the link is free again before it arrives), as ``transport/link.py`` emulates; the server
serves requests in arrival order. The client's compute is multiplied by its ``speed`` (its slowdown factor).

Compute comes from a ``Profile`` measured on one batch of ``train.batch_size`` rows and scales linearly with the
rows of a micro-batch (smaller batches use a device less well, so pipelining may gain less than predicted). The
server is predicted as one client sees it alone (other clients' work on a shared trunk is not modelled).

Memory of a cut: parameters + training state (gradient and AdamW moments of the trainable ones) + the activations
one batch keeps for backward, the head's and the tail's at once (an upper bound for a serial step).

A serial step is the whole batch as one micro-batch; with ``m`` micro-batches pipelined, every piece of work is
cut in m, and since the pipelined order can always mimic the serial one (piece k of each operation in the k-th
m-th of its serial interval), a pipelined step is never predicted slower than a serial one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from splitlm.planning.profile import Profile
from splitlm.runtime.schedule import Op, OpKind, pipelined, serial

MB = 1e6  # megabytes (10^6 bytes), as the budgets in the config count them


@dataclass(frozen=True)
class LinkModel:
    """One direction of a client's link (``transport.link``): 0 bandwidth is unlimited."""

    bandwidth_mbps: float = 0.0
    latency_ms: float = 0.0

    def hold_s(self, nbytes: float) -> float:
        """Seconds ``nbytes`` keep the link busy."""
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0


@dataclass(frozen=True)
class ClientSetting:
    """What one client (or several alike) brings to the plan: its speed, its link and its memory budget."""

    clients: tuple[int, ...] = (0,)
    speed: float = 1.0
    up: LinkModel = LinkModel()
    down: LinkModel = LinkModel()
    budget_mb: float = 0.0  # 0: no budget
    current: tuple[int, int] | None = None  # the cut the config gives these clients (head, tail)


@dataclass(frozen=True)
class Work:
    """Seconds and bytes of one micro-batch of a cut (client compute already multiplied by the speed)."""

    head_forward: float
    head_backward: float
    tail: float  # U-shape: tail forward, loss and backward
    trunk_forward: float  # vanilla: with the loss and the trunk's backward
    trunk_backward: float
    client_step: float
    server_step: float
    up_forward: float  # payload bytes of each message
    down_forward: float
    up_backward: float
    down_backward: float
    codec: dict[str, float] | None = None  # MESSAGE_KINDS -> encode + decode seconds (half each side)


@dataclass(frozen=True)
class Prediction:
    head: int
    tail: int
    serial_s: float
    pipelined_s: float
    client_mb: float
    server_mb: float
    bytes_per_step: int

    @property
    def cut(self) -> tuple[int, int]:
        return self.head, self.tail

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def candidates(layers: int, mode: str) -> list[tuple[int, int]]:
    """Every cut: head h >= 1 and tail t >= 1 (U-shape) or t = 0 (vanilla), leaving the server a block."""
    if mode == "vanilla":
        return [(h, 0) for h in range(1, layers)]
    return [(h, t) for h in range(1, layers - 1) for t in range(1, layers - h)]


def work(profile: Profile, head: int, tail: int, speed: float = 1.0, rows: float = 1.0) -> Work:
    """The work of one micro-batch holding ``rows`` of the profiled batch (1.0: all of it)."""
    layers, ushape = profile.layers, profile.mode == "ushape"
    parts = profile.parts
    h_fwd, h_bwd, _, h_train, _ = parts["head"].span(range(head))
    embed = parts["head"].embed
    t_fwd, t_bwd, _, t_train, _ = parts["trunk"].span(range(head, layers - tail))
    trunk_final = 0.0 if ushape else parts["trunk"].final.forward_s + parts["trunk"].final.backward_s
    tail_s, tail_train = 0.0, 0
    if ushape:
        part = parts["tail"]
        fwd, bwd, _, tail_train, _ = part.span(range(layers - tail, layers))
        tail_s = fwd + bwd + part.final.forward_s + part.final.backward_s
        tail_train += part.final.trainable
    client_step = (h_train + embed.trainable) * parts["head"].optimizer_s_per_param
    if ushape:
        client_step += tail_train * parts["tail"].optimizer_s_per_param
    server_params = t_train + (0 if ushape else parts["trunk"].final.trainable)
    sizes = profile.message_bytes
    return Work(
        head_forward=(h_fwd + embed.forward_s) * rows * speed,
        head_backward=(h_bwd + embed.backward_s) * rows * speed,
        tail=tail_s * rows * speed,
        trunk_forward=(t_fwd + (t_bwd + trunk_final if not ushape else 0.0)) * rows,
        trunk_backward=(t_bwd if ushape else 0.0) * rows,
        client_step=client_step * speed,
        server_step=server_params * parts["trunk"].optimizer_s_per_param,
        up_forward=sizes.get("forward", 0) * rows,
        down_forward=sizes.get("forward_reply", 0) * rows,
        up_backward=sizes.get("backward", 0) * rows,
        down_backward=sizes.get("backward_reply", 0) * rows,
        codec={kind: seconds * rows for kind, seconds in profile.codec_s.items()},
    )


def simulate(ops: list[Op], micro: Work, up: LinkModel, down: LinkModel) -> float:
    """Seconds from the first op to the end of the optimizer step, every micro-batch doing ``micro``'s work."""
    client = up_free = down_free = server_free = 0.0
    ready: dict[int, float] = {}  # micro-batch -> when the reply it waits for arrives
    codec = {kind: seconds / 2 for kind, seconds in (micro.codec or {}).items()}  # encoding; decoding the same
    encode_f, decode_fr = codec.get("forward", 0.0), codec.get("forward_reply", 0.0)
    encode_b, decode_br = codec.get("backward", 0.0), codec.get("backward_reply", 0.0)

    def exchange(at: float, sent: float, serve: float, back: float) -> float:
        """Hand a request over at ``at``: when its reply arrives, each resource taken in FIFO order."""
        nonlocal up_free, server_free, down_free
        up_free = max(at, up_free) + up.hold_s(sent)
        server_free = max(up_free + up.latency_ms / 1e3, server_free) + serve
        down_free = max(server_free, down_free) + down.hold_s(back)
        return down_free + down.latency_ms / 1e3

    for op in ops:
        kind, m = op.kind, op.micro
        if kind is OpKind.HEAD_FORWARD:
            client += micro.head_forward
        elif kind is OpKind.SEND_FORWARD:  # the client encodes, the server decodes, serves and encodes its reply
            client += encode_f
            serve = encode_f + micro.trunk_forward + decode_fr
            ready[m] = exchange(client, micro.up_forward, serve, micro.down_forward)
        elif kind is OpKind.AWAIT_FORWARD:
            client = max(client, ready.pop(m, client)) + decode_fr
        elif kind is OpKind.TAIL:
            client += micro.tail
        elif kind is OpKind.SEND_BACKWARD:
            client += encode_b
            serve = encode_b + micro.trunk_backward + decode_br
            ready[m] = exchange(client, micro.up_backward, serve, micro.down_backward)
        elif kind is OpKind.AWAIT_BACKWARD:
            client = max(client, ready.pop(m, client)) + decode_br
        elif kind is OpKind.HEAD_BACKWARD:
            client += micro.head_backward
        elif kind is OpKind.STEP:  # acknowledgements still due, then the step request and both optimizers
            client = max([client, *ready.values()])
            client = exchange(client, 0, micro.server_step, 0) + micro.client_step
    return client


def predict(
    profile: Profile, head: int, tail: int, setting: ClientSetting, micro_batches: int = 4, grad_accum: int = 1
) -> Prediction:
    """Step time (serial, and pipelined over ``micro_batches``), memory and bytes per step of one cut."""
    ushape = profile.mode == "ushape"
    waits = bool(sum(profile.parts["head"].trainable[:head]) + profile.parts["head"].embed.trainable)
    whole = work(profile, head, tail, setting.speed)
    serial_s = simulate(serial(grad_accum, ushape, waits), whole, setting.up, setting.down)
    pieces = max(1, min(micro_batches, profile.batch_size))
    piece = work(profile, head, tail, setting.speed, rows=1 / pieces)
    pipelined_s = simulate(pipelined(grad_accum * pieces, ushape, waits), piece, setting.up, setting.down)
    messages = whole.up_forward + whole.down_forward + whole.up_backward + whole.down_backward
    client_bytes, server_bytes = memory(profile, head, tail)
    return Prediction(
        head=head,
        tail=tail,
        serial_s=serial_s,
        pipelined_s=pipelined_s,
        client_mb=client_bytes / MB,
        server_mb=server_bytes / MB,
        bytes_per_step=round(messages * grad_accum),
    )


def memory(profile: Profile, head: int, tail: int) -> tuple[int, int]:
    """(client bytes, server bytes) of a cut: parameters, training state and one batch's saved activations."""
    layers, parts = profile.layers, profile.parts
    client = 0
    h = parts["head"]
    _, _, params, trainable, acts = h.span(range(head))
    client += params + h.embed.param_bytes + acts + h.embed.activation_bytes
    client += (trainable + h.embed.trainable) * h.state_bytes_per_trainable
    trunk = parts["trunk"]
    _, _, params, trainable, acts = trunk.span(range(head, layers - tail))
    server = params + acts + trainable * trunk.state_bytes_per_trainable
    if profile.mode == "ushape":
        t = parts["tail"]
        _, _, params, trainable, acts = t.span(range(layers - tail, layers))
        client += params + t.final.param_bytes - profile.tied_bytes + acts + t.final.activation_bytes
        client += (trainable + t.final.trainable) * t.state_bytes_per_trainable
    else:
        end = trunk.final
        server += end.param_bytes + end.activation_bytes + end.trainable * trunk.state_bytes_per_trainable
    return client, server


def predict_all(
    profile: Profile, setting: ClientSetting, micro_batches: int = 4, grad_accum: int = 1
) -> list[Prediction]:
    return [
        predict(profile, h, t, setting, micro_batches, grad_accum) for h, t in candidates(profile.layers, profile.mode)
    ]


def best(predictions: list[Prediction], budget_mb: float = 0.0, pipelined_step: bool = False) -> Prediction | None:
    """The fastest cut whose client memory is within ``budget_mb`` (0: any), or None when none fits."""
    fits = [p for p in predictions if budget_mb <= 0 or p.client_mb <= budget_mb]
    if not fits:
        return None
    return min(fits, key=lambda p: (p.pipelined_s if pipelined_step else p.serial_s, p.client_mb, p.cut))
