"""Pixel transforms that turn decoded uint8 frames into frame-encoder inputs.

The official D2VLM transform (``clip_center_224``) is torchvision's ``Resize`` on the
short side, a centre square crop, a resize to the square size and CLIP normalisation.
It is re-implemented here with ``torch.nn.functional.interpolate`` only, because
torchvision does not import in this environment; the size arithmetic follows
torchvision (long side truncated with ``int``, crop offset rounded) so the crops match.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of CLIP's image normalisation (on the 0..1 scale)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of CLIP's image normalisation (on the 0..1 scale)."""


def transform_id(image_size: int) -> str:
    """Identifier of the transform :func:`clip_center_transform` applies at ``image_size``.

    Args:
        image_size: Side of the square output image in pixels.

    Returns:
        The id, e.g. ``"clip_center_224"``; it is part of every feature-cache key.
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return f"clip_center_{int(image_size)}"


def _as_uint8_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate ``frames`` and return them as a uint8 tensor ``[F, H, W, 3]``."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
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


def clip_center_transform(frames: np.ndarray | torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Apply the official ``clip_center_<image_size>`` transform.

    Steps: scale to 0..1; resize so the short side is ``image_size`` (bilinear,
    antialiased); centre-crop a square of side ``min(image_size, h, w)``; resize that
    square to ``image_size`` if it is smaller; normalise with the CLIP mean and std.

    Args:
        frames: uint8 RGB frames ``[F, H, W, 3]`` (numpy or torch, any device).
        image_size: Side of the square output in pixels.

    Returns:
        float32 tensor ``[F, 3, image_size, image_size]`` on the input's device.

    Raises:
        ValueError: If ``frames`` is not a non-empty uint8 ``[F, H, W, 3]`` array or
            ``image_size`` is not a positive integer.
    """
    transform_id(image_size)  # validates image_size
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

    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()
