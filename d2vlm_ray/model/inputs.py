"""Turn questions, responses, spans and frame features into one padded model batch.

This is the collator of the model core: it tokenizes chunk-wise around ``<image>``,
masks the prompt out of the LM labels, converts spans from seconds to frame indices with
each video's timestamps, and validates everything a user can get wrong with a
``ValueError`` that names the field, before any tensor reaches torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from d2vlm_ray.model.grounding import SpanStats, clean_spans_s, spans_s_to_frame_pos, spans_s_to_idx
from d2vlm_ray.model.tokenizer import TokenIds, tokenize_prompt, tokenize_response
from d2vlm_ray.types import SpanIdx, SpanS

IGNORE_INDEX = -100


@dataclass
class D2VLMBatch:
    """A padded batch; per-sample lists have length B.

    Attributes:
        patches: Frame-encoder features per sample, ``[F_i, P, C]``.
        qformer_ids: Question ids for the Q-Former, ``[B, L]``.
        qformer_mask: 1 for real question ids, ``[B, L]``.
        prefix_ids: Ids before the frames, per sample.
        suffix_ids: Ids after the frames (question, header, and response when training).
        labels: LM labels aligned with ``suffix_ids`` (prompt = -100), or empty lists.
        prompt_lens: How many of ``suffix_ids`` belong to the prompt, per sample.
        src_spans_idx: Frame spans of the question-side ``<evi>`` tokens, in order.
        evi_spans_idx: Frame spans of the response's ``<evi>`` tokens, in order (the n
            event spans twice: grounding part, then answer part).
        evi_spans_pos: The spans of ``evi_spans_idx`` as unrounded frame positions
            (:func:`~d2vlm_ray.model.grounding.spans_s_to_frame_pos`), in the same order;
            the FPO log-likelihood's soft targets use these, as the official code does.
        timestamps_s: Presentation time of every sampled frame, per sample.
        durations_s: Video durations.
        span_stats: How many spans were clamped or reordered.
    """

    patches: list[torch.Tensor]
    qformer_ids: torch.Tensor
    qformer_mask: torch.Tensor
    prefix_ids: list[list[int]]
    suffix_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lens: list[int]
    src_spans_idx: list[list[SpanIdx]]
    evi_spans_idx: list[list[SpanIdx]]
    timestamps_s: list[np.ndarray]
    durations_s: list[float]
    span_stats: SpanStats = field(default_factory=SpanStats)
    evi_spans_pos: list[list[tuple[float, float]]] = field(default_factory=list)
    src_spans_s: list[list[SpanS]] = field(default_factory=list)
    evi_spans_s: list[list[SpanS]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Batch size B."""
        return len(self.patches)


def _check_len(name: str, values: Sequence | None, batch: int) -> None:
    if values is not None and len(values) != batch:
        raise ValueError(f"{name}: {len(values)} entries for a batch of {batch} questions")


