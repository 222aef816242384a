"""Training and held-out data: rows, held-out split, tokenization, padded batches, resumable order."""

from splitlm.data.batch import IGNORE_INDEX, Batch, Example, collate, eval_batches
from splitlm.data.load import load_rows, split_rows
from splitlm.data.order import DataOrder
from splitlm.data.partition import (
    PARTITIONERS,
    Partitioner,
    label_histograms,
    make_partitioner,
    register_partitioner,
    skew,
)
from splitlm.data.tokenize import pack_examples, shorten, tokenize_rows

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONERS",
    "Batch",
    "DataOrder",
    "Example",
    "Partitioner",
    "collate",
    "eval_batches",
    "label_histograms",
    "load_rows",
    "make_partitioner",
    "pack_examples",
    "register_partitioner",
    "shorten",
    "skew",
    "split_rows",
    "tokenize_rows",
]
