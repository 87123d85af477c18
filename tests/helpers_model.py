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


def parity_config(**overrides) -> ModelConfig:
    """A reduced model in the official layout's size rules (the parity harness's sizes).

    Phi-3 width 96 × 8 layers (so ``hidden_states[6]``, the official injection layer, is a
    block output and ``hidden_states[-2]`` is 7), EVA width 176 (2 heads of the official
    88) × 2 blocks with q/v biases, Q-Former width 64 (1 head of BERT's 64) × 2 layers.
    """
    data = {
        "preset": "tiny",
        "vision": {"image_size": 224, "patch_size": 14, "hidden_size": 176, "num_layers": 2, "num_heads": 2,
                   "intermediate_size": 768},
        "qformer": {"hidden_size": 64, "num_layers": 2, "num_heads": 1, "intermediate_size": 128, "num_queries": 4},
        "llm": {"hidden_size": 96, "num_layers": 8, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 192,
                "max_position_embeddings": 512},
        "inject_layer_idx": 6,
        "ground_layer_idx": 7,
    }
    data.update(overrides)
    return from_dict(ModelConfig, data)


def write_official_dir(model: D2VLM, cfg: ModelConfig, tokenizers: Tokenizers, out_dir) -> None:
    """Write ``model`` as an official-layout checkpoint: official key names, HF config.json, tokenizer."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from d2vlm_ray.model.checkpoint import native_state_dict, to_official_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_official_state_dict(native_state_dict(model))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    c = model.causal_lm.config
    meta = {
        "model_type": "etchat_phi3",
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": cfg.llm.rope_theta,
        "rms_norm_eps": cfg.llm.rms_norm_eps,
        "sliding_window": cfg.llm.sliding_window,
        "bi_attention": True,
        "alpha": cfg.alpha,
        "vision_output_layer": cfg.vision.num_layers - 1,
    }
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2))
    tokenizers.llm.save_pretrained(str(out_dir))
