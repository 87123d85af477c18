"""SFT loss of D2VLM (spec §2.2): tensors in, tensors out.

    L = L_LM + w_g · BCE(s, 2^-d) + w_c · L1(e_grounding, e_answer)

with ``w_g = w_c = 10``. The grounding BCE is averaged over each sample's 2n × F
(evidence token × frame) entries, the consistency L1 over each sample's elements; both
are summed over the samples that have spans and divided by their count. When no sample
in the batch has spans, both terms are a zero that still touches the heads, so every
trainable parameter stays in the graph (DeepSpeed and DDP expect that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2vlm_ray.losses.targets import soft_targets

IGNORE_INDEX = -100


@dataclass
class SFTLoss:
    """The total loss and its terms (terms are detached, for logging)."""

    total: torch.Tensor
    lm: torch.Tensor
    grounding: torch.Tensor
    consistency: torch.Tensor


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy, mean over every labelled token of the batch.

    Args:
        logits: ``[B, S, V]``; position t predicts the label at t + 1.
        labels: ``[B, S]`` with -100 where no loss is taken.
    """
    # At least float32 (bf16 logits lose too much in the log-softmax), float64 kept as is.
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    shift_labels = labels[:, 1:].reshape(-1)
    if bool((shift_labels != IGNORE_INDEX).any()):
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    return shift_logits.sum() * 0.0


def grounding_bce(evidence_logits: torch.Tensor, spans_idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean BCE of one sample's evidence logits ``[E, F]`` against soft targets ``alpha ** -d``."""
    targets = soft_targets(spans_idx, evidence_logits.shape[1], alpha).to(evidence_logits.device)
    return F.binary_cross_entropy_with_logits(evidence_logits.float(), targets)


def consistency_l1(evidence_queries: torch.Tensor) -> torch.Tensor:
    """Mean |e_k − e_{n+k}| between the grounding-part and answer-part queries ``[2n, D]``."""
    n = evidence_queries.shape[0] // 2
    return F.l1_loss(evidence_queries[n : 2 * n].float(), evidence_queries[:n].float())


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    evidence_logits: list[torch.Tensor],
    evidence_queries: list[torch.Tensor],
    evidence_spans_idx: list[torch.Tensor],
    *,
    alpha: float = 2.0,
    grounding_weight: float = 10.0,
    consistency_weight: float = 10.0,
) -> SFTLoss:
    """D2VLM's SFT objective for a batch.

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]``.
        evidence_logits: Per sample ``[E_i, F_i]`` (``E_i = 2 n_i``, possibly 0).
        evidence_queries: Per sample ``[E_i, D]``.
        evidence_spans_idx: Per sample ``[E_i, 2]`` target spans.
        alpha: Soft-target base.
        grounding_weight: Weight of the BCE term.
        consistency_weight: Weight of the L1 term.
    """
    lm = lm_loss(logits, labels)
    bce_terms, l1_terms = [], []
    for ev_logits, queries, spans in zip(evidence_logits, evidence_queries, evidence_spans_idx):
        if ev_logits.shape[0] == 0:
            continue
        bce_terms.append(grounding_bce(ev_logits, spans, alpha))
        l1_terms.append(consistency_l1(queries))
    if bce_terms:
        n_samples = len(bce_terms)
        grounding = torch.stack(bce_terms).sum() / n_samples
        consistency = torch.stack(l1_terms).sum() / n_samples
    else:
        zero = sum(q.sum() for q in evidence_queries) * 0.0 if evidence_queries else lm * 0.0
        grounding = consistency = zero
    total = lm + grounding_weight * grounding + consistency_weight * consistency
    return SFTLoss(total=total, lm=lm.detach(), grounding=grounding.detach(), consistency=consistency.detach())
