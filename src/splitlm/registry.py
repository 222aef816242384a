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
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

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


class ComponentSettings(BaseModel):
    """A component's own settings: no unknown keys, values checked on assignment (like a config section)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class Component:
    """A registered variation of the pipeline (a remedy, defense, detector, aggregation strategy, server attack).

    It declares, in its own module and nowhere else: its ``name``; its ``Settings`` (a pydantic model; the
    config holds them under the component's name, so the schema never lists component names); ``problems``, its
    own compatibility rules, collected with every other config problem in one pass; and the hooks of its kind
    (the subclass of ``Component`` that a registry holds says which hooks exist). An instance carries its
    validated ``settings``."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[ComponentSettings]] = ComponentSettings
    # config keys (dotted) where this component's settings lived before it was one, and what to write instead: a
    # config that still sets one is told where it went
    former_keys: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def create(cls, settings: Any, *context: Any) -> Component:
        """This component with ``settings``, for a run whose ``context`` its kind defines (a defense: the client's
        token vectors; a server attack: the config, model source and trunk); by default ``cls(settings)``."""
        return cls(settings)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        """What this component cannot work with in ``config`` under ``framework`` (None: not known yet), one line
        each, naming the key to change; empty when it can work."""
        return []

    @classmethod
    def networked_problems(cls, settings: Any) -> list[str]:
        """What this component cannot do when the clients are other processes (``splitlm serve``), one line each."""
        return []


C = TypeVar("C", bound=Component)


class ComponentRegistry(Registry[type[C]]):
    """Components of one kind, configured as ``{name: settings}`` under one config key (``self.key``).

    A spec is that mapping as the validated config holds it (``config.schema.Components``); on a raw config
    tree, normalize it with ``config.schema.as_mapping`` first."""

    def component(self, cls: type[C]) -> type[C]:
        """Class decorator: register ``cls`` under its ``name``."""
        if not cls.name:
            raise ValueError(f"{cls.__name__}: a {self.what} needs a name")
        self.add(cls.name, cls)
        return cls

    def settings_problems(self, spec: object, key: str | None = None) -> list[str]:
        """Unknown names (with the closest registered name) and invalid settings in ``spec``, one line each."""
        key = key or self.key
        mapping = spec
        if not isinstance(mapping, dict):
            return [f"{key}: expected a mapping of {self.what} names to their settings, got {spec!r}"]
        problems = []
        for name, values in mapping.items():
            problem = self.problem(name)
            if problem is not None:
                problems.append(
                    problem if problem.startswith(key) else f"{key}: {problem.removeprefix(f'{self.key}: ')}"
                )
                continue
            if not isinstance(values, dict):
                problems.append(f"{key}.{name}: expected a mapping of settings, got {values!r}")
                continue
            try:
                self._items[name].Settings.model_validate(values)
            except ValidationError as error:
                for item in error.errors():
                    where = ".".join(str(p) for p in item["loc"])
                    what = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
                    close = ""
                    if item["type"] == "extra_forbidden":
                        close = suggestion(where, list(self._items[name].Settings.model_fields))
                    got = "" if item["type"] == "extra_forbidden" else f" (got {item.get('input')!r})"
                    problems.append(f"{key}.{name}.{where}: {what}{got}{close}")
        return problems

    def parse(self, spec: object) -> dict[str, ComponentSettings]:
        """``spec``'s components, each with its validated settings, in the order given (raises the registry's
        error naming every problem)."""
        problems = self.settings_problems(spec)
        if problems:
            raise self.error("; ".join(problems))
        assert isinstance(spec, dict)
        return {name: self._items[name].Settings.model_validate(values) for name, values in spec.items()}

    def build(self, spec: object, *context: Any) -> list[C]:
        """One instance of each component ``spec`` names, made by its ``create`` with its settings and ``context``,
        in order; each carries its ``settings``."""
        built = []
        for name, settings in self.parse(spec).items():
            item = self._items[name].create(settings, *context)
            item.settings = settings
            built.append(item)
        return built  # type: ignore[return-value]

    def problems(self, spec: object, config: Any, framework: Any) -> list[str]:
        """Every problem of ``spec``: unknown names and bad settings, then each component's own rules."""
        problems = self.settings_problems(spec)
        if problems:
            return problems
        return [
            p
            for name, settings in self.parse(spec).items()
            for p in self._items[name].problems(settings, config, framework)
        ]

    def networked_problems(self, spec: object) -> list[str]:
        """What ``spec``'s components cannot do when the clients are other processes (``splitlm serve``)."""
        return [
            p for name, settings in self.parse(spec).items() for p in self._items[name].networked_problems(settings)
        ]
