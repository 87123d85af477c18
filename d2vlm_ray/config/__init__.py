"""Typed configs: dataclasses loaded from YAML with CLI dotlist overrides."""

from d2vlm_ray.config.load import (
    ConfigError,
    dump_config,
    from_dict,
    load_config,
    merge_dicts,
    parse_overrides,
    to_dict,
)
from d2vlm_ray.config.presets import preset_dict
from d2vlm_ray.config.schema import (
    DecodeSettings,
    LLMConfig,
    LoraSettings,
    ModelConfig,
    QFormerConfig,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "DecodeSettings",
    "LLMConfig",
    "LoraSettings",
    "ModelConfig",
    "QFormerConfig",
    "VisionConfig",
    "dump_config",
    "from_dict",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "preset_dict",
    "to_dict",
]
