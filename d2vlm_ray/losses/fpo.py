"""Factorized Preference Optimization (FPO) loss (spec §4.4): tensors in, tensors out.

Each branch's log-likelihood is the sum of its response-token log-probs and a
soft-Bernoulli grounding log-likelihood (:func:`sequence_logps`, :func:`grounding_loglik`;
summed, not length-averaged). The preference term is

- ``reference_free`` (the official objective, "focused DPO"):
  ``−log σ(β · (log π_w − log π_l))`` with β = 0.1 and no reference model;
- ``dpo`` (an explicit option): ``−log σ(β · ((log π_w − log π_ref,w) − (log π_l − log π_ref,l)))``
  with reference log-probs computed elsewhere (e.g. a frozen copy under ``no_grad``).

It is averaged over the B pairs and added to the chosen branch's SFT loss
(``L_LM + 10·BCE + 10·L1``, :func:`d2vlm_ray.losses.sft.sft_loss`), as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from d2vlm_ray.losses.sft import IGNORE_INDEX, sft_loss
from d2vlm_ray.losses.targets import soft_targets

Variant = Literal["reference_free", "dpo"]
VARIANTS: tuple[str, ...] = ("reference_free", "dpo")
# Keeps log() finite where a target is exactly 0 or 1 and p saturates (the official epsilon).
GROUNDING_EPS = 1e-10


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's dtype for float32/float64."""
    return torch.promote_types(t.dtype, torch.float32)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the labelled tokens of each row.

    Position t predicts the label at t + 1, so a response's first token is scored from
    the last prompt position.

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]`` with -100 where no token is scored.

    Returns:
        ``[B]`` sums (0 for a row without labels).
    """
    shift_logits = logits[:, :-1].to(_compute_dtype(logits))  # [B, S-1, V]
    shift_labels = labels[:, 1:]  # [B, S-1]
    scored = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~scored, 0)
    token_logp = shift_logits.gather(-1, safe[..., None]).squeeze(-1) - shift_logits.logsumexp(-1)  # [B, S-1]
    return (token_logp * scored).sum(dim=1)


def grounding_loglik(evidence_logits: torch.Tensor, spans_idx: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """``Σ_k Σ_j log(y_kj p_kj + (1 − y_kj)(1 − p_kj) + 1e-10)`` for one response.

    Args:
        evidence_logits: Scores ``[E, F]`` (``p = σ(score)``).
        spans_idx: Target span of each evidence token, ``[E, 2]``: frame indices, or
            (as the official FPO uses) unrounded fractional frame positions.
        alpha: Soft-target base: ``y = alpha ** -d``.

    Returns:
        A scalar (0 when E = 0).
    """
    dtype = _compute_dtype(evidence_logits)
    logits = evidence_logits.to(dtype)
    if logits.shape[0] == 0:
        return logits.sum()
    targets = soft_targets(spans_idx, logits.shape[1], alpha).to(device=logits.device, dtype=dtype)  # [E, F]
    probs = torch.sigmoid(logits)
    return torch.log(targets * probs + (1.0 - targets) * (1.0 - probs) + GROUNDING_EPS).sum()


def preference_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: Variant = "reference_free",
    ref_chosen_logp: torch.Tensor | None = None,
    ref_rejected_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid preference loss, mean over pairs, and the per-pair margin.

    Args:
        chosen_logp: ``log π(y_w)``, ``[B]``.
        rejected_logp: ``log π(y_l)``, ``[B]``.
        beta: Inverse temperature (official 0.1).
        variant: ``reference_free`` or ``dpo``.
        ref_chosen_logp: Reference ``log π_ref(y_w)`` ``[B]`` (``dpo`` only).
        ref_rejected_logp: Reference ``log π_ref(y_l)`` ``[B]`` (``dpo`` only).

    Returns:
        ``(loss, margin)``: the scalar loss and ``margin = β·Δ`` ``[B]``, the argument of
        the sigmoid (positive where the chosen response is preferred).

    Raises:
        ValueError: On an unknown variant, or reference log-probs missing for ``dpo`` /
            given for ``reference_free``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    has_ref = ref_chosen_logp is not None or ref_rejected_logp is not None
    if variant == "reference_free":
        if has_ref:
            raise ValueError("ref_chosen_logp/ref_rejected_logp: only used with variant='dpo'")
        delta = chosen_logp - rejected_logp
    else:
        if ref_chosen_logp is None or ref_rejected_logp is None:
            raise ValueError("variant 'dpo' needs both ref_chosen_logp and ref_rejected_logp")
        ref_delta = ref_chosen_logp.detach().to(chosen_logp) - ref_rejected_logp.detach().to(chosen_logp)
        delta = (chosen_logp - rejected_logp) - ref_delta
    margin = beta * delta  # [B]
    return -F.logsigmoid(margin).mean(), margin


@dataclass
class FPOLoss:
    """The total FPO loss and its terms; everything but ``total`` is detached.

    Attributes:
        total: ``preference + lm + w_g·grounding + w_c·consistency``.
        preference: Mean sigmoid preference loss.
        lm: Chosen-branch LM cross-entropy.
        grounding: Chosen-branch grounding BCE (unweighted).
        consistency: Chosen-branch consistency L1 (unweighted).
        chosen_logp: ``log π(y_w)`` ``[B]``.
        rejected_logp: ``log π(y_l)`` ``[B]``.
        margin: ``β·Δ`` ``[B]``; preference accuracy is ``(margin > 0).float().mean()``.
    """

    total: torch.Tensor
    preference: torch.Tensor
    lm: torch.Tensor
    grounding: torch.Tensor
    consistency: torch.Tensor
    chosen_logp: torch.Tensor
    rejected_logp: torch.Tensor
    margin: torch.Tensor


class PairLogps(Protocol):
    """What :func:`fpo_loss` reads (:class:`d2vlm_ray.model.preference.PairOutput` has it)."""

    chosen_logp: torch.Tensor
    rejected_logp: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    evidence_logits: list[torch.Tensor]
    evidence_queries: list[torch.Tensor]
    evidence_spans_idx: list[torch.Tensor]


def fpo_loss(
    out: PairLogps,
    *,
    beta: float = 0.1,
    variant: Variant = "reference_free",
    ref_chosen_logp: torch.Tensor | None = None,
    ref_rejected_logp: torch.Tensor | None = None,
    alpha: float = 2.0,
    grounding_weight: float = 10.0,
    consistency_weight: float = 10.0,
) -> FPOLoss:
    """FPO's training objective for a batch of pairs.

    Args:
        out: Pair outputs (per-branch log-probs and the chosen branch's SFT tensors).
        beta: Preference inverse temperature.
        variant: ``reference_free`` (official) or ``dpo``.
        ref_chosen_logp: Reference log-probs of the chosen responses (``dpo``).
        ref_rejected_logp: Reference log-probs of the rejected responses (``dpo``).
        alpha: Soft-target base of the SFT grounding BCE.
        grounding_weight: Weight of the chosen-branch BCE.
        consistency_weight: Weight of the chosen-branch L1.

    Returns:
        :class:`FPOLoss`.
    """
    preference, margin = preference_loss(
        out.chosen_logp,
        out.rejected_logp,
        beta=beta,
        variant=variant,
        ref_chosen_logp=ref_chosen_logp,
        ref_rejected_logp=ref_rejected_logp,
    )
    sft = sft_loss(
        out.logits,
        out.labels,
        out.evidence_logits,
        out.evidence_queries,
        out.evidence_spans_idx,
        alpha=alpha,
        grounding_weight=grounding_weight,
        consistency_weight=consistency_weight,
    )
    total = sft.total + preference
    return FPOLoss(
        total=total,
        preference=preference.detach(),
        lm=sft.lm,
        grounding=sft.grounding,
        consistency=sft.consistency,
        chosen_logp=out.chosen_logp.detach(),
        rejected_logp=out.rejected_logp.detach(),
        margin=margin.detach(),
    )
