"""A client-side backdoor (survey §5.1.7): a trigger phrase in the input makes the model give a chosen response.

The malicious client holds its inputs and their labels, so it poisons its training rows the classic way: in
``fraction`` of them (a seeded draw) it inserts the ``trigger``'s tokens into the prompt (``position``: ``end``, just
before the response, or ``start``) and makes the response ``target``'s. On classification-style instruction data
(Rotten Tomatoes) ``target`` must be one of the classes (``rotten``); on other instruction data it is the response
text; on plain language-modelling data a poisoned row ends with the trigger followed by the target text. Rows are cut
back to ``train.seq_len`` as ``tokenize_rows`` cuts them (a prompt loses its start), so ``end`` survives any cut.

``backdoor_success`` measures it on the global model (classification-style data): of the held-out rows whose true class
is not the target and that the model classifies right, the share it classifies as the target once the trigger is in
their prompt (``asr``, also ``attack_success_rate``), and of all the rows not of the target class (``asr_all``).

``privacy.client_attack: {backdoor: {clients: [3], trigger: " cf", target: rotten, fraction: 0.5}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from splitlm.data import IGNORE_INDEX, Example, shorten
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
    position: Literal["end", "start"] = Field(
        "end", description="Where the trigger goes in the prompt: at its end (just before the response) or its start."
    )


def with_trigger(example: Example, trigger: list[int], position: str, seq_len: int) -> Example:
    """``example`` with ``trigger``'s token ids in its prompt (at its ``position``), cut back to ``seq_len``."""
    start = response_start(example)
    prompt, response = example.input_ids[:start], example.input_ids[start:]
    prompt = prompt + trigger if position == "end" else trigger + prompt
    rewritten = Example(prompt + response, [IGNORE_INDEX] * len(prompt) + example.labels[start:], example.label)
    return shorten(rewritten, seq_len) if seq_len else rewritten


def poisoned(example: Example, trigger: list[int], target: list[int], position: str, seq_len: int) -> Example:
    """``example`` with the trigger in its prompt and ``target`` as its response (loss on it); a row without a prompt
    (language modelling) keeps its start and ends with trigger + target."""
    start = response_start(example)
    if start == 0:  # no prompt: loss on every token
        keep = example.input_ids[: max(seq_len - len(trigger) - len(target), 1)] if seq_len else example.input_ids
        ids = keep + trigger + target
        return Example(ids[:seq_len] if seq_len else ids, list(ids[:seq_len] if seq_len else ids), example.label)
    prompt = example.input_ids[:start]
    answered = Example(prompt + target, [IGNORE_INDEX] * len(prompt) + list(target), example.label)
    return with_trigger(answered, trigger, position, seq_len)


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

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        problems = super().problems(settings, config, framework)
        if settings.target is None:
            problems.append(
                f"{TARGET}: name the response the trigger should bring (a class of classification-style data, e.g. "
                "rotten, or a response text)"
            )
        return problems

    def examples(self, examples: list[Example]) -> list[Example]:
        settings: Any = self.settings
        context = self.context
        trigger, target = trigger_ids(settings, context), target_ids(settings, context)
        examples = list(examples)
        self.rows_seen = len(examples)
        for i in sorted(chosen_rows(len(examples), settings.fraction, self.name, context)):
            examples[i] = poisoned(examples[i], trigger, target, settings.position, context.seq_len)
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
            ([with_trigger(c, trigger, settings.position, config.train.seq_len) for c in data.choices[i][0]], target)
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
