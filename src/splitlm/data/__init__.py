"""Training and held-out data: rows, held-out split, tokenization, padded batches, resumable order."""

from splitlm.data.batch import IGNORE_INDEX, Batch, Example, collate, eval_batches
from splitlm.data.load import known_entities, load_rows, split_rows
from splitlm.data.order import DataOrder
from splitlm.data.partition import (
    PARTITIONERS,
    Partitioner,
    label_histograms,
    make_partitioner,
    register_partitioner,
    skew,
)
from splitlm.data.pii import ENTITY_TYPES, pii_rows, write_pii
from splitlm.data.tokenize import pack_examples, shorten, tokenize_rows

__all__ = [
    "ENTITY_TYPES",
    "IGNORE_INDEX",
    "PARTITIONERS",
    "Batch",
    "DataOrder",
    "Example",
    "Partitioner",
    "collate",
    "eval_batches",
    "known_entities",
    "label_histograms",
    "load_rows",
    "make_partitioner",
    "pack_examples",
    "pii_rows",
    "register_partitioner",
    "shorten",
    "skew",
    "split_rows",
    "tokenize_rows",
    "write_pii",
]
