"""Fixtures for the privacy tests: tiny runs recorded by the server tap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from splitlm.frameworks import run_framework

Record = Callable[..., Path]


@pytest.fixture(scope="session")
def record_run(tmp_path_factory: pytest.TempPathFactory, fast_config: Callable[..., object]) -> Record:
    """``record_run("name", "privacy.defenses=[dxp]", ...)``: a fast tiny run trained with the server tap on,
    cached per session by its overrides; returns its output_dir (with ``tap/`` and ``truth/``)."""
    cache: dict[tuple[str, ...], Path] = {}

    def record(*overrides: str) -> Path:
        key = tuple(overrides)
        if key not in cache:
            out = tmp_path_factory.mktemp("recorded")
            config = fast_config(out / "run", "privacy.tap.enabled=true", "privacy.tap.max_batches=2", *overrides)
            run_framework(config)
            cache[key] = out / "run"
        return cache[key]

    return record
