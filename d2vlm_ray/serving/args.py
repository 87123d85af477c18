"""``ServeArgs``: the ``args:`` block of a Serve config, validated before anything deploys.

Relative paths are resolved against the working directory of the process that builds the
app (``serve run`` / ``serve deploy`` from the repository root); replicas receive absolute
paths. A missing checkpoint fails here with what to run, never with invented weights.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2vlm_ray.cache.spec import LEGACY_KEYS, SERVE_DEFAULT_MAX_FRAMES, FeatureSpec, legacy_key_hint
from d2vlm_ray.config import ConfigError, from_dict
from d2vlm_ray.config.presets import PRESETS, TINY_PRESETS
from d2vlm_ray.serving.core import FeatureSettings

QUICKSTART_HINT = (
    "For the tiny quickstart model, run the quickstart first (it writes a checkpoint), or create a random "
    "PRESET checkpoint with: python -c \"from d2vlm_ray.config import from_dict, ModelConfig; "
    "from d2vlm_ray.model.checkpoint import init_checkpoint; "
    "init_checkpoint(from_dict(ModelConfig, {'preset': 'PRESET'}), 'CHECKPOINT_DIR')\""
)


class ServeArgs(BaseModel):
    """Arguments of :func:`d2vlm_ray.serving.app.build_app`.

    Attributes:
        checkpoint_dir: d2vlm_ray checkpoint directory (from training or ``init_checkpoint``).
        preset: The preset the checkpoint is expected to have; only used to say what to
            run when the directory is missing.
        model_id: Name reported by ``/v1/models``.
        features: Sampling, partial-decode policy and feature cache: the
            :class:`~d2vlm_ray.cache.FeatureSpec` the jobs nest too, so the server reads the
            entries they build. ``features.cache_root`` is required (every replica's node
            must see the same storage: a shared filesystem or an object store) and
            ``features.max_frames`` must be >= 1 (a server bounds every request). A decode
            losing more than ``features.max_missing_frames_fraction`` of its sampled frames
            gets 422 ``partial_decode``; within it the response lists the lost frames and
            the decoder's ``warnings``.
        media_roots: Directories whose videos requests may name by path.
        allowed_url_schemes: URL schemes requests may use (``file`` URLs must also lie
            under a media root).
        max_upload_bytes: Largest multipart upload (413 beyond).
        max_json_bytes: Largest JSON body (413 beyond).
        max_video_duration_s: Longest video (413 beyond).
        dtype: Grounder/Answerer compute dtype (``float64`` for parity checks).
        encoder_dtype: FrameEncoder compute dtype.
        device: ``auto`` (GPU if visible), ``cpu`` or ``cuda``.
        default_max_new_tokens: Answer token bound when a request sets none.
        max_new_tokens: Largest answer token bound a request may ask for.
        default_max_grounding_tokens: Grounding token bound when a request sets none.
        max_grounding_tokens: Largest grounding token bound a request may ask for.
        default_deadline_s: Deadline when a request sets none.
        max_deadline_s: Longest deadline a request may ask for.
        max_inflight_requests: Requests one Ingress replica works on at once; more get
            503 with ``Retry-After`` instead of queueing.
        retry_after_s: The ``Retry-After`` value of a 503.
        max_replica_retries: How often the Ingress repeats a request's idempotent work
            (features, grounding, answering) on another replica when the one working on
            it dies; bounded so that a request that kills replicas cannot kill them all.
        max_batch_size: Largest batch the Grounder and Answerer decode together.
        batch_wait_timeout_s: How long they wait to fill a batch.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    checkpoint_dir: str
    preset: str | None = None
    model_id: str = "d2vlm"
    features: FeatureSpec
    media_roots: list[str] = Field(default_factory=list)
    allowed_url_schemes: list[str] = Field(default_factory=lambda: ["file", "s3", "gs"])
    max_upload_bytes: int = Field(64 << 20, gt=0)
    max_json_bytes: int = Field(1 << 20, gt=0)
    max_video_duration_s: float | None = Field(600.0, gt=0)
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    encoder_dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    default_max_new_tokens: int = Field(64, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    default_max_grounding_tokens: int = Field(16, ge=1)
    max_grounding_tokens: int = Field(64, ge=1)
    default_deadline_s: float = Field(30.0, gt=0)
    max_deadline_s: float = Field(120.0, gt=0)
    max_inflight_requests: int = Field(32, ge=1)
    retry_after_s: int = Field(1, ge=1)
    max_replica_retries: int = Field(2, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            hint = legacy_key_hint([key for key in data if key in LEGACY_KEYS])
            if hint:
                raise ValueError(f"ServeArgs: old layout{hint}")
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose one of {sorted(PRESETS)}")
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _features(cls, value: Any) -> FeatureSpec:
        if isinstance(value, FeatureSpec):
            spec = replace(value)
        elif isinstance(value, dict):
            try:
                spec = from_dict(FeatureSpec, {"max_frames": SERVE_DEFAULT_MAX_FRAMES, **value})
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        else:
            raise ValueError(f"expected a mapping of FeatureSpec fields, got {type(value).__name__}")
        spec.validate()
        if not spec.cache_root:
            raise ValueError("features.cache_root is required: the cache the replicas share")
        if spec.max_frames < 1:
            raise ValueError("features.max_frames must be >= 1: a server bounds the frames of every request")
        return spec

    @model_validator(mode="after")
    def _bounds(self) -> ServeArgs:
        for default, limit in (
            ("default_max_new_tokens", "max_new_tokens"),
            ("default_max_grounding_tokens", "max_grounding_tokens"),
            ("default_deadline_s", "max_deadline_s"),
        ):
            if getattr(self, default) > getattr(self, limit):
                raise ValueError(f"{default} must not exceed {limit}")
        return self

    @classmethod
    def load(cls, args: dict[str, Any], *, base_dir: str | None = None) -> ServeArgs:
        """Validate ``args``, make local paths absolute and check the checkpoint exists.

        Raises:
            pydantic.ValidationError: On unknown or ill-typed fields.
            FileNotFoundError: If the checkpoint directory is missing (with what to run).
        """
        parsed = cls.model_validate(args)
        base = Path(base_dir or os.getcwd())

        def absolute(path: str) -> str:
            if "://" in path:
                return path
            return str((base / os.path.expanduser(path)).resolve())

        parsed = parsed.model_copy(
            update={
                "checkpoint_dir": absolute(parsed.checkpoint_dir),
                "features": replace(parsed.features, cache_root=absolute(parsed.features.cache_root)),
                "media_roots": [absolute(r) for r in parsed.media_roots],
            }
        )
        parsed.check_checkpoint()
        return parsed

    def check_checkpoint(self) -> None:
        """Raise ``FileNotFoundError`` saying what to run if the checkpoint is missing."""
        ckpt = Path(self.checkpoint_dir)
        if (ckpt / "config.json").is_file():
            return
        problem = "does not exist" if not ckpt.exists() else "holds no config.json (not a checkpoint)"
        message = f"checkpoint_dir {str(ckpt)!r} {problem}."
        if self.preset in (None, *TINY_PRESETS):
            hint = QUICKSTART_HINT.replace("PRESET", self.preset or "tiny")
            message += " " + hint.replace("CHECKPOINT_DIR", str(ckpt))
        else:
            message += " Point checkpoint_dir at a trained d2vlm_ray checkpoint (jobs write them under runs/)."
        raise FileNotFoundError(message)

    def feature_settings(self) -> FeatureSettings:
        """Sampling and limits for :class:`~d2vlm_ray.serving.core.FeatureService`."""
        return FeatureSettings(
            fps=self.features.fps,
            max_frames=self.features.max_frames,
            max_duration_s=self.max_video_duration_s,
            max_missing_frames_fraction=self.features.max_missing_frames_fraction,
        )

    def validation_context(self, *, upload: bool) -> dict[str, Any]:
        """The context :mod:`d2vlm_ray.serving.schemas` validates requests with."""
        return {
            "upload": upload,
            "max_new_tokens": self.max_new_tokens,
            "max_grounding_tokens": self.max_grounding_tokens,
            "max_deadline_s": self.max_deadline_s,
        }
