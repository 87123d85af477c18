"""The frozen frame encoder: EVA ViT-g in the BLIP-2 layout (official), an EfficientNet-Lite, or a CLIP ViT.

The official model keeps the first 39 of EVA-G's 40 blocks, applies no final norm, and
drops the CLS token, giving ``[F, 256, 1408]`` patch features per video at 224 px. These
features do not depend on the question, which is why the shared feature cache stores
them (DESIGN.md, decision 1).

The ``efficientnet_lite`` family (``efficientnet_lite_pytorch``, the ``backbones`` extra)
gives the last convolutional feature map flattened instead: ``[F, 49, 1280]`` for Lite0 at
224 px. It has no pooling and no classifier, and its batch norms stay in eval mode even
when the surrounding model trains.

The ``clip`` family (transformers' ``CLIPVisionModel``) is Grounded-VideoLLM's image encoder
(Phi-3.5-V's CLIP ViT-L/14 at 336 px officially). Like the official model it gives the
*second-to-last* layer's hidden states without CLS: ``[F, (S/p)^2, C]``, ``[F, 576, 1024]``
at the official sizes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel

from d2vlm_ray.config.schema import VideoEncoderConfig, VisionConfig
from d2vlm_ray.data.transforms import clip_center_transform, transform_id
from d2vlm_ray.model.backbones import BACKBONES_EXTRA_HINT, MissingExtraError

# The pixel normalisation each family's weights expect; it is part of the transform id.
NORMALIZATION_BY_FAMILY = {"eva": "clip", "efficientnet_lite": "efficientnet_lite", "clip": "clip"}


class EfficientNetLiteFeatures(nn.Module):
    """A frozen EfficientNet-Lite whose output is its last feature map as patch tokens.

    Args:
        net: The library's ``EfficientNet`` (its classifier is replaced by an identity and
            never called).
        variant: ``lite0`` … ``lite4``, for the encoder id.
        width_coefficient: The channel multiplier the network was built with.
        depth_coefficient: The block-repeat multiplier the network was built with.
    """

    def __init__(self, net: nn.Module, variant: str, width_coefficient: float, depth_coefficient: float) -> None:
        super().__init__()
        self.net = net
        self.variant = variant
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient

    @property
    def feature_width(self) -> int:
        """Channels of the last feature map (C of the patch features)."""
        return int(self.net._bn1.num_features)

    def train(self, mode: bool = True) -> EfficientNetLiteFeatures:
        """Stay in eval mode: the encoder is frozen, so batch norm keeps its ImageNet statistics
        and drop-connect stays off even while the rest of D2VLM trains."""
        super().train(False)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[F, 3, S, S]`` to patch features ``[F, (S/32)^2, C]``."""
        fmap = self.net.extract_features(pixel_values)  # [F, C, S/32, S/32]
        return fmap.flatten(2).transpose(1, 2).contiguous()  # [F, P, C], row-major patches


