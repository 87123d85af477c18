"""The frozen frame encoder: EVA ViT-g in the BLIP-2 layout, via transformers.

The official model keeps the first 39 of EVA-G's 40 blocks, applies no final norm, and
drops the CLS token, giving ``[F, 256, 1408]`` patch features per video at 224 px. These
features do not depend on the question, which is why the shared feature cache stores
them (DESIGN.md, decision 1).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from d2vlm_ray.config.schema import VisionConfig
from d2vlm_ray.data.transforms import clip_center_transform, transform_id


def build_vision_model(cfg: VisionConfig) -> Blip2VisionModel:
    """A frozen BLIP-2 vision transformer with ``cfg.num_layers`` blocks and no final norm.

    The key bias of each block is zero, as in EVA (which has only q and v biases); the
    model is frozen, so it stays zero and maps back onto EVA's ``q_bias``/``v_bias``.
    """
    hf_cfg = Blip2VisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        qkv_bias=True,
        # transformers' default here is 1e-10, which leaves a freshly built encoder outputting
        # (near) zeros; real runs load EVA weights, but random tiny encoders must see pixels.
        initializer_range=0.02,
    )
    hf_cfg._attn_implementation = "eager"
    model = Blip2VisionModel(hf_cfg)
    # EVA's output layer -2 is taken before any final norm.
    model.post_layernorm = nn.Identity()
    width = cfg.hidden_size
    with torch.no_grad():
        for layer in model.encoder.layers:
            bias = layer.self_attn.qkv.bias
            if bias is not None and not bias.is_meta:
                bias[width : 2 * width].zero_()
    model.requires_grad_(False)
    model.eval()
    return model


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers in name order (device and dtype independent)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class VisionFrameEncoder:
    """Implements :class:`d2vlm_ray.types.FrameEncoder` over a BLIP-2 vision model.

    Args:
        model: The frozen vision transformer.
        image_size: Square input side the transform produces.
        chunk_frames: Frames encoded per forward call, bounding peak memory on long videos.
    """

    def __init__(self, model: Blip2VisionModel, image_size: int, chunk_frames: int = 64) -> None:
        self.model = model
        self._image_size = image_size
        self.chunk_frames = chunk_frames
        self._encoder_id: str | None = None

    @property
    def image_size(self) -> int:
        """Square input side in pixels."""
        return self._image_size

    @property
    def transform_id(self) -> str:
        """Id of the CLIP center-crop transform at this image size."""
        return transform_id(self._image_size)

    @property
    def encoder_id(self) -> str:
        """``eva-vit/<layers>x<width>/<weights sha256 prefix>``, computed once."""
        if self._encoder_id is None:
            cfg = self.model.config
            arch = f"{cfg.num_hidden_layers}x{cfg.hidden_size}p{cfg.patch_size}"
            self._encoder_id = f"eva-vit/{arch}/{weights_sha256(self.model)[:16]}"
        return self._encoder_id

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``[F, H, W, 3]`` to patch features ``[F, P, C]`` on the CPU.

        Raises:
            ValueError: On an empty or malformed frame array.
        """
        pixels = clip_center_transform(frames, self._image_size)  # [F, 3, S, S]
        param = next(self.model.parameters())
        out = []
        for start in range(0, pixels.shape[0], self.chunk_frames):
            chunk = pixels[start : start + self.chunk_frames].to(param.device, param.dtype)
            hidden = self.model(pixel_values=chunk).last_hidden_state  # [f, 1 + P, C]
            out.append(hidden[:, 1:].to("cpu"))  # drop CLS
        return torch.cat(out, dim=0)
