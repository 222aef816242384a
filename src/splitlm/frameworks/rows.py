"""Which rows a client trained on and which no client saw: the ground truth of membership inference and unlearning.

``client_examples`` rebuilds client ``index``'s training examples exactly as the run built them (the same data,
held-out split, partition, ``data.client_eval_size`` hold-out and packing, from the config and its seed);
``held_out_examples`` the run's held-out rows (``data.eval_size``, never trained on by anyone), one example each.
Scoring code reads them; the attacker never does.
"""

from __future__ import annotations

from splitlm.config import Config
from splitlm.data import Example, load_rows, pack_examples, split_rows, tokenize_rows
from splitlm.errors import ConfigError
from splitlm.frameworks.base import framework_of
from splitlm.frameworks.federation import hold_out, partition
from splitlm.frameworks.setup import load_source, prepare_data
from splitlm.models import ModelSource


def client_examples(config: Config, index: int, source: ModelSource | None = None) -> list[Example]:
    """Client ``index``'s training examples, as ``build_member`` gives them to it."""
    if not 0 <= index < config.framework.num_clients:
        raise ConfigError(f"client {index} is not one of the run's clients 0..{config.framework.num_clients - 1}")
    source = source or load_source(config)
    data = prepare_data(config, source.tokenizer(), pack=False)
    parts, _ = partition(config, framework_of(config), data)
    examples, _ = hold_out(config, index, [data.train[i] for i in parts[index]])
    return pack_examples(examples, config.train.seq_len) if config.data.pack else examples


def held_out_examples(config: Config, source: ModelSource | None = None) -> list[Example]:
    """The run's held-out rows (``data.eval_size`` of them, from the same source as the training rows)."""
    if config.data.partition == "by_source":
        raise ConfigError("held-out rows of a by_source run mix its sources: pick non-members from one source yourself")
    source = source or load_source(config)
    _, held = split_rows(load_rows(config.data, config.seed), config.data.eval_size, config.seed)
    return tokenize_rows(held, source.tokenizer(), config.data, config.train.seq_len)
