"""The 4D attention mask: causal except inside the frame block."""

from __future__ import annotations

import torch

from d2vlm_ray.model.masks import build_attention_mask


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, 0] == 0


def test_causal_outside_frames_bidirectional_inside() -> None:
    # Sequence of 8: columns 0-1 text, 2-5 frames, 6-7 text.
    valid = torch.ones(1, 8, dtype=torch.bool)
    mask = build_attention_mask(valid, 8, torch.tensor([2]), torch.tensor([4]), True, torch.float32)
    allowed = _allowed(mask)[0]
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    expected = causal.clone()
    expected[2:6, 2:6] = True
    assert torch.equal(allowed, expected)
    # Frames see later frames, but never later text.
    assert allowed[2, 5] and not allowed[2, 6] and not allowed[5, 6]
    # Text before frames cannot see frames; text after sees them all.
    assert not allowed[1, 2] and allowed[6, 2:6].all()
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min


def test_without_bidirectional_flag_it_is_purely_causal() -> None:
    valid = torch.ones(1, 6, dtype=torch.bool)
    mask = build_attention_mask(valid, 6, torch.tensor([1]), torch.tensor([3]), False, torch.float64)
    assert torch.equal(_allowed(mask)[0], torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_padding_keys_masked_and_padding_rows_not_empty() -> None:
    # Left padding of two columns for sample 0; sample 1 is full.
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    mask = build_attention_mask(valid, 5, torch.tensor([3, 3]), torch.tensor([2, 2]), True, torch.float32)
    allowed = _allowed(mask)
    assert not allowed[0, 2:, :2].any(), "real tokens must not attend to padding"
    assert allowed.any(dim=-1).all(), "every row needs at least one allowed key"
    assert allowed[0, 0, 0] and not allowed[0, 0, 1]


def test_decode_step_rows_follow_the_cache() -> None:
    # One new query after 4 cached columns, one of which is padding.
    valid = torch.tensor([[False, True, True, True, True]])
    mask = build_attention_mask(valid, 1, torch.tensor([1]), torch.tensor([2]), True, torch.float32)
    assert mask.shape == (1, 1, 1, 5)
    assert torch.equal(_allowed(mask)[0, 0], torch.tensor([False, True, True, True, True]))
