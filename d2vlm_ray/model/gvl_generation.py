"""Decoding for Grounded-VideoLLM, returning the same result types as D2VLM's decoding.

The model writes spans as temporal-token pairs ``<s><e>``. Results are returned in the
project's family-neutral form, so serving, evaluation and the official parsers need no
second code path: each well-formed pair becomes one ``<evi>`` id in ``token_ids`` with its
span in ``spans_s``, and the text shows it as ``"s - e"`` exactly as D2VLM's detokenizer
shows an ``<evi>``. A malformed marker (a lone start, an end before its start) keeps its
raw temporal token, is shown verbatim (``<37>``) in the text, gives no span, and is named
in the result's ``warnings``: a reader sees that the output was not well formed.

Samples are decoded one at a time with a KV cache (no padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.model.generation import GenerationResult, choose_tokens, stop_ids_of
from d2vlm_ray.model.grounded_videollm import GroundedVideoLLM
from d2vlm_ray.model.grounding import spans_s_to_idx
from d2vlm_ray.model.inputs import D2VLMBatch, build_batch
from d2vlm_ray.model.temporal_tokens import collapse_to_evidence
from d2vlm_ray.model.tokenizer import TokenIds, detokenize
from d2vlm_ray.types import GroundingResult, SpanS


@torch.no_grad()
def _decode(
    model: GroundedVideoLLM, embeds: torch.Tensor, seen_ids: list[int], settings: DecodeSettings, stop_ids: set[int]
) -> list[int]:
    """Greedy or sampled ids after the prompt embeddings ``[L, D]``, until a stop id or the bound."""
    generator = torch.Generator().manual_seed(settings.seed)
    out = model.llm(inputs_embeds=embeds[None], use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()  # [1, V]
    exempt = set(model.temporal_ids)
    seen = list(seen_ids)
    generated: list[int] = []
    for _ in range(settings.max_new_tokens):
        (tok,) = choose_tokens(logits, [seen], settings, exempt, generator)
        generated.append(tok)
        seen.append(tok)
        if tok in stop_ids:
            break
        step = model.embed(torch.tensor([[tok]], device=model.device))  # [1, 1, D]
        out = model.llm(inputs_embeds=step, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return generated


def neutral_ids(
    model: GroundedVideoLLM, raw_ids: Sequence[int], duration_s: float
) -> tuple[list[int], list[SpanS], list[str]]:
    """Collapse each well-formed temporal pair of generated ids into one ``<evi>``.

    Returns:
        The ids in neutral form, the span of each ``<evi>`` in seconds, and one warning per
        malformed marker (whose raw id is kept).
    """
    neutral, parse = collapse_to_evidence(
        raw_ids, model.evi_token_id, model.first_temporal_id, model.num_temporal_tokens, duration_s
    )
    warnings = [
        f"temporal tokens: {p.kind.replace('_', ' ')} at {' '.join(f'<{b}>' for b in p.bins)}; no span was read from it"
        for p in parse.problems
    ]
    return neutral, list(parse.spans_s), warnings


def _span_scores(spans_idx: Sequence[tuple[int, int]], n_frames: int) -> torch.Tensor:
    """``[E, F]``: 1 on the frames of each span, 0 elsewhere (this family has no frame scores)."""
    scores = torch.zeros(len(spans_idx), n_frames)
    for e, (first, last) in enumerate(spans_idx):
        scores[e, first : last + 1] = 1.0
    return scores


def _result(
    tokenizer,
    ids: list[int],
    spans_s: list[SpanS],
    warnings: list[str],
    timestamps_s: np.ndarray,
    duration_s: float,
    truncated: bool,
) -> GenerationResult:
    spans_idx = spans_s_to_idx(spans_s, timestamps_s, duration_s, "generated spans")
    return GenerationResult(
        token_ids=ids,
        spans_idx=spans_idx,
        spans_s=spans_s,
        probs=_span_scores(spans_idx, len(timestamps_s)),
        text=detokenize(tokenizer, ids, spans_s),
        truncated=truncated,
        warnings=warnings,
    )


def _prompt_ids(batch: D2VLMBatch, b: int, suffix_ids: list[int]) -> list[int]:
    return list(batch.prefix_ids[b]) + list(suffix_ids)


def _decode_batch(
    model: GroundedVideoLLM, batch: D2VLMBatch, settings: DecodeSettings, stops: set[int]
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Video tokens ``[N_i, D]`` and the raw generated ids of every sample of a batch built
    without responses (one sample at a time)."""
    settings.validate()
    model.check_context(batch, extra_tokens=settings.max_new_tokens)
    video = model.compress(batch)
    raws = []
    for b in range(batch.size):
        seq = model.sequence(batch, b, video[b])
        raws.append(_decode(model, seq.embeds, _prompt_ids(batch, b, seq.suffix_ids), settings, stops))
    return video, raws


