"""Config of the evaluate job: decoding presets, actor pool, report and the shared feature spec."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2vlm_ray.cache.spec import FeatureSpec
from d2vlm_ray.config import ConfigError, DecodeSettings, from_dict

logger = logging.getLogger(__name__)


REFERRING_TASKS = ("rar", "eca", "rvq")
PRESET_MAX_NEW_TOKENS = {"greedy": 64, "official": 2048}
SHARD_DIR = "shards"
SETTINGS_FILE = "inference_settings.json"
PREDICTIONS_FILE = "predictions.json"




@dataclass
class DecodingConfig:
    """How to generate.

    Attributes:
        preset: ``greedy`` (argmax) or ``official`` (the paper: sampling at temperature
            0.2, repetition penalty 1.2 on rar/eca/rvq except ``<evi>``, 2048 tokens).
        max_new_tokens: Bound on generated tokens; 0 = the preset's (64 greedy, 2048 official).
        seed: Base seed of sampled decoding (logged; unused by greedy decoding).
        inject_evidence: Add event features to generated ``<evi>`` embeddings; ``false`` is
            the ablation.
    """

    preset: Literal["greedy", "official"] = "greedy"
    max_new_tokens: int = 0
    seed: int = 0
    inject_evidence: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.max_new_tokens < 0:
            raise ValueError("decoding.max_new_tokens must be >= 0 (0 = the preset's value)")

    @property
    def resolved_max_new_tokens(self) -> int:
        """``max_new_tokens``, or the preset's default when it is 0."""
        return self.max_new_tokens or PRESET_MAX_NEW_TOKENS[self.preset]

    def settings_for(self, task: str, sample_id: str) -> DecodeSettings:
        """The :class:`DecodeSettings` of one sample (task-dependent for ``official``)."""
        if self.preset == "greedy":
            return DecodeSettings(
                max_new_tokens=self.resolved_max_new_tokens,
                do_sample=False,
                seed=self.seed,
                inject_evidence=self.inject_evidence,
            )
        return DecodeSettings(
            max_new_tokens=self.resolved_max_new_tokens,
            do_sample=True,
            temperature=0.2,
            top_p=1.0,
            repetition_penalty=1.2 if task in REFERRING_TASKS else 1.0,
            seed=sample_seed(self.seed, sample_id),
            inject_evidence=self.inject_evidence,
        )


