"""The D2VLM module: frame tokens spliced into Phi-3, grounding heads, ``<evi>`` injection.

Shapes use: B batch, F frames, P patches per frame, C patch width, D LLM width,
S suffix tokens, E evidence tokens, V vocabulary.

A sequence is ``[prefix ids][F frame tokens][suffix ids]``: the prefix is the system turn
and user header, the suffix the question, assistant header and (in training) the
response. The LLM runs in two calls that share one KV cache:

1. the prefix and frames (left-padded across the batch), which yields the layer-
   ``inject_layer_idx`` frame states that ``<evi>`` tokens carry and the frame keys of the
   grounding head; frames never see later text, so these equal the states of one full
   pass (spec §3.2);
2. the suffix (right-padded), with each ``<evi>`` embedding shifted by its event's
   features, continuing from the cache.

The module holds no per-request state: everything a request needs lives in the values
these methods return, so one model serves concurrent requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2VisionModel, DynamicCache, Phi3ForCausalLM

from d2vlm_ray.model.compressor import FrameCompressor
from d2vlm_ray.model.inputs import D2VLMBatch
from d2vlm_ray.model.llm_host import LLMHost
from d2vlm_ray.model.masks import build_attention_mask
from d2vlm_ray.types import SpanIdx


def grounding_head(width: int) -> nn.Sequential:
    """LN → Linear(D, D/2) → GELU → Linear(D/2, D), the official frame/evidence head."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width))


@dataclass
class LLMState:
    """The LLM's running state for a batch: KV cache plus what the mask and RoPE need.

    Attributes:
        cache: Keys and values of every column so far.
        key_valid: ``[B, K]`` True for real tokens, False for padding columns.
        next_pos: ``[B]`` RoPE position of each sample's next token.
        frame_start: ``[B]`` column of the first frame token.
        frame_count: ``[B]`` frames per sample.
    """

    cache: DynamicCache
    key_valid: torch.Tensor
    next_pos: torch.Tensor
    frame_start: torch.Tensor
    frame_count: torch.Tensor


@dataclass
class PrefixResult:
    """What the prefix pass yields per sample.

    Attributes:
        state: The LLM state after the frames.
        frame_tokens: Compressed frame tokens (LLM inputs), ``[F_i, D]`` each.
        frame_states: Layer-``inject_layer_idx`` frame states, ``[F_i, D]`` each.
        frame_keys: Grounding-head frame keys, ``[F_i, D]`` each.
        key_states: Layer-``key_layer_idx`` frame states the frame head reads, ``[F_i, D]`` each.
    """

    state: LLMState
    frame_tokens: list[torch.Tensor]
    frame_states: list[torch.Tensor]
    frame_keys: list[torch.Tensor]
    key_states: list[torch.Tensor]


@dataclass
class SuffixResult:
    """Outputs of a suffix pass, ``[B, S, ...]`` with right padding.

    Attributes:
        logits: Next-token logits ``[B, S, V]``.
        ground_hidden: Hidden states the grounding heads read, ``[B, S, D]``.
        valid: ``[B, S]`` True for real tokens.
    """

    logits: torch.Tensor
    ground_hidden: torch.Tensor
    valid: torch.Tensor


