"""Question-conditioned frame compressor: InstructBLIP Q-Former plus D2VLM's aggregator.

Per frame, 32 learned queries and the question's tokens go through the Q-Former (queries
and text attend to each other; only the queries cross-attend to the frame's patches).
The aggregator then lets the projected queries attend over the *raw* patches, adds the
queries back, averages over queries and projects to the LLM width: exactly one LLM token
per frame (spec §1.4).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from d2vlm_ray.config.schema import QFormerConfig


def build_qformer(cfg: QFormerConfig, vision_width: int, vocab_size: int) -> InstructBlipQFormerModel:
    """The BERT-style Q-Former with cross-attention every ``cross_attention_frequency`` layers."""
    hf_cfg = InstructBlipQFormerConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=vision_width,
        max_position_embeddings=512,
    )
    hf_cfg._attn_implementation = "eager"
    return InstructBlipQFormerModel(hf_cfg)


def _ln_linear(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width_out))


class FrameCompressor(nn.Module):
    """Patch features + question → one LLM token per frame.

    Args:
        qformer: The Q-Former.
        vision_width: Patch feature width C (1408 official).
        llm_width: LLM hidden size D (3072 official).
        num_queries: Learned queries Q (32 official).
    """

    def __init__(self, qformer: InstructBlipQFormerModel, vision_width: int, llm_width: int, num_queries: int):
        super().__init__()
        qformer_width = qformer.config.hidden_size
        self.qformer = qformer
        self.qformer_query = nn.Parameter(torch.zeros(1, num_queries, qformer_width))
        nn.init.normal_(self.qformer_query, std=0.02)
        self.qformer_ln = nn.LayerNorm(vision_width)  # only on the cross-attention input
        self.qformer_proj = nn.Linear(qformer_width, vision_width)
        self.qformer_q_proj = _ln_linear(vision_width, vision_width)
        self.qformer_k_proj = _ln_linear(vision_width, vision_width)
        self.qformer_v_proj = _ln_linear(vision_width, llm_width)
        self.vision_width = vision_width

    def forward(
        self,
        patches: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Compress frames, each conditioned on its own question text.

        Args:
            patches: Raw patch features ``[F, P, C]`` (frames of one or several videos).
            text_ids: Question token ids per frame ``[F, L]`` (repeated for a video's frames).
            text_mask: 1 for real question tokens, 0 for padding, ``[F, L]``.

        Returns:
            One token per frame, ``[F, D]``.
        """
        n_frames = patches.shape[0]
        queries = self.qformer_query.expand(n_frames, -1, -1)  # [F, Q, Dq]
        query_mask = torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        out = self.qformer(
            input_ids=text_ids,
            attention_mask=torch.cat([query_mask, text_mask], dim=1),
            query_embeds=queries,
            encoder_hidden_states=self.qformer_ln(patches),
            encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device),
        ).last_hidden_state
        query_out = out[:, : queries.shape[1]]  # [F, Q, Dq]
        query_embeds = self.qformer_proj(query_out)  # [F, Q, C]
        logits = self.qformer_q_proj(query_embeds) @ self.qformer_k_proj(patches).transpose(1, 2)
        attn = torch.softmax(logits / math.sqrt(self.vision_width), dim=-1)  # [F, Q, P]
        # Values are the raw patches (not k_proj outputs), as in the official aggregator.
        pooled = (attn @ patches + query_embeds).mean(dim=1)  # [F, C]
        return self.qformer_v_proj(pooled)  # [F, D]
