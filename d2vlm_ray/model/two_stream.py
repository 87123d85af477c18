"""Grounded-VideoLLM's two-stream video encoding: frozen encoders, cached layout, projector.

A video's F sampled frames split into K contiguous segments (:func:`segment_bounds`). Per
segment a *spatial* stream takes the middle frame (the keyframe) through the image encoder
(CLIP ViT, :mod:`d2vlm_ray.model.vision`) and 2-D average pools its patch grid to s×s; a
*temporal* stream takes the segment's frames through a video encoder and pools each frame's
token grid to t×t, then the segment to T frames. :class:`TwoStreamProjector` maps both
through 2-layer MLPs into the LLM width and concatenates them per segment, in time order.

Cached layout. :class:`TwoStreamFrameEncoder` writes one row per sampled frame,
``[F, s*s + t*t, C]`` with ``C = max(C_img, C_vid)``: columns ``[:s*s, :C_img]`` hold the
frame's pooled image patches, columns ``[s*s:, :C_vid]`` its pooled video tokens from its
segment's pass, and the rest is zero padding so that one tensor holds both streams. Every
frame gets both streams, though the projector reads the spatial ones of keyframes only,
because the feature cache is keyed per video and sampling rule and stores a row per sampled
frame: row f then still belongs to ``timestamps_s[f]``, missing-frame bookkeeping stays as
it is, and the keyframe choice is left to the projector, which knows K.

The video encoder is transformers' TimeSformer (divided space-time attention), sized like
the official encoder. The official weights are InternVideo2-1B's, and they do **not** load
into it: InternVideo2 embeds a clip with a 3-D convolution (tubelet 1) into one sequence of
``T·L`` tokens plus CLS with a single learned space-time position table, and every block
runs *joint* attention over all of them (fused bias-free qkv, RMS-normalised q and k,
LayerScale on both branches); it ends in an attention-pooling head and CLIP-distillation
decoders, and Grounded-VideoLLM takes the patch tokens of its second-to-last block.
TimeSformer instead has a 2-D patch embedding, separate spatial and temporal position
tables, and per block a temporal attention (plus a dense layer) before a spatial attention,
each with biased q/k/v. No renaming maps one parameter set onto the other; loading those
weights needs an InternVideo2 implementation. Here too the video stream takes the
second-to-last block's patch tokens, without CLS. Its pixels get CLIP's normalisation (the
official pipeline uses ImageNet's for InternVideo2; :mod:`d2vlm_ray.data.transforms` has no
such transform yet), which the transform id records.

The segment length n varies with F, but TimeSformer only runs clips of exactly
``VideoEncoderConfig.num_frames`` (N) frames: in transformers 5.23 its embeddings interpolate
the time table for other lengths, yet every layer reshapes its tokens with
``config.num_frames`` and fails. So each segment is resampled to N slots, slot j showing
local frame ``floor((j + 0.5) · n / N)`` (frames repeat when n < N, are thinned when n > N),
and frame f's row averages the slots showing it, or, when it was thinned out, takes the
slot whose time bin holds it (:func:`_segment_slots`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TimesformerConfig, TimesformerModel

from d2vlm_ray.config.schema import GVLSettings, ModelConfig, VideoEncoderConfig
from d2vlm_ray.data.transforms import clip_center_transform, transform_id
from d2vlm_ray.model.vision import VisionFrameEncoder, build_vision_model, check_vit_sizes, weights_sha256


def segment_bounds(num_frames: int, num_segments: int) -> list[tuple[int, int]]:
    """Split ``num_frames`` frames into ``min(num_segments, num_frames)`` contiguous segments.

    Args:
        num_frames: F, the sampled frames of a video.
        num_segments: K, the segments wanted.

    Returns:
        ``[start, stop)`` frame ranges in time order, covering every frame once; sizes differ
        by at most one (the longer segments come first).

    Raises:
        ValueError: If ``num_frames`` or ``num_segments`` is below 1.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: need at least one frame, got {num_frames}")
    if num_segments < 1:
        raise ValueError(f"model.gvl.num_segments: must be at least 1, got {num_segments}")
    count = min(num_segments, num_frames)
    base, extra = divmod(num_frames, count)
    bounds, start = [], 0
    for seg_idx in range(count):
        stop = start + base + (1 if seg_idx < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def keyframe_indices(bounds: list[tuple[int, int]]) -> list[int]:
    """The middle frame ``(start + stop - 1) // 2`` of each ``[start, stop)`` segment."""
    return [(start + stop - 1) // 2 for start, stop in bounds]


def build_video_encoder(cfg: VideoEncoderConfig) -> TimesformerModel:
    """A frozen TimeSformer (divided space-time attention, random weights) sized from ``cfg``.

    Raises:
        ValueError: If the patch size does not divide the image size or the heads the width.
    """
    check_vit_sizes("model.video", cfg)
    hf_cfg = TimesformerConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_frames=cfg.num_frames,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        layer_norm_eps=cfg.layer_norm_eps,
        attention_type="divided_space_time",
    )
    model = TimesformerModel(hf_cfg)
    model.requires_grad_(False)
    model.eval()
    return model


class TwoStreamVision(nn.Module):
    """The two frozen encoders of Grounded-VideoLLM and the pooling sizes they are read at.

    Args:
        image: The keyframe encoder from :func:`build_vision_model`.
        video: The segment encoder from :func:`build_video_encoder`.
        gvl: The two-stream settings (K, s, t are kept).
        image_size: Square input side of the image encoder in pixels.
    """

    def __init__(self, image: nn.Module, video: TimesformerModel, gvl: GVLSettings, image_size: int) -> None:
        super().__init__()
        self.image = image
        self.video = video
        self.image_size = int(image_size)
        self.num_segments = int(gvl.num_segments)
        self.spatial_pool = int(gvl.spatial_pool)
        self.temporal_pool = int(gvl.temporal_pool)

    def train(self, mode: bool = True) -> TwoStreamVision:
        """Stay in eval mode: both encoders are frozen, whatever the surrounding model does."""
        super().train(False)
        return self


def build_two_stream_vision(cfg: ModelConfig) -> TwoStreamVision:
    """Both frozen encoders of ``cfg`` (``cfg.vision``, ``cfg.video``, ``cfg.gvl``), random weights."""
    vision = TwoStreamVision(
        build_vision_model(cfg.vision), build_video_encoder(cfg.video), cfg.gvl, cfg.vision.image_size
    )
    vision.requires_grad_(False)
    return vision.eval()


def stream_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    """``(C_img, C_vid, C)``: the two streams' feature widths and the cached width (their max)."""
    image_width, video_width = int(cfg.vision.hidden_size), int(cfg.video.hidden_size)
    return image_width, video_width, max(image_width, video_width)


class TwoStreamFrameEncoder:
    """Implements :class:`d2vlm_ray.types.FrameEncoder`: both streams of every frame in one row.

    Args:
        vision: The frozen encoders.
        chunk_frames: Frames per image-encoder call, bounding peak memory on long videos.
    """

    def __init__(self, vision: TwoStreamVision, chunk_frames: int = 64) -> None:
        self.vision = vision
        self._image = VisionFrameEncoder(vision.image, vision.image_size, chunk_frames)
        self._video_size = int(vision.video.config.image_size)
        self._encoder_id: str | None = None

    @property
    def image_size(self) -> int:
        """Square input side of the image (keyframe) encoder in pixels."""
        return self._image.image_size

    @property
    def transform_id(self) -> str:
        """``<image transform id>+<video transform id>``; both sets of pixels shape the features."""
        return f"{self._image.transform_id}+{transform_id(self._video_size)}"

    @property
    def encoder_id(self) -> str:
        """``two-stream/k{K}s{s}t{t}/<image id>+timesformer/<L>x<C>p<p>f<frames>/<sha16>``, computed once."""
        if self._encoder_id is None:
            v = self.vision
            vc = v.video.config
            video_id = (
                f"timesformer/{vc.num_hidden_layers}x{vc.hidden_size}p{vc.patch_size}f{vc.num_frames}/"
                f"{weights_sha256(v.video)[:16]}"
            )
            layout = f"k{v.num_segments}s{v.spatial_pool}t{v.temporal_pool}"
            self._encoder_id = f"two-stream/{layout}/{self._image.encoder_id}+{video_id}"
        return self._encoder_id

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode uint8 frames ``[F, H, W, 3]`` to float32 CPU features ``[F, s*s + t*t, C]``.

        Raises:
            ValueError: On an empty or malformed frame array.
        """
        v = self.vision
        s, t = v.spatial_pool, v.temporal_pool
        patches = self._image.encode(frames).float()  # [F, P, C_img]
        spatial = _pool_grid(patches, s)  # [F, s*s, C_img]
        pixels = clip_center_transform(frames, self._video_size)  # [F, 3, S_v, S_v]
        param = next(v.video.parameters())
        temporal = []
        num_slots = int(v.video.config.num_frames)
        for start, stop in segment_bounds(pixels.shape[0], v.num_segments):
            shown_idx, owners = _segment_slots(stop - start, num_slots)
            clip = pixels[start:stop][shown_idx][None].to(param.device, param.dtype)  # [1, N, 3, S_v, S_v]
            # Block -2's output, as the official model reads InternVideo2 (module docstring).
            tokens = v.video(pixel_values=clip, output_hidden_states=True).hidden_states[-2][0, 1:]  # [P*N, C_v]
            # TimeSformer orders tokens patch-major, time-minor.
            tokens = tokens.view(-1, num_slots, tokens.shape[-1]).transpose(0, 1)  # [N, P, C_v]
            pooled = _pool_grid(tokens.float().cpu(), t)  # [N, t*t, C_v]
            temporal.append(torch.stack([pooled[slots].mean(dim=0) for slots in owners]))  # [n, t*t, C_v]
        video = torch.cat(temporal)  # [F, t*t, C_v]
        width = max(spatial.shape[-1], video.shape[-1])
        out = torch.zeros(spatial.shape[0], s * s + t * t, width)  # [F, s*s + t*t, C]
        out[:, : s * s, : spatial.shape[-1]] = spatial
        out[:, s * s :, : video.shape[-1]] = video
        return out


def _segment_slots(num_frames: int, num_slots: int) -> tuple[list[int], list[list[int]]]:
    """How a segment of ``num_frames`` frames fills the video encoder's ``num_slots`` frames.

    Returns:
        The local frame each slot shows (``floor((j + 0.5) * n / N)``, evenly spread), and per
        local frame the slots whose outputs become its row: those showing it, or, for a frame
        thinned out, the one slot whose time bin ``[j / N, (j + 1) / N)`` holds it.
    """
    shown_idx = [(2 * slot + 1) * num_frames // (2 * num_slots) for slot in range(num_slots)]
    owners = []
    for frame_idx in range(num_frames):
        slots = [slot for slot, shown in enumerate(shown_idx) if shown == frame_idx]
        owners.append(slots or [frame_idx * num_slots // num_frames])
    return shown_idx, owners


def _pool_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Adaptive-average pool square token grids ``[N, g*g, C]`` (row-major) to ``[N, side*side, C]``."""
    n, count, width = tokens.shape
    grid = int(round(count**0.5))
    if grid * grid != count:
        raise ValueError(f"expected a square patch grid, got {count} tokens per frame")
    maps = tokens.transpose(1, 2).reshape(n, width, grid, grid)  # [N, C, g, g]
    return F.adaptive_avg_pool2d(maps, side).flatten(2).transpose(1, 2)  # [N, side*side, C]


def _mlp(in_width: int, out_width: int) -> nn.Sequential:
    """Linear–GELU–Linear, the shape of the official projectors."""
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


class TwoStreamProjector(nn.Module):
    """Cached two-stream rows ``[F, s*s + t*t, C]`` to LLM input tokens ``[N, D]``.

    Per segment, in time order: the keyframe's ``s*s`` spatial tokens, then ``T*t*t``
    temporal tokens (the segment's frames pooled over time to T, frame-major).

    Args:
        image_width: C_img, the spatial columns read.
        video_width: C_vid, the temporal columns read.
        llm_width: D.
        gvl: The two-stream settings.
    """

    def __init__(self, image_width: int, video_width: int, llm_width: int, gvl: GVLSettings) -> None:
        super().__init__()
        self.image_width = int(image_width)
        self.video_width = int(video_width)
        self.num_segments = int(gvl.num_segments)
        self.spatial_pool = int(gvl.spatial_pool)
        self.temporal_pool = int(gvl.temporal_pool)
        self.temporal_frames = int(gvl.temporal_frames)
        self.spatial_proj = _mlp(self.image_width, llm_width)
        self.temporal_proj = _mlp(self.video_width, llm_width)

    @property
    def tokens_per_segment(self) -> int:
        """``s*s + T*t*t``."""
        return self.spatial_pool**2 + self.temporal_frames * self.temporal_pool**2

    def num_tokens(self, num_frames: int) -> int:
        """Output tokens for ``num_frames`` sampled frames: ``K_eff * (s*s + T*t*t)``."""
        return len(segment_bounds(num_frames, self.num_segments)) * self.tokens_per_segment

    def token_frames(self, num_frames: int) -> list[tuple[int, int]]:
        """The ``[start, stop)`` frame range of the segment each output token comes from."""
        per = self.tokens_per_segment
        return [bounds for bounds in segment_bounds(num_frames, self.num_segments) for _ in range(per)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project cached rows ``[F, s*s + t*t, C]`` to ``[num_tokens(F), D]``.

        Raises:
            ValueError: If the rows do not have the two-stream layout of these settings.
        """
        ss = self.spatial_pool**2
        if features.dim() != 3 or features.shape[1] != ss + self.temporal_pool**2:
            raise ValueError(
                f"features: expected [F, {ss + self.temporal_pool**2}, C] two-stream rows, got {tuple(features.shape)}"
            )
        if features.shape[2] < max(self.image_width, self.video_width):
            raise ValueError(f"features: width {features.shape[2]} is below the stream widths")
        features = features.to(self.spatial_proj[0].weight.dtype)
        bounds = segment_bounds(features.shape[0], self.num_segments)
        keyframes = features[keyframe_indices(bounds), :ss, : self.image_width]  # [K, s*s, C_img]
        temporal = torch.stack(
            [self._pool_time(features[start:stop, ss:, : self.video_width]) for start, stop in bounds]
        )  # [K, T, t*t, C_v]
        spatial_tokens = self.spatial_proj(keyframes)  # [K, s*s, D]
        temporal_tokens = self.temporal_proj(temporal.flatten(1, 2))  # [K, T*t*t, D]
        return torch.cat([spatial_tokens, temporal_tokens], dim=1).flatten(0, 1)  # [K*(s*s + T*t*t), D]

    def _pool_time(self, frames: torch.Tensor) -> torch.Tensor:
        """One segment's temporal tokens ``[n, t*t, C_v]`` to ``[T, t*t, C_v]``.

        Longer segments average-pool over time; shorter ones repeat frames (nearest), so no
        output frame blends two input frames.
        """
        n = frames.shape[0]
        if n >= self.temporal_frames:
            pooled = F.adaptive_avg_pool1d(frames.permute(1, 2, 0).flatten(0, 1), self.temporal_frames)  # [t*t*C, T]
            return pooled.view(frames.shape[1], frames.shape[2], -1).permute(2, 0, 1)
        repeat_idx = [i * n // self.temporal_frames for i in range(self.temporal_frames)]
        return frames[repeat_idx]
