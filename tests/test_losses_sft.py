"""SFT loss terms on hand-computed examples."""

from __future__ import annotations

import math

import torch

from d2vlm_ray.losses.sft import consistency_l1, grounding_bce, lm_loss, sft_loss


def test_lm_loss_hand_computed() -> None:
    """Labels [-100, 0, 1] over V = 2.

    Position 0 (logits [0, 0]) predicts label 0: -ln(1/2) = ln 2.
    Position 1 (logits [ln 3, 0], softmax [3/4, 1/4]) predicts label 1: -ln(1/4) = 2 ln 2.
    The last position predicts nothing. Mean over the two labelled tokens: 1.5 ln 2.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    assert torch.isclose(lm_loss(logits, labels), torch.tensor(1.5 * math.log(2.0)))


def test_lm_loss_without_labels_is_zero_but_differentiable() -> None:
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_grounding_bce_hand_computed() -> None:
    """Span (1, 1) over 3 frames, alpha 2: targets y = [0.5, 1, 0.5] for both rows.

    A logit of 0 (p = 1/2) costs ln 2 whatever the target; logit ln 3 (p = 3/4) with
    y = 1 costs -ln(3/4) = ln(4/3). Row 0 = [0, ln 3, 0], row 1 = zeros:
    mean = (5 ln 2 + ln(4/3)) / 6.
    """
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    spans = torch.tensor([[1, 1], [1, 1]])
    expected = (5 * math.log(2.0) + math.log(4.0 / 3.0)) / 6
    assert torch.isclose(grounding_bce(logits, spans, alpha=2.0), torch.tensor(expected))


def test_consistency_l1_pairs_grounding_with_answer_copy() -> None:
    """Rows [1, 2] (grounding copy) and [0, 4] (answer copy): mean |diff| = (1 + 2) / 2."""
    queries = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    assert consistency_l1(queries).item() == 1.5


def test_sft_total_weights_and_sample_averaging() -> None:
    """Two samples: the first has one event, the second none.

    The grounding and consistency terms average over samples *with* spans (1 here), so
    total = LM + 10 * BCE + 10 * 1.5.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[-100, 0, 1], [-100, 0, 1]])
    ev_logits = [torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]]), torch.zeros(0, 3)]
    queries = [torch.tensor([[1.0, 2.0], [0.0, 4.0]]), torch.zeros(0, 2)]
    spans = [torch.tensor([[1, 1], [1, 1]]), torch.zeros(0, 2, dtype=torch.long)]
    out = sft_loss(logits, labels, ev_logits, queries, spans)
    bce = (5 * math.log(2.0) + math.log(4.0 / 3.0)) / 6
    expected = 1.5 * math.log(2.0) + 10 * bce + 10 * 1.5
    assert torch.isclose(out.total, torch.tensor(expected))
    assert torch.isclose(out.grounding, torch.tensor(bce)) and out.consistency.item() == 1.5


def test_sft_without_any_spans_keeps_only_lm() -> None:
    logits = torch.zeros(1, 2, 3)
    labels = torch.tensor([[-100, 1]])
    queries = [torch.zeros(0, 4, requires_grad=True)]
    out = sft_loss(logits, labels, [torch.zeros(0, 5)], queries, [torch.zeros(0, 2, dtype=torch.long)])
    assert torch.isclose(out.total, torch.tensor(math.log(3.0)))
    assert out.grounding.item() == 0.0
