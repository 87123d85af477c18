"""Small builders shared by the model-core tests (tiny preset, synthetic frames)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from d2vlm_ray.config import ModelConfig, from_dict
from d2vlm_ray.model.builders import Tokenizers, build_d2vlm, build_frame_encoder, build_tokenizers
from d2vlm_ray.model.d2vlm import D2VLM


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset with optional top-level overrides."""
    return from_dict(ModelConfig, {"preset": "tiny", **overrides})


@lru_cache(maxsize=1)
def tiny_tokenizers() -> Tokenizers:
    """Both tiny tokenizers (built once per test session)."""
    return build_tokenizers(tiny_config())


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> D2VLM:
    """A freshly initialised tiny D2VLM in eval mode."""
    torch.manual_seed(seed)
    model = build_d2vlm(tiny_config(**overrides), tiny_tokenizers())
    return model.to(dtype).eval()


def square_clip(num_frames: int, first_idx: int, last_idx: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """Black frames ``[F, 64, 64, 3]`` with a coloured square on frames first..last (inclusive)."""
    frames = np.zeros((num_frames, 64, 64, 3), np.uint8)
    frames[first_idx : last_idx + 1, 16:48, 16:48] = rgb
    return frames


def encode(model: D2VLM, frames: np.ndarray) -> torch.Tensor:
    """Patch features of ``frames`` through the model's frozen encoder, in the model's dtype."""
    encoder = build_frame_encoder(model, model.vision.config.image_size)
    return encoder.encode(frames).to(model.dtype)
