"""The tiny model learns, and its stateless generation is batch-invariant and splittable.

One module-scoped fixture overfits a tiny D2VLM (LoRA via peft, the official trainable
policy) on four synthetic clips, each a coloured square that appears over a few frames.
The trained weights then drive the generation tests in float64, where equality of tokens
and spans is exact.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from d2vlm_ray.config import DecodeSettings
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model.generation import answer, generate, ground
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.lora import apply_lora, merge_lora, parameter_group, trainable_counts
from tests.helpers_model import encode, square_clip, tiny_config, tiny_model, tiny_tokenizers

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SPANS_IDX = [(8, 11), (5, 7), (3, 5), (0, 2)]
NUM_FRAMES = 16
RESPONSE = "<evi></evi>The event happens in <evi>."


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
    return inter / (max(a[1], b[1]) - min(a[0], b[0]) + 1)


@pytest.fixture(scope="module")
def trained() -> dict:
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    apply_lora(model, tiny_config().lora)
    tok = tiny_tokenizers()
    questions = [f"When does the {c} square appear?" for c in COLOURS]
    feats = [encode(model, square_clip(NUM_FRAMES, a, b, rgb)) for (a, b), rgb in zip(SPANS_IDX, COLOURS.values())]
    # Frames sampled at 2 fps: the spans in seconds are half the frame indices.
    times = [np.arange(NUM_FRAMES) / 2.0 for _ in feats]
    spans_s = [[(a / 2.0, b / 2.0)] for a, b in SPANS_IDX]
    batch = build_batch(
        tok.llm, tok.qformer, questions, feats, times, [NUM_FRAMES / 2.0] * 4, responses=[RESPONSE] * 4, spans_s=spans_s
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    model.train()
    for _ in range(300):
        out = model(batch)
        loss = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append((loss.total.item(), loss.grounding.item()))
    model.eval()
    changed = {parameter_group(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    counts = trainable_counts(model)
    merge_lora(model)
    return {
        "model": model,
        "questions": questions,
        "feats": feats,
        "times": times,
        "losses": losses,
        "changed": changed,
        "counts": counts,
    }


def test_loss_falls_and_gradients_reach_every_trained_group(trained: dict) -> None:
    first, last = trained["losses"][0], trained["losses"][-1]
    assert last[0] < 0.6 * first[0]
    assert last[1] < first[1], "the grounding BCE must fall"
    assert {"lora", "frm_head", "evi_head", "qformer", "embed", "lm_head"} <= trained["changed"]
    assert "vision" not in trained["changed"] and "qformer_frozen" not in trained["changed"]
    assert "vision" not in trained["counts"]


def test_overfit_grounding_reaches_iou_half(trained: dict) -> None:
    model, tok = trained["model"], tiny_tokenizers()
    batch = build_batch(tok.llm, tok.qformer, trained["questions"], trained["feats"], trained["times"], [8.0] * 4)
    results = generate(model, tok.llm, batch, DecodeSettings(max_new_tokens=16))
    ious = []
    for res, target in zip(results, SPANS_IDX):
        assert res.spans_idx, f"no evidence token generated: {res.text!r}"
        ious.append(_iou(res.spans_idx[0], target))
        assert res.spans_s[0] == (res.spans_idx[0][0] / 2.0, res.spans_idx[0][1] / 2.0), "spans use timestamps"
    assert ious[0] >= 0.5, ious
    assert np.mean(ious) >= 0.5, ious


@pytest.fixture(scope="module")
def model64(trained: dict) -> torch.nn.Module:
    return copy.deepcopy(trained["model"]).double()


def test_batch_equals_single_in_float64(trained: dict, model64: torch.nn.Module) -> None:
    tok = tiny_tokenizers()
    # Different frame counts and question lengths force padding on both sides.
    feats = [trained["feats"][0].double(), trained["feats"][1][:11].double(), trained["feats"][2][:7].double()]
    times = [np.arange(f.shape[0]) / 2.0 for f in feats]
    questions = [trained["questions"][0], "When does the green square appear in this video?", trained["questions"][2]]
    durations = [f.shape[0] / 2.0 for f in feats]
    settings = DecodeSettings(max_new_tokens=14)
    together = generate(model64, tok.llm, build_batch(tok.llm, tok.qformer, questions, feats, times, durations), settings)
    for i in range(3):
        alone = generate(
            model64, tok.llm, build_batch(tok.llm, tok.qformer, [questions[i]], [feats[i]], [times[i]], [durations[i]]), settings
        )[0]
        assert alone.token_ids == together[i].token_ids
        assert alone.spans_idx == together[i].spans_idx
        assert alone.text == together[i].text


def test_ground_then_answer_equals_single_call(trained: dict, model64: torch.nn.Module) -> None:
    tok = tiny_tokenizers()
    feats = [f.double() for f in trained["feats"][:2]]
    batch = build_batch(tok.llm, tok.qformer, trained["questions"][:2], feats, trained["times"][:2], [8.0, 8.0])
    settings = DecodeSettings(max_new_tokens=16)
    single = generate(model64, tok.llm, batch, settings)
    groundings = ground(model64, tok.llm, batch, trained["questions"][:2], settings)
    for g in groundings:
        assert g.token_ids[-1] == tok.llm.convert_tokens_to_ids("</evi>")
        assert g.frame_tokens.shape == (NUM_FRAMES, model64.causal_lm.config.hidden_size)
        assert g.scores.shape == (len(g.spans_idx), NUM_FRAMES)
    longest = max(len(g.token_ids) for g in groundings)
    answers = answer(model64, tok.llm, tok.qformer, groundings, DecodeSettings(max_new_tokens=16 - longest))
    for two_phase, one_call, g in zip(answers, single, groundings):
        # answer() bounds only the answer part, so the two-phase stream is a prefix of the single call's.
        assert len(g.token_ids) < len(two_phase.token_ids) <= 16
        assert one_call.token_ids[: len(two_phase.token_ids)] == two_phase.token_ids
        assert one_call.spans_idx[: len(two_phase.spans_idx)] == two_phase.spans_idx


def test_sampling_is_seeded_and_bounded(trained: dict) -> None:
    model, tok = trained["model"], tiny_tokenizers()
    batch = build_batch(tok.llm, tok.qformer, trained["questions"][:2], trained["feats"][:2], trained["times"][:2], [8.0] * 2)
    settings = DecodeSettings(max_new_tokens=5, do_sample=True, temperature=5.0, seed=7)
    first = generate(model, tok.llm, batch, settings)
    again = generate(model, tok.llm, batch, settings)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.token_ids) <= 5 for r in first)
    other = generate(model, tok.llm, batch, DecodeSettings(max_new_tokens=5, do_sample=True, temperature=5.0, seed=8))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]


def test_evidence_injection_switch_changes_answer_states(trained: dict) -> None:
    model, tok = trained["model"], tiny_tokenizers()
    batch = build_batch(tok.llm, tok.qformer, trained["questions"][:1], trained["feats"][:1], trained["times"][:1], [8.0])
    with_inj = ground(model, tok.llm, batch, trained["questions"][:1], DecodeSettings(max_new_tokens=8))[0]
    without = ground(model, tok.llm, batch, trained["questions"][:1], DecodeSettings(max_new_tokens=8, inject_evidence=False))[0]
    assert with_inj.evidence_vectors.shape[0] == len(with_inj.spans_idx) > 0
    assert without.evidence_vectors.shape[0] == 0


def test_generation_decodes_spans_with_the_models_threshold(trained: dict) -> None:
    """span_threshold comes from the model (its config), not a constant inside generation."""
    model, tok = trained["model"], tiny_tokenizers()
    batch = build_batch(tok.llm, tok.qformer, trained["questions"][:2], trained["feats"][:2], trained["times"][:2], [8.0] * 2)
    settings = DecodeSettings(max_new_tokens=8)
    widths = {}
    before = model.span_threshold
    try:
        for threshold in (1.0, 0.05):
            model.span_threshold = threshold
            results = ground(model, tok.llm, batch, trained["questions"][:2], settings)
            widths[threshold] = [last - first for r in results for first, last in r.spans_idx]
    finally:
        model.span_threshold = before
    assert widths[1.0] and all(w == 0 for w in widths[1.0])  # only the most likely frame
    assert len(widths[0.05]) == len(widths[1.0]) and max(widths[0.05]) > 0