def generate(
    model: GroundedVideoLLM, tokenizer, batch: D2VLMBatch, settings: DecodeSettings
) -> list[GenerationResult]:
    """Whole responses (grounding part and answer) for a batch built without responses."""
    stops = stop_ids_of(tokenizer, TokenIds.from_tokenizer(tokenizer))
    _, raws = _decode_batch(model, batch, settings, stops)
    results = []
    for b, raw in enumerate(raws):
        ids, spans_s, warnings = neutral_ids(model, raw, batch.durations_s[b])
        truncated = not (raw and raw[-1] in stops)
        results.append(
            _result(tokenizer, ids, spans_s, warnings, batch.timestamps_s[b], batch.durations_s[b], truncated)
        )
    return results


def ground(
    model: GroundedVideoLLM,
    tokenizer,
    batch: D2VLMBatch,
    questions: list[str],
    settings: DecodeSettings,
    src_spans_s: list[list[SpanS]] | None = None,
) -> list[GroundingResult]:
    """The grounding part (spans as temporal pairs, then ``</evi>``) for each sample.

    ``frame_tokens`` of each result holds the video tokens ``[N, D]``, so answering never
    re-runs the projectors.
    """
    ids = TokenIds.from_tokenizer(tokenizer)
    stops = stop_ids_of(tokenizer, ids) | {ids.evi_end}
    video, raws = _decode_batch(model, batch, settings, stops)
    results = []
    for b, raw in enumerate(raws):
        neutral, spans_s, warnings = neutral_ids(model, raw, batch.durations_s[b])
        spans_idx = spans_s_to_idx(spans_s, batch.timestamps_s[b], batch.durations_s[b], "generated spans")
        results.append(
            GroundingResult(
                question=questions[b],
                spans_s=spans_s,
                spans_idx=spans_idx,
                scores=_span_scores(spans_idx, len(batch.timestamps_s[b])),
                token_ids=neutral,
                frame_tokens=video[b].detach().cpu(),
                evidence_vectors=torch.zeros(0, video[b].shape[-1]),
                timestamps_s=batch.timestamps_s[b],
                duration_s=batch.durations_s[b],
                src_spans_s=list(src_spans_s[b]) if src_spans_s is not None else [],
                warnings=warnings,
            )
        )
    return results


def answer(
    model: GroundedVideoLLM, tokenizer, qformer_tokenizer, groundings: list[GroundingResult], settings: DecodeSettings
) -> list[GenerationResult]:
    """Continue from grounding results (their video tokens and spans) to the answers."""
    settings.validate()
    ids = TokenIds.from_tokenizer(tokenizer)
    stops = stop_ids_of(tokenizer, ids)
    # Only the frame count of these placeholder features is read (for the timestamps check).
    batch = build_batch(
        tokenizer,
        qformer_tokenizer,
        [g.question for g in groundings],
        [torch.zeros(len(g.timestamps_s), 1, 1) for g in groundings],
        [g.timestamps_s for g in groundings],
        [g.duration_s for g in groundings],
        src_spans_s=[list(g.src_spans_s) for g in groundings],
    )
    results = []
    for b, g in enumerate(groundings):
        forced = list(g.token_ids)
        if forced and forced[-1] in stops:
            # The grounding already ended the response: nothing is left to answer.
            raw_answer: list[int] = []
        else:
            seq = model.sequence(batch, b, g.frame_tokens, extra_ids=forced, extra_spans_s=list(g.spans_s))
            raw_answer = _decode(model, seq.embeds, _prompt_ids(batch, b, seq.suffix_ids), settings, stops)
        answer_ids, answer_spans, warnings = neutral_ids(model, raw_answer, g.duration_s)
        all_ids = forced + answer_ids
        truncated = not (all_ids and all_ids[-1] in stops)
        results.append(
            _result(
                tokenizer,
                all_ids,
                list(g.spans_s) + answer_spans,
                list(g.warnings) + warnings,
                g.timestamps_s,
                g.duration_s,
                truncated,
            )
        )
    return results
