"""YouCook2 dense video captioning (TimeChat / D2VLM evaluator conventions).

Accepted predictions (see ``load_videos``):

* E.T. Bench-style records ``{"video", "a": text, "tgt": [[s, e], ...], "g": [captions]}``;
  the text is parsed with the official dense-caption parser (variant
  ``official``/``timechat``) or D2VLM's ``</evi>`` parser (variant ``d2vlm``);
* TimeChat / D2VLM dicts ``{"<id>.mp4": [{"timestamp": [s, e], "caption": str}] | []}``
  with a GT file ``{"annotations": [{"image_id", "segments": [[s, e], ...],
  "pure_cap": "cap1. cap2. ..."}]}`` (``pure_cap`` is split on ``". "``).

Metrics, all ×100 and rounded to 1 decimal, computed per GT video and averaged
over GT videos (a video without predictions scores 0):

* ``Precision@θ`` / ``Recall@θ`` for θ ∈ {0.3, 0.5, 0.7, 0.9}, IoU **>** θ, densevid
  IoU; precision divides by max(|P|, 1);
* ``F1_Score``: per video 2·P̄·R̄/(P̄+R̄) of the means over θ, then the mean;
* ``SODA_c``: order-preserving DP (both sides sorted by start time) maximising
  Σ IoU·METEOR; p = best/|P|, r = best/|G|, F = 2pr/(p+r). It needs METEOR
  (pycocoevalcap + java). Without it ``SODA_c`` is omitted and ``SODA_c_sim`` is
  reported instead: the same DP with the MiniLM cosine of the normalised
  captions (clipped at 0) as the pair score. It is NOT comparable with published
  SODA_c numbers;
* ``CIDEr`` and ``METEOR`` (optional extra): per θ, predictions paired with GT
  captions at IoU ≥ θ (unmatched ones with a seeded filler string), corpus score
  per video, mean over θ then over videos;
* ``n_preds``: mean number of predictions per GT video.

Not implemented: ``Para_CIDER`` / ``Para_METEOR`` and the ``SODA_c_1`` placeholder.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2vlm_ray.eval import coco
from d2vlm_ray.eval.parsers import EVIDENCE_DELIMITER, Span, parse_dense_captions
from d2vlm_ray.eval.similarity import FILLER_SEED, SentenceSimilarity, filler_string, ptb_normalize
from d2vlm_ray.eval.spans import dense_iou

YOUCOOK2_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
VARIANTS = ("official", "timechat", "d2vlm")


@dataclass(frozen=True)
class CaptionVideo:
    """One GT video with its (possibly empty) predicted events.

    Attributes:
        gt_spans_s: GT step spans in seconds.
        gt_captions: One caption per GT span.
        pred_spans_s: Predicted spans (empty for a failed parse).
        pred_captions: One caption per predicted span.
    """

    gt_spans_s: list[Span]
    gt_captions: list[str]
    pred_spans_s: list[Span]
    pred_captions: list[str]


def load_videos(preds: Any, gt: Any | None = None, variant: str = "official") -> list[CaptionVideo]:
    """Normalise any accepted prediction layout (module docstring) to videos.

    Raises:
        ValueError: On an unknown variant or an unrecognised layout.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown YouCook2 variant {variant!r}; choose from {VARIANTS}")
    videos: list[CaptionVideo] = []
    if isinstance(preds, dict):
        if gt is None or not isinstance(gt, dict) or "annotations" not in gt:
            raise ValueError("TimeChat-format YouCook2 predictions need --gt with an 'annotations' list")
        for ann in gt["annotations"]:
            captions = [c.strip() for c in str(ann["pure_cap"]).split(". ")]
            entries = preds.get(ann["image_id"]) or []
            videos.append(CaptionVideo(
                gt_spans_s=[[float(s), float(e)] for s, e in ann["segments"]],
                gt_captions=captions,
                pred_spans_s=[[float(p["timestamp"][0]), float(p["timestamp"][1])] for p in entries],
                pred_captions=[str(p.get("caption", "")) for p in entries],
            ))
        return videos
    if not isinstance(preds, list):
        raise ValueError("YouCook2 predictions must be a list of records or a {video: [...]} dict")
    delimiter = EVIDENCE_DELIMITER if variant == "d2vlm" else None
    for record in preds:
        if not isinstance(record, dict) or not {"a", "tgt", "g"} <= record.keys():
            raise ValueError("a YouCook2 record needs 'a', 'tgt' and 'g'")
        parsed = parse_dense_captions(str(record["a"]), delimiter)
        spans, captions = parsed if parsed is not None else ([], [])
        videos.append(CaptionVideo(
            gt_spans_s=[[float(s), float(e)] for s, e in record["tgt"]],
            gt_captions=[str(c) for c in record["g"]],
            pred_spans_s=spans,
            pred_captions=captions,
        ))
    return videos


def video_precision_recall(video: CaptionVideo, threshold: float) -> tuple[float, float]:
    """TimeChat per-video precision and recall at one threshold (IoU > θ)."""
    covered_preds, covered_gts = set(), set()
    for p_idx, pred in enumerate(video.pred_spans_s):
        for g_idx, gt in enumerate(video.gt_spans_s):
            if dense_iou(pred, gt) > threshold:
                covered_preds.add(p_idx)
                covered_gts.add(g_idx)
    precision = len(covered_preds) / max(len(video.pred_spans_s), 1)
    recall = len(covered_gts) / len(video.gt_spans_s) if video.gt_spans_s else 0.0
    return precision, recall


