"""Frameworks register themselves by name; ``framework.name`` in a config picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from splitlm.config import Config
from splitlm.errors import ConfigError

Recipe = Callable[..., dict[str, Any]]
FRAMEWORKS: dict[str, Recipe] = {}


def register(name: str) -> Callable[[Recipe], Recipe]:
    def decorate(recipe: Recipe) -> Recipe:
        FRAMEWORKS[name] = recipe
        return recipe

    return decorate


def run_framework(config: Config, resume: bool = False) -> dict[str, Any]:
    recipe = FRAMEWORKS.get(config.framework.name)
    if recipe is None:
        raise ConfigError(
            f"framework.name: unknown framework {config.framework.name!r}; choose from {sorted(FRAMEWORKS)}"
        )
    return recipe(config, resume=resume)
