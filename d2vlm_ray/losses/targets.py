"""Soft grounding targets: what the grounding terms of the SFT and FPO losses score against.

They live in ``losses`` (not beside span decoding in ``model.grounding``) so that the losses
import nothing from ``model``: the model package may use the losses' maths
(``model.preference``), never the other way round.
"""

from __future__ import annotations

import torch


def soft_targets(spans_idx: torch.Tensor, num_frames: int, alpha: float) -> torch.Tensor:
    """Soft grounding targets ``alpha ** -d`` (spec §2.2).

    ``d`` is 0 inside the closed span and the distance in frames to the nearer boundary
    outside it: with alpha 2, frames one step outside get 0.5, two steps 0.25. Spans may
    be fractional frame positions (:func:`spans_s_to_frame_pos`); ``d`` is then fractional.

    Args:
        spans_idx: Tensor ``[E, 2]`` of ``(first, last)``: frame indices (long) or
            fractional frame positions (float).
        num_frames: F.
        alpha: Decay base (> 1).

    Returns:
        Float targets ``[E, F]`` in ``(0, 1]``.
    """
    spans = spans_idx.to(torch.float64)  # float64 keeps fractional positions exact
    frame_idx = torch.arange(num_frames, device=spans.device, dtype=torch.float64)  # [F]
    first = spans[:, :1]  # [E, 1]
    last = spans[:, 1:]  # [E, 1]
    distance = (first - frame_idx).clamp(min=0) + (frame_idx - last).clamp(min=0)  # [E, F]
    return torch.pow(torch.tensor(float(alpha), dtype=torch.float32), -distance.float())