def soda_assignment_score(score_matrix: np.ndarray) -> float:
    """Best total score of an order-preserving one-to-one assignment (DP).

    ``best[i][j] = max(best[i-1][j], best[i][j-1], best[i-1][j-1] + S[i][j])``.

    Args:
        score_matrix: Shape ``(n_gt, n_pred)``, rows and columns in time order.

    Returns:
        The maximal sum (0.0 for an empty matrix).
    """
    n_rows, n_cols = score_matrix.shape
    best = np.zeros((n_rows + 1, n_cols + 1), dtype=np.float64)
    for i in range(1, n_rows + 1):
        for j in range(1, n_cols + 1):
            best[i, j] = max(best[i - 1, j], best[i, j - 1], best[i - 1, j - 1] + score_matrix[i - 1, j - 1])
    return float(best[n_rows, n_cols])


def soda_c(video: CaptionVideo, pair_score: Callable[[str, str], float]) -> float:
    """SODA_c F-measure of one video with a caption pair score (METEOR or a fallback)."""
    if not video.pred_spans_s or not video.gt_spans_s:
        return 0.0
    gt_order = sorted(range(len(video.gt_spans_s)), key=lambda i: video.gt_spans_s[i][0])
    pred_order = sorted(range(len(video.pred_spans_s)), key=lambda j: video.pred_spans_s[j][0])
    matrix = np.zeros((len(gt_order), len(pred_order)))
    for r, gi in enumerate(gt_order):
        for c, pj in enumerate(pred_order):
            iou = dense_iou(video.pred_spans_s[pj], video.gt_spans_s[gi])
            if iou > 0:
                matrix[r, c] = iou * pair_score(video.gt_captions[gi], video.pred_captions[pj])
    best = soda_assignment_score(matrix)
    precision, recall = best / len(pred_order), best / len(gt_order)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def evaluate_youcook2(
    videos: list[CaptionVideo], similarity: SentenceSimilarity | None = None, with_coco: bool = True
) -> dict[str, Any]:
    """Score dense-captioning videos (module docstring for keys and scale).

    Args:
        videos: From ``load_videos``.
        similarity: MiniLM model for the ``SODA_c_sim`` fallback (built if needed).
        with_coco: Compute CIDEr/METEOR/SODA_c when pycocoevalcap and java exist.

    Returns:
        Metric name -> value ×100 (1 decimal); ``notes`` lists omitted keys.

    Raises:
        ValueError: If there is no video.
    """
    if not videos:
        raise ValueError("no YouCook2 videos to score")
    out: dict[str, Any] = {}
    per_video_f1 = []
    pr_by_thr = {thr: [video_precision_recall(v, thr) for v in videos] for thr in YOUCOOK2_THRESHOLDS}
    for thr in YOUCOOK2_THRESHOLDS:
        out[f"Precision@{thr}"] = round(100 * float(np.mean([p for p, _ in pr_by_thr[thr]])), 1)
        out[f"Recall@{thr}"] = round(100 * float(np.mean([r for _, r in pr_by_thr[thr]])), 1)
    for v_idx in range(len(videos)):
        mean_p = float(np.mean([pr_by_thr[thr][v_idx][0] for thr in YOUCOOK2_THRESHOLDS]))
        mean_r = float(np.mean([pr_by_thr[thr][v_idx][1] for thr in YOUCOOK2_THRESHOLDS]))
        per_video_f1.append(0.0 if mean_p + mean_r == 0 else 2 * mean_p * mean_r / (mean_p + mean_r))
    out["F1_Score"] = round(100 * float(np.mean(per_video_f1)), 1)
    out["n_preds"] = round(float(np.mean([len(v.pred_spans_s) for v in videos])), 1)

    reason = coco.unavailable_reason() if with_coco else "caption metrics disabled"
    notes: list[str] = []
    if reason is None:
        out["SODA_c"] = round(100 * float(np.mean([soda_c(v, coco.meteor_pair) for v in videos])), 1)
        out |= _coco_caption_scores(videos)
    else:
        notes.append(f"{reason}; SODA_c replaced by SODA_c_sim (MiniLM pair score, not comparable)")
        model = similarity or SentenceSimilarity()

        def minilm_score(ref: str, hyp: str) -> float:
            return max(0.0, model.similarity(ptb_normalize(ref), ptb_normalize(hyp)))

        out["SODA_c_sim"] = round(100 * float(np.mean([soda_c(v, minilm_score) for v in videos])), 1)
    return out | {"notes": notes}


def _coco_caption_scores(videos: list[CaptionVideo]) -> dict[str, float]:
    """CIDEr and METEOR with threshold pairing (only called when the extra is present)."""
    rng = random.Random(FILLER_SEED)
    per_video: dict[str, list[float]] = {"CIDEr": [], "METEOR": []}
    for video in videos:
        if not video.pred_spans_s:
            per_video["CIDEr"].append(0.0)
            per_video["METEOR"].append(0.0)
            continue
        per_thr: dict[str, list[float]] = {"CIDEr": [], "METEOR": []}
        for thr in YOUCOOK2_THRESHOLDS:
            refs: dict[int, list[str]] = {}
            hyps: dict[int, list[str]] = {}
            for span, caption in zip(video.pred_spans_s, video.pred_captions):
                matched = [video.gt_captions[g] for g, gt in enumerate(video.gt_spans_s)
                           if g < len(video.gt_captions) and dense_iou(span, gt) >= thr]
                for ref in matched or [filler_string(rng)]:
                    refs[len(refs)] = [ptb_normalize(ref)]
                    hyps[len(hyps)] = [ptb_normalize(caption)]
            scores = coco.corpus_scores(refs, hyps)
            per_thr["CIDEr"].append(scores["CIDEr"])
            per_thr["METEOR"].append(scores["METEOR"])
        for name in per_video:
            per_video[name].append(float(np.mean(per_thr[name])))
    return {name: round(100 * float(np.mean(values)), 1) for name, values in per_video.items()}
