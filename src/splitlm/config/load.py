"""Read a YAML config, apply dotted ``key=value`` overrides, validate everything at once."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from splitlm.config.schema import Config, as_mapping, cross_field_problems
from splitlm.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001). The value is read as YAML (so 3, 1e-4, true, [a, b])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. train.steps=10")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-4 as a string (it wants 1.0e-4); users mean a number.
    if isinstance(value, str) and not value.isalpha() and any(c in value for c in "eE."):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, list) and all(isinstance(item, str) for item in child):
            child = node[part] = as_mapping(child)  # components by name (their defaults): now one gets settings
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def _section_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section (a pydantic model) that ``path`` leads to from the top (list indices pass through)."""
    model: type[BaseModel] = Config
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        found = _model_in(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _closest_key(loc: tuple[Any, ...]) -> str:
    """`` (did you mean 'steps'?)`` for an unknown key: the closest key of its section, or ``""``."""
    section = _section_at(tuple(loc[:-1]))
    if section is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


TYPO_EDITS = 2  # an unknown key this many edits (or fewer) from a key of its section is taken for a typo of it


def edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn ``a`` into ``b`` (optimal string alignment)."""
    previous, current = list(range(len(b) + 1)), [0] * (len(b) + 1)
    before: list[int] = []
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        before, previous = previous, current
    return previous[len(b)]


def is_typo(loc: tuple[Any, ...]) -> bool:
    """Whether the unknown key at ``loc`` is a typo of the key of its section that "did you mean" names: within
    ``TYPO_EDITS`` of it (``train.stpes``, not ``privacy.dxp``: no key is named for that)."""
    section = _section_at(tuple(loc[:-1]))
    if section is None:
        return False
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return bool(close) and edits(str(loc[-1]), close[0]) <= TYPO_EDITS


def _format(error: ValidationError) -> list[str]:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key{_closest_key(item['loc'])}")
        elif item["type"] == "value_error":
            parts.append(str(item["msg"]).removeprefix("Value error, "))
        else:
            parts.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return parts


def import_plugins(modules: object) -> None:
    """Import the config's ``plugins`` (modules that register components of their own) before it is checked: module
    names, or paths of ``.py`` files (imported as a module named after the file)."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(
            f"plugins: expected a list of module names or .py files, e.g. [my_remedies] (got {modules!r})"
        )
    for module in modules:
        try:
            if module.endswith(".py"):
                _import_file(Path(module))
            else:
                importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"plugins: cannot import {module!r} ({error}); install it or put its folder on PYTHONPATH"
            ) from None


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ImportError(f"no file {path}")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        return  # imported already (a process checks its config more than once)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


Check = Callable[[dict[str, Any]], list[str]]  # more problems of a raw config tree (e.g. unknown plugin names)


def build_config(
    tree: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    checks: Sequence[Check] = (),
    quick: bool = False,
) -> Config:
    """Validate a config tree with overrides applied; raise ``ConfigError`` naming every bad key.

    ``checks`` add problems that the schema cannot see by itself (the callers above it pass the names their
    registries know), reported together with the schema's own. ``quick``: when the schema finds problems, and every
    unknown key among them is a typo of a key of its section (``is_typo``), raise them without running ``checks``:
    those import the registries, and with them torch (seconds), while the schema's problems are reported in well
    under one. Any other unknown key may be one a component took over (``Component.former_keys``: none is a typo of
    a key of its section), so the checks run to say where it went."""
    tree = dict(tree or {})
    for text in overrides:
        path, value = parse_override(text)
        _set(tree, path, value)
    import_plugins(tree.get("plugins"))
    try:
        config = Config.model_validate(tree)
    except ValidationError as error:
        problems = _format(error)
        if all(item["loc"] for item in error.errors()):  # field errors stopped the cross-field checks: run them
            problems += cross_field_problems(tree)
        typos = all(is_typo(tuple(item["loc"])) for item in error.errors() if item["type"] == "extra_forbidden")
        if quick and typos:
            raise ConfigError(f"invalid config: {'; '.join(problems)}") from None
        more = [problem for check in checks for problem in check(tree)]
        # a check that says more of an unknown key (e.g. where a former key went) replaces the bare "unknown key"
        said = {problem.partition(": ")[0] for problem in more}
        problems = [p for p in problems if not (p.partition(": ")[0] in said and ": unknown key" in p)] + more
        raise ConfigError(f"invalid config: {'; '.join(problems)}") from None
    problems = [problem for check in checks for problem in check(tree)]
    if problems:
        raise ConfigError(f"invalid config: {'; '.join(problems)}")
    return config


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    checks: Sequence[Check] = (),
    quick: bool = False,
) -> Config:
    """Load ``path`` (YAML) and apply overrides; ``path=None`` starts from the defaults (``quick``: build_config)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass the path of a YAML file, e.g. configs/tiny.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    return build_config(tree, overrides, checks, quick)


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
