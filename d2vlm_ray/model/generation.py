"""Stateless two-phase decoding over an explicit :class:`DecodeState`.

D2VLM's response is ``n × <evi>``, ``</evi>``, then the answer with n interleaved
``<evi>``. At each step where the chosen token is ``<evi>``, the evidence head scores
every frame from the hidden state that predicted it, the official span rule picks a
span, and the ``<evi>`` fed back next gets the mean of the layer-``inject_layer_idx``
frame states over that span (spec §2.3–2.4).

Everything a request needs — KV cache, frame keys, frame states, picked spans — lives in
the state value, never on the module, so one model serves many requests at once, and a
batch of videos/questions decodes together with padding. ``ground`` stops after
``</evi>``; ``answer`` continues from a :class:`~d2vlm_ray.types.GroundingResult` without
re-running the compressor; ``generate`` does both in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.model.d2vlm import D2VLM, LLMState, PrefixResult
from d2vlm_ray.model.grounding import decode_span, span_idx_to_s
from d2vlm_ray.model.inputs import D2VLMBatch, build_batch
from d2vlm_ray.model.tokenizer import TokenIds, detokenize
from d2vlm_ray.types import GroundingResult, SpanIdx, SpanS


@dataclass
class DecodeState:
    """Per-request decoding state for a batch (a value; the model keeps none).

    Attributes:
        llm: KV cache, key validity and RoPE positions.
        prefix: Frame tokens, layer-``inject`` frame states and frame keys per sample.
        timestamps_s: Frame presentation times per sample.
        durations_s: Video durations.
        last_logits: Next-token logits of each sample's last position ``[B, V]``.
        last_hidden: Grounding-layer hidden state of each sample's last position ``[B, D]``.
        seen_ids: Every id each sample has seen (prompt and generated), for repetition penalty.
        tokens: Generated ids per sample.
        spans_idx: Span of each generated ``<evi>`` per sample.
        probs: Frame probabilities of each generated ``<evi>``, ``[F]`` each.
        evidence: Vector added to each generated ``<evi>``, ``[D]`` each.
        finished: Whether each sample has emitted its stop token.
    """

    llm: LLMState
    prefix: PrefixResult
    timestamps_s: list[np.ndarray]
    durations_s: list[float]
    last_logits: torch.Tensor
    last_hidden: torch.Tensor
    seen_ids: list[list[int]]
    tokens: list[list[int]] = field(default_factory=list)
    spans_idx: list[list[SpanIdx]] = field(default_factory=list)
    probs: list[list[torch.Tensor]] = field(default_factory=list)
    evidence: list[list[torch.Tensor]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One sample's generated response.

    Attributes:
        token_ids: Generated ids (including any forced grounding ids).
        spans_idx: Frame span of each ``<evi>`` in ``token_ids``.
        spans_s: The same spans in seconds.
        probs: Frame probabilities per ``<evi>``, ``[E, F]``.
        text: Detokenized text, each ``<evi>`` shown as ``"s - e"`` in seconds.
        truncated: True if ``max_new_tokens`` ran out before the stop token.
        warnings: What may make this result wrong that its fields alone do not show (e.g. a
            Grounded-VideoLLM temporal marker that formed no span).
    """

    token_ids: list[int]
    spans_idx: list[SpanIdx]
    spans_s: list[SpanS]
    probs: torch.Tensor
    text: str
    truncated: bool
    warnings: list[str] = field(default_factory=list)


