"""Seeded weights in official key names, reproducible bit for bit from the seed.

Both sides of the parity harness call :func:`official_weights`: ``make_fixtures.py`` (in a
separate environment running the official code) to fill the official model, and
``tests/test_official_parity.py`` to write the same weights as an official-layout
checkpoint that the project then loads through its key map and ``from_pretrained``. So the
weights never need to be committed; ``WEIGHTS_SHA256`` in the fixtures proves that both
sides generated the same bits. Pure torch, no project or official imports.

Init (per tensor, from its own generator seeded with ``seed`` and the CRC32 of its name):

- ``position_ids``: ``0..n-1`` (a buffer, not a weight);
- 1-D tensors whose name marks a norm (``norm``, ``LayerNorm``, ``layernorm``, ``_ln``,
  ``.0.weight`` of the LN-first projector/head blocks): ``1 + 0.1·N(0, 1)``;
- other 1-D tensors (biases, EVA's ``q_bias``/``v_bias``): ``0.1·N(0, 1)``;
- embeddings, ``cls_token``, ``pos_embed``, ``qformer_query``: ``0.5·N(0, 1)``;
- the last linear layer of both grounding heads (``frm_head.3``, ``evi_head.3``):
  ``4·N(0, 1) / sqrt(fan_in)``, so that frame probabilities spread out and decoded spans
  are not simply the whole video;
- every other tensor: ``N(0, 1) / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``.
"""

from __future__ import annotations

import hashlib
import math
import zlib

import torch

_NORM_MARKS = ("norm", "LayerNorm", "layernorm", "_ln.", "_proj.0.weight", "_head.0.weight")
_SHARP = ("frm_head.3.", "evi_head.3.")
_WIDE = ("embed_tokens", "word_embeddings", "position_embeddings", "cls_token", "pos_embed", "qformer_query")


def official_weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor for one official key, as documented in this module."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.long).reshape(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode("utf-8")))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        is_norm = name.endswith(".weight") and any(mark in name for mark in _NORM_MARKS)
        return 1.0 + 0.1 * noise if is_norm else 0.1 * noise
    if any(mark in name for mark in _WIDE):
        return 0.5 * noise
    scale = 4.0 if name.startswith(_SHARP) else 1.0
    return scale * noise / math.sqrt(math.prod(shape[1:]))


def official_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """All tensors for ``shapes`` (official key → shape)."""
    return {name: official_weight(name, tuple(shape), seed) for name, shape in sorted(shapes.items())}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
