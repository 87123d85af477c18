"""Grounded-VideoLLM family: sequence layout, decoding in neutral form, checkpoints, and learning.

The learning fixture trains a tiny Grounded-VideoLLM (``tiny-gvl``: the ``tiny`` LLM, a tiny
CLIP ViT and a tiny TimeSformer) on clips where a red square appears over a few frames,
and scores grounding on clips it never saw, before and after training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2vlm_ray.config import DecodeSettings, ModelConfig, from_dict
from d2vlm_ray.eval import recall_at_iou
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model.builders import build_frame_encoder, build_model, build_tokenizers
from d2vlm_ray.model.checkpoint import from_pretrained, init_checkpoint, load_frame_encoder, save_pretrained
from d2vlm_ray.model.generation import answer, generate, ground
from d2vlm_ray.model.grounded_videollm import GroundedVideoLLM
from d2vlm_ray.model.gvl_generation import neutral_ids
from d2vlm_ray.model.inputs import IGNORE_INDEX, build_batch
from d2vlm_ray.model.lora import apply_lora, merge_lora, parameter_group
from d2vlm_ray.model.temporal_tokens import span_to_bins
from d2vlm_ray.model.tokenizer import TokenIds
from tests.helpers_model import square_clip

NUM_FRAMES = 24
FPS = 2.0
RESPONSE = "<evi></evi>The square shows at <evi>."
QUESTION = "When does the red square appear?"


def gvl_config() -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "tiny-gvl"})


@pytest.fixture(scope="module")
def tokenizers():
    return build_tokenizers(gvl_config())


def _model(tokenizers, seed: int = 0) -> GroundedVideoLLM:
    torch.manual_seed(seed)
    return build_model(gvl_config(), tokenizers).eval()


def _clip_batch(model, tokenizers, spans_idx, *, responses: bool):
    encoder = build_frame_encoder(model, 56)
    feats = [encoder.encode(square_clip(NUM_FRAMES, a, b, (255, 0, 0))) for a, b in spans_idx]
    times = [np.arange(NUM_FRAMES) / FPS for _ in feats]
    spans_s = [[(a / FPS, b / FPS)] for a, b in spans_idx]
    return build_batch(
        tokenizers.llm,
        tokenizers.qformer,
        [QUESTION] * len(feats),
        feats,
        times,
        [NUM_FRAMES / FPS] * len(feats),
        responses=[RESPONSE] * len(feats) if responses else None,
        spans_s=spans_s if responses else None,
    ), spans_s


def test_sequence_writes_each_evi_as_two_temporal_tokens(tokenizers) -> None:
    model = _model(tokenizers)
    batch, spans_s = _clip_batch(model, tokenizers, [(4, 9)], responses=True)
    video = model.compress(batch)
    seq = model.sequence(batch, 0, video[0])
    ids = TokenIds.from_tokenizer(tokenizers.llm)
    start, end = span_to_bins(spans_s[0][0], NUM_FRAMES / FPS, model.num_temporal_tokens)
    assert ids.evi not in seq.suffix_ids
    pair = [model.first_temporal_id + start, model.first_temporal_id + end]
    # The grounding part and the answer each carry the span as its two tokens.
    hits = [i for i in range(len(seq.suffix_ids) - 1) if seq.suffix_ids[i : i + 2] == pair]
    assert len(hits) == 2
    n_video = model.num_video_tokens(NUM_FRAMES)
    assert seq.embeds.shape == (len(batch.prefix_ids[0]) + n_video + len(seq.suffix_ids), 64)
    labelled = seq.labels[seq.labels != IGNORE_INDEX].tolist()
    assert labelled == seq.suffix_ids[seq.prompt_len :], "the response (and only it) is labelled"
    out = model(batch)
    assert out.logits.shape[:2] == out.labels.shape and out.evidence_logits == []


def test_neutral_ids_collapse_pairs_and_flag_malformed_markers(tokenizers) -> None:
    model = _model(tokenizers)
    ids = TokenIds.from_tokenizer(tokenizers.llm)
    t = model.first_temporal_id
    word = tokenizers.llm.convert_tokens_to_ids("red")
    raw = [t + 10, t + 20, ids.evi_end, word, t + 30, t + 25, word, t + 40, ids.end]
    neutral, spans_s, warnings = neutral_ids(model, raw, 100.0)
    assert neutral == [ids.evi, ids.evi_end, word, t + 30, t + 25, word, t + 40, ids.end]
    assert spans_s == [pytest.approx((10.0, 20.0))]
    kinds = " ".join(warnings)
    assert "end before start" in kinds and "lone start" in kinds and len(warnings) == 2


def test_a_malformed_marker_reaches_the_http_payload_as_an_output_warning(tokenizers) -> None:
    from d2vlm_ray.serving.core import grounding_payload
    from d2vlm_ray.types import GroundingResult

    model = _model(tokenizers)
    ids = TokenIds.from_tokenizer(tokenizers.llm)
    neutral, spans_s, warnings = neutral_ids(model, [model.first_temporal_id + 5, ids.evi_end], 10.0)
    grounding = GroundingResult(
        question=QUESTION,
        spans_s=spans_s,
        spans_idx=[],
        scores=torch.zeros(0, 3),
        token_ids=neutral,
        frame_tokens=torch.zeros(3, 64),
        evidence_vectors=torch.zeros(0, 64),
        timestamps_s=np.arange(3.0),
        duration_s=10.0,
        warnings=warnings,
    )
    body = grounding_payload(grounding, tokenizers.llm, cache_hit=False, timings_ms={})
    assert body["spans_s"] == [] and "<5>" in body["text"], "the lone marker stays visible and gives no span"
    assert body["output_warnings"] == warnings and "lone start" in warnings[0]
    assert body["warnings"] == [], "decode warnings are the video's, not the model's"


def test_generate_ground_answer_agree_and_return_neutral_results(tokenizers) -> None:
    model = _model(tokenizers)
    batch, _ = _clip_batch(model, tokenizers, [(2, 5), (10, 20)], responses=False)
    settings = DecodeSettings(max_new_tokens=12)
    whole = generate(model, tokenizers.llm, batch, settings)
    grounded = ground(model, tokenizers.llm, batch, [QUESTION] * 2, settings)
    answered = answer(model, tokenizers.llm, tokenizers.qformer, grounded, settings)
    ids = TokenIds.from_tokenizer(tokenizers.llm)
    for res in whole:
        assert sum(1 for t in res.token_ids if t == ids.evi) == len(res.spans_s)
        assert res.probs.shape == (len(res.spans_s), NUM_FRAMES)
    for g, a in zip(grounded, answered):
        assert a.token_ids[: len(g.token_ids)] == g.token_ids
        assert g.frame_tokens.shape == (model.num_video_tokens(NUM_FRAMES), 64)


def test_checkpoint_round_trip_and_frame_encoder(tmp_path, tokenizers) -> None:
    cfg = gvl_config()
    init_checkpoint(cfg, tmp_path / "init", seed=3)
    model, tok, loaded_cfg = from_pretrained(tmp_path / "init")
    assert isinstance(model, GroundedVideoLLM) and loaded_cfg.family == "grounded_videollm"
    assert model.first_temporal_id == tokenizers.llm.convert_tokens_to_ids("<0>")
    save_pretrained(model, loaded_cfg, tok, tmp_path / "again")
    again, _, _ = from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    encoder = load_frame_encoder(tmp_path / "init")
    assert encoder.encoder_id == build_frame_encoder(model, 56).encoder_id
    assert encoder.encoder_id.startswith("two-stream/")


def test_fpo_refuses_this_family(tmp_path) -> None:
    from d2vlm_ray.train.objectives import check_fpo_family

    init_checkpoint(gvl_config(), tmp_path / "init", seed=0)
    with pytest.raises(ValueError, match="FPO is defined for the d2vlm family"):
        check_fpo_family(tmp_path / "init")


TRAIN_SPANS = [(0, 4), (3, 8), (6, 11), (9, 14), (12, 17), (15, 20), (18, 23), (2, 9), (8, 15), (14, 21)]
HELD_OUT_SPANS = [(1, 6), (7, 12), (13, 18), (17, 22)]


def _grounding_recall(model, tokenizers) -> dict[str, float]:
    batch, spans_s = _clip_batch(model, tokenizers, HELD_OUT_SPANS, responses=False)
    results = ground(model, tokenizers.llm, batch, [QUESTION] * len(HELD_OUT_SPANS), DecodeSettings(max_new_tokens=6))
    preds = [r.spans_s[0] if r.spans_s else None for r in results]
    return recall_at_iou(preds, [s[0] for s in spans_s], thresholds=(0.3, 0.5))


@pytest.fixture(scope="module")
def trained(tokenizers) -> dict:
    model = _model(tokenizers, seed=0)
    before = _grounding_recall(model, tokenizers)
    apply_lora(model, from_dict(ModelConfig, {"preset": "tiny-gvl"}).lora)
    batch, _ = _clip_batch(model, tokenizers, TRAIN_SPANS, responses=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(250):
        out = model(batch)
        loss = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(loss.lm.item())
    model.eval()
    changed = {parameter_group(n) for n, p in model.named_parameters() if not torch.equal(params[n], p)}
    merge_lora(model)
    return {"before": before, "after": _grounding_recall(model, tokenizers), "losses": losses, "changed": changed}


def test_tiny_model_learns_to_ground_held_out_clips(trained: dict) -> None:
    losses = trained["losses"]
    assert losses[-1] < 0.3 * losses[0]
    assert {"projector", "lora", "embed", "lm_head"} <= trained["changed"]
    assert "vision" not in trained["changed"]
    assert trained["after"]["R@0.5"] > trained["before"]["R@0.5"], (trained["before"], trained["after"])


def test_streaming_an_answer_reports_the_tokens_and_result_of_the_whole_answer(tokenizers) -> None:
    from d2vlm_ray.serving.core import AnsweringService

    model = _model(tokenizers, seed=1)
    batch, _ = _clip_batch(model, tokenizers, [(4, 9)], responses=False)
    settings = DecodeSettings(max_new_tokens=10)
    (grounding,) = ground(model, tokenizers.llm, batch, [QUESTION], settings)
    service = AnsweringService(model, tokenizers, gvl_config())
    *streamed, final = list(service.stream(grounding, settings))
    (whole,) = service.answer_many([grounding], [settings])
    assert final.token_ids == whole.token_ids and final.text == whole.text and final.spans_s == whole.spans_s
    n_ground = len(grounding.token_ids)
    assert [t.token_id for t in streamed] == whole.token_ids[n_ground:]
    assert [t.span_s for t in streamed if t.span_s is not None] == whole.spans_s[len(grounding.spans_s) :]