def build_efficientnet_lite(cfg: VisionConfig) -> EfficientNetLiteFeatures:
    """A frozen EfficientNet-Lite feature extractor with random weights.

    ``width_coefficient``/``depth_coefficient`` of 0 keep the variant's own (stem and head
    unscaled, as in the released weights); non-zero values scale the whole network,
    including the head, so tiny random encoders stay cheap.

    Raises:
        MissingExtraError: If ``efficientnet_lite_pytorch`` is not installed.
        ValueError: If ``cfg.hidden_size`` differs from the network's feature width.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingExtraError(
            "model.vision.family=efficientnet_lite needs the efficientnet-lite-pytorch package of the "
            f"'backbones' extra: {BACKBONES_EXTRA_HINT}"
        ) from None
    overrides: dict[str, object] = {"image_size": cfg.image_size}
    if cfg.width_coefficient > 0:
        overrides.update(width_coefficient=cfg.width_coefficient, fix_head_stem=False)
    if cfg.depth_coefficient > 0:
        overrides["depth_coefficient"] = cfg.depth_coefficient
    net = EfficientNet.from_name(f"efficientnet-{cfg.variant}", **overrides)
    net._fc = nn.Identity()
    # torch's default conv init shrinks activations through ~20 convs and ReLU6s until a random
    # encoder outputs ~1e-9 everywhere; He init keeps a random (test) encoder seeing pixels.
    # Real runs overwrite these weights with the pretrained ones.
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and not module.weight.is_meta:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    gp = net._global_params
    model = EfficientNetLiteFeatures(net, cfg.variant, float(gp.width_coefficient), float(gp.depth_coefficient))
    if model.feature_width != cfg.hidden_size:
        raise ValueError(
            f"model.vision.hidden_size: {cfg.hidden_size} but efficientnet-{cfg.variant} with "
            f"width_coefficient={cfg.width_coefficient} gives {model.feature_width}-wide features"
        )
    model.requires_grad_(False)
    model.eval()
    return model


def build_vision_model(cfg: VisionConfig) -> nn.Module:
    """The frozen frame encoder of ``cfg.family`` (random weights).

    Raises:
        ValueError: On an unknown family.
    """
    if cfg.family == "eva":
        return build_eva_vit(cfg)
    if cfg.family == "efficientnet_lite":
        return build_efficientnet_lite(cfg)
    if cfg.family == "clip":
        return build_clip_vision(cfg)
    raise ValueError(f"model.vision.family: unknown family {cfg.family!r}")


def build_eva_vit(cfg: VisionConfig) -> Blip2VisionModel:
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


def check_vit_sizes(section: str, cfg: VisionConfig | VideoEncoderConfig) -> None:
    """Raise ``ValueError`` naming ``section`` if the patch size does not divide the image size
    or the heads do not divide the width (transformers would fail deep inside otherwise)."""
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"{section}.patch_size: {cfg.patch_size} does not divide image_size {cfg.image_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{section}.num_heads: {cfg.num_heads} does not divide hidden_size {cfg.hidden_size}")


def build_clip_vision(cfg: VisionConfig) -> CLIPVisionModel:
    """A frozen CLIP vision transformer (random weights) sized from ``cfg``.

    Args:
        cfg: The vision settings; ``image_size``, ``patch_size``, ``hidden_size``,
            ``num_layers``, ``num_heads``, ``intermediate_size`` and ``layer_norm_eps`` size it.

    Returns:
        The model in eval mode with every parameter frozen.

    Raises:
        ValueError: If the patch size does not divide the image size or the heads the width.
    """
    check_vit_sizes("model.vision", cfg)
    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        # OpenAI's CLIP ViTs (Phi-3.5-V's included) use the sigmoid GELU approximation.
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        # The patch and position embeddings draw from this std; real runs load CLIP weights,
        # but a random tiny encoder must still give features that vary with the pixels.
        initializer_range=0.02,
    )
    hf_cfg._attn_implementation = "eager"
    model = CLIPVisionModel(hf_cfg)
    model.requires_grad_(False)
    model.eval()
    return model


def vision_family(model: nn.Module) -> str:
    """The :data:`NORMALIZATION_BY_FAMILY` key of a model built by :func:`build_vision_model`."""
    if isinstance(model, EfficientNetLiteFeatures):
        return "efficientnet_lite"
    if isinstance(model, CLIPVisionModel):
        return "clip"
    return "eva"


def patch_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels ``[F, 3, S, S]`` to a frame encoder's patch features ``[F, P, C]`` (no CLS).

    Args:
        model: A model built by :func:`build_vision_model`, on the pixels' device and dtype.
        pixels: The transformed frames.

    Returns:
        EVA: the last (un-normed) block; CLIP: the second-to-last layer, as Grounded-VideoLLM
        takes it; EfficientNet-Lite: the last feature map, flattened row-major.
    """
    family = vision_family(model)
    if family == "efficientnet_lite":
        return model(pixels)  # [F, P, C]
    if family == "clip":
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [F, 1 + P, C]
        return hidden[:, 1:]
    return model(pixel_values=pixels).last_hidden_state[:, 1:]  # [F, P, C], CLS dropped


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers in name order (device and dtype independent)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class VisionFrameEncoder:
    """Implements :class:`d2vlm_ray.types.FrameEncoder` over any frame-encoder family.

    Args:
        model: The frozen BLIP-2 or CLIP vision transformer, or :class:`EfficientNetLiteFeatures`.
        image_size: Square input side the transform produces.
        chunk_frames: Frames encoded per forward call, bounding peak memory on long videos.
    """

    def __init__(self, model: nn.Module, image_size: int, chunk_frames: int = 64) -> None:
        self.model = model
        self._image_size = image_size
        self.chunk_frames = chunk_frames
        self._encoder_id: str | None = None
        self._family = vision_family(model)
        self._normalization = NORMALIZATION_BY_FAMILY[self._family]

    @property
    def image_size(self) -> int:
        """Square input side in pixels."""
        return self._image_size

    @property
    def transform_id(self) -> str:
        """Id of the center-crop transform at this image size with this family's normalisation."""
        return transform_id(self._image_size, self._normalization)

    @property
    def encoder_id(self) -> str:
        """``eva-vit/<layers>x<width>p<patch>/<sha>``, ``clip-vit/<layers>x<width>p<patch>/<sha>`` or
        ``efficientnet-lite/<variant>w<w>d<d>/<sha>`` (sha = the weights' sha256 prefix), computed once."""
        if self._encoder_id is None:
            model = self.model
            if isinstance(model, EfficientNetLiteFeatures):
                arch = f"{model.variant}w{model.width_coefficient:g}d{model.depth_coefficient:g}"
                family = "efficientnet-lite"
            else:
                cfg = model.config
                arch = f"{cfg.num_hidden_layers}x{cfg.hidden_size}p{cfg.patch_size}"
                family = "clip-vit" if self._family == "clip" else "eva-vit"
            self._encoder_id = f"{family}/{arch}/{weights_sha256(model)[:16]}"
        return self._encoder_id

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``[F, H, W, 3]`` to patch features ``[F, P, C]`` on the CPU.

        Raises:
            ValueError: On an empty or malformed frame array.
        """
        pixels = clip_center_transform(frames, self._image_size, self._normalization)  # [F, 3, S, S]
        param = next(self.model.parameters())
        out = []
        for start in range(0, pixels.shape[0], self.chunk_frames):
            chunk = pixels[start : start + self.chunk_frames].to(param.device, param.dtype)
            out.append(patch_features(self.model, chunk).to("cpu"))  # [f, P, C]
        return torch.cat(out, dim=0)