def _last_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pick ``x[b, last valid index of b]`` for right-padded ``x`` ``[B, S, ...]``."""
    last = valid.long().sum(dim=1) - 1  # [B]
    return x[torch.arange(x.shape[0], device=x.device), last]


@torch.no_grad()
def prefill(
    model: D2VLM,
    batch: D2VLMBatch,
    settings: DecodeSettings,
    *,
    frame_tokens: list[torch.Tensor] | None = None,
    forced_ids: list[list[int]] | None = None,
    forced_spans_idx: list[list[SpanIdx]] | None = None,
) -> DecodeState:
    """Run the prompt (and optionally forced response ids) and return the decode state.

    Args:
        model: The model.
        batch: A batch built without responses.
        settings: Decoding settings (``inject_evidence`` applies to forced ``<evi>`` too).
        frame_tokens: Precomputed frame tokens ``[F_i, D]`` (skip the compressor).
        forced_ids: Response ids to feed before decoding (e.g. a grounding part).
        forced_spans_idx: One span per ``<evi>`` in ``forced_ids``.
    """
    model.check_context(batch, extra_tokens=settings.max_new_tokens + sum(len(f) for f in forced_ids or [[]]))
    if frame_tokens is None:
        frame_tokens = model.compress(batch)
    frame_tokens = [ft.to(model.device, model.dtype) for ft in frame_tokens]
    prefix = model.prefill_prefix(batch, frame_tokens)
    forced_ids = forced_ids or [[] for _ in range(batch.size)]
    forced_spans_idx = forced_spans_idx or [[] for _ in range(batch.size)]
    suffix_ids = [list(s) + list(f) for s, f in zip(batch.suffix_ids, forced_ids)]
    embeds, valid = model.embed_suffix(
        suffix_ids, batch.prompt_lens, batch.src_spans_idx, forced_spans_idx, prefix, inject=settings.inject_evidence
    )
    out, llm_state = model.run_suffix(prefix.state, embeds, valid)
    state = DecodeState(
        llm=llm_state,
        prefix=prefix,
        timestamps_s=batch.timestamps_s,
        durations_s=batch.durations_s,
        last_logits=_last_valid(out.logits, valid).float(),
        last_hidden=_last_valid(out.ground_hidden, valid),
        seen_ids=[list(p) + s for p, s in zip(batch.prefix_ids, suffix_ids)],
        tokens=[list(f) for f in forced_ids],
        spans_idx=[list(s) for s in forced_spans_idx],
        probs=[[] for _ in range(batch.size)],
        evidence=[[] for _ in range(batch.size)],
        finished=[False] * batch.size,
    )
    return state


def choose_tokens(
    logits: torch.Tensor,
    seen_ids: list[list[int]],
    settings: DecodeSettings,
    exempt_ids: set[int],
    generator: torch.Generator,
) -> list[int]:
    """Greedy or sampled next token per sample, after the repetition penalty.

    Args:
        logits: Next-token logits ``[B, V]``.
        seen_ids: Every id each sample has seen so far (what the penalty applies to).
        settings: Decoding settings.
        exempt_ids: Ids that repeat by design and are never penalised (D2VLM's ``<evi>``:
            one per event, twice; Grounded-VideoLLM's temporal tokens).
        generator: Sampling generator.
    """
    logits = logits.clone()
    if settings.repetition_penalty != 1.0:
        for b, seen in enumerate(seen_ids):
            ids = torch.tensor(
                sorted({t for t in seen if t not in exempt_ids and 0 <= t < logits.shape[1]}), dtype=torch.long
            )
            if ids.numel():
                vals = logits[b, ids]
                logits[b, ids] = torch.where(
                    vals > 0, vals / settings.repetition_penalty, vals * settings.repetition_penalty
                )
    if not settings.do_sample:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > settings.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).tolist()


@torch.no_grad()
def decode(
    model: D2VLM,
    state: DecodeState,
    settings: DecodeSettings,
    token_ids: TokenIds,
    *,
    stop_ids: set[int],
) -> DecodeState:
    """Decode until every sample emits a stop id or ``settings.max_new_tokens`` steps pass."""
    settings.validate()
    generator = torch.Generator().manual_seed(settings.seed)
    device = model.device
    for _ in range(settings.max_new_tokens):
        if all(state.finished):
            break
        chosen = choose_tokens(state.last_logits, state.seen_ids, settings, {token_ids.evi}, generator)
        active = torch.tensor([not f for f in state.finished], device=device)
        feed = torch.zeros(len(chosen), 1, state.last_hidden.shape[-1], device=device, dtype=model.dtype)
        ids = []
        for b, tok in enumerate(chosen):
            if state.finished[b]:
                ids.append(token_ids.pad)
                continue
            ids.append(tok)
            state.tokens[b].append(tok)
            state.seen_ids[b].append(tok)
            if tok == token_ids.evi:
                # The span comes from the hidden state that predicted this <evi>.
                logits = model.evidence_scores(state.last_hidden[b : b + 1], state.prefix.frame_keys[b])[0]
                probs = torch.sigmoid(logits.float())
                span = decode_span(probs, model.span_threshold)
                state.spans_idx[b].append(span)
                state.probs[b].append(probs.cpu())
                if settings.inject_evidence and model.evidence_injection:
                    vec = model.evidence_vector(state.prefix.frame_states[b], span)
                    state.evidence[b].append(vec.cpu())
                    feed[b, 0] = vec
            if tok in stop_ids:
                state.finished[b] = True
        embeds = model.embed(torch.tensor(ids, device=device)[:, None]) + feed  # [B, 1, D]
        positions = state.llm.next_pos[:, None]
        logits, hidden, state.llm = model.run_llm(embeds, active[:, None], state.llm, positions)
        state.last_logits = logits[:, -1].float()
        state.last_hidden = hidden[model.ground_layer_idx][:, -1]
    return state


def _results(state: DecodeState, tokenizer, stop_ids: set[int]) -> list[GenerationResult]:
    out = []
    for b, ids in enumerate(state.tokens):
        spans_s = [span_idx_to_s(s, state.timestamps_s[b]) for s in state.spans_idx[b]]
        probs = torch.stack(state.probs[b]) if state.probs[b] else torch.zeros(0, len(state.timestamps_s[b]))
        out.append(
            GenerationResult(
                token_ids=list(ids),
                spans_idx=list(state.spans_idx[b]),
                spans_s=spans_s,
                probs=probs,
                text=detokenize(tokenizer, ids, spans_s),
                truncated=not (ids and ids[-1] in stop_ids),
            )
        )
    return out


def stop_ids_of(tokenizer, ids: TokenIds) -> set[int]:
    """Ids that end a response: the chat template's end token and the tokenizer's EOS."""
    stops = {ids.end}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def _is_gvl(model: object) -> bool:
    """Whether ``model`` is of the Grounded-VideoLLM family, which decodes in :mod:`d2vlm_ray.model.gvl_generation`."""
    return model.family == "grounded_videollm"


def generate(model: D2VLM, tokenizer, batch: D2VLMBatch, settings: DecodeSettings) -> list[GenerationResult]:
    """Grounding and answering in one call (the official single ``generate``).

    A Grounded-VideoLLM model decodes with its own rules and returns the same result types.
    """
    if _is_gvl(model):
        from d2vlm_ray.model import gvl_generation

        return gvl_generation.generate(model, tokenizer, batch, settings)
    ids = TokenIds.from_tokenizer(tokenizer)
    stops = stop_ids_of(tokenizer, ids)
    state = decode(model, prefill(model, batch, settings), settings, ids, stop_ids=stops)
    return _results(state, tokenizer, stops)


def ground(
    model: D2VLM,
    tokenizer,
    batch: D2VLMBatch,
    questions: list[str],
    settings: DecodeSettings,
    src_spans_s: list[list[SpanS]] | None = None,
) -> list[GroundingResult]:
    """Generate the grounding part (``n × <evi>`` then ``</evi>``) for each sample.

    ``src_spans_s`` are the question-side spans the batch was built with; they travel in
    each result so :func:`answer` can rebuild the same prompt.
    """
    if _is_gvl(model):
        from d2vlm_ray.model import gvl_generation

        return gvl_generation.ground(model, tokenizer, batch, questions, settings, src_spans_s)
    ids = TokenIds.from_tokenizer(tokenizer)
    stops = stop_ids_of(tokenizer, ids) | {ids.evi_end}
    state = decode(model, prefill(model, batch, settings), settings, ids, stop_ids=stops)
    results = []
    for b in range(batch.size):
        spans_idx = list(state.spans_idx[b])
        width = state.prefix.frame_tokens[b].shape[-1]
        results.append(
            GroundingResult(
                question=questions[b],
                spans_s=[span_idx_to_s(s, state.timestamps_s[b]) for s in spans_idx],
                spans_idx=spans_idx,
                scores=torch.stack(state.probs[b]) if state.probs[b] else torch.zeros(0, len(state.timestamps_s[b])),
                token_ids=list(state.tokens[b]),
                frame_tokens=state.prefix.frame_tokens[b].detach().cpu(),
                evidence_vectors=torch.stack(state.evidence[b]) if state.evidence[b] else torch.zeros(0, width),
                timestamps_s=state.timestamps_s[b],
                duration_s=state.durations_s[b],
                src_spans_s=list(src_spans_s[b]) if src_spans_s is not None else [],
            )
        )
    return results


def answer(
    model: D2VLM,
    tokenizer,
    qformer_tokenizer,
    groundings: list[GroundingResult],
    settings: DecodeSettings,
) -> list[GenerationResult]:
    """Continue from grounding results and generate the answers with interleaved evidence.

    The compressed frame tokens (and the question-side spans) travel in each
    :class:`GroundingResult`, so the compressor never runs again; the LLM re-prefills
    prompt, frames and grounding tokens (one token per frame, cheap) and decodes the
    rest. ``max_new_tokens`` bounds the answer part.
    """
    if _is_gvl(model):
        from d2vlm_ray.model import gvl_generation

        return gvl_generation.answer(model, tokenizer, qformer_tokenizer, groundings, settings)
    ids = TokenIds.from_tokenizer(tokenizer)
    stops = stop_ids_of(tokenizer, ids)
    frame_tokens = [g.frame_tokens for g in groundings]
    batch = build_batch(
        tokenizer,
        qformer_tokenizer,
        [g.question for g in groundings],
        [ft[:, None, :] for ft in frame_tokens],
        [g.timestamps_s for g in groundings],
        [g.duration_s for g in groundings],
        src_spans_s=[list(g.src_spans_s) for g in groundings],
    )
    forced = [list(g.token_ids) for g in groundings]
    open_ids = [i for i, g in enumerate(groundings) if not (g.token_ids and g.token_ids[-1] in stops)]
    state = prefill(
        model, batch, settings, frame_tokens=frame_tokens, forced_ids=forced, forced_spans_idx=[g.spans_idx for g in groundings]
    )
    # A grounding that already ended the response (<|end|>) has nothing left to answer.
    state.finished = [i not in open_ids for i in range(len(groundings))]
    state.probs = [list(g.scores) for g in groundings]
    state = decode(model, state, settings, ids, stop_ids=stops)
    return _results(state, tokenizer, stops)
