"""Progress on stderr for the long quiet parts of a run: converting and loading the model, profiling the blocks
(``splitlm plan``), evaluating. A line per phase (what it is doing, then how long it took) or a transient bar per
loop; all of it quiet where ``train.progress=false`` (``show``), like the training bar."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_shown = {"on": True}


def show(on: bool) -> None:
    """Turn the progress lines and bars of this process on or off (``train.progress``)."""
    _shown["on"] = on


def shown() -> bool:
    return _shown["on"]


def say(message: str) -> None:
    if _shown["on"]:
        print(f"splitlm: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """``splitlm: <what> ...`` now and ``splitlm: <what>: done in X s`` at the end of the block."""
    say(f"{what} ...")
    started = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - started:.1f} s")


def bar(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    """A transient progress bar (gone when done) over ``iterable``, or one to ``update`` by hand."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not _shown["on"])