@dataclass
class D2VLMOutput:
    """Training forward outputs; per-sample lists have length B.

    Attributes:
        logits: ``[B, S, V]`` over the suffix positions.
        labels: ``[B, S]`` LM labels (-100 where no loss).
        evidence_logits: Scores ``e·f/√D`` of each response ``<evi>`` against each frame, ``[E_i, F_i]``.
        evidence_queries: Evidence-head vectors of each response ``<evi>``, ``[E_i, D]``.
        evidence_spans_idx: Target span of each response ``<evi>``, ``[E_i, 2]``.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    evidence_logits: list[torch.Tensor]
    evidence_queries: list[torch.Tensor]
    evidence_spans_idx: list[torch.Tensor]


@dataclass
class HeadInputs:
    """What the two grounding heads read for one sample's response ``<evi>`` tokens.

    Attributes:
        query_states: Layer-``ground_layer_idx`` states before each ``<evi>``, ``[E, D]``.
        key_states: Layer-``key_layer_idx`` frame states, ``[F, D]``.
        spans_idx: Target span of each ``<evi>``, ``[E, 2]``.
    """

    query_states: torch.Tensor
    key_states: torch.Tensor
    spans_idx: torch.Tensor


class D2VLM(LLMHost):
    """Temporally grounded video LLM with evidence tokens (D2VLM, ICCV 2025).

    Args:
        vision: Frozen frame encoder (patch features out).
        compressor: Q-Former plus aggregator, one LLM token per frame.
        llm: Phi-3 causal LM (eager attention); may be wrapped by peft.
        evi_token_id: Id of ``<evi>``.
        inject_layer_idx: ``hidden_states`` index averaged into ``<evi>`` embeddings.
        ground_layer_idx: ``hidden_states`` index read by the grounding heads.
        key_layer_idx: ``hidden_states`` index of the frame states the frame head reads
            (None = ``ground_layer_idx``, the official layout).
        bidirectional_frames: Frame tokens attend to each other both ways.
        evidence_injection: Add event features to ``<evi>`` embeddings.
        alpha: Base of the soft grounding targets the losses score against.
        span_threshold: Fraction of the max frame probability kept when decoding a span.
        pretrained_vocab_size: Vocabulary rows that came from pretrained weights (0 = none);
            the trainable policy may train only the rows after them.
    """

    family = "d2vlm"

    def __init__(
        self,
        vision: Blip2VisionModel,
        compressor: FrameCompressor,
        llm: Phi3ForCausalLM,
        *,
        evi_token_id: int,
        inject_layer_idx: int,
        ground_layer_idx: int,
        key_layer_idx: int | None = None,
        bidirectional_frames: bool = True,
        evidence_injection: bool = True,
        alpha: float = 2.0,
        span_threshold: float = 0.6,
        pretrained_vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.compressor = compressor
        self.llm = llm
        width = self.causal_lm.config.hidden_size
        self.frm_head = grounding_head(width)
        self.evi_head = grounding_head(width)
        self.evi_token_id = evi_token_id
        self.inject_layer_idx = inject_layer_idx
        self.ground_layer_idx = ground_layer_idx
        self.key_layer_idx = ground_layer_idx if key_layer_idx is None else key_layer_idx
        self.bidirectional_frames = bidirectional_frames
        self.evidence_injection = evidence_injection
        self.alpha = alpha
        self.span_threshold = span_threshold
        self.pretrained_vocab_size = pretrained_vocab_size
        self.score_scale = 1.0 / math.sqrt(width)

    def compress(self, batch: D2VLMBatch) -> list[torch.Tensor]:
        """Question-conditioned frame tokens per sample, ``[F_i, D]``.

        All frames of the batch go through the Q-Former in one call, each frame paired
        with its own sample's question.
        """
        counts = [p.shape[0] for p in batch.patches]
        patches = torch.cat(batch.patches, dim=0).to(self.device, self.compressor.qformer_ln.weight.dtype)
        owner = torch.repeat_interleave(torch.arange(batch.size), torch.tensor(counts))
        text_ids = batch.qformer_ids[owner].to(self.device)  # [ΣF, L]
        text_mask = batch.qformer_mask[owner].to(self.device)
        tokens = self.compressor(patches, text_ids, text_mask).to(self.dtype)  # [ΣF, D]
        return list(torch.split(tokens, counts, dim=0))

    def run_llm(
        self,
        embeds: torch.Tensor,
        valid: torch.Tensor,
        state: LLMState,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], LLMState]:
        """Run the LLM over new columns, appending them to ``state``'s cache.

        Args:
            embeds: ``[B, N, D]`` input embeddings of the new columns.
            valid: ``[B, N]`` True for real tokens.
            state: State before these columns (its cache is extended in place).
            positions: ``[B, N]`` RoPE positions of the new columns.

        Returns:
            Logits ``[B, N, V]``, all hidden states (index 0 = embeddings), and the new state.
        """
        key_valid = torch.cat([state.key_valid, valid], dim=1)
        mask = build_attention_mask(
            key_valid, embeds.shape[1], state.frame_start, state.frame_count, self.bidirectional_frames, embeds.dtype
        )
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        next_pos = state.next_pos + valid.long().sum(dim=1)
        new_state = LLMState(out.past_key_values, key_valid, next_pos, state.frame_start, state.frame_count)
        return out.logits, out.hidden_states, new_state

    def check_context(self, batch: D2VLMBatch, extra_tokens: int = 0) -> None:
        """Raise ``ValueError`` naming the sample if a sequence would exceed the LLM's context.

        Args:
            batch: The batch (prefix, frames and suffix per sample).
            extra_tokens: Tokens still to be generated (``max_new_tokens``).
        """
        limit = self.causal_lm.config.max_position_embeddings
        for i, (prefix, patches, suffix) in enumerate(zip(batch.prefix_ids, batch.patches, batch.suffix_ids)):
            total = len(prefix) + patches.shape[0] + len(suffix) + extra_tokens
            if total > limit:
                raise ValueError(
                    f"questions[{i}]: {total} tokens ({patches.shape[0]} frames, {len(prefix) + len(suffix)} text, "
                    f"{extra_tokens} to generate) exceed the model's context of {limit}"
                )

    def prefill_prefix(self, batch: D2VLMBatch, frame_tokens: list[torch.Tensor]) -> PrefixResult:
        """Run the system turn, user header and frames, left-padded to a common length."""
        device, dtype = self.device, self.dtype
        lengths = [len(ids) + ft.shape[0] for ids, ft in zip(batch.prefix_ids, frame_tokens)]
        width = max(lengths)
        embeds = torch.zeros(batch.size, width, frame_tokens[0].shape[-1], device=device, dtype=dtype)
        valid = torch.zeros(batch.size, width, dtype=torch.bool, device=device)
        for b, (ids, ft) in enumerate(zip(batch.prefix_ids, frame_tokens)):
            text = self.embed(torch.tensor(ids, device=device, dtype=torch.long))
            row = torch.cat([text, ft], dim=0)  # [P_b, D]
            embeds[b, width - row.shape[0] :] = row
            valid[b, width - row.shape[0] :] = True
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        counts = torch.tensor([ft.shape[0] for ft in frame_tokens], device=device)
        empty = LLMState(
            cache=DynamicCache(),
            key_valid=torch.zeros(batch.size, 0, dtype=torch.bool, device=device),
            next_pos=torch.zeros(batch.size, dtype=torch.long, device=device),
            frame_start=width - counts,
            frame_count=counts,
        )
        _, hidden, state = self.run_llm(embeds, valid, empty, positions)
        inject_h, key_h = hidden[self.inject_layer_idx], hidden[self.key_layer_idx]
        frame_states = [inject_h[b, width - n :] for b, n in enumerate(counts.tolist())]
        key_states = [key_h[b, width - n :] for b, n in enumerate(counts.tolist())]
        frame_keys = [self.frm_head(k) for k in key_states]
        return PrefixResult(state, frame_tokens, frame_states, frame_keys, key_states)

    def evidence_vector(self, frame_states: torch.Tensor, span_idx: SpanIdx) -> torch.Tensor:
        """Mean of ``frame_states`` over the closed span, ``[D]``; the span is clamped to the video."""
        last = frame_states.shape[0] - 1
        first, stop = sorted((min(max(span_idx[0], 0), last), min(max(span_idx[1], 0), last)))
        return frame_states[first : stop + 1].mean(dim=0)

    def embed_suffix(
        self,
        suffix_ids: list[list[int]],
        prompt_lens: list[int],
        src_spans_idx: list[list[SpanIdx]],
        evi_spans_idx: list[list[SpanIdx]],
        prefix: PrefixResult,
        inject: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded suffix embeddings with ``<evi>`` injection.

        Question-side ``<evi>`` tokens (before ``prompt_lens[b]``) get the mean of the frame
        *tokens* over their span; response ``<evi>`` tokens get the mean of the layer-
        ``inject_layer_idx`` frame states over theirs (spec §2.4).

        Returns:
            Embeddings ``[B, S, D]`` and validity ``[B, S]``.
        """
        device = self.device
        width = max(len(ids) for ids in suffix_ids)
        batch = len(suffix_ids)
        ids = torch.full((batch, width), 0, dtype=torch.long, device=device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for b, row in enumerate(suffix_ids):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            valid[b, : len(row)] = True
        embeds = self.embed(ids)  # [B, S, D]
        if not (inject and self.evidence_injection):
            return embeds, valid
        additions = torch.zeros_like(embeds)
        for b, row in enumerate(suffix_ids):
            positions = [p for p, t in enumerate(row) if t == self.evi_token_id]
            src_pos = [p for p in positions if p < prompt_lens[b]]
            resp_pos = [p for p in positions if p >= prompt_lens[b]]
            for p, span in zip(src_pos, src_spans_idx[b]):
                additions[b, p] = self.evidence_vector(prefix.frame_tokens[b], span)
            for p, span in zip(resp_pos, evi_spans_idx[b]):
                additions[b, p] = self.evidence_vector(prefix.frame_states[b], span)
        return embeds + additions, valid

    def run_suffix(
        self, prefix_state: LLMState, embeds: torch.Tensor, valid: torch.Tensor
    ) -> tuple[SuffixResult, LLMState]:
        """Run right-padded suffix embeddings after the prefix."""
        positions = prefix_state.next_pos[:, None] + (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        logits, hidden, state = self.run_llm(embeds, valid, prefix_state, positions)
        return SuffixResult(logits, hidden[self.ground_layer_idx], valid), state

    def evidence_scores(self, query_hidden: torch.Tensor, frame_keys: torch.Tensor) -> torch.Tensor:
        """Grounding logits ``e·f/√D`` for query hidden states ``[E, D]`` against keys ``[F, D]`` → ``[E, F]``."""
        return self._score(self.evi_head(query_hidden), frame_keys)

    def _score(self, queries: torch.Tensor, frame_keys: torch.Tensor) -> torch.Tensor:
        return (queries @ frame_keys.transpose(0, 1)) * self.score_scale  # [E, F]

    def response_evidence(
        self, suffix_ids: list[int], prompt_len: int, ground_hidden: torch.Tensor, frame_keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evidence queries and grounding logits of one sequence's response ``<evi>`` tokens.

        Each query is read at the position before its ``<evi>`` (:meth:`_query_positions`).

        Args:
            suffix_ids: The sequence's suffix ids.
            prompt_len: How many of them belong to the prompt.
            ground_hidden: Grounding-layer hidden states of the suffix, ``[S, D]``.
            frame_keys: The sequence's frame keys, ``[F, D]``.

        Returns:
            Queries ``[E, D]`` and logits ``[E, F]``.
        """
        queries = self.evi_head(ground_hidden[self._query_positions(suffix_ids, prompt_len, ground_hidden.device)])
        return queries, self._score(queries, frame_keys)

    def _teacher_forced(self, batch: D2VLMBatch) -> tuple[PrefixResult, SuffixResult]:
        """Prefix and suffix passes over prompts and responses, with ``<evi>`` injection."""
        if any(not labels for labels in batch.labels):
            raise ValueError("responses: the training forward needs a response for every sample")
        self.check_context(batch)
        frame_tokens = self.compress(batch)
        prefix = self.prefill_prefix(batch, frame_tokens)
        embeds, valid = self.embed_suffix(
            batch.suffix_ids, batch.prompt_lens, batch.src_spans_idx, batch.evi_spans_idx, prefix, inject=True
        )
        suffix, _ = self.run_suffix(prefix.state, embeds, valid)
        return prefix, suffix

    def _query_positions(self, suffix_ids: list[int], prompt_len: int, device: torch.device) -> torch.Tensor:
        """Suffix positions whose states query the grounding head: the one *before* each response
        ``<evi>`` (its next-token prediction is that ``<evi>``, spec §2.1); question-side ``<evi>``
        (before ``prompt_len``) are not grounded."""
        pos = [p - 1 for p, t in enumerate(suffix_ids) if t == self.evi_token_id and p >= prompt_len]
        return torch.tensor(pos, dtype=torch.long, device=device)

    def head_inputs(self, batch: D2VLMBatch) -> list[HeadInputs]:
        """The grounding heads' inputs per sample, from a teacher-forced pass without gradients.

        What a head-only fit (:mod:`d2vlm_ray.train.head_warmup`) trains on: with everything
        but the heads frozen, the heads' inputs do not change, so one pass serves every update.
        """
        with torch.no_grad():
            prefix, suffix = self._teacher_forced(batch)
        out = []
        for b in range(batch.size):
            pos = self._query_positions(batch.suffix_ids[b], batch.prompt_lens[b], self.device)
            out.append(
                HeadInputs(
                    query_states=suffix.ground_hidden[b, pos].float(),  # [E, D]
                    key_states=prefix.key_states[b].float(),  # [F, D]
                    spans_idx=torch.tensor(batch.evi_spans_idx[b], dtype=torch.long).reshape(-1, 2),
                )
            )
        return out

    def forward(self, batch: D2VLMBatch) -> D2VLMOutput:
        """Teacher-forced forward over prompts and responses (training and scoring)."""
        prefix, suffix = self._teacher_forced(batch)
        labels = torch.full(suffix.valid.shape, -100, dtype=torch.long, device=self.device)
        ev_logits, ev_queries, ev_spans = [], [], []
        for b, row in enumerate(batch.labels):
            labels[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=self.device)
            queries, scores = self.response_evidence(
                batch.suffix_ids[b], batch.prompt_lens[b], suffix.ground_hidden[b], prefix.frame_keys[b]
            )
            ev_queries.append(queries)  # [E, D]
            ev_logits.append(scores)  # [E, F]
            ev_spans.append(torch.tensor(batch.evi_spans_idx[b], dtype=torch.long, device=self.device).reshape(-1, 2))
        return D2VLMOutput(suffix.logits, labels, ev_logits, ev_queries, ev_spans)
