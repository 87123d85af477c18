"""Pixel transforms that turn decoded uint8 frames into frame-encoder inputs.

The official D2VLM transform (``clip_center_224``) is torchvision's ``Resize`` on the
short side, a centre square crop, a resize to the square size and CLIP normalisation.
It is re-implemented here with ``torch.nn.functional.interpolate`` only, because
torchvision does not import in this environment; the size arithmetic follows
torchvision (long side truncated with ``int``, crop offset rounded) so the crops match.

The same geometry with EfficientNet-Lite's normalisation (``normalization="efficientnet_lite"``,
transform id ``effnet_lite_center_<size>``) feeds that frame-encoder family; the id differs
because the pixels do, so feature-cache keys never mix the two.

Frames enter at their stored size, as decord returns them (the official behaviour, kept as
the default). :func:`apply_sample_aspect_ratio` is the option for non-square pixels: it
resizes frames to the shape a player displays (``decode_video(..., apply_sar=True)``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of CLIP's image normalisation (on the 0..1 scale)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of CLIP's image normalisation (on the 0..1 scale)."""

# TensorFlow's EfficientNet-Lite preprocessing: (pixel - 127) / 128 on the 0..255 scale.
# Measured on the cockatoo clip of the real-media corpus (14 frames at 1 fps), the
# EfficientNet-Lite0 ImageNet weights give class 89 (sulphur-crested cockatoo) its highest
# mean log-probability under this normalisation (-3.39, vs -3.51 for CLIP's and -3.65 for
# torchvision's ImageNet mean/std), and the most top-1 hits (6 of 14 frames, vs 5 and 3).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
"""Per-channel RGB mean of EfficientNet-Lite's input normalisation (on the 0..1 scale)."""

EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
"""Per-channel RGB standard deviation of EfficientNet-Lite's input normalisation (0..1 scale)."""

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "efficientnet_lite": (EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD),
}
"""Pixel normalisations by name: ``(mean, std)`` per RGB channel on the 0..1 scale."""

# The transform-id prefix of each normalisation; ``clip`` keeps the official id.
_ID_PREFIX = {"clip": "clip_center", "efficientnet_lite": "effnet_lite_center"}


def transform_id(image_size: int, normalization: str = "clip") -> str:
    """Identifier of the transform :func:`clip_center_transform` applies.

    Args:
        image_size: Side of the square output image in pixels.
        normalization: A key of :data:`NORMALIZATIONS`; it changes the pixels, so the id.

    Returns:
        The id, e.g. ``"clip_center_224"`` or ``"effnet_lite_center_224"``; it is part of
        every feature-cache key.

    Raises:
        ValueError: On a non-positive size or an unknown normalisation.
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: unknown {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
    return f"{_ID_PREFIX[normalization]}_{int(image_size)}"


def _as_uint8_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate ``frames`` and return them as a uint8 tensor ``[F, H, W, 3]``."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
        # Arrays read zero-copy from Ray's object store are read-only, and torch warns about
        # wrapping those; copy them (uint8, far smaller than the float copy made next).
        writable = frames.flags.writeable and frames.flags.c_contiguous
        tensor = torch.from_numpy(frames if writable else np.array(frames, order="C"))
    elif isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
        tensor = frames
    else:
        raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if tensor.ndim != 4:
        raise ValueError(f"frames must have shape [F, H, W, 3], got {tuple(tensor.shape)}")
    n_frames, height, width, channels = tensor.shape
    if channels != 3:
        raise ValueError(f"frames must have 3 (RGB) channels in the last axis, got shape {tuple(tensor.shape)}")
    if n_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(tensor.shape)}")
    return tensor


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of float ``[F, 3, H, W]`` images; a no-op at the same size."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def clip_center_transform(
    frames: np.ndarray | torch.Tensor, image_size: int = 224, normalization: str = "clip"
) -> torch.Tensor:
    """Apply the official ``clip_center_<image_size>`` transform (or its sibling normalisation).

    Steps: scale to 0..1; resize so the short side is ``image_size`` (bilinear,
    antialiased); centre-crop a square of side ``min(image_size, h, w)``; resize that
    square to ``image_size`` if it is smaller; normalise with the mean and std of
    ``normalization`` (CLIP's by default, the official transform).

    Args:
        frames: uint8 RGB frames ``[F, H, W, 3]`` (numpy or torch, any device).
        image_size: Side of the square output in pixels.
        normalization: A key of :data:`NORMALIZATIONS`.

    Returns:
        float32 tensor ``[F, 3, image_size, image_size]`` on the input's device.

    Raises:
        ValueError: If ``frames`` is not a non-empty uint8 ``[F, H, W, 3]`` array or
            ``image_size`` is not a positive integer.
    """
    transform_id(image_size, normalization)  # validates image_size and normalization
    size = int(image_size)
    images = _as_uint8_tensor(frames).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    # torchvision.transforms.Resize(int) truncates the long side; matching it keeps crops identical.
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    images = _resize(images, new_h, new_w)

    # The long side can truncate below ``size`` for extreme aspect ratios, hence the min.
    crop = min(size, new_h, new_w)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    images = images[..., top : top + crop, left : left + crop]
    images = _resize(images, size, size)

    mean_rgb, std_rgb = NORMALIZATIONS[normalization]
    mean = torch.tensor(mean_rgb, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std_rgb, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()


def apply_sample_aspect_ratio(
    frames: np.ndarray, sample_aspect_ratio: Fraction | float, *, rotated: bool = False
) -> np.ndarray:
    """Resize frames from their stored shape to the shape a player displays.

    The official pipeline (decord, then :func:`clip_center_transform`) uses frames at
    their stored size, and that stays the default everywhere. A stream whose pixels are
    not square (sample aspect ratio, SAR, e.g. 16:11 for PAL 16:9 stored as 704x576) is
    shown stretched: its displayed width is ``stored_width * SAR``. This applies that
    stretch, with the same antialiased bilinear filter as the rest of the pipeline.

    Args:
        frames: uint8 RGB frames ``[F, H, W, 3]``.
        sample_aspect_ratio: Width of one stored pixel over its height (``1`` is square).
        rotated: The frames were rotated by 90 or 270 degrees for display, so the stored
            width is now the height, which is what gets stretched.

    Returns:
        uint8 frames ``[F, H', W', 3]`` (unchanged if the ratio is 1 or the size would not change).

    Raises:
        ValueError: If ``frames`` is not a non-empty uint8 ``[F, H, W, 3]`` array or the
            ratio is not a positive finite number.
    """
    tensor = _as_uint8_tensor(frames)
    sar = float(sample_aspect_ratio)
    if not (sar > 0 and np.isfinite(sar)):
        raise ValueError(f"sample_aspect_ratio must be a positive number, got {sample_aspect_ratio!r}")
    height, width = int(tensor.shape[1]), int(tensor.shape[2])
    new_h, new_w = (max(1, round(height * sar)), width) if rotated else (height, max(1, round(width * sar)))
    if (new_h, new_w) == (height, width):
        return np.asarray(frames)
    images = tensor.permute(0, 3, 1, 2).to(torch.float32)  # [F, 3, H, W]
    resized = _resize(images, new_h, new_w).round().clamp(0, 255).to(torch.uint8)
    return resized.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [F, H', W', 3]
