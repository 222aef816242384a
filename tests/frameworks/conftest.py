"""Fixtures the framework tests share: a partitioner that gives every client all the data, and the held-out loss
of the model ``splitlm generate`` / ``export`` rebuild from a run's ``adapters/``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from partitioners import EVERYONE, EveryoneGetsAll
from splitlm.data.partition import PARTITIONERS, register_partitioner
from splitlm.frameworks.assemble import assemble, load_run_config
from splitlm.frameworks.setup import load_source, prepare_data
from splitlm.runtime.loss import causal_lm_loss


@pytest.fixture
def everyone() -> Iterator[str]:
    """The name of a partitioner under which every client holds every example (registered for the test)."""
    register_partitioner(EVERYONE)(EveryoneGetsAll)
    yield EVERYONE
    PARTITIONERS.remove(EVERYONE)


def assembled_eval_loss(out: Path) -> float:
    """The held-out loss of the model rebuilt from run ``out``'s ``adapters/`` (merged, unsplit)."""
    model, _, config = assemble(out)
    data = prepare_data(load_run_config(out), load_source(config).tokenizer())
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.eval:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            total, count = causal_lm_loss(logits, batch.labels)
            loss_sum, tokens = loss_sum + float(total), tokens + count
    return loss_sum / tokens


@pytest.fixture
def assembled_loss() -> Callable[[Path], float]:
    return assembled_eval_loss
