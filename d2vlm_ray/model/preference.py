"""The FPO preference forward: one video encoding, two independent response branches.

Shapes use: B pairs, F frames, S suffix tokens, V vocabulary, D LLM width, E evidence tokens.

For each pair the video is compressed and the prompt prefix (system turn, user header,
frames) is run through the LLM **once** (:meth:`D2VLM.compress`, :meth:`D2VLM.prefill_prefix`).
The prefix KV cache is then repeated along the batch dimension, so every pair owns two
rows: row ``2b`` continues with the chosen suffix (question, assistant header, chosen
response) and row ``2b + 1`` with the rejected one. Rows never attend to each other, which
is the official "special mask" mathematics (spec §4.4) without packing: both branches see
the same prompt keys, use the same position ids, and the first response token of each is
predicted from the last prompt position.

Each branch's ``<evi>`` tokens are injected with that branch's own spans, and each
branch's log-likelihood is

    log π(y) = Σ_response tokens log p(token)            (incl. the final ``<|end|>``)
             + Σ_evi Σ_frames log(y·p + (1 − y)·(1 − p) + 1e-10)

with soft targets ``y = alpha ** -d`` built from that branch's spans (grounding copies
then answer copies) as unrounded frame positions, as the official ``calculate_logps`` does
(the SFT BCE term rounds them to frames). The chosen branch also returns the tensors
:func:`d2vlm_ray.losses.sft.sft_loss` needs, so FPO's SFT regulariser comes for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from d2vlm_ray.losses.fpo import grounding_loglik, sequence_logps
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.d2vlm import D2VLM, LLMState, PrefixResult
from d2vlm_ray.model.inputs import IGNORE_INDEX, D2VLMBatch, build_batch
from d2vlm_ray.types import PreferencePair


@dataclass
class PairBatch:
    """A batch of preference pairs, tokenized; both views share prompts and videos.

    Attributes:
        chosen: The batch of prompts + chosen responses (its prefix, patches and Q-Former
            ids are what the shared video pass uses).
        rejected: The same prompts + rejected responses.
        sample_ids: Id of each pair's chosen sample.
        families: Perturbation family of each pair.
    """

    chosen: D2VLMBatch
    rejected: D2VLMBatch
    sample_ids: list[str]
    families: list[str]

    @property
    def size(self) -> int:
        """Number of pairs B."""
        return self.chosen.size


@dataclass
class PairOutput:
    """What :func:`pair_forward` returns; per-pair tensors have shape ``[B]``.

    The chosen branch's SFT tensors (``logits`` … ``evidence_spans_idx``) have the layout
    of :class:`d2vlm_ray.model.d2vlm.D2VLMOutput`, so
    ``sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries,
    out.evidence_spans_idx)`` is the chosen branch's SFT loss.

    Attributes:
        chosen_text_logp: Summed response-token log-probs of the chosen branch.
        chosen_grounding_logp: Summed soft-Bernoulli grounding log-likelihood, chosen.
        rejected_text_logp: Same as ``chosen_text_logp`` for the rejected branch.
        rejected_grounding_logp: Same as ``chosen_grounding_logp`` for the rejected branch.
        logits: Chosen rows' logits ``[B, S, V]``.
        labels: Chosen rows' LM labels ``[B, S]`` (-100 outside the response).
        evidence_logits: Chosen evidence scores, ``[E_i, F_i]`` per pair.
        evidence_queries: Chosen evidence-head vectors, ``[E_i, D]`` per pair.
        evidence_spans_idx: Chosen target spans per evidence token, ``[E_i, 2]``.
        rejected_evidence_logits: Rejected evidence scores, ``[E'_i, F_i]`` per pair.
        rejected_evidence_spans_idx: Rejected target spans, ``[E'_i, 2]`` per pair.
    """

    chosen_text_logp: torch.Tensor
    chosen_grounding_logp: torch.Tensor
    rejected_text_logp: torch.Tensor
    rejected_grounding_logp: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    evidence_logits: list[torch.Tensor]
    evidence_queries: list[torch.Tensor]
    evidence_spans_idx: list[torch.Tensor]
    rejected_evidence_logits: list[torch.Tensor]
    rejected_evidence_spans_idx: list[torch.Tensor]

    @property
    def chosen_logp(self) -> torch.Tensor:
        """``log π(y_w)`` per pair, ``[B]``."""
        return self.chosen_text_logp + self.chosen_grounding_logp

    @property
    def rejected_logp(self) -> torch.Tensor:
        """``log π(y_l)`` per pair, ``[B]``."""
        return self.rejected_text_logp + self.rejected_grounding_logp


def build_pair_batch(
    tokenizers: Tokenizers,
    pairs: Sequence[PreferencePair],
    patches: Sequence[torch.Tensor],
    timestamps_s: Sequence[np.ndarray],
    durations_s: Sequence[float],
    *,
    max_text_tokens: int = 256,
) -> PairBatch:
    """Tokenize preference pairs with their videos' features into a :class:`PairBatch`.

    Args:
        tokenizers: The model's LLM and Q-Former tokenizers.
        pairs: B preference pairs.
        patches: Frame-encoder features ``[F_i, P, C]`` of each pair's video.
        timestamps_s: Presentation times ``[F_i]`` per video.
        durations_s: Video durations.
        max_text_tokens: Q-Former question tokens kept.

    Raises:
        ValueError: On mismatched lengths, or a response whose ``<evi>`` count is not
            twice its number of spans (the message names the pair and the branch).
    """
    if not pairs:
        raise ValueError("pairs: the batch is empty")
    for name, values in (("patches", patches), ("timestamps_s", timestamps_s), ("durations_s", durations_s)):
        if len(values) != len(pairs):
            raise ValueError(f"{name}: {len(values)} entries for {len(pairs)} pairs")
    questions = [p.prompt for p in pairs]
    src = [list(p.src_spans_s) for p in pairs]
    views = {}
    for branch in ("chosen", "rejected"):
        responses = [getattr(p, f"{branch}_text") for p in pairs]
        spans = [list(getattr(p, f"{branch}_spans_s")) for p in pairs]
        try:
            views[branch] = build_batch(
                tokenizers.llm,
                tokenizers.qformer,
                questions,
                list(patches),
                list(timestamps_s),
                list(durations_s),
                responses=responses,
                spans_s=spans,
                src_spans_s=src,
                max_text_tokens=max_text_tokens,
            )
        except ValueError as exc:
            raise ValueError(f"{branch} branch: {exc}") from None
    return PairBatch(
        chosen=views["chosen"],
        rejected=views["rejected"],
        sample_ids=[p.sample_id for p in pairs],
        families=[p.family for p in pairs],
    )


def _interleave(items: Sequence) -> list:
    """``[a, b]`` → ``[a, a, b, b]``: the row order of a cache repeated with repeat_interleave(2)."""
    return [x for item in items for x in (item, item)]


def _fork_prefix(prefix: PrefixResult) -> PrefixResult:
    """Two rows per sample sharing one prefix: row 2b chosen, row 2b+1 rejected.

    The cache tensors are repeated (not re-computed), so gradients from both branches
    flow back into the single video/prefix pass.
    """
    state = prefix.state
    state.cache.batch_repeat_interleave(2)
    forked = LLMState(
        cache=state.cache,
        key_valid=state.key_valid.repeat_interleave(2, dim=0),
        next_pos=state.next_pos.repeat_interleave(2, dim=0),
        frame_start=state.frame_start.repeat_interleave(2, dim=0),
        frame_count=state.frame_count.repeat_interleave(2, dim=0),
    )
    return PrefixResult(
        forked,
        _interleave(prefix.frame_tokens),
        _interleave(prefix.frame_states),
        _interleave(prefix.frame_keys),
        _interleave(prefix.key_states),
    )


def pair_forward(model: D2VLM, batch: PairBatch) -> PairOutput:
    """Score chosen and rejected responses of every pair, encoding each video once.

    Args:
        model: The D2VLM (possibly peft-wrapped LLM inside).
        batch: From :func:`build_pair_batch`.

    The grounding log-likelihood scores against the model's own soft-target base
    (``model.alpha``, from its config).

    Returns:
        Per-branch summed log-probs and the chosen branch's SFT tensors.
    """
    chosen, rejected = batch.chosen, batch.rejected
    frame_tokens = model.compress(chosen)  # [F_i, D] per pair
    prefix = _fork_prefix(model.prefill_prefix(chosen, frame_tokens))
    suffix_ids = [row for pair in zip(chosen.suffix_ids, rejected.suffix_ids) for row in pair]
    label_rows = [row for pair in zip(chosen.labels, rejected.labels) for row in pair]
    prompt_lens = _interleave(chosen.prompt_lens)
    src_idx = _interleave(chosen.src_spans_idx)
    evi_idx = [row for pair in zip(chosen.evi_spans_idx, rejected.evi_spans_idx) for row in pair]
    evi_pos = [row for pair in zip(chosen.evi_spans_pos, rejected.evi_spans_pos) for row in pair]
    embeds, valid = model.embed_suffix(suffix_ids, prompt_lens, src_idx, evi_idx, prefix, inject=True)
    suffix, _ = model.run_suffix(prefix.state, embeds, valid)  # logits [2B, S, V]

    device = model.device
    labels = torch.full(valid.shape, IGNORE_INDEX, dtype=torch.long, device=device)  # [2B, S]
    for r, row in enumerate(label_rows):
        labels[r, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    text_logp = sequence_logps(suffix.logits, labels)  # [2B]

    ev_logits, ev_queries, ev_spans, ground_logp = [], [], [], []
    for r, row in enumerate(suffix_ids):
        queries, logits_r = model.response_evidence(row, prompt_lens[r], suffix.ground_hidden[r], prefix.frame_keys[r])
        spans_r = torch.tensor(evi_idx[r], dtype=torch.long, device=device).reshape(-1, 2)  # [E, 2]
        # The log-likelihood's targets use the unrounded spans (official calculate_logps);
        # only the SFT BCE below rounds them to frames.
        pos_r = torch.tensor(evi_pos[r], dtype=torch.float64, device=device).reshape(-1, 2)  # [E, 2]
        ev_logits.append(logits_r)
        ev_queries.append(queries)
        ev_spans.append(spans_r)
        ground_logp.append(grounding_loglik(logits_r, pos_r, model.alpha))
    ground = torch.stack(ground_logp)  # [2B]
    # A pair where one branch has no evidence tokens (e.g. the official text-only 'qwen'
    # pairs) is compared on text alone, as the official code does: otherwise the branch
    # with spans would carry a negative grounding term the other lacks.
    text_only = torch.tensor(
        [not (evi_idx[2 * b] and evi_idx[2 * b + 1]) for b in range(len(evi_idx) // 2)], device=device
    )
    ground = ground.masked_fill(text_only.repeat_interleave(2), 0.0)
    return PairOutput(
        chosen_text_logp=text_logp[0::2],
        chosen_grounding_logp=ground[0::2],
        rejected_text_logp=text_logp[1::2],
        rejected_grounding_logp=ground[1::2],
        logits=suffix.logits[0::2],
        labels=labels[0::2],
        evidence_logits=ev_logits[0::2],
        evidence_queries=ev_queries[0::2],
        evidence_spans_idx=ev_spans[0::2],
        rejected_evidence_logits=ev_logits[1::2],
        rejected_evidence_spans_idx=ev_spans[1::2],
    )
