"""Typed configuration: schema, YAML loading, dotted overrides."""

from splitlm.config.load import build_config, dump_config, load_config, parse_override
from splitlm.config.schema import PART_NAMES, Config, LoraConfig, ResolvedLora

__all__ = [
    "PART_NAMES",
    "Config",
    "LoraConfig",
    "ResolvedLora",
    "build_config",
    "dump_config",
    "load_config",
    "parse_override",
]
