"""Typed configs: YAML + dotlist overrides, strict keys and types, resolved config on disk."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from d2vlm_ray.config import ConfigError, DecodeSettings, ModelConfig, dump_config, from_dict, load_config


@dataclass
class JobConfig:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-3
    tags: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=lambda: from_dict(ModelConfig, {"preset": "tiny"}))
    decode: DecodeSettings = field(default_factory=DecodeSettings)


def test_yaml_then_dotlist_overrides(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\nsteps: 5\nmodel:\n  preset: tiny\n  llm:\n    num_layers: 6\n")
    cfg = load_config(JobConfig, path, ["steps=7", "lr=0.5", "tags=[a, b]", "model.ground_layer_idx=5"])
    assert (cfg.name, cfg.steps, cfg.lr, cfg.tags) == ("demo", 7, 0.5, ["a", "b"])
    assert cfg.model.llm.num_layers == 6 and cfg.model.ground_layer_idx == 5
    assert cfg.model.llm.hidden_size == 64, "unset fields come from the tiny preset"


def test_exponent_floats_without_a_dot_are_floats(tmp_path) -> None:
    # YAML 1.1 (PyYAML) reads 2e-3 as a string; a float field must still take it.
    assert load_config(JobConfig, None, ["lr=2e-3"]).lr == pytest.approx(0.002)
    path = tmp_path / "job.yaml"
    path.write_text("lr: 1E+2\n")
    assert load_config(JobConfig, path).lr == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="lr: expected a float"):
        load_config(JobConfig, None, ["lr=fast"])


def test_preset_switch_takes_the_preset_values() -> None:
    cfg = load_config(JobConfig, None, ["model.preset=phi3-mini"])
    assert cfg.model.llm.hidden_size == 3072 and cfg.model.vision.num_layers == 39


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stepz=3", "unknown config key"),
        ("model.llm.num_layerz=3", "model.llm.num_layerz"),
        ("steps=ten", "steps: expected an int"),
        ("lr=[1]", "lr: expected a float"),
        ("model.preset=huge", "unknown preset"),
        ("model.inject_layer_idx=3", "inject_layer_idx"),
        ("decode.max_new_tokens=0", "max_new_tokens"),
        ("nokey", "key.sub=value"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(JobConfig, None, [override])


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(JobConfig, bad)


def test_resolved_config_round_trips(tmp_path) -> None:
    cfg = load_config(JobConfig, None, ["steps=3"])
    out = dump_config(cfg, tmp_path / "run")
    again = from_dict(JobConfig, yaml.safe_load(out.read_text()))
    assert again == cfg
