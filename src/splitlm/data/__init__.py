"""Training and held-out data: rows, held-out split, tokenization, padded batches, resumable order."""

from splitlm.data.batch import IGNORE_INDEX, Batch, Example, collate, eval_batches
from splitlm.data.load import load_rows, split_rows
from splitlm.data.order import DataOrder
from splitlm.data.tokenize import pack_examples, tokenize_rows

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataOrder",
    "Example",
    "collate",
    "eval_batches",
    "load_rows",
    "pack_examples",
    "split_rows",
    "tokenize_rows",
]
