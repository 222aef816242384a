"""Components (``registry.Component``): settings owned by the component, checked with the closest-name hint."""

from __future__ import annotations

import pytest
from pydantic import Field

from splitlm.config.schema import as_mapping
from splitlm.errors import ConfigError
from splitlm.registry import Component, ComponentRegistry, ComponentSettings

REGISTRY = ComponentRegistry[Component]("remedy", "remedies")


@REGISTRY.component
class Tilt(Component):
    name = "tilt"

    class Settings(ComponentSettings):
        tau: float = Field(1.0, gt=0)

    @classmethod
    def problems(cls, settings: Settings, config: object, framework: object) -> list[str]:
        return [] if config == "ushape" else ["remedies.tilt: needs ushape"]


def test_a_list_of_names_means_default_settings() -> None:
    (tilt,) = REGISTRY.build(as_mapping(["tilt"]))
    assert isinstance(tilt, Tilt) and tilt.settings.tau == 1.0


def test_unknown_names_and_settings_get_one_line_each_with_the_closest_name() -> None:
    problems = REGISTRY.settings_problems(as_mapping({"tlit": {}}))
    assert problems == ["remedies: unknown remedy 'tlit'; choose from ['tilt'] (did you mean 'tilt'?)"]
    problems = REGISTRY.settings_problems(as_mapping({"tilt": {"tau": -1, "tua": 2}}))
    assert problems == [
        "remedies.tilt.tau: Input should be greater than 0 (got -1)",
        "remedies.tilt.tua: unknown key (did you mean 'tau'?)",
    ]
    with pytest.raises(ConfigError, match=r"remedies\.tilt\.tau"):
        REGISTRY.parse(as_mapping({"tilt": {"tau": 0}}))


def test_a_components_own_rules_run_after_its_settings_are_valid() -> None:
    assert REGISTRY.problems(as_mapping(["tilt"]), "vanilla", None) == ["remedies.tilt: needs ushape"]
    assert REGISTRY.problems(as_mapping(["tilt"]), "ushape", None) == []
    assert REGISTRY.problems(as_mapping({"tilt": {"tau": 0}}), "ushape", None)[0].startswith("remedies.tilt.tau")


def test_plugins_are_imported_before_the_config_is_checked(tmp_path, monkeypatch) -> None:
    from splitlm.config import build_config

    (tmp_path / "my_plugin_module.py").write_text("import sys\nsys.modules[__name__].loaded = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = build_config({"plugins": ["my_plugin_module"]})
    assert config.plugins == ["my_plugin_module"]
    import my_plugin_module  # type: ignore[import-not-found]

    assert my_plugin_module.loaded
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin'"):
        build_config({"plugins": ["no_such_plugin"]})
