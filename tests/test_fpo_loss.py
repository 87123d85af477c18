"""FPO loss terms against numbers derived by hand (spec §4.4)."""

from __future__ import annotations

import math

import pytest
import torch

from d2vlm_ray.losses.fpo import fpo_loss, grounding_loglik, preference_loss, sequence_logps
from d2vlm_ray.model.preference import PairOutput

LN3 = math.log(3.0)


def _text_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, 3, 2]`` and labels ``[-100, 0, 0]``.

    Position 0 has logits (0, 0): p(token 0) = 1/2. Position 1 has (ln 3, 0):
    p(token 0) = 3/(3 + 1) = 3/4. Position 2 predicts nothing. So the summed log-prob is
    ln(1/2) + ln(3/4) = ln(3/8).
    """
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 0, 0]])
    return logits, labels


def test_sequence_logps_sums_labelled_tokens() -> None:
    logits, labels = _text_example()
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(3 / 8), abs=1e-12)
    # A row with no labels scores 0; rows are independent.
    both = sequence_logps(logits.repeat(2, 1, 1), torch.tensor([[-100, 0, 0], [-100, -100, -100]]))
    assert both.tolist() == pytest.approx([math.log(3 / 8), 0.0], abs=1e-12)


def test_grounding_loglik_soft_bernoulli() -> None:
    """One evidence token, span (1, 1), 3 frames, alpha 4: y = (1/4, 1, 1/4).

    Logits (0, 0, ln 3) give p = (1/2, 1/2, 3/4). Per frame y p + (1 − y)(1 − p):
    f0: 1/4·1/2 + 3/4·1/2 = 1/2; f1: 1·1/2 = 1/2; f2: 1/4·3/4 + 3/4·1/4 = 3/8.
    Sum of logs = ln(1/2 · 1/2 · 3/8) = ln(3/32).
    """
    logits = torch.tensor([[0.0, 0.0, LN3]], dtype=torch.float64)
    spans = torch.tensor([[1, 1]])
    assert grounding_loglik(logits, spans, alpha=4.0).item() == pytest.approx(math.log(3 / 32), abs=1e-8)
    # With alpha 2 every outside frame has y = 1/2, whose term is 1/2 whatever p is.
    assert grounding_loglik(logits, spans, alpha=2.0).item() == pytest.approx(3 * math.log(0.5), abs=1e-8)


def test_grounding_loglik_epsilon_and_empty() -> None:
    """A saturated wrong frame (y = 1, p = σ(−100) ≈ 4e-44) costs ln(1e-10), not −inf."""
    logits = torch.tensor([[-100.0]], dtype=torch.float64)
    value = grounding_loglik(logits, torch.tensor([[0, 0]]), alpha=2.0).item()
    assert value == pytest.approx(math.log(1e-10), rel=1e-9)
    assert grounding_loglik(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0


def test_reference_free_preference() -> None:
    """log π_w = −2, log π_l = −12, β = 0.1: margin 1, loss −log σ(1) = ln(1 + e^-1).

    A second pair with equal log-probs has margin 0 and loss ln 2; the loss is the mean.
    """
    loss, margin = preference_loss(torch.tensor([-2.0]), torch.tensor([-12.0]))
    assert margin.tolist() == pytest.approx([1.0])
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    loss2, margin2 = preference_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-12.0, -5.0]))
    assert margin2.tolist() == pytest.approx([1.0, 0.0])
    assert loss2.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2, abs=1e-6)


def test_dpo_variant_uses_reference() -> None:
    """π: (−2, −12); π_ref: (−1, −21). Δ = (−2 + 1) − (−12 + 21) = −10, margin −1.

    Loss −log σ(−1) = ln(1 + e). The reference-free loss on the same π would be ln(1 + e^-1).
    """
    loss, margin = preference_loss(
        torch.tensor([-2.0]),
        torch.tensor([-12.0]),
        variant="dpo",
        ref_chosen_logp=torch.tensor([-1.0]),
        ref_rejected_logp=torch.tensor([-21.0]),
    )
    assert margin.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(math.log1p(math.e), abs=1e-6)


def test_variant_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="variant"):
        preference_loss(torch.zeros(1), torch.zeros(1), variant="ipo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_chosen_logp"):
        preference_loss(torch.zeros(1), torch.zeros(1), variant="dpo")
    with pytest.raises(ValueError, match="ref_chosen_logp"):
        zero = torch.zeros(1)
        preference_loss(zero, zero, ref_chosen_logp=zero, ref_rejected_logp=zero)


def _hand_output(chosen_text: float, rejected_text: float) -> PairOutput:
    """A PairOutput whose chosen SFT terms are known.

    LM: the text example, mean CE = −ln(3/8)/2. Grounding: logits 0 everywhere → BCE = ln 2
    for every target. Consistency: queries (1, 2) and (1, 4) → mean |diff| = (0 + 2)/2 = 1.
    Grounding log-likelihoods are 0 so log π equals the given text log-probs.
    """
    logits, labels = _text_example()
    zero = torch.zeros(1, dtype=torch.float64)
    return PairOutput(
        chosen_text_logp=torch.tensor([chosen_text], dtype=torch.float64, requires_grad=True),
        chosen_grounding_logp=zero,
        rejected_text_logp=torch.tensor([rejected_text], dtype=torch.float64, requires_grad=True),
        rejected_grounding_logp=zero,
        logits=logits,
        labels=labels,
        evidence_logits=[torch.zeros(2, 3, dtype=torch.float64)],
        evidence_queries=[torch.tensor([[1.0, 2.0], [1.0, 4.0]], dtype=torch.float64)],
        evidence_spans_idx=[torch.tensor([[1, 1], [1, 1]])],
        rejected_evidence_logits=[torch.zeros(0, 3)],
        rejected_evidence_spans_idx=[torch.zeros(0, 2, dtype=torch.long)],
    )


def test_fpo_total_is_preference_plus_chosen_sft() -> None:
    out = _hand_output(-2.0, -12.0)
    loss = fpo_loss(out)
    lm = -math.log(3 / 8) / 2
    pref = math.log1p(math.exp(-1.0))
    assert loss.lm.item() == pytest.approx(lm, abs=1e-6)
    assert loss.grounding.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert loss.consistency.item() == pytest.approx(1.0, abs=1e-6)
    assert loss.preference.item() == pytest.approx(pref, abs=1e-9)
    assert loss.total.item() == pytest.approx(lm + pref + 10 * math.log(2.0) + 10 * 1.0, abs=1e-5)
    assert loss.margin.tolist() == pytest.approx([1.0])
    for term in (loss.preference, loss.lm, loss.grounding, loss.consistency, loss.chosen_logp, loss.margin):
        assert not term.requires_grad
    # d(−log σ(β Δ))/d log π_w = −β σ(−β Δ) = −0.1 σ(−1); the rejected gradient is its negative.
    loss.total.backward()
    expected = -0.1 / (1 + math.e)
    assert out.chosen_text_logp.grad.item() == pytest.approx(expected, abs=1e-12)
    assert out.rejected_text_logp.grad.item() == pytest.approx(-expected, abs=1e-12)


def test_fpo_dpo_variant_and_weights() -> None:
    out = _hand_output(-2.0, -12.0)
    loss = fpo_loss(
        out,
        variant="dpo",
        ref_chosen_logp=torch.tensor([-1.0]),
        ref_rejected_logp=torch.tensor([-21.0]),
        grounding_weight=0.0,
        consistency_weight=0.0,
    )
    lm = -math.log(3 / 8) / 2
    assert loss.total.item() == pytest.approx(lm + math.log1p(math.e), abs=1e-5)
