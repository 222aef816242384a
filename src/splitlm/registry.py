"""One registry for every plugin kind that a config names: frameworks, policies, partitioners, defenses,
attacks, codecs.

A plugin registers itself where it is defined (``@FRAMEWORKS.register("sl")``); a config refers to it by
name. An unknown name is an error of the registry's kind that names the config key, the choices and the
closest match, never a silent default. Built-ins that live in their own modules are imported the first
time a registry is asked for a name (``load``), so importing a registry does not import every plugin.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from splitlm.errors import ConfigError, SplitLMError

T = TypeVar("T")


def suggestion(name: str, choices: list[str]) -> str:
    """``" (did you mean 'tiny-llama'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Named plugins of one kind.

    ``what``: the kind, for messages (``"policy"``); ``key``: the config key that names one, prefixed to
    errors (``"server.policy"``); ``error``: the ``SplitLMError`` subclass for unknown names;
    ``builtins``: modules to import before the first look-up (they register the built-in plugins).
    """

    def __init__(
        self,
        what: str,
        key: str = "",
        error: type[SplitLMError] = ConfigError,
        builtins: tuple[str, ...] = (),
    ) -> None:
        self.what = what
        self.key = key
        self.error = error
        self.builtins = builtins
        self._items: dict[str, T] = {}
        self._loaded = not builtins

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (a name is registered once)."""

        def decorate(item: T) -> T:
            self.add(name, item)
            return item

        return decorate

    def add(self, name: str, item: T) -> None:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.what} {name!r} is registered already")
        self._items[name] = item

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests that register a plugin of their own)."""
        self._items.pop(name, None)

    __delitem__ = remove

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.builtins:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        problem = self.problem(name)
        if problem is not None:
            raise self.error(problem)
        return self._items[name]

    def problem(self, name: object) -> str | None:
        """What is wrong with ``name`` as a choice of this registry (None: it is registered)."""
        self._load()
        if isinstance(name, str) and name in self._items:
            return None
        prefix = f"{self.key}: " if self.key else ""
        close = suggestion(name, self.names()) if isinstance(name, str) else ""
        return f"{prefix}unknown {self.what} {name!r}; choose from {self.names()}{close}"

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
