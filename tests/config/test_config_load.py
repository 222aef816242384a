"""Config loading: dotted overrides with YAML types, errors that name every bad key, a lossless dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitlm.config import Config, build_config, dump_config, load_config, parse_override
from splitlm.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.steps=10", ["train", "steps"], 10),
        ("train.lr=1e-4", ["train", "lr"], 1e-4),
        ("train.lr=2.5E-3", ["train", "lr"], 2.5e-3),
        ("train.lr=0.01", ["train", "lr"], 0.01),
        ("train.progress=false", ["train", "progress"], False),
        ("train.progress=true", ["train", "progress"], True),
        ("lora.target_modules=[q_proj, v_proj]", ["lora", "target_modules"], ["q_proj", "v_proj"]),
        ("lora.target_modules=null", ["lora", "target_modules"], None),
        ("model.name=tiny-llama", ["model", "name"], "tiny-llama"),
        ("model.name=some-model-name", ["model", "name"], "some-model-name"),
        ("data.name=./data/train.jsonl", ["data", "name"], "./data/train.jsonl"),
        ("output_dir=runs/exp.1", ["output_dir"], "runs/exp.1"),
        ("seed=7", ["seed"], 7),
        (" train.steps = 3", ["train", "steps"], 3),
        ("model.revision=", ["model", "revision"], ""),
    ],
)
def test_parse_override_types(text: str, path: list[str], value: object) -> None:
    parsed_path, parsed = parse_override(text)
    assert parsed_path == path
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("text", ["train.steps", "=3", " =3", ""])
def test_parse_override_needs_key_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        parse_override(text)


def test_overrides_reach_the_typed_config() -> None:
    config = build_config(
        {}, ["train.lr=1e-4", "train.steps=12", "train.progress=false", "lora.target_modules=[q_proj]",
             "split.mode=vanilla", "split.tail_layers=0", "seed=3"],
    )  # fmt: skip
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.steps == 12 and config.train.progress is False
    assert config.lora.target_modules == ["q_proj"]
    assert (config.split.mode, config.split.tail_layers, config.seed) == ("vanilla", 0, 3)


def test_override_beats_file_value(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  lr: 0.1\n")
    config = load_config(path, ["train.steps=9"])
    assert (config.train.steps, config.train.lr) == (9, 0.1)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["nosuch.key=1"], "nosuch"),
        (["train.stepz=1"], "train.stepz: unknown key"),
        (["lora.head.rnak=4"], "lora.head.rnak: unknown key"),
        (["train.steps=ten"], "train.steps"),
        (["split.mode=diagonal"], "split.mode"),
        (["train.lr=0"], "train.lr"),
    ],
)
def test_errors_name_the_dotted_key(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as error:
        build_config({}, overrides)
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=5", "train.stpes: unknown key (did you mean 'steps'?)"),
        ("lora.head.rnak=4", "lora.head.rnak: unknown key (did you mean 'rank'?)"),
        ("framework.clients=[{speeed: 2}]", "framework.clients.0.speeed: unknown key (did you mean 'speed'?)"),
        ("modle.name=x", "modle: unknown key (did you mean 'model'?)"),
        ("train.zzz=1", "train.zzz: unknown key"),  # nothing close: no guess
    ],
)
def test_an_unknown_key_gets_the_closest_key_of_its_section(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config({}, [override])
    assert str(error.value) == f"invalid config: {message}"


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        build_config({"seed": 3}, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"seed: Input should be a valid integer"):
        build_config({}, ["seed.x=1"])


def test_all_field_errors_reported_at_once() -> None:
    bad = ["train.stepz=1", "train.lr=-1", "split.mode=diagonal", "data.eval_size=0", "model.oops=1"]
    with pytest.raises(ConfigError) as error:
        build_config({}, bad)
    message = str(error.value)
    for key in ("train.stepz", "train.lr", "split.mode", "data.eval_size", "model.oops"):
        assert key in message, key
    assert "\n" not in message


def test_cross_field_checks_reported_together() -> None:
    with pytest.raises(ConfigError) as error:
        build_config(
            {},
            ["data.format=instruction", "data.response_field=prompt", "train.steps=3", "train.warmup_steps=5"],
        )
    assert "data.response_field" in str(error.value) and "train.warmup_steps" in str(error.value)


def test_vanilla_ignores_a_tail_set_in_the_file() -> None:
    """configs/tiny.yaml sets a tail; the issue's vanilla command overrides only split.mode."""
    config = build_config({"split": {"tail_layers": 1}}, ["split.mode=vanilla"])
    assert config.split.mode == "vanilla"


def test_field_and_cross_field_errors_reported_together() -> None:
    """Habit 3: all problems at once, including the cross-field ones next to a field error."""
    with pytest.raises(ConfigError) as error:
        build_config({}, ["train.lr=-1", "train.steps=3", "train.warmup_steps=5"])
    assert "train.lr" in str(error.value) and "train.warmup_steps" in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.name=tiny-gpt2", "train.lr=1e-4", "lora.target_modules=[c_attn]", "lora.trunk.method=frozen",
         "data.max_rows=50", "seed=11", "output_dir=runs/x"],
        ["split.mode=vanilla", "split.tail_layers=0", "lora.head.rank=2"],
    ],
    ids=["defaults", "custom", "vanilla"],
)  # fmt: skip
def test_dump_then_load_round_trip(tmp_path: Path, overrides: list[str]) -> None:
    config = build_config({}, overrides)
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.model_dump() == config.model_dump()
    dump_config(loaded, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_dump_of_vanilla_config_with_default_tail_reloads(tmp_path: Path) -> None:
    """A vanilla config that never set split.tail_layers (the common case) must survive its own dump:
    runs write config.yaml this way, and generate/export reload it."""
    config = build_config({}, ["split.mode=vanilla"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").model_dump() == config.model_dump()


@pytest.mark.parametrize(
    ("text", "match"),
    [("train: [1, 2\n", "not valid YAML at line"), ("- a\n- b\n", "expected a mapping of sections, got list")],
)
def test_bad_yaml_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_empty_file_and_no_file_give_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config(None) == Config()


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# splitlm ") and path.name in first
    assert isinstance(load_config(path), Config)
