"""Grounded-VideoLLM (Wang et al., 2024): two-stream video tokens and discrete temporal tokens.

Shapes use: B batch, F sampled frames, N video tokens, L sequence length, D LLM width,
V vocabulary.

A sequence is ``[prefix ids][N video tokens][suffix ids]``, as for D2VLM, but:

- the video tokens come from :class:`~d2vlm_ray.model.two_stream.TwoStreamProjector`
  (K segments, each a keyframe's spatial tokens then the segment's temporal tokens);
- a time is a token: ``<k>`` (k in 0..M) stands for ``k / M`` of the video's duration, and
  each span is written as its start and end tokens. The project's records mark spans with
  ``<evi>`` placeholders (``n × <evi>``, ``</evi>``, then the answer with n ``<evi>``);
  this family writes every ``<evi>`` as its span's two temporal tokens, so one training
  record serves both families and ``</evi>`` still closes the grounding part;
- attention is plainly causal and there are no grounding heads: the LM loss is the whole
  objective, and spans are read off the generated tokens.

The module takes the family-neutral :class:`~d2vlm_ray.model.inputs.D2VLMBatch` and lays it
out as this family's sequence itself, so collators, the feature cache and the batch
builders are shared with D2VLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d2vlm_ray.model.d2vlm import D2VLMOutput
from d2vlm_ray.model.inputs import IGNORE_INDEX, D2VLMBatch
from d2vlm_ray.model.llm_host import LLMHost
from d2vlm_ray.model.temporal_tokens import expand_evidence, span_to_bins
from d2vlm_ray.model.two_stream import TwoStreamProjector, TwoStreamVision


@dataclass
class GVLSequence:
    """One sample laid out as Grounded-VideoLLM's input.

    Attributes:
        embeds: Input embeddings ``[L, D]``: prefix text, video tokens, suffix text.
        labels: LM labels ``[L]`` (-100 on the prompt and the video tokens).
        suffix_ids: The suffix ids with every ``<evi>`` written as two temporal tokens.
        prompt_len: How many of ``suffix_ids`` belong to the prompt.
    """

    embeds: torch.Tensor
    labels: torch.Tensor
    suffix_ids: list[int]
    prompt_len: int


class GroundedVideoLLM(LLMHost):
    """Video LLM grounding with discrete temporal tokens over a two-stream encoding.

    Args:
        vision: The frozen two-stream encoder (image encoder and video encoder).
        compressor: The two projectors that turn cached stream features into LLM tokens.
        llm: Causal LM (eager attention); may be wrapped by peft.
        evi_token_id: Id of ``<evi>``, the span placeholder of the project's records.
        first_temporal_id: Id of ``<0>``; ``<k>`` is ``first_temporal_id + k``.
        num_temporal_tokens: M; the vocabulary holds ``<0> … <M>``.
        alpha: Unused by this family's losses; kept so checkpoints and trainers that read
            ``model.alpha`` work unchanged.
        pretrained_vocab_size: Vocabulary rows that came from pretrained weights (0 = none).
    """

    family = "grounded_videollm"

    def __init__(
        self,
        vision: TwoStreamVision,
        compressor: TwoStreamProjector,
        llm: nn.Module,
        *,
        evi_token_id: int,
        first_temporal_id: int,
        num_temporal_tokens: int,
        alpha: float = 2.0,
        pretrained_vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.compressor = compressor
        self.llm = llm
        self.evi_token_id = evi_token_id
        self.first_temporal_id = first_temporal_id
        self.num_temporal_tokens = num_temporal_tokens
        self.alpha = alpha
        self.pretrained_vocab_size = pretrained_vocab_size

    @property
    def temporal_ids(self) -> range:
        """Ids of ``<0> … <M>``."""
        return range(self.first_temporal_id, self.first_temporal_id + self.num_temporal_tokens + 1)

    def compress(self, batch: D2VLMBatch) -> list[torch.Tensor]:
        """Video tokens per sample, ``[N_i, D]``, from the cached two-stream features ``[F_i, P, C]``."""
        param = next(self.compressor.parameters())
        return [self.compressor(p.to(self.device, param.dtype)).to(self.dtype) for p in batch.patches]

    def num_video_tokens(self, num_frames: int) -> int:
        """N for a video of ``num_frames`` sampled frames."""
        return self.compressor.num_tokens(num_frames)

    def check_context(self, batch: D2VLMBatch, extra_tokens: int = 0) -> None:
        """Raise ``ValueError`` naming the sample if a sequence would exceed the LLM's context.

        Each span placeholder costs one more token here than in D2VLM (two temporal tokens).
        """
        limit = self.causal_lm.config.max_position_embeddings
        for i, (prefix, patches, suffix) in enumerate(zip(batch.prefix_ids, batch.patches, batch.suffix_ids)):
            n_video = self.num_video_tokens(patches.shape[0])
            n_text = len(prefix) + len(suffix) + sum(1 for t in suffix if t == self.evi_token_id)
            total = n_text + n_video + extra_tokens
            if total > limit:
                raise ValueError(
                    f"questions[{i}]: {total} tokens ({n_video} video tokens, {n_text} text, "
                    f"{extra_tokens} to generate) exceed the model's context of {limit}"
                )

    def temporal_suffix(
        self, batch: D2VLMBatch, b: int, extra_ids: list[int] | None = None, extra_spans_s: list | None = None
    ) -> tuple[list[int], list[int] | None, int]:
        """Sample ``b``'s suffix ids (and labels) with each ``<evi>`` as two temporal tokens.

        Args:
            batch: The batch.
            b: Sample index.
            extra_ids: Ids appended after the suffix (a forced grounding part), whose
                ``<evi>`` take ``extra_spans_s`` in order.
            extra_spans_s: Spans in seconds of the ``<evi>`` in ``extra_ids``.

        Returns:
            The suffix ids, the expanded labels (``None`` without a response) and the
            expanded prompt length.
        """
        duration_s = batch.durations_s[b]
        m = self.num_temporal_tokens
        ids = list(batch.suffix_ids[b]) + list(extra_ids or [])
        spans_s = list(batch.src_spans_s[b]) + list(batch.evi_spans_s[b]) + list(extra_spans_s or [])
        bins = [span_to_bins(span, duration_s, m) for span in spans_s]
        labels = list(batch.labels[b]) + [IGNORE_INDEX] * len(extra_ids or []) if batch.labels[b] else None
        prompt = list(batch.suffix_ids[b][: batch.prompt_lens[b]])
        n_src = sum(1 for t in prompt if t == self.evi_token_id)
        new_ids, new_labels = expand_evidence(ids, self.evi_token_id, bins, self.first_temporal_id, labels)
        new_prompt, _ = expand_evidence(prompt, self.evi_token_id, bins[:n_src], self.first_temporal_id)
        return new_ids, new_labels, len(new_prompt)

    def sequence(
        self,
        batch: D2VLMBatch,
        b: int,
        video_tokens: torch.Tensor,
        extra_ids: list[int] | None = None,
        extra_spans_s: list | None = None,
    ) -> GVLSequence:
        """Lay sample ``b`` out as ``[prefix][video tokens][suffix]`` embeddings and labels."""
        device = self.device
        suffix_ids, suffix_labels, prompt_len = self.temporal_suffix(batch, b, extra_ids, extra_spans_s)
        prefix = self.embed(torch.tensor(batch.prefix_ids[b], dtype=torch.long, device=device))  # [P, D]
        suffix = self.embed(torch.tensor(suffix_ids, dtype=torch.long, device=device))  # [S, D]
        embeds = torch.cat([prefix, video_tokens.to(device, self.dtype), suffix], dim=0)  # [L, D]
        labels = torch.full((embeds.shape[0],), IGNORE_INDEX, dtype=torch.long, device=device)
        if suffix_labels is not None:
            labels[embeds.shape[0] - len(suffix_ids) :] = torch.tensor(suffix_labels, dtype=torch.long, device=device)
        return GVLSequence(embeds, labels, suffix_ids, prompt_len)

    def forward(self, batch: D2VLMBatch) -> D2VLMOutput:
        """Teacher-forced forward over right-padded sequences (training and scoring).

        Returns:
            :class:`~d2vlm_ray.model.d2vlm.D2VLMOutput` whose logits and labels cover whole
            sequences ``[B, L, ...]`` and whose evidence lists are empty (no grounding heads).
        """
        if any(not labels for labels in batch.labels):
            raise ValueError("responses: the training forward needs a response for every sample")
        self.check_context(batch)
        video = self.compress(batch)
        seqs = [self.sequence(batch, b, video[b]) for b in range(batch.size)]
        width = max(s.embeds.shape[0] for s in seqs)
        embeds = torch.zeros(batch.size, width, seqs[0].embeds.shape[-1], device=self.device, dtype=self.dtype)
        labels = torch.full((batch.size, width), IGNORE_INDEX, dtype=torch.long, device=self.device)
        mask = torch.zeros(batch.size, width, dtype=torch.long, device=self.device)
        for b, seq in enumerate(seqs):
            n = seq.embeds.shape[0]
            embeds[b, :n], labels[b, :n], mask[b, :n] = seq.embeds, seq.labels, 1
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # [B, L, V]
        return D2VLMOutput(logits, labels, [], [], [])
