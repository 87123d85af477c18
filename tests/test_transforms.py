"""Tests of the CLIP centre-crop pixel transform and the sample-aspect-ratio option."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from d2vlm_ray.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    apply_sample_aspect_ratio,
    clip_center_transform,
    transform_id,
)


def test_transform_id() -> None:
    assert transform_id(224) == "clip_center_224"
    assert transform_id(32) == "clip_center_32"
    with pytest.raises(ValueError):
        transform_id(0)


@pytest.mark.parametrize("shape", [(2, 360, 640), (1, 640, 360), (3, 100, 100), (1, 50, 300)])
def test_output_shape_and_dtype(shape: tuple[int, int, int]) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    out = clip_center_transform(frames, image_size=64)
    assert out.shape == (shape[0], 3, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_constant_colour_maps_to_normalised_value() -> None:
    rgb = (200, 30, 90)
    frames = np.empty((2, 90, 160, 3), dtype=np.uint8)
    frames[...] = rgb
    out = clip_center_transform(torch.from_numpy(frames), image_size=48)
    for channel in range(3):
        expected = (rgb[channel] / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(out[:, channel], torch.full_like(out[:, channel], expected), atol=1e-5)


def test_center_crop_keeps_middle_of_wide_frame() -> None:
    # Left quarter red, middle half green, right quarter blue: the centre crop of a
    # 2:1 frame must see only green (edges excepted by the bilinear filter).
    frames = np.zeros((1, 100, 200, 3), dtype=np.uint8)
    frames[:, :, :50, 0] = 255
    frames[:, :, 50:150, 1] = 255
    frames[:, :, 150:, 2] = 255
    out = clip_center_transform(frames, image_size=50)
    pixels = out[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    inner = pixels[:, :, 2:-2]
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=1e-4)
    assert inner[0].abs().max() < 1e-4 and inner[2].abs().max() < 1e-4


def test_center_crop_keeps_middle_of_tall_frame() -> None:
    frames = np.zeros((1, 200, 100, 3), dtype=np.uint8)
    frames[:, :50, :, 0] = 255
    frames[:, 50:150, :, 1] = 255
    frames[:, 150:, :, 2] = 255
    out = clip_center_transform(frames, image_size=40)
    pixels = out[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    inner = pixels[:, 2:-2, :]
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=1e-4)


def test_small_frame_is_upscaled() -> None:
    frames = np.full((1, 8, 12, 3), 128, dtype=np.uint8)
    out = clip_center_transform(frames, image_size=32)
    assert out.shape == (1, 3, 32, 32)


def test_matches_direct_interpolation_for_square_input() -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8)
    out = clip_center_transform(frames, image_size=48)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    ref = torch.nn.functional.interpolate(images, size=(48, 48), mode="bilinear", antialias=True)
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((1, 8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 8, 3), dtype=np.uint8),
        [[[[0, 0, 0]]]],
    ],
)
def test_rejects_bad_input(bad: object) -> None:
    with pytest.raises(ValueError):
        clip_center_transform(bad)  # type: ignore[arg-type]


def test_sample_aspect_ratio_stretches_the_stored_width() -> None:
    frames = np.zeros((2, 576, 704, 3), dtype=np.uint8)
    frames[:, :, 352:] = 200
    wide = apply_sample_aspect_ratio(frames, Fraction(16, 11))
    assert wide.shape == (2, 576, 1024, 3) and wide.dtype == np.uint8
    # The left half stays dark and the right half bright: a stretch, not a crop or a shift.
    assert wide[:, :, :500].max() == 0 and wide[:, :, 524:].min() == 200
    # A portrait frame rotated for display: the stored width is its height now.
    tall = apply_sample_aspect_ratio(np.zeros((1, 704, 576, 3), dtype=np.uint8), Fraction(16, 11), rotated=True)
    assert tall.shape == (1, 1024, 576, 3)
    np.testing.assert_array_equal(apply_sample_aspect_ratio(frames, 1), frames)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            apply_sample_aspect_ratio(frames, bad)
