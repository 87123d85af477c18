"""YouCook2 dense video captioning (TimeChat / D2VLM evaluator conventions).

Accepted predictions (see ``load_videos``):

* E.T. Bench-style records ``{"video", "a": text, "tgt": [[s, e], ...], "g": [captions]}``;
  the text is parsed with the official dense-caption parser (variants
  ``official``/``timechat``/``fixed``) or D2VLM's ``</evi>`` parser (``d2vlm``);
* TimeChat / D2VLM dicts ``{"<id>.mp4": [{"timestamp": [s, e], "caption": str}] | []}``
  with a GT file ``{"annotations": [{"image_id", "segments": [[s, e], ...],
  "pure_cap": "cap1. cap2. ..."}]}`` (``pure_cap`` is split on ``". "``).

Metrics, ×100 and rounded to 1 decimal (``decimals``), computed per GT video and
averaged over GT videos (a video without predictions scores 0), as TimeChat's
``eval_dvc.py`` (which D2VLM's YouCook2 evaluator copies) computes them:

* ``Precision@θ`` / ``Recall@θ`` for θ ∈ {0.3, 0.5, 0.7, 0.9}, IoU **>** θ, densevid
  IoU on spans ordered ``[min, max]`` (TimeChat's ``iou()`` orders each span);
  precision divides by max(|P|, 1); ``Precision_Mean`` / ``Recall_Mean`` are the
  means over θ;
* ``F1_Score``: per video 2·P̄·R̄/(P̄+R̄) of the means over θ, then the mean;
* ``n_preds``: mean number of predictions per GT video (1 decimal, not ×100).

Caption metrics (need the ``captioning`` extra and java; otherwise omitted with a
note). Captions are PTB-tokenized with the Java tokenizer, and every GT caption
gets a "." appended first, as TimeChat does:

* ``CIDEr`` and ``METEOR``: per θ, each prediction is paired with every GT
  caption at IoU ≥ θ (an unmatched one with a seeded filler string), corpus
  score per video, mean over θ then over videos;
* ``SODA_c`` (TimeChat's ``SODA_c_2``): order-preserving DP maximising Σ IoU·S,
  p = best/|P|, r = best/|G|, F = 2pr/(p+r). In ``official``/``timechat``/
  ``d2vlm`` S reproduces TimeChat exactly: METEOR called with the GT caption as
  hypothesis and the prediction as reference, and the per-prediction scores
  taken in sorted string-key order ('0', '1', '10', '11', ..., '2'), which
  shifts them against the IoU columns for videos with more than 10
  predictions; rows and columns keep the given order. ``fixed`` uses
  S = METEOR(hypothesis = prediction, reference = GT) without the shift, and
  sorts GT and predictions by start time (SODA assumes temporal order);
* ``Para_CIDER`` / ``Para_METEOR``: corpus scores of whole-video paragraphs
  (letters only, lower-cased). TimeChat pairs the paragraphs of the videos
  present in the prediction file with the GT paragraphs of the first videos,
  so they misalign when a video is missing from a dict-form prediction file;
  ``official``/``timechat``/``d2vlm`` reproduce that, ``fixed`` pairs by video
  (a missing video gets an empty paragraph).

Without the extra, ``SODA_c_sim`` is reported instead: the same DP with the
MiniLM cosine of the normalised captions (clipped at 0) as S. It is NOT
comparable with published SODA_c numbers.

Filler strings: TimeChat draws them from the unseeded ``random`` module; here
they come from ``similarity.FILLER_SEED``. A filler is a single word no
prediction shares, so CIDEr and METEOR do not depend on its letters.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2vlm_ray.eval import coco
from d2vlm_ray.eval.parsers import EVIDENCE_DELIMITER, Span, parse_dense_captions
from d2vlm_ray.eval.similarity import FILLER_SEED, SentenceSimilarity, filler_string, ptb_normalize
from d2vlm_ray.eval.spans import dense_iou

YOUCOOK2_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
VARIANTS = ("official", "timechat", "d2vlm", "fixed")


class YouCook2InputError(ValueError):
    """A YouCook2 prediction or GT entry is malformed (missing field, span/caption count mismatch)."""


@dataclass(frozen=True)
class CaptionVideo:
    """One GT video with its (possibly empty) predicted events.

    Attributes:
        gt_spans_s: GT step spans in seconds.
        gt_captions: One caption per GT span.
        pred_spans_s: Predicted spans (empty for a failed parse).
        pred_captions: One caption per predicted span.
        in_predictions: Whether the prediction file holds an entry for this video
            (TimeChat's paragraph metrics only see such videos).
    """

    gt_spans_s: list[Span]
    gt_captions: list[str]
    pred_spans_s: list[Span]
    pred_captions: list[str]
    in_predictions: bool = True


def _ordered_iou(a: Span, b: Span) -> float:
    """Densevid IoU after ordering each span ``[min, max]``, as TimeChat's ``iou()``."""
    return dense_iou((min(a), max(a)), (min(b), max(b)))


def _span(value: Any, where: str) -> Span:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise YouCook2InputError(f"{where}: a span must be [start_s, end_s], got {value!r}")
    try:
        return [float(value[0]), float(value[1])]
    except (TypeError, ValueError) as exc:
        raise YouCook2InputError(f"{where}: span values must be numbers, got {value!r}") from exc


def _load_timechat(preds: dict[str, Any], gt: Any) -> list[CaptionVideo]:
    if not isinstance(gt, dict) or not isinstance(gt.get("annotations"), list):
        raise YouCook2InputError("TimeChat-format YouCook2 predictions need --gt with an 'annotations' list")
    videos: list[CaptionVideo] = []
    for a_idx, ann in enumerate(gt["annotations"]):
        where = f"GT annotation {a_idx}"
        if not isinstance(ann, dict) or not {"image_id", "segments", "pure_cap"} <= ann.keys():
            raise YouCook2InputError(f"{where} needs 'image_id', 'segments' and 'pure_cap'")
        # TimeChat splits on ". " without stripping and appends "." later (in scoring).
        captions = str(ann["pure_cap"]).split(". ")
        segments = [_span(seg, where) for seg in ann["segments"]]
        if len(captions) != len(segments):
            raise YouCook2InputError(
                f"{where} ({ann['image_id']}): 'pure_cap' splits into {len(captions)} captions on '. ' "
                f"but there are {len(segments)} segments")
        key = str(ann["image_id"]).split("/")[-1]
        entries = preds.get(key)
        if entries is not None and not isinstance(entries, list):
            raise YouCook2InputError(f"prediction for {key} must be a list of {{timestamp, caption}}")
        pred_spans, pred_captions = [], []
        for e_idx, entry in enumerate(entries or []):
            if not isinstance(entry, dict) or not {"timestamp", "caption"} <= entry.keys():
                raise YouCook2InputError(f"prediction {key}[{e_idx}] needs 'timestamp' and 'caption'")
            pred_spans.append(_span(entry["timestamp"], f"prediction {key}[{e_idx}]"))
            pred_captions.append(str(entry["caption"]))
        videos.append(CaptionVideo(segments, captions, pred_spans, pred_captions, in_predictions=key in preds))
    return videos


def load_videos(preds: Any, gt: Any | None = None, variant: str = "official") -> list[CaptionVideo]:
    """Normalise any accepted prediction layout (module docstring) to videos.

    Raises:
        ValueError: On an unknown variant.
        YouCook2InputError: On an unrecognised layout, a missing field, or a GT
            whose captions and spans differ in number.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown YouCook2 variant {variant!r}; choose from {VARIANTS}")
    if isinstance(preds, dict):
        return _load_timechat(preds, gt)
    if not isinstance(preds, list):
        raise YouCook2InputError("YouCook2 predictions must be a list of records or a {video: [...]} dict")
    delimiter = EVIDENCE_DELIMITER if variant == "d2vlm" else None
    videos: list[CaptionVideo] = []
    for r_idx, record in enumerate(preds):
        if not isinstance(record, dict) or not {"a", "tgt", "g"} <= record.keys():
            raise YouCook2InputError(f"YouCook2 record {r_idx} needs 'a', 'tgt' and 'g'")
        gt_spans = [_span(seg, f"record {r_idx} 'tgt'") for seg in record["tgt"]]
        if not isinstance(record["g"], list) or len(record["g"]) != len(gt_spans):
            raise YouCook2InputError(
                f"record {r_idx}: 'g' must hold one caption per 'tgt' span ({len(gt_spans)}), "
                f"got {record['g']!r}")
        parsed = parse_dense_captions(str(record["a"]), delimiter)
        spans, captions = parsed if parsed is not None else ([], [])
        videos.append(CaptionVideo(gt_spans, [str(c) for c in record["g"]], spans, captions))
    return videos


def video_precision_recall(video: CaptionVideo, threshold: float) -> tuple[float, float]:
    """TimeChat per-video precision and recall at one threshold (IoU > θ)."""
    covered_preds, covered_gts = set(), set()
    for p_idx, pred in enumerate(video.pred_spans_s):
        for g_idx, gt in enumerate(video.gt_spans_s):
            if _ordered_iou(pred, gt) > threshold:
                covered_preds.add(p_idx)
                covered_gts.add(g_idx)
    precision = len(covered_preds) / max(len(video.pred_spans_s), 1)
    recall = len(covered_gts) / len(video.gt_spans_s) if video.gt_spans_s else 0.0
    return precision, recall


def soda_assignment_score(score_matrix: np.ndarray) -> float:
    """Best total score of an order-preserving one-to-one assignment (DP).

    ``best[i][j] = max(best[i-1][j], best[i][j-1], best[i-1][j-1] + S[i][j])``;
    with S ≥ 0 this equals TimeChat's ``chased_dp_assignment``.

    Args:
        score_matrix: Shape ``(n_gt, n_pred)``, rows and columns in assignment order.

    Returns:
        The maximal sum (0.0 for an empty matrix).
    """
    n_rows, n_cols = score_matrix.shape
    best = np.zeros((n_rows + 1, n_cols + 1), dtype=np.float64)
    for i in range(1, n_rows + 1):
        for j in range(1, n_cols + 1):
            best[i, j] = max(best[i - 1, j], best[i, j - 1], best[i - 1, j - 1] + score_matrix[i - 1, j - 1])
    return float(best[n_rows, n_cols])


def _soda_from_matrix(iou_matrix: np.ndarray, score_matrix: np.ndarray) -> float:
    """F-measure of the best assignment; both matrices ``(n_gt, n_pred)``."""
    best = soda_assignment_score(iou_matrix * score_matrix)
    n_gt, n_pred = iou_matrix.shape
    precision, recall = best / n_pred, best / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def soda_c(video: CaptionVideo, pair_score: Callable[[str, str], float], sort_by_start: bool = True) -> float:
    """SODA_c F-measure of one video with a caption pair score ``pair_score(gt, pred)``.

    Args:
        video: The video.
        pair_score: Score of (GT caption, predicted caption).
        sort_by_start: Order GT and predictions by start time (else the given order).
    """
    if not video.pred_spans_s or not video.gt_spans_s:
        return 0.0
    gt_order = list(range(len(video.gt_spans_s)))
    pred_order = list(range(len(video.pred_spans_s)))
    if sort_by_start:
        gt_order.sort(key=lambda i: min(video.gt_spans_s[i]))
        pred_order.sort(key=lambda j: min(video.pred_spans_s[j]))
    ious = np.zeros((len(gt_order), len(pred_order)))  # (n_gt, n_pred)
    scores = np.zeros_like(ious)
    for r, gi in enumerate(gt_order):
        for c, pj in enumerate(pred_order):
            ious[r, c] = _ordered_iou(video.pred_spans_s[pj], video.gt_spans_s[gi])
            if ious[r, c] > 0:
                scores[r, c] = pair_score(video.gt_captions[gi], video.pred_captions[pj])
    return _soda_from_matrix(ious, scores)


def _round(value: float, decimals: int | None, scale: float = 100.0) -> float:
    return float(scale * value) if decimals is None else round(float(scale * value), decimals)


def evaluate_youcook2(
    videos: list[CaptionVideo],
    similarity: SentenceSimilarity | None = None,
    with_coco: bool = True,
    variant: str = "official",
    decimals: int | None = 1,
) -> dict[str, Any]:
    """Score dense-captioning videos (module docstring for keys and scale).

    Args:
        videos: From ``load_videos``.
        similarity: MiniLM model for the ``SODA_c_sim`` fallback (built if needed).
        with_coco: Compute the caption metrics when pycocoevalcap and java exist.
        variant: ``official``/``timechat``/``d2vlm`` (TimeChat's computation) or ``fixed``.
        decimals: Rounding of the ×100 values; ``None`` keeps them unrounded.

    Returns:
        Metric name -> value ×100; ``notes`` lists omitted keys.

    Raises:
        ValueError: If there is no video or the variant is unknown.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown YouCook2 variant {variant!r}; choose from {VARIANTS}")
    if not videos:
        raise YouCook2InputError("no YouCook2 videos to score")
    out: dict[str, Any] = {}
    pr_by_thr = {thr: [video_precision_recall(v, thr) for v in videos] for thr in YOUCOOK2_THRESHOLDS}
    for thr in YOUCOOK2_THRESHOLDS:
        out[f"Precision@{thr}"] = _round(float(np.mean([p for p, _ in pr_by_thr[thr]])), decimals)
        out[f"Recall@{thr}"] = _round(float(np.mean([r for _, r in pr_by_thr[thr]])), decimals)
    mean_ps = [float(np.mean([pr_by_thr[t][i][0] for t in YOUCOOK2_THRESHOLDS])) for i in range(len(videos))]
    mean_rs = [float(np.mean([pr_by_thr[t][i][1] for t in YOUCOOK2_THRESHOLDS])) for i in range(len(videos))]
    per_video_f1 = [0.0 if p + r == 0 else 2 * p * r / (p + r) for p, r in zip(mean_ps, mean_rs)]
    out["Precision_Mean"] = _round(float(np.mean(mean_ps)), decimals)
    out["Recall_Mean"] = _round(float(np.mean(mean_rs)), decimals)
    out["F1_Score"] = _round(float(np.mean(per_video_f1)), decimals)
    out["n_preds"] = _round(float(np.mean([len(v.pred_spans_s) for v in videos])), decimals, scale=1.0)

    reason = coco.unavailable_reason() if with_coco else "caption metrics disabled"
    notes: list[str] = []
    if reason is None:
        scores = _caption_scores(videos, variant)
        out |= {name: _round(value, decimals) for name, value in scores.items()}
    else:
        notes.append(f"{reason}; CIDEr/METEOR/Para_* omitted and SODA_c replaced by SODA_c_sim "
                     "(MiniLM pair score, not comparable)")
        out["SODA_c_sim"] = _round(_soda_sim(videos, similarity or SentenceSimilarity()), decimals)
    return out | {"notes": notes}


def _soda_sim(videos: list[CaptionVideo], model: SentenceSimilarity) -> float:
    """Mean SODA_c with the MiniLM cosine as pair score, every caption embedded once in one batch."""
    texts = sorted({ptb_normalize(c) for v in videos for c in (*v.gt_captions, *v.pred_captions)})
    index = {text: i for i, text in enumerate(texts)}
    embeddings = model.embed(texts)  # (n_texts, 384), unit norm

    def minilm_score(ref: str, hyp: str) -> float:
        cosine = float(np.dot(embeddings[index[ptb_normalize(ref)]], embeddings[index[ptb_normalize(hyp)]]))
        return max(0.0, cosine)

    return float(np.mean([soda_c(v, minilm_score) for v in videos]))


def _paragraph_words(text: str) -> str:
    """TimeChat's paragraph preprocessing: letters only, lower-cased, single spaces."""
    return " ".join(re.sub("[^a-zA-Z]", " ", text).strip().lower().split())


def _caption_scores(videos: list[CaptionVideo], variant: str) -> dict[str, float]:
    """CIDEr, METEOR, SODA_c and Para_* (fractions; only called when the extra is present)."""
    timechat = variant != "fixed"
    # One Java call tokenizes every caption; GT captions get the "." TimeChat appends.
    gt_raw = [[caption + "." for caption in v.gt_captions] for v in videos]
    unique = sorted({c for caps in gt_raw for c in caps} | {c for v in videos for c in v.pred_captions})
    tokenized = dict(zip(unique, coco.ptb_tokenize(unique)))
    rng = random.Random(FILLER_SEED)
    per_video: dict[str, list[float]] = {"CIDEr": [], "METEOR": [], "SODA_c": []}
    for video, gt_caps in zip(videos, gt_raw):
        if not video.pred_spans_s:
            for name in per_video:
                per_video[name].append(0.0)
            continue
        gt_tok = [tokenized[c] for c in gt_caps]
        pred_tok = [tokenized[c] for c in video.pred_captions]
        per_thr: dict[str, list[float]] = {"CIDEr": [], "METEOR": []}
        for thr in YOUCOOK2_THRESHOLDS:
            refs: dict[int, list[str]] = {}
            hyps: dict[int, list[str]] = {}
            for span, caption in zip(video.pred_spans_s, pred_tok):
                matched = [gt_tok[g] for g, gt in enumerate(video.gt_spans_s) if _ordered_iou(span, gt) >= thr]
                for ref in matched or [filler_string(rng)]:
                    refs[len(refs)] = [ref]
                    hyps[len(hyps)] = [caption]
            scores = coco.corpus_scores(refs, hyps, names=("METEOR", "CIDEr"))
            per_thr["CIDEr"].append(float(np.nan_to_num(scores["CIDEr"])))
            per_thr["METEOR"].append(float(np.nan_to_num(scores["METEOR"])))
        per_video["CIDEr"].append(float(np.mean(per_thr["CIDEr"])))
        per_video["METEOR"].append(float(np.mean(per_thr["METEOR"])))
        per_video["SODA_c"].append(_video_soda_meteor(video, gt_tok, pred_tok, timechat))
    out = {name: float(np.mean(values)) for name, values in per_video.items()}
    return out | _paragraph_scores(videos, timechat)


def _video_soda_meteor(video: CaptionVideo, gt_tok: list[str], pred_tok: list[str], timechat: bool) -> float:
    """SODA_c of one video with METEOR pair scores (TimeChat's or the corrected one)."""
    if not gt_tok:
        return 0.0
    if not timechat:
        cells = [(g, p) for g in range(len(gt_tok)) for p in range(len(pred_tok))]
        values = coco.meteor_items([(gt_tok[g], pred_tok[p]) for g, p in cells])
        return _fixed_soda(video, dict(zip(cells, values)))
    n_gt, n_pred = len(gt_tok), len(pred_tok)
    # TimeChat: compute_score(res, gt) makes the GT caption the hypothesis and the
    # prediction the reference, and its METEOR returns scores in sorted string-key order.
    key_order = sorted(range(n_pred), key=str)
    pairs = [(pred_tok[key_order[c]], gt_tok[g]) for g in range(n_gt) for c in range(n_pred)]
    scores = np.asarray(coco.meteor_items(pairs), dtype=np.float64).reshape(n_gt, n_pred)
    ious = np.array([[_ordered_iou(pred, gt) for pred in video.pred_spans_s] for gt in video.gt_spans_s])
    return _soda_from_matrix(ious, np.nan_to_num(scores))


def _fixed_soda(video: CaptionVideo, values: dict[tuple[int, int], float]) -> float:
    """SODA_c with METEOR(hypothesis = prediction, reference = GT), both sides in start-time order."""
    gt_order = sorted(range(len(video.gt_spans_s)), key=lambda i: min(video.gt_spans_s[i]))
    pred_order = sorted(range(len(video.pred_spans_s)), key=lambda j: min(video.pred_spans_s[j]))
    ious = np.array([[_ordered_iou(video.pred_spans_s[p], video.gt_spans_s[g]) for p in pred_order]
                     for g in gt_order])  # (n_gt, n_pred)
    scores = np.array([[values[(g, p)] for p in pred_order] for g in gt_order])
    return _soda_from_matrix(ious, np.nan_to_num(scores))


def _paragraph_scores(videos: list[CaptionVideo], timechat: bool) -> dict[str, float]:
    """Para_CIDER / Para_METEOR over whole-video paragraphs (module docstring for the pairing)."""
    gt_paras = [_paragraph_words(" ".join(c + "." for c in v.gt_captions)) for v in videos]
    if timechat:
        pred_paras = [_paragraph_words(". ".join(v.pred_captions)) for v in videos if v.in_predictions]
    else:
        pred_paras = [_paragraph_words(". ".join(v.pred_captions)) for v in videos]
    refs = {str(i): [gt] for i, (_, gt) in enumerate(zip(pred_paras, gt_paras))}
    hyps = {str(i): [pred] for i, (pred, _) in enumerate(zip(pred_paras, gt_paras))}
    if not refs:
        return {"Para_CIDER": 0.0, "Para_METEOR": 0.0}
    scores = coco.corpus_scores(refs, hyps, names=("METEOR", "CIDEr"))
    return {"Para_CIDER": float(np.nan_to_num(scores["CIDEr"])),
            "Para_METEOR": float(np.nan_to_num(scores["METEOR"]))}