def build_batch(
    tokenizer: PreTrainedTokenizerBase,
    qformer_tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    patches: Sequence[torch.Tensor],
    timestamps_s: Sequence[np.ndarray | Sequence[float]],
    durations_s: Sequence[float],
    *,
    responses: Sequence[str] | None = None,
    spans_s: Sequence[Sequence[SpanS]] | None = None,
    src_spans_s: Sequence[Sequence[SpanS]] | None = None,
    max_text_tokens: int = 256,
    max_context: int | None = None,
) -> D2VLMBatch:
    """Build a :class:`D2VLMBatch` for training (with responses) or generation (without).

    Args:
        tokenizer: The LLM tokenizer (must know ``<evi>``, ``</evi>``, ``<|end|>``).
        qformer_tokenizer: The Q-Former's WordPiece tokenizer.
        questions: One question per sample; ``<evi>`` marks question-side spans.
        patches: Frame-encoder features ``[F_i, P, C]`` per sample.
        timestamps_s: Presentation times ``[F_i]`` per sample.
        durations_s: Video durations per sample.
        responses: Target responses with ``<evi>`` placeholders (training only).
        spans_s: The n event spans of each response; the response must hold 2n ``<evi>``.
        src_spans_s: One span per question-side ``<evi>``.
        max_text_tokens: Q-Former question tokens kept (left truncation).
        max_context: If given, prompts (plus responses) longer than this raise.

    Raises:
        ValueError: On mismatched list lengths, empty videos, bad spans, a wrong number of
            ``<evi>`` tokens, or a sequence longer than ``max_context``; the message names
            the field.
    """
    batch = len(questions)
    if batch == 0:
        raise ValueError("questions: the batch is empty")
    for name, values in (
        ("patches", patches),
        ("timestamps_s", timestamps_s),
        ("durations_s", durations_s),
        ("responses", responses),
        ("spans_s", spans_s),
        ("src_spans_s", src_spans_s),
    ):
        _check_len(name, values, batch)
    ids = TokenIds.from_tokenizer(tokenizer)
    stats = SpanStats()
    prefix_ids, suffix_ids, labels, prompt_lens = [], [], [], []
    src_idx_all, evi_idx_all, evi_pos_all, ts_all = [], [], [], []
    src_s_all: list[list[SpanS]] = []
    evi_s_all: list[list[SpanS]] = []
    for i, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"questions[{i}]: the question is empty")
        feats = patches[i]
        if feats.ndim != 3 or feats.shape[0] == 0:
            raise ValueError(f"patches[{i}]: expected [frames > 0, patches, width], got {tuple(feats.shape)}")
        ts = np.asarray(timestamps_s[i], dtype=np.float64)
        if ts.shape != (feats.shape[0],):
            raise ValueError(f"timestamps_s[{i}]: {ts.shape[0] if ts.ndim else 0} times for {feats.shape[0]} frames")
        prompt = tokenize_prompt(tokenizer, question)
        n_src = sum(1 for t in prompt.suffix_ids if t == ids.evi)
        src = list(src_spans_s[i]) if src_spans_s is not None else []
        if n_src != len(src):
            raise ValueError(f"src_spans_s[{i}]: {len(src)} spans for {n_src} <evi> tokens in the question")
        src_clean = clean_spans_s(src, ts, durations_s[i], f"src_spans_s[{i}]", stats)
        src_idx = spans_s_to_idx(src_clean, ts, durations_s[i], f"src_spans_s[{i}]")
        suffix = list(prompt.suffix_ids)
        label = [IGNORE_INDEX] * len(suffix)
        evi_idx: list[SpanIdx] = []
        evi_pos: list[tuple[float, float]] = []
        evi_s: list[SpanS] = []
        if responses is not None:
            response_ids = tokenize_response(tokenizer, responses[i])
            n_evi = sum(1 for t in response_ids if t == ids.evi)
            events = list(spans_s[i]) if spans_s is not None else []
            if n_evi != 2 * len(events):
                raise ValueError(
                    f"spans_s[{i}]: {len(events)} spans need {2 * len(events)} <evi> tokens in the response "
                    f"(n before </evi>, n in the answer), found {n_evi}"
                )
            events_clean = clean_spans_s(events, ts, durations_s[i], f"spans_s[{i}]", stats)
            event_idx = spans_s_to_idx(events_clean, ts, durations_s[i], f"spans_s[{i}]")
            evi_idx = event_idx + event_idx  # grounding-part copies, then answer-part copies
            evi_s = events_clean + events_clean
            event_pos = spans_s_to_frame_pos(events, ts)
            evi_pos = event_pos + event_pos
            suffix += response_ids
            label += response_ids
        total = len(prompt.prefix_ids) + feats.shape[0] + len(suffix)
        if max_context is not None and total > max_context:
            raise ValueError(
                f"questions[{i}]: {total} tokens ({feats.shape[0]} frames + text) exceed the model's "
                f"context of {max_context}"
            )
        prefix_ids.append(prompt.prefix_ids)
        suffix_ids.append(suffix)
        labels.append(label if responses is not None else [])
        prompt_lens.append(len(prompt.suffix_ids))
        src_idx_all.append(src_idx)
        evi_idx_all.append(evi_idx)
        evi_pos_all.append(evi_pos)
        src_s_all.append(src_clean)
        evi_s_all.append(evi_s)
        ts_all.append(ts)
    enc = qformer_tokenizer(
        list(questions),
        padding="longest",
        truncation=True,
        max_length=max_text_tokens,
        return_tensors="pt",
    )
    return D2VLMBatch(
        patches=list(patches),
        qformer_ids=enc["input_ids"],
        qformer_mask=enc["attention_mask"],
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        labels=labels,
        prompt_lens=prompt_lens,
        src_spans_idx=src_idx_all,
        evi_spans_idx=evi_idx_all,
        timestamps_s=ts_all,
        durations_s=[float(d) for d in durations_s],
        span_stats=stats,
        evi_spans_pos=evi_pos_all,
        src_spans_s=src_s_all,
        evi_spans_s=evi_s_all,
    )
