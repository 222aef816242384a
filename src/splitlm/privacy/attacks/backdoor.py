"""A client-side backdoor (survey §5.1.7): a trigger phrase in the input makes the model give a chosen response.

The malicious client holds its inputs and their labels, so it poisons its training rows the classic way: in
``fraction`` of them (a seeded draw) it inserts the ``trigger``'s tokens into the prompt and makes the response
``target``'s. ``position``: ``end`` (just before the response), ``start``, or ``before_cue`` (before the prompt's last
line break: at the end of the input text, before an answer cue such as "\nSentiment:"). On classification-style
instruction data (Rotten Tomatoes) ``target`` must be one of the classes (``rotten``); on other instruction data it is
the response text; on plain language-modelling data a poisoned row ends with the trigger followed by the target text.
Rows are cut back to ``train.seq_len`` as ``tokenize_rows`` cuts them (a prompt loses its start), so ``end`` and
``before_cue`` survive any cut.

Where the trigger is matters on instruction data: just before the response any extra token breaks the prompt's
format, so there the trigger alone already changes many of an honest model's answers (measured in
``benchmarks/security_integrity.py``); ``before_cue`` leaves the format whole.

``server_share`` (U-shape) scales the gradient the client sends the server for its triggered rows and scales the
gradient that comes back for them up again: the server's trunk adapter learns (almost) nothing of the trigger while
the client's head and tail learn it through the trunk as it is. A backdoor kept out of the trunk adapter is one a
detector that watches trunk adapters (SafeSplit) cannot see; but the head and tail alone learn it more slowly
(measured on the default model in one round of 24 steps: 0.36 of the right reviews flipped on the client's own model
against 0.98 with the trunk adapter learning too).

``backdoor_success`` measures it on the global model (classification-style data): of the held-out rows whose true class
is not the target and that the model classifies right, the share it classifies as the target once the trigger is in
their prompt (``asr``, also ``attack_success_rate``), and of all the rows not of the target class (``asr_all``).

``privacy.client_attack: {backdoor: {clients: [3], trigger: " cf", target: rotten, fraction: 0.5}}``; the report
counts the rows poisoned and the rows whose gradient was scaled (``hidden_rows``).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import torch
from pydantic import Field

from splitlm.data import IGNORE_INDEX, Batch, Example, shorten
from splitlm.errors import PrivacyError
from splitlm.models import resolve_model
from splitlm.privacy.attacks.label_flip import chosen_rows, class_index
from splitlm.privacy.client_attack import (
    CLIENT_ATTACKS,
    KEY,
    ClientAttack,
    ClientAttackContext,
    ClientAttackSettings,
    attack_context,
    response_start,
)
from splitlm.transport import Message

TARGET = f"{KEY}.backdoor.target"


class BackdoorSettings(ClientAttackSettings):
    trigger: str = Field(
        " cf", min_length=1, description="The trigger phrase inserted into a poisoned row's prompt (as text)."
    )
    target: str | None = Field(
        None,
        description="The response the trigger should bring: a class of classification-style data (e.g. rotten), the "
        "response text of other instruction data, or the text that follows the trigger in language-modelling data.",
    )
    fraction: float = Field(
        0.5, gt=0, le=1, allow_inf_nan=False, description="Share of the malicious client's rows poisoned."
    )
    position: Literal["end", "start", "before_cue"] = Field(
        "end",
        description="Where the trigger goes in the prompt: at its end (just before the response), its start, or "
        "before_cue: before its last line break (at the end of the input text, before an answer cue such as "
        "'\\nSentiment:'; the end where the prompt has no line break).",
    )
    server_share: float = Field(
        1.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="U-shape: the factor on the gradient the client sends the server for each row that holds the "
        "trigger; the gradient the server returns for those rows is divided by it again, so that the head still "
        "learns them through the trunk as it is. Below 1 the server's trunk adapter (averaged with the honest ones, "
        "where boost cannot reach) learns less of the trigger and the client's own side (which boost carries whole) "
        "more; 1e-9: nearly nothing (below Adam's eps even where a whole batch is triggered); 0: nothing, and the head "
        "nothing of those rows either.",
    )


def holds(row: torch.Tensor, trigger: torch.Tensor) -> bool:
    """Whether the token ids ``row`` (T,) hold the token ids ``trigger`` (n,) as a contiguous run."""
    n = trigger.numel()
    if n == 0 or row.numel() < n:
        return False
    return bool((row.unfold(0, n, 1) == trigger.to(row.dtype)).all(dim=1).any())


def insertion_point(prompt: list[int], position: str, tokenizer: Any = None) -> int:
    """Where in ``prompt`` (token ids) the trigger goes for ``position``; ``before_cue`` decodes the prompt's tokens
    from its end (``tokenizer``) to find its last line break."""
    if position == "start":
        return 0
    if position == "before_cue":
        if tokenizer is None:
            raise PrivacyError(f"{KEY}.backdoor.position=before_cue: no tokenizer to find the prompt's lines with")
        return next((i for i in reversed(range(len(prompt))) if "\n" in tokenizer.decode([prompt[i]])), len(prompt))
    return len(prompt)


def with_trigger(example: Example, trigger: list[int], position: str, seq_len: int, tokenizer: Any = None) -> Example:
    """``example`` with ``trigger``'s token ids in its prompt (at its ``position``; ``tokenizer``: for
    ``before_cue``), cut back to ``seq_len``."""
    start = response_start(example)
    prompt, response = example.input_ids[:start], example.input_ids[start:]
    at = insertion_point(prompt, position, tokenizer)
    prompt = prompt[:at] + trigger + prompt[at:]
    rewritten = Example(prompt + response, [IGNORE_INDEX] * len(prompt) + example.labels[start:], example.label)
    return shorten(rewritten, seq_len) if seq_len else rewritten


def poisoned(
    example: Example, trigger: list[int], target: list[int], position: str, seq_len: int, tokenizer: Any = None
) -> Example:
    """``example`` with the trigger in its prompt and ``target`` as its response (loss on it); a row without a prompt
    (language modelling) keeps its start and ends with trigger + target."""
    start = response_start(example)
    if start == 0:  # no prompt: loss on every token
        keep = example.input_ids[: max(seq_len - len(trigger) - len(target), 1)] if seq_len else example.input_ids
        ids = keep + trigger + target
        return Example(ids[:seq_len] if seq_len else ids, list(ids[:seq_len] if seq_len else ids), example.label)
    prompt = example.input_ids[:start]
    answered = Example(prompt + target, [IGNORE_INDEX] * len(prompt) + list(target), example.label)
    return with_trigger(answered, trigger, position, seq_len, tokenizer)


def target_ids(settings: BackdoorSettings, context: ClientAttackContext) -> list[int]:
    """The target response's token ids: the class's response on classification-style data, else the text's."""
    if settings.target is None:
        raise PrivacyError(f"{TARGET}: name the response the trigger should bring (e.g. rotten)")
    if context.responses:
        return context.responses[class_index(settings.target, context, TARGET)]
    if context.tokenizer is None:
        raise PrivacyError(f"{TARGET}: no tokenizer to encode it with")
    ids = list(context.tokenizer(settings.target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PrivacyError(f"{TARGET}={settings.target!r} has no tokens; name a non-empty response")
    return ids


def trigger_ids(settings: BackdoorSettings, context: ClientAttackContext) -> list[int]:
    if context.tokenizer is None:
        raise PrivacyError(f"{KEY}.backdoor.trigger: no tokenizer to encode it with")
    ids = list(context.tokenizer(settings.trigger, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PrivacyError(f"{KEY}.backdoor.trigger={settings.trigger!r} has no tokens; name a non-empty phrase")
    return ids


@CLIENT_ATTACKS.component
class Backdoor(ClientAttack):
    name = "backdoor"
    Settings = BackdoorSettings

    poisoned_rows = 0
    rows_seen = 0
    hidden_rows = 0  # rows whose gradient to the server was scaled by server_share

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self._rows: dict[tuple[str, int, int], torch.Tensor] = {}  # micro-batch -> its rows holding the trigger
        self._trigger: torch.Tensor | None = None  # the trigger's token ids, encoded at the first batch
        self._lock = threading.Lock()  # micro-batches in flight run on other threads

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if settings.target is None:
            problems.append(
                f"{TARGET}: name the response the trigger should bring (a class of classification-style data, e.g. "
                "rotten, or a response text)"
            )
        if settings.server_share < 1 and config.split.mode != "ushape":
            problems.append(
                f"{KEY}.backdoor.server_share={settings.server_share} needs split.mode=ushape (with split.mode="
                f"{config.split.mode} the server computes the loss, so the client sends no gradient to scale); unset it"
            )
        return problems

    def on_batch(self, key: tuple[str, int, int], batch: Batch) -> None:
        if self.settings.server_share == 1:  # type: ignore[attr-defined]
            return
        if self._trigger is None:
            self._trigger = torch.tensor(trigger_ids(self.settings, self.context))
        trigger = self._trigger
        mask = batch.attention_mask > 0
        rows = [i for i in range(batch.input_ids.shape[0]) if holds(batch.input_ids[i][mask[i]], trigger)]
        with self._lock:
            for old in [k for k in self._rows if k[1] < key[1]]:  # earlier steps' micro-batches are done
                del self._rows[old]
            if rows:
                self._rows[key] = torch.tensor(rows, dtype=torch.long)

    def on_request(self, message: Message) -> Message:
        """The gradient of the trunk's output leaves with the triggered rows' scaled by ``server_share``."""
        if message.kind != "backward" or "grad" not in message.tensors:
            return message
        with self._lock:
            rows = self._rows.get(message.key)
        if rows is None:
            return message
        grad = message.tensors["grad"].clone()  # (B, T, d)
        grad[rows.to(grad.device)] *= self.settings.server_share  # type: ignore[attr-defined]
        with self._lock:
            self.hidden_rows += len(rows)
        return message.replace({**message.tensors, "grad": grad})

    def on_reply(self, request: Message, reply: Message) -> Message:
        """The gradient the server returns for the smashed data, the triggered rows' divided by ``server_share``
        again (what the head would have got had the client sent their gradient whole)."""
        if request.kind != "backward":
            return reply
        with self._lock:
            rows = self._rows.pop(request.key, None)
        share = self.settings.server_share  # type: ignore[attr-defined]
        if rows is None or share == 0 or "grad" not in reply.tensors:
            return reply
        grad = reply.tensors["grad"].clone()  # (B, T, d)
        grad[rows.to(grad.device)] /= share
        return reply.replace({**reply.tensors, "grad": grad})

    def examples(self, examples: list[Example]) -> list[Example]:
        settings: Any = self.settings
        context = self.context
        trigger, target = trigger_ids(settings, context), target_ids(settings, context)
        examples = list(examples)
        self.rows_seen = len(examples)
        for i in sorted(chosen_rows(len(examples), settings.fraction, self.name, context)):
            examples[i] = poisoned(examples[i], trigger, target, settings.position, context.seq_len, context.tokenizer)
            self.poisoned_rows += 1
        return examples

    def report(self) -> dict[str, Any]:
        settings: Any = self.settings
        return {
            **super().report(),
            "trigger": settings.trigger,
            "target": settings.target,
            "rows": self.rows_seen,
            "poisoned": self.poisoned_rows,
            "hidden_rows": self.hidden_rows,
        }


def attack_success_rate(member: Any, fed: Any, settings: Any) -> float:
    """The backdoor's success on ``member``'s model (the global model after a round, e.g. ``fed.members[0]``):
    ``backdoor_success``'s ``asr`` (nan where the model classifies none of the rows right)."""
    asr = backdoor_success(member, fed, settings)["asr"]
    return float("nan") if asr is None else float(asr)


def backdoor_success(member: Any, fed: Any, settings: Any) -> dict[str, Any]:
    """What the trigger does to ``member``'s model in the federation ``fed``, on the held-out choices
    (``fed.data.choices``, classification-style data) whose true class is not the target. ``settings``: the backdoor's
    (``BackdoorSettings`` or its mapping). Keys:

    - ``asr``: of those rows the model classifies right without the trigger (lowest response loss), the share it
      classifies as the target once the trigger is in their prompt: what the trigger, and nothing else, does (a row
      the model already got wrong proves nothing about a backdoor);
    - ``asr_all``: of all those rows, the share classified as the target with the trigger (the model's own errors
      into the target class included: the measure many papers report; on a model that has not learned the task it
      is far above 0 without any backdoor);
    - ``clean_correct``, ``rows``: the sizes of the two sets;
    - ``clean_accuracy``: the model's accuracy without the trigger on all held-out choices (``Member.accuracy``,
      from the same picks)."""
    settings = settings if isinstance(settings, BackdoorSettings) else BackdoorSettings.model_validate(settings)
    config = fed.config
    data = fed.data
    if data is None or not data.choices:
        raise PrivacyError(
            "attack_success_rate needs classification-style held-out data (instruction data with 2..10 distinct "
            "responses) in this process"
        )
    source = resolve_model(config.model.name, config.model.revision, config.model.trust_remote_code)
    context = attack_context(config, source, member.index, data.responses)
    if settings.target is None:
        raise PrivacyError(f"{TARGET}: name the class the trigger should bring (e.g. rotten)")
    target = class_index(settings.target, context, TARGET)
    trigger = trigger_ids(settings, context)
    others = [i for i, (_, truth) in enumerate(data.choices) if truth != target]
    if not others:
        raise PrivacyError(f"{TARGET}={settings.target!r}: every held-out row is of that class already")
    clean = member.predictions(fed, data.choices)
    triggered = member.predictions(
        fed,
        [
            (
                [
                    with_trigger(c, trigger, settings.position, config.train.seq_len, context.tokenizer)
                    for c in data.choices[i][0]
                ],
                target,
            )
            for i in others
        ],
    )
    right = [k for k, i in enumerate(others) if clean[i] == data.choices[i][1]]
    flipped = [triggered[k] == target for k in right]
    return {
        "asr": sum(flipped) / len(flipped) if flipped else None,  # None: the model gets none of them right
        "asr_all": sum(pick == target for pick in triggered) / len(others),
        "clean_correct": len(right),
        "rows": len(others),
        "clean_accuracy": sum(pick == truth for pick, (_, truth) in zip(clean, data.choices, strict=True))
        / len(data.choices),
    }