@dataclass
class ComputeConfig:
    """The actor pool.

    Attributes:
        num_actors: Actors, each holding one model copy.
        batch_size: Samples per ``map_batches`` call (and per generation batch).
        cpus_per_actor: CPUs reserved per actor.
        gpus_per_actor: GPUs reserved per actor when running on GPU (> 0; fractions share a GPU).
        device: ``auto`` = GPU when the cluster has one, else CPU; ``cuda`` on a cluster
            without GPUs is refused (an actor nothing can host would wait forever).
        dtype: Model weights' dtype on the actor.
    """

    num_actors: int = 1
    batch_size: int = 4
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.num_actors < 1:
            raise ValueError("compute.num_actors must be >= 1")
        if self.batch_size < 1:
            raise ValueError("compute.batch_size must be >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("compute.cpus_per_actor and compute.gpus_per_actor must be >= 0")


@dataclass
class ReportConfig:
    """What the report draws.

    Attributes:
        plots: Write PNG plots (needs matplotlib).
        timeline_samples: Samples shown in the ground-truth vs prediction timeline.
    """

    plots: bool = True
    timeline_samples: int = 8

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        if self.timeline_samples < 0:
            raise ValueError("report.timeline_samples must be >= 0")


@dataclass
class EvaluateConfig:
    """Config of the evaluate job (``jobs/configs/evaluate_*.yaml``).

    Attributes:
        checkpoint_dir: A d2vlm_ray checkpoint directory (``save_pretrained``/``init_checkpoint``).
        annotations: The annotation file to predict.
        format: ``evi`` (D2VLM / synthetic), ``etbench``, or ``auto`` (by the record fields).
        video_root: Folder relative video paths are joined to (see the module docstring for "").
        output_dir: Run folder: shards, predictions, metrics, summary, plots, resolved config.
        limit: Predict only the first N records in file order (0 = all).
        max_duration_s: Fail videos whose annotated duration exceeds this (0 = no limit).
        max_input_tokens: Prompt + frame tokens allowed (0 = the model's positions minus
            ``max_new_tokens``, at least half the positions).
        blank_frames: Feed an all-black clip of the video's length instead of the video.
        retry_failed: On resume, predict failed samples again.
        overwrite: Delete earlier shards and predict everything again.
        metrics: ``synthetic`` (tvg/dvc/tal/gqa of the synthetic benchmark), ``etbench``
            (``evaluate_etbench``), ``auto`` (etbench for E.T. Bench files, else synthetic)
            or ``none``.
        etbench_variant: Scorer variant for ``etbench`` (official, d2vlm, d2vlm-strict, fixed).
        with_coco: Also compute the optional captioning metrics (needs pycocoevalcap and java).
        num_cpus: CPUs of the local Ray instance the job starts when none is running (0 = all).
        decoding: Decoding settings.
        features: Sampling, partial-decode policy and feature cache (the spec every job and
            Serve share; ``cache_root`` "" = decode every time). A sample whose video lost
            more than ``max_missing_frames_fraction`` of its sampled frames fails with
            ``video:partial_decode``; smaller losses are predicted and the record carries
            the decode's ``warnings``.
        compute: Actor pool.
        report: Report settings.
    """

    checkpoint_dir: str = ""
    annotations: str = ""
    format: Literal["auto", "evi", "etbench"] = "auto"
    video_root: str = ""
    output_dir: str = ""
    limit: int = 0
    max_duration_s: float = 0.0
    max_input_tokens: int = 0
    blank_frames: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    metrics: Literal["auto", "synthetic", "etbench", "none"] = "auto"
    etbench_variant: str = "official"
    with_coco: bool = False
    num_cpus: int = 0
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` naming the field."""
        for name in ("checkpoint_dir", "annotations", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be set")
        if not math.isfinite(self.features.fps):
            raise ValueError("features.fps must be a finite number")
        self.features.validate()
        for name in ("limit", "max_input_tokens", "num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_duration_s < 0:
            raise ValueError("max_duration_s must be >= 0")
        from d2vlm_ray.eval.etbench import VARIANTS

        if self.etbench_variant not in VARIANTS:
            raise ValueError(f"etbench_variant must be one of {sorted(VARIANTS)}, got {self.etbench_variant!r}")
        for section in (self.decoding, self.compute, self.report):
            section.validate()


def as_config(cfg: EvaluateConfig | Mapping[str, Any]) -> EvaluateConfig:
    """Accept a config object or a plain (nested) dict; validate either.

    Raises:
        ConfigError: On unknown keys, wrong types or invalid values.
    """
    if isinstance(cfg, EvaluateConfig):
        try:
            cfg.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"evaluate: expected an EvaluateConfig or a mapping, got {type(cfg).__name__}")
    return from_dict(EvaluateConfig, cfg)


def check_inputs(cfg: EvaluateConfig) -> None:
    """Fail fast, before Ray starts, on a missing annotation file or checkpoint.

    Raises:
        ValueError: Naming the field whose path does not exist.
    """
    if not Path(cfg.annotations).is_file():
        raise ValueError(f"annotations: file {cfg.annotations!r} does not exist")
    if not (Path(cfg.checkpoint_dir) / "config.json").is_file():
        raise ValueError(f"checkpoint_dir: {cfg.checkpoint_dir!r} is not a checkpoint directory (no config.json)")


def sample_seed(base_seed: int, sample_id: str) -> int:
    """Per-sample sampling seed: ``(base_seed + crc32(sample_id)) mod 2**31``."""
    return (int(base_seed) + zlib.crc32(sample_id.encode("utf-8"))) % (2**31)
