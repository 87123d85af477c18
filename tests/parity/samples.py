"""The inputs both sides of the parity harness use: sizes, samples, pairs, pixels.

Pure python + torch (no project or official imports), shared by ``make_fixtures.py`` and
``tests/test_official_parity.py`` so the two can never drift apart.
"""

from __future__ import annotations

import torch

SEED = 20251207
# Reduced official architecture: Phi-3 96 wide × 8 blocks (hidden_states[6], the official
# injection layer, is a block output; hidden_states[-2] = [7] feeds the heads), EVA 176
# wide (2 heads of the official 88) × 2 blocks with q/v biases, Q-Former BERT 64 wide
# (1 head of 64) × 2 layers, 32 queries (fixed in the official code).
LLM = {"hidden_size": 96, "num_layers": 8, "num_heads": 4, "intermediate_size": 192, "max_position_embeddings": 512}
VISION = {"hidden_size": 176, "num_layers": 2, "image_size": 224, "patch_size": 14}
QFORMER = {"hidden_size": 64, "num_layers": 2, "num_heads": 1, "intermediate_size": 128, "num_queries": 32}
ALPHA = 2.0
QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]

# SFT samples: (question, response, event spans in seconds, question-side spans, frames).
# Frames sit at 0, 1, 2, ... s (1 fps), the official sampling. Half-second ends exercise
# the official half-to-even rounding: 2.5 -> 2, 4.5 -> 4, 5.5 -> 6.
SFT_SAMPLES = [
    (
        "Describe all the events in the video.",
        "<evi><evi></evi><evi>, the red square jumps. <evi>, the blue circle grows.",
        [(1.0, 3.0), (4.5, 6.0)],
        [],
        8,
    ),
    ("What happens during <evi>?", "<evi></evi>At <evi>, it turned green.", [(2.0, 4.0)], [(0.0, 1.0)], 6),
    ("Find every occurrence of the action.", "<evi><evi></evi><evi>, <evi>.", [(0.0, 1.0), (2.5, 5.5)], [], 7),
]

# FPO pairs over SFT samples 0 and 1: (sample index, chosen spans, rejected text,
# rejected spans). Fractional spans make the unrounded log-likelihood targets matter.
FPO_PAIRS = [
    (0, [(1.4, 3.0), (4.0, 6.3)], SFT_SAMPLES[0][1], [(0.0, 1.3), (5.6, 7.0)]),
    (1, [(2.4, 4.6)], "<evi></evi>At <evi>, it turned red and it jumped.", [(2.4, 4.6)]),
]

# Generation: (sample index, max_new_tokens, forced token schedule or None for greedy).
# The forced schedule is given as tokens and makes <evi> occur at decode time.
GENERATIONS = [
    (1, 10, None),
    (0, 14, ["<evi>", "<evi>", "</evi>", "<evi>", ",", "the", "red", "square", "jumps", ".", "<evi>", ",", "<|end|>"]),
]


def pixels(sample_idx: int, num_frames: int) -> torch.Tensor:
    """Already-normalised frames ``[F, 3, 224, 224]`` of one sample, from the seed."""
    gen = torch.Generator().manual_seed(SEED + 7919 * (sample_idx + 1))
    return torch.randn(num_frames, 3, VISION["image_size"], VISION["image_size"], generator=gen) * 0.5
