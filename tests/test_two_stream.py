"""The clip frame-encoder family and Grounded-VideoLLM's two-stream encoder and projector."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from d2vlm_ray.config.load import from_dict
from d2vlm_ray.config.presets import preset_dict
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.model.two_stream import (
    TwoStreamFrameEncoder,
    TwoStreamProjector,
    TwoStreamVision,
    _segment_slots,
    build_two_stream_vision,
    build_video_encoder,
    keyframe_indices,
    segment_bounds,
    stream_widths,
)
from d2vlm_ray.model.vision import VisionFrameEncoder, build_vision_model
from d2vlm_ray.types import FrameEncoder


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return from_dict(ModelConfig, preset_dict("tiny-gvl"))


@pytest.fixture(scope="module")
def encoder(cfg: ModelConfig) -> TwoStreamFrameEncoder:
    torch.manual_seed(0)
    return TwoStreamFrameEncoder(build_two_stream_vision(cfg), chunk_frames=4)


def _frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 52, 3), dtype=np.uint8)


# --- segments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_frames", "num_segments"), [(1, 12), (5, 12), (12, 12), (37, 12), (13, 4)])
def test_segment_bounds_cover_frames_contiguously(num_frames: int, num_segments: int) -> None:
    bounds = segment_bounds(num_frames, num_segments)
    assert len(bounds) == min(num_frames, num_segments)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_frames
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    for (start, stop), key_idx in zip(bounds, keyframe_indices(bounds)):
        assert start <= key_idx < stop


def test_segment_bounds_edge_cases() -> None:
    assert segment_bounds(3, 12) == [(0, 1), (1, 2), (2, 3)]
    assert segment_bounds(12, 12) == [(i, i + 1) for i in range(12)]
    assert sorted(stop - start for start, stop in segment_bounds(37, 12)) == [3] * 11 + [4]
    assert keyframe_indices([(0, 4), (4, 7), (7, 8)]) == [1, 5, 7]
    with pytest.raises(ValueError, match="num_frames"):
        segment_bounds(0, 12)
    with pytest.raises(ValueError, match="num_segments"):
        segment_bounds(5, 0)


# --- clip family --------------------------------------------------------------------------------


def test_clip_family_shapes_id_frozen_deterministic(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    clip = VisionFrameEncoder(build_vision_model(cfg.vision), cfg.vision.image_size)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    out = clip.encode(_frames(3))
    assert out.shape == (3, grid * grid, cfg.vision.hidden_size)
    assert out.std() > 0.1  # a random tiny encoder still sees pixels
    assert torch.equal(out, clip.encode(_frames(3)))
    assert not (out[0] - out[1]).abs().max() < 1e-4  # different frames, different features
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert not clip.model.training
    assert clip.encoder_id.startswith(f"clip-vit/{cfg.vision.num_layers}x{cfg.vision.hidden_size}p")
    assert clip.transform_id == f"clip_center_{cfg.vision.image_size}"
    eva_cfg = dataclasses.replace(cfg.vision, family="eva")
    eva = VisionFrameEncoder(build_vision_model(eva_cfg), eva_cfg.image_size)
    assert eva.encoder_id.split("/")[0] == "eva-vit" != clip.encoder_id.split("/")[0]


def test_clip_features_are_the_second_to_last_layer(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    clip = VisionFrameEncoder(build_vision_model(cfg.vision), cfg.vision.image_size)
    out = clip.encode(_frames(2))
    clip.model.encoder.layers[-1].mlp.fc2.bias.data.add_(5.0)  # only the last layer moves
    assert torch.equal(out, clip.encode(_frames(2)))


# --- video encoder ------------------------------------------------------------------------------


def test_timesformer_needs_exactly_num_frames(cfg: ModelConfig) -> None:
    """Why segments are resampled: transformers' TimeSformer layers reshape with config.num_frames.
    Should this start passing, the encoder could feed segments at their own length."""
    assert cfg.video.num_frames == 8
    model = build_video_encoder(cfg.video)
    side, grid = cfg.video.image_size, cfg.video.image_size // cfg.video.patch_size
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 8, 3, side, side))
        assert out.last_hidden_state.shape == (1, 1 + 8 * grid * grid, cfg.video.hidden_size)
        with pytest.raises(RuntimeError):
            model(pixel_values=torch.randn(1, 3, 3, side, side))


@pytest.mark.parametrize(("num_frames", "num_slots"), [(1, 8), (3, 8), (8, 8), (12, 8), (25, 8)])
def test_segment_slots_show_every_frame_or_its_time_bin(num_frames: int, num_slots: int) -> None:
    shown_idx, owners = _segment_slots(num_frames, num_slots)
    assert len(shown_idx) == num_slots and shown_idx == sorted(shown_idx)
    assert len(owners) == num_frames and all(owners)
    if num_frames <= num_slots:  # nothing thinned: every frame is shown and reads only its own slots
        assert sorted({*shown_idx}) == list(range(num_frames))
        assert all(shown_idx[slot] == f for f, slots in enumerate(owners) for slot in slots)
    else:
        assert all(len(slots) == 1 for slots in owners)
        assert [owners[f][0] for f in range(num_frames)] == sorted(owners[f][0] for f in range(num_frames))


def test_encoder_runs_segments_shorter_and_longer_than_num_frames(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    vision = build_two_stream_vision(cfg)
    for num_frames, num_segments in [(36, 12), (12, 1)]:  # segments of 3 and of 12 frames, N = 8
        gvl = dataclasses.replace(cfg.gvl, num_segments=num_segments)
        enc = TwoStreamFrameEncoder(TwoStreamVision(vision.image, vision.video, gvl, cfg.vision.image_size))
        out = enc.encode(_frames(num_frames))
        assert out.shape == (num_frames, 2, cfg.vision.hidden_size) and torch.isfinite(out).all()
        assert out[:, 1].std(dim=0).amax() > 0  # frames of a segment get their own rows


# --- frame encoder ------------------------------------------------------------------------------


def test_encoder_layout_and_zero_padding(cfg: ModelConfig, encoder: TwoStreamFrameEncoder) -> None:
    assert isinstance(encoder, FrameEncoder)
    s, t = cfg.gvl.spatial_pool, cfg.gvl.temporal_pool
    image_width, video_width, width = stream_widths(cfg)
    out = encoder.encode(_frames(5))
    assert out.shape == (5, s * s + t * t, width) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out[:, : s * s, :image_width].abs().amax() > 0
    assert out[:, s * s :, :video_width].abs().amax() > 0
    assert torch.all(out[:, : s * s, image_width:] == 0) and torch.all(out[:, s * s :, video_width:] == 0)
    assert torch.equal(out, encoder.encode(_frames(5)))
    assert encoder.image_size == cfg.vision.image_size
    assert encoder.transform_id == f"clip_center_{cfg.vision.image_size}+clip_center_{cfg.video.image_size}"


def test_encoder_widths_differ_pads_the_narrow_stream(cfg: ModelConfig) -> None:
    wide = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, hidden_size=64, num_heads=4))
    image_width, video_width, width = stream_widths(wide)
    assert (image_width, video_width, width) == (48, 64, 64)
    out = TwoStreamFrameEncoder(build_two_stream_vision(wide)).encode(_frames(4))
    ss = wide.gvl.spatial_pool**2
    assert out.shape[-1] == 64 and torch.all(out[:, :ss, image_width:] == 0)
    assert out[:, ss:, image_width:].abs().amax() > 0


def test_encoder_spatial_pooling_matches_image_patches(cfg: ModelConfig) -> None:
    big = dataclasses.replace(cfg, gvl=dataclasses.replace(cfg.gvl, spatial_pool=2, temporal_pool=2))
    torch.manual_seed(1)
    enc = TwoStreamFrameEncoder(build_two_stream_vision(big))
    frames = _frames(3)
    patches = VisionFrameEncoder(enc.vision.image, big.vision.image_size).encode(frames)  # [F, 4, C] for a 2x2 grid
    out = enc.encode(frames)
    torch.testing.assert_close(out[:, :4, : big.vision.hidden_size], patches)


def test_encoder_id_changes_with_either_weights(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    vision = build_two_stream_vision(cfg)
    first = TwoStreamFrameEncoder(vision).encoder_id
    assert first.startswith("two-stream/k12s1t1/clip-vit/") and "+timesformer/2x48p28f8/" in first
    with torch.no_grad():
        vision.video.embeddings.cls_token.add_(1.0)
    after_video = TwoStreamFrameEncoder(vision).encoder_id
    with torch.no_grad():
        vision.image.post_layernorm.bias.add_(1.0)
    after_image = TwoStreamFrameEncoder(vision).encoder_id
    assert len({first, after_video, after_image}) == 3


def test_temporal_features_are_segment_local(cfg: ModelConfig, encoder: TwoStreamFrameEncoder) -> None:
    frames = _frames(6)  # K=3 gives segments [0, 2), [2, 4), [4, 6)
    small_k = TwoStreamFrameEncoder(
        TwoStreamVision(
            encoder.vision.image,
            encoder.vision.video,
            dataclasses.replace(cfg.gvl, num_segments=3),
            cfg.vision.image_size,
        )
    )
    ss = cfg.gvl.spatial_pool**2
    base = small_k.encode(frames)
    changed = frames.copy()
    changed[3] = 255 - changed[3]
    out = small_k.encode(changed)
    moved = (out[:, ss:] - base[:, ss:]).abs().amax(dim=(1, 2))  # [F]
    assert moved[2] > 1e-4 and moved[3] > 1e-4  # its own segment, itself included
    assert torch.all(moved[[0, 1, 4, 5]] == 0)  # other segments untouched
    spatial_moved = (out[:, :ss] - base[:, :ss]).abs().amax(dim=(1, 2))
    assert spatial_moved[3] > 1e-4 and torch.all(spatial_moved[[0, 1, 2, 4, 5]] == 0)


def test_temporal_token_layout_is_per_frame(cfg: ModelConfig) -> None:
    """With temporal mixing off in block 1, block 1's tokens of frame f depend on frame f only,
    so a wrong patch-major/time-minor reshape would move the change to another row."""
    torch.manual_seed(0)
    vision = build_two_stream_vision(cfg)
    first = vision.video.encoder.layer[0]
    with torch.no_grad():
        first.temporal_dense.weight.zero_()
        first.temporal_dense.bias.zero_()
    one_segment = TwoStreamVision(
        vision.image, vision.video, dataclasses.replace(cfg.gvl, num_segments=1), cfg.vision.image_size
    )
    enc = TwoStreamFrameEncoder(one_segment)
    frames = _frames(4)
    base = enc.encode(frames)
    changed = frames.copy()
    changed[2] = 255 - changed[2]
    ss = cfg.gvl.spatial_pool**2
    moved = (enc.encode(changed)[:, ss:] - base[:, ss:]).abs().amax(dim=(1, 2))  # [F]
    assert moved[2] > 1e-4 and torch.all(moved[[0, 1, 3]] == 0)


# --- projector ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 5, 12, 37])
def test_projector_shape_matches_num_tokens(cfg: ModelConfig, num_frames: int) -> None:
    gvl = dataclasses.replace(cfg.gvl, spatial_pool=2, temporal_pool=2, temporal_frames=3)
    proj = TwoStreamProjector(48, 40, 32, gvl)
    out = proj(torch.randn(num_frames, 4 + 4, 48))
    assert out.shape == (proj.num_tokens(num_frames), 32)
    assert proj.num_tokens(num_frames) == min(num_frames, 12) * (4 + 3 * 4)
    ranges = proj.token_frames(num_frames)
    assert len(ranges) == out.shape[0] and ranges[0][0] == 0 and ranges[-1][1] == num_frames


def test_projector_reads_keyframe_and_own_segment_only(cfg: ModelConfig) -> None:
    gvl = dataclasses.replace(cfg.gvl, num_segments=2)
    torch.manual_seed(0)
    proj = TwoStreamProjector(48, 48, 16, gvl)
    feats = torch.randn(6, 2, 48)  # segments [0, 3) and [3, 6), keyframes 1 and 4
    base = proj(feats)
    per = proj.tokens_per_segment
    nudged = feats.clone()
    nudged[0, 0] += 1.0  # a non-key frame's spatial column: unread
    assert torch.equal(proj(nudged), base)
    nudged = feats.clone()
    nudged[5, 1] += 1.0  # segment 2's last frame, temporal column: only its last pooled frame (T = 2)
    moved = (proj(nudged) - base).abs().amax(dim=1)
    assert torch.all(moved[: per + 2] == 0) and moved[-1] > 0
    nudged = feats.clone()
    nudged[4, 0] += 1.0  # segment 2's keyframe, spatial column
    moved = (proj(nudged) - base).abs().amax(dim=1)
    assert moved[per] > 0 and torch.all(moved[:per] == 0) and torch.all(moved[per + 1 :] == 0)


def test_projector_repeats_frames_of_short_segments(cfg: ModelConfig) -> None:
    gvl = dataclasses.replace(cfg.gvl, num_segments=1, temporal_frames=4)
    proj = TwoStreamProjector(8, 8, 8, gvl)
    feats = torch.randn(2, 2, 8)
    out = proj(feats)  # [1 + 4, 8]: 2 frames repeated to 4
    assert torch.equal(out[1], out[2]) and torch.equal(out[3], out[4]) and not torch.equal(out[2], out[3])
    torch.testing.assert_close(out[1], proj.temporal_proj(feats[0, 1]))


def test_gradients_reach_projectors_not_encoders(cfg: ModelConfig, encoder: TwoStreamFrameEncoder) -> None:
    _, _, width = stream_widths(cfg)
    proj = TwoStreamProjector(cfg.vision.hidden_size, cfg.video.hidden_size, 24, cfg.gvl)
    feats = encoder.encode(_frames(7))
    proj(feats).square().sum().backward()
    for mlp in (proj.spatial_proj, proj.temporal_proj):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.vision.parameters())
    encoder.vision.train()
    assert not encoder.vision.training and not encoder.vision.video.training and not encoder.vision.image.training
    with pytest.raises(ValueError, match="features"):
        proj(torch.randn(7, 3, width))


def test_official_sizes_build_on_meta_without_allocating() -> None:
    from accelerate import init_empty_weights

    full = from_dict(ModelConfig, preset_dict("grounded-videollm"))
    with init_empty_weights():
        vision = build_two_stream_vision(full)
    assert stream_widths(full) == (1024, 1408, 1408)
    assert all(p.is_meta for p in vision.parameters())
    assert vision.image.config.hidden_size == 1024 and vision.video.config.hidden_size == 1408
    assert vision.video.config.num_hidden_layers == 40 and vision.image.config.num_hidden_layers == 24
    assert sum(p.numel() for p in vision.parameters()) > 1_000_000_000
