"""E.T. Bench metrics for all 12 tasks, with the official and D2VLM scorer variants.

Input: prediction records (E.T. Bench annotation dicts with the raw model text in
``a``). Records are grouped by ``task`` then ``source``; each (task, source) group
gets one metric dict, rounded to 5 decimals (Python ``round``, i.e. round-half-
even on the binary value), with the same keys as the official ``metrics.json``:

* rar/eca/rvq: ``Total, Failed, Acc`` (d2vlm adds ``Matched_count``,
  ``matched_ratio``, ``correct_ratio_within_matched``);
* tvg/epm: ``Total, Failed, mIoU, F1@0.1..0.7, F1`` (F1@θ is really R@θ);
* tal: ``Total, Failed, F1@θ, F1``; evs/vhd: ``Total, Failed, F1``;
* dvc/slc: ``Total, Failed, F1@θ, F1, SentSim`` (+ ``Bleu_1..4, METEOR, ROUGE_L,
  CIDEr`` when the optional pycocoevalcap extra and java are present);
* tem: ``Total, Failed, mIoU, R@θ, mRec``; gvq: the same plus ``Acc``;
* d2vlm only: the evidence counterparts ``mIoU_evi``, ``F1_evi@θ``/``F1_evi``,
  ``R_evi@θ``/``mRec_evi`` of the keys above, and gvq's ``Matched count``,
  ``Matched ratio``, ``correct count within matched``, ``correct ratio within
  matched`` (see Variants; the ratios are unrounded, as D2VLM writes them).

``evaluate_etbench`` adds ``Overall`` (14 numbers ×100, 1 decimal) and
``Merged`` (Acc(ref), F1(gnd), F1(cap), Sim(cap), Rec(com), ×100, 1 decimal).

Variants (``VARIANTS``):

* ``official``: the E.T. Bench script (parsers of ``parsers.py``; first interval
  for tvg/epm; first number for vhd; the ``(X)`` and leading-letter stages fall
  through to MiniLM similarity when wrong; letter map from the group's first
  sample; nncore float32 IoU).
* ``d2vlm``: D2VLM's modified scorer with delimiter ``</evi>``: no delimiter ->
  failure for tvg/epm/tal/evs/tem/vhd/dvc/slc/gvq-grounding; tvg/epm IoU is the
  max over all answer intervals (stage-1 numbers lose a trailing "."); vhd is the
  midpoint of the answer's first interval; referring: the ``(X)`` stage is off, a
  leading letter a..e is final, similarity only without one; evs scores the
  union of answer and evidence bins; the tal running-sum reset on rec = prc = 0
  is reproduced. It adds D2VLM's evidence metrics, scored on the spans before
  ``</evi>`` (kept in written order, not sorted) exactly as that scorer does:
  tvg/epm ``mIoU_evi, F1_evi@θ, F1_evi`` (max over all evidence spans; no
  evidence -> the answer spans); tem ``mIoU_evi, R_evi@θ, mRec_evi`` (first
  evidence span, or the first answer span); tal ``F1_evi@θ, F1_evi`` (a
  threshold counts only where the ANSWER reaches it, and an evidence F1 of 0
  resets that threshold's running sum, as in D2VLM); evs ``F1_evi`` (equal to
  ``F1``: D2VLM paints answer and evidence into one mask); vhd ``F1_evi`` (the
  evidence's first-span midpoint, or the answer point); dvc/slc ``F1_evi@θ,
  F1_evi`` (densevid detection of the evidence spans, scaled by the answer
  parse rate; no evidence -> precision and recall 0); gvq ``mIoU_evi,
  R_evi@θ, mRec_evi`` (first evidence span, or ``[0, 0]`` without one) plus
  ``Matched count``, ``Matched ratio``, ``correct count within matched`` and
  ``correct ratio within matched`` (leading letters a..e of the option count).
* ``d2vlm-strict``: D2VLM's ``..._strict_rvq`` copy of the official script:
  official everywhere except referring, where a recognised ``(X)`` letter and a
  recognised leading letter are both final.
* ``fixed``: ``official`` with these departures: the letter map is built per
  sample (official: from the group's first sample); the IoU of two zero-length
  spans is 0.0 instead of NaN; dvc/slc samples are keyed by (video, idx) so
  duplicate videos do not overwrite each other.

Where the official scripts crash, every variant returns this documented result:

* only some tasks present (official: IndexError, no metrics.json): per-task
  results as usual; ``Overall`` lists the tasks present; a ``Merged`` entry is
  ``None`` unless all the tasks of its group are present;
* ``"1..5 - 3"`` and other unreadable numbers: see ``parsers`` (a parse failure);
* NaN IoU in tal with rec = prc = 0 at a threshold (official: ZeroDivisionError):
  that sample adds 0 at that threshold (d2vlm: resets the running sum, as D2VLM);
* a multiple-choice group whose first sample has neither 4 nor 5 options
  (official: NotImplementedError): the letters cover that sample's option count;
* an empty (task, source) group never arises (groups come from the records).

In every variant the random filler strings of dvc/slc Sim are seeded
(``similarity.FILLER_SEED``; the official ones are unseeded, so official Sim
wobbles slightly between runs). Captions are tokenized as the official scorer
does (non-ASCII to spaces, then the Java PTBTokenizer from pycocoevalcap) when
the ``captioning`` extra and java are present; otherwise with the pure-Python
``similarity.ptb_normalize`` and a note in ``notes``.

An empty record list, or a dvc/slc record whose ``g`` does not hold one caption
per ``tgt`` span, raises ``ETBenchInputError`` (official: exit 0 with no
metrics, resp. IndexError).

NaN mIoU (official behaviour for a zero-length prediction on a zero-length GT)
is kept as ``float('nan')``; the CLI writes it as JSON ``null``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2vlm_ray.eval import coco
from d2vlm_ray.eval.parsers import (
    EVIDENCE_DELIMITER,
    Span,
    leading_letter,
    letter_map,
    paren_letter,
    parse_dense_captions,
    parse_dense_evidence,
    parse_evidence_spans,
    parse_spans,
    parse_vhd_midpoint,
    parse_vhd_point,
    split_evidence,
    strip_choice_prefix,
)
from d2vlm_ray.eval.similarity import (
    FILLER_SEED,
    SentenceSimilarity,
    filler_string,
    ptb_normalize,
    remove_nonascii,
)
from d2vlm_ray.eval.spans import ETBENCH_THRESHOLDS, MAX_PROPOSALS, dense_iou, detection_precision_recall, nncore_iou

TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")
REFERRING_TASKS = ("rar", "eca", "rvq")
GROUNDING_TASKS = ("tvg", "epm", "tal", "evs", "vhd")
CAPTIONING_TASKS = ("dvc", "slc")
COMPLEX_TASKS = ("tem", "gvq")
_OVERALL_COLUMNS = (
    ("RAR (Acc)", "rar", "Acc"), ("EVC (Acc)", "eca", "Acc"), ("RVQ (Acc)", "rvq", "Acc"),
    ("TVG (F1)", "tvg", "F1"), ("EPM (F1)", "epm", "F1"), ("TAL (F1)", "tal", "F1"),
    ("EVS (F1)", "evs", "F1"), ("VHD (F1)", "vhd", "F1"), ("DVC (F1)", "dvc", "F1"),
    ("DVC (Sim)", "dvc", "SentSim"), ("SLC (F1)", "slc", "F1"), ("SLC (Sim)", "slc", "SentSim"),
    ("TEM (Rec)", "tem", "mRec"), ("GVQ (Rec)", "gvq", "mRec"),
)


@dataclass(frozen=True)
class Variant:
    """Switches that distinguish the scorer variants (see the module docstring).

    Attributes:
        name: Variant name.
        delimiter: ``None`` (official) or D2VLM's evidence/answer delimiter.
        grounding_max_iou: tvg/epm IoU is the max over all predicted intervals.
        referring: ``"official"`` (fall through), ``"d2vlm"`` (no ``(X)`` stage,
            leading letter final) or ``"strict"`` (both stages final).
        vhd_midpoint: VHD point = midpoint of the answer's first interval.
        evs_union: EVS scores answer ∪ evidence bins.
        tal_reset: Reproduce D2VLM's running-sum reset in TAL.
        per_sample_letters: Letter map from each sample's option count.
        nan_iou_zero: Two zero-length spans have IoU 0 instead of NaN.
        key_by_sample: Key dvc/slc samples by (video, idx) instead of video.
        evidence_metrics: Add D2VLM's ``*_evi`` metrics (needs ``delimiter``).
    """

    name: str
    delimiter: str | None = None
    grounding_max_iou: bool = False
    referring: str = "official"
    vhd_midpoint: bool = False
    evs_union: bool = False
    tal_reset: bool = False
    per_sample_letters: bool = False
    nan_iou_zero: bool = False
    key_by_sample: bool = False
    evidence_metrics: bool = False


VARIANTS: dict[str, Variant] = {
    "official": Variant("official"),
    "d2vlm": Variant("d2vlm", delimiter=EVIDENCE_DELIMITER, grounding_max_iou=True, referring="d2vlm",
                     vhd_midpoint=True, evs_union=True, tal_reset=True, evidence_metrics=True),
    "d2vlm-strict": Variant("d2vlm-strict", referring="strict"),
    "fixed": Variant("fixed", per_sample_letters=True, nan_iou_zero=True, key_by_sample=True),
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown E.T. Bench variant {name!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]


class _LazySimilarity:
    """Builds the MiniLM model only when a scorer first needs it."""

    def __init__(self, similarity: SentenceSimilarity | None) -> None:
        self._similarity = similarity

    def __call__(self) -> SentenceSimilarity:
        if self._similarity is None:
            self._similarity = SentenceSimilarity()
        return self._similarity


SimilarityFn = Callable[[], SentenceSimilarity]


def _r5(value: float) -> float:
    return round(value, 5)


def _max_nan(values: Iterable[float]) -> float:
    """Max that propagates NaN, like ``torch.Tensor.max``."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def _iou(gt: Span, pred: Span, variant: Variant) -> float:
    return nncore_iou(gt, pred, nan_as_zero=variant.nan_iou_zero)


def _grounding_parse(answer: str, variant: Variant) -> tuple[list[Span] | None, list[Span] | None]:
    """(answer spans, evidence spans) under the variant's rules."""
    if variant.delimiter is None:
        return parse_spans(answer), None
    parts = split_evidence(answer.lower(), variant.delimiter.lower())
    if parts is None:
        return None, None
    evidence, answer_part = parts
    return parse_spans(answer_part, strip_trailing_dot=True), parse_evidence_spans(evidence)


def _recall_block(hits: list[int], total: int, prefix: str) -> tuple[dict[str, float], float]:
    """Rounded ``{prefix}@θ`` recalls and their unrounded mean."""
    recalls = [h / total for h in hits]
    block = {f"{prefix}@{thr}": _r5(rec) for thr, rec in zip(ETBENCH_THRESHOLDS, recalls)}
    return block, sum(recalls) / len(recalls)


class _RecallTally:
    """Running hits at each E.T. Bench threshold and the IoU sum of one span source."""

    def __init__(self) -> None:
        self.hits = [0] * len(ETBENCH_THRESHOLDS)
        self.sum_iou = 0.0

    def add(self, iou: float) -> None:
        """Count one sample's IoU (NaN adds NaN to the sum and no hit, as in torch)."""
        self.sum_iou += iou
        self.hits = [h + int(iou >= thr) for h, thr in zip(self.hits, ETBENCH_THRESHOLDS)]

    def block(self, total: int, prefix: str, miou_key: str, mean_key: str) -> dict[str, float]:
        """``{miou_key, prefix@θ..., mean_key}`` over ``total`` samples, rounded to 5 decimals."""
        recalls, mean = _recall_block(self.hits, total, prefix)
        return {miou_key: _r5(self.sum_iou / total)} | recalls | {mean_key: _r5(mean)}


def eval_tvg(samples: list[dict[str, Any]], variant: Variant) -> dict[str, Any]:
    """TVG/EPM: R@θ of the first (d2vlm: best) interval, stored as ``F1@θ``; F1 = mean R@θ.

    With evidence metrics, the same over the evidence spans (best of all; the
    answer spans when there is no evidence) as ``mIoU_evi``, ``F1_evi@θ``, ``F1_evi``.
    """
    answer, evidence = _RecallTally(), _RecallTally()
    failed = 0
    for sample in samples:
        spans, evidence_spans = _grounding_parse(sample["a"], variant)
        if not spans:
            failed += 1
            continue
        candidates = spans if variant.grounding_max_iou else spans[:1]
        answer.add(_max_nan(_iou(sample["tgt"], span, variant) for span in candidates))
        if variant.evidence_metrics:
            evidence.add(_max_nan(_iou(sample["tgt"], span, variant) for span in evidence_spans or spans))
    out = {"Total": len(samples), "Failed": failed} | answer.block(len(samples), "F1", "mIoU", "F1")
    if variant.evidence_metrics:
        out |= evidence.block(len(samples), "F1_evi", "mIoU_evi", "F1_evi")
    return out


def eval_tem(samples: list[dict[str, Any]], variant: Variant) -> dict[str, Any]:
    """TEM: IoU of the first interval with the best GT segment; R@θ and mRec.

    With evidence metrics, the same for the first evidence span (the first answer
    span when there is no evidence): ``mIoU_evi``, ``R_evi@θ``, ``mRec_evi``.
    """
    answer, evidence = _RecallTally(), _RecallTally()
    failed = 0
    for sample in samples:
        spans, evidence_spans = _grounding_parse(sample["a"], variant)
        if not spans:
            failed += 1
            continue
        answer.add(_max_nan(_iou(gt, spans[0], variant) for gt in sample["tgt"]))
        if variant.evidence_metrics:
            first_evidence = (evidence_spans or spans)[0]
            evidence.add(_max_nan(_iou(gt, first_evidence, variant) for gt in sample["tgt"]))
    out = {"Total": len(samples), "Failed": failed} | answer.block(len(samples), "R", "mIoU", "mRec")
    if variant.evidence_metrics:
        out |= evidence.block(len(samples), "R_evi", "mIoU_evi", "mRec_evi")
    return out


def _iou_matrix(gts: list[Span], spans: list[Span], variant: Variant) -> np.ndarray:
    """G×P IoU matrix, float64 holding the float32 IoUs."""
    return np.array([[_iou(gt, span, variant) for span in spans] for gt in gts], dtype=np.float64)


def _add_matrix_f1(running: float, matrix: np.ndarray, thr: float, reset: bool) -> float:
    """Add one sample's TAL F1 at ``thr`` to a running sum.

    Recall is over GT rows and precision over prediction columns (any match, no
    one-to-one assignment). When both are 0 the sample adds nothing, or, with
    ``reset`` (D2VLM's guard), the running sum itself becomes 0.
    """
    rec = float(np.mean(matrix.max(axis=1) >= thr))
    prc = float(np.mean(matrix.max(axis=0) >= thr))
    if rec == 0 and prc == 0:
        return 0.0 if reset else running
    return running + 2 * prc * rec / (prc + rec)


def eval_tal(samples: list[dict[str, Any]], variant: Variant) -> dict[str, Any]:
    """TAL: per-sample F1 from the G×P IoU matrix (no one-to-one matching).

    With evidence metrics, ``F1_evi@θ``/``F1_evi`` score the evidence spans (or
    the answer spans) the way D2VLM does: only at thresholds the ANSWER reaches,
    and an evidence F1 of 0 there resets that threshold's running sum to 0.
    """
    f1_sums = [0.0] * len(ETBENCH_THRESHOLDS)
    f1_sums_evi = [0.0] * len(ETBENCH_THRESHOLDS)
    failed = 0
    for sample in samples:
        spans, evidence_spans = _grounding_parse(sample["a"], variant)
        if not spans:
            failed += 1
            continue
        matrix = _iou_matrix(sample["tgt"], spans, variant)
        matrix_evi = _iou_matrix(sample["tgt"], evidence_spans or spans, variant)
        for i, thr in enumerate(ETBENCH_THRESHOLDS):
            # NaN compares False, so a NaN matrix skips this guard as in torch.
            if matrix.max() < thr:
                continue
            # For the answer rec = prc = 0 needs NaN IoUs past the guard; for the evidence it
            # is common (evidence missing a GT the answer hits), and D2VLM resets there too.
            f1_sums[i] = _add_matrix_f1(f1_sums[i], matrix, thr, variant.tal_reset)
            if variant.evidence_metrics:
                f1_sums_evi[i] = _add_matrix_f1(f1_sums_evi[i], matrix_evi, thr, reset=True)
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed}
    f1_scores = [f / len(samples) for f in f1_sums]
    out |= {f"F1@{thr}": _r5(f1) for thr, f1 in zip(ETBENCH_THRESHOLDS, f1_scores)}
    out["F1"] = _r5(sum(f1_scores) / len(f1_scores))
    if variant.evidence_metrics:
        f1_scores_evi = [f / len(samples) for f in f1_sums_evi]
        out |= {f"F1_evi@{thr}": _r5(f1) for thr, f1 in zip(ETBENCH_THRESHOLDS, f1_scores_evi)}
        out["F1_evi"] = _r5(sum(f1_scores_evi) / len(f1_scores_evi))
    return out


def _bins(spans: Iterable[Span], n_bins: int = 1000) -> np.ndarray:
    mask = np.zeros(n_bins, dtype=bool)
    for span in spans:
        # Python round (half-even) and plain slicing, as the official 1-second bins.
        mask[max(0, round(span[0])):round(span[1])] = True
    return mask


def eval_evs(samples: list[dict[str, Any]], variant: Variant) -> dict[str, Any]:
    """EVS: 1-second-bin F1 averaged over successfully parsed samples only.

    With evidence metrics ``F1_evi`` equals ``F1``: D2VLM paints the answer and
    the evidence spans into one shared mask and scores that mask twice.
    """
    f1_scores: list[float] = []
    failed = 0
    for sample in samples:
        spans, evidence = _grounding_parse(sample["a"], variant)
        if not spans:
            failed += 1
            continue
        pred_spans = [s for s in spans if math.isfinite(s[1])]
        if variant.evs_union:
            pred_spans = pred_spans + (evidence if evidence else spans)
        gt_mask, pred_mask = _bins(sample["tgt"]), _bins(pred_spans)
        tp = int(np.sum(gt_mask & pred_mask))
        fp = int(np.sum(pred_mask & ~gt_mask))
        fn = int(np.sum(gt_mask & ~pred_mask))
        if tp == 0:
            f1_scores.append(0.0)
            continue
        rec, prc = tp / (tp + fn), tp / (tp + fp)
        f1_scores.append(2 * prc * rec / (prc + rec))
    f1 = _r5(sum(f1_scores) / len(f1_scores)) if f1_scores else 0
    out = {"Total": len(samples), "Failed": failed, "F1": f1}
    if variant.evidence_metrics:
        out["F1_evi"] = f1
    return out


def eval_vhd(samples: list[dict[str, Any]], variant: Variant) -> dict[str, Any]:
    """VHD: hit if the point lies inside any annotator window (inclusive); F1 = hits / N.

    With evidence metrics, ``F1_evi`` uses the midpoint of the evidence's first
    span (the answer point when the evidence has none).
    """
    hits, hits_evi, failed = 0, 0, 0
    for sample in samples:
        windows = sample["tgt"]
        if not isinstance(windows[0][0], (list, tuple)):
            windows = [windows]
        evidence_point = None
        if variant.vhd_midpoint:
            parts = split_evidence(sample["a"], variant.delimiter or EVIDENCE_DELIMITER)
            point = parse_vhd_midpoint(parts[1]) if parts else None
            evidence_point = parse_vhd_midpoint(parts[0]) if parts else None
        else:
            point = parse_vhd_point(sample["a"])
        if point is None:
            failed += 1
            continue
        hits += int(any(w[0] <= point <= w[1] for annotator in windows for w in annotator))
        if evidence_point is None:
            evidence_point = point
        hits_evi += int(any(w[0] <= evidence_point <= w[1] for annotator in windows for w in annotator))
    out = {"Total": len(samples), "Failed": failed, "F1": _r5(hits / len(samples))}
    if variant.evidence_metrics:
        out["F1_evi"] = _r5(hits_evi / len(samples))
    return out


def _option_texts(options: list[Any]) -> list[str]:
    texts = []
    for idx, option in enumerate(options):
        body = f"{option[0]} - {option[1]}" if isinstance(option, (list, tuple)) else str(option)
        texts.append(f"({chr(ord('A') + idx)}) {body}")
    return texts


def eval_referring(samples: list[dict[str, Any]], variant: Variant, similarity: SimilarityFn) -> dict[str, Any]:
    """RAR/ECA/RVQ accuracy with the letter stages and the MiniLM similarity fallback."""
    group_map = letter_map(len(samples[0]["o"]))
    hits, failed, matched, matched_correct = 0, 0, 0, 0
    for sample in samples:
        choices = letter_map(len(sample["o"])) if variant.per_sample_letters else group_map
        truth = sample["p"]
        text = sample["a"]
        if variant.delimiter is not None:
            parts = text.split(variant.delimiter)
            text = parts[-1] if len(parts) > 1 else parts[0]
        ever_matched = False
        if variant.referring != "d2vlm":
            letter = paren_letter(text)
            if letter is not None:
                ever_matched = True
                if variant.referring == "strict" and letter in choices:
                    hits += int(truth == choices[letter])
                    continue
                if letter in choices and truth == choices[letter]:
                    hits += 1
                    continue
        processed = strip_choice_prefix(text, lower=True)
        if not processed:
            failed += 1
            continue
        letter = leading_letter(processed)
        if letter is not None:
            # Official and strict count any letter-shaped reply as matched; D2VLM only a..e.
            ever_matched = ever_matched or variant.referring != "d2vlm"
            if variant.referring == "official":
                if letter in choices and truth == choices[letter]:
                    hits += 1
                    continue
            elif letter in choices:
                matched += 1
                correct = truth == choices[letter]
                hits += int(correct)
                matched_correct += int(correct)
                continue
        best = similarity().best_option(processed, _option_texts(sample["o"]))
        if not ever_matched:
            failed += 1
        hits += int(best == truth)
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed, "Acc": _r5(hits / len(samples))}
    if variant.referring == "d2vlm":
        out["Matched_count"] = matched
        out["matched_ratio"] = matched / len(samples)
        out["correct_ratio_within_matched"] = matched_correct / (matched + 1e-7)
    return out


def eval_gvq(samples: list[dict[str, Any]], variant: Variant, similarity: SimilarityFn) -> dict[str, Any]:
    """GVQ: choice (a recognised leading letter is final) AND grounding; R@θ, mRec, Acc.

    With evidence metrics, also ``mIoU_evi``/``R_evi@θ``/``mRec_evi`` from the
    first evidence span (``[0, 0]`` without one, as D2VLM) of the correctly
    answered samples, and D2VLM's letter statistics: ``Matched count`` (answers
    with a recognised leading letter), ``Matched ratio`` (over all samples),
    ``correct count within matched`` and ``correct ratio within matched``
    (correct / (matched + 1e-7), D2VLM's guard against 0/0).
    """
    correct_ids: set[int] = set()
    choice_failed, matched, matched_correct = 0, 0, 0
    for i, sample in enumerate(samples):
        text = sample["a"]
        if variant.delimiter is not None:
            text = text.split(variant.delimiter)[-1]
        processed = strip_choice_prefix(text, lower=False)
        if not processed:
            choice_failed += 1
            continue
        choices = letter_map(len(sample["o"]))
        letter = leading_letter(processed)
        if letter is not None and letter in choices:
            matched += 1
            if sample["p"] == choices[letter]:
                correct_ids.add(i)
                matched_correct += 1
            continue
        if similarity().best_option(processed, _option_texts(sample["o"])) == sample["p"]:
            correct_ids.add(i)
    answer, evidence = _RecallTally(), _RecallTally()
    ground_failed = 0
    for i, sample in enumerate(samples):
        if i not in correct_ids:
            continue
        spans, evidence_spans = _grounding_parse(sample["a"], variant)
        if not spans:
            ground_failed += 1
            continue
        answer.add(_iou(sample["tgt"], spans[0], variant))
        if variant.evidence_metrics:
            evidence.add(_iou(sample["tgt"], evidence_spans[0] if evidence_spans else [0.0, 0.0], variant))
    total = len(samples)
    out: dict[str, Any] = {"Total": total, "Failed": ground_failed + choice_failed}
    out |= answer.block(total, "R", "mIoU", "mRec") | {"Acc": _r5(len(correct_ids) / total)}
    if variant.evidence_metrics:
        out |= evidence.block(total, "R_evi", "mIoU_evi", "mRec_evi")
        out |= {"Matched count": matched, "Matched ratio": matched / total,
                "correct count within matched": matched_correct,
                "correct ratio within matched": matched_correct / (matched + 1e-7)}
    return out


class ETBenchInputError(ValueError):
    """E.T. Bench prediction records that cannot be scored (empty input, inconsistent GT fields)."""


def caption_tokenizer(with_coco: bool) -> Callable[[list[str]], list[str]]:
    """The caption tokenizer the official scorer uses: non-ASCII to spaces, then Java PTB.

    Falls back to the pure-Python ``ptb_normalize`` when java/pycocoevalcap are
    missing or caption metrics are switched off (``evaluate_etbench`` then adds
    a note, since Sim and Bleu/CIDEr can move in the 4th decimal).
    """
    if with_coco and coco.unavailable_reason() is None:
        return lambda texts: coco.ptb_tokenize([remove_nonascii(text) for text in texts])
    return lambda texts: [ptb_normalize(text) for text in texts]


def _detection_f1(
    pred_spans: dict[Any, list[Span]],
    gts: dict[Any, tuple[list[Span], list[str]]],
    scale: float,
    prefix: str,
    max_proposals: int | None = MAX_PROPOSALS,
) -> dict[str, float]:
    """``{prefix}@θ`` and ``{prefix}``: densevid F1 from mean P/R over parsed videos, both scaled by ``scale``."""
    block: dict[str, float] = {}
    f1_scores = []
    for thr in ETBENCH_THRESHOLDS:
        pr = [detection_precision_recall(pred_spans[k], gts[k][0], thr, max_proposals) for k in gts]
        prc = float(np.mean([p for p, _ in pr])) * scale if pr else 0.0
        rec = float(np.mean([r for _, r in pr])) * scale if pr else 0.0
        f1 = 0.0 if prc + rec == 0 else 2 * prc * rec / (prc + rec)
        block[f"{prefix}@{thr}"] = _r5(f1)
        f1_scores.append(f1)
    block[prefix] = _r5(sum(f1_scores) / len(f1_scores))
    return block


def eval_dvc(
    samples: list[dict[str, Any]], variant: Variant, similarity: SimilarityFn, with_coco: bool = True
) -> dict[str, Any]:
    """DVC/SLC: parse-rate-scaled detection F1 (IoU > θ) and caption Sim (pairs at IoU ≥ θ).

    Sim pairs every prediction with each GT caption it overlaps at IoU ≥ θ, or with
    a seeded random filler string when it overlaps none; both sides are normalised
    with ``ptb_normalize``; Sim is the mean over θ of the mean over parsed videos
    of each video's mean pair cosine. It is not scaled by the parse rate.
    """
    gts: dict[Any, tuple[list[Span], list[str]]] = {}
    preds: dict[Any, list[tuple[Span, str]]] = {}
    evidence: dict[Any, list[Span]] = {}
    failed = 0
    for sample in samples:
        parsed = parse_dense_captions(sample["a"], variant.delimiter)
        if parsed is None:
            failed += 1
            continue
        key = (sample["video"], sample.get("idx")) if variant.key_by_sample else sample["video"]
        gts[key] = (sample["tgt"], sample["g"])
        # The official scorer indexes g by tgt position and dies with IndexError; say what is wrong instead.
        if not isinstance(sample["g"], list) or len(sample["g"]) != len(sample["tgt"]):
            raise ETBenchInputError(
                f"{sample.get('task')} sample idx={sample.get('idx')} ({sample['video']}): 'g' must hold one "
                f"caption per 'tgt' span ({len(sample['tgt'])}), got {sample['g']!r}")
        preds[key] = list(zip(*parsed))[:MAX_PROPOSALS]
        if variant.evidence_metrics:
            evidence[key] = parse_dense_evidence(sample["a"], variant.delimiter or EVIDENCE_DELIMITER)
    scale = len(preds) / len(samples)
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed}
    out |= _detection_f1({k: [p[0] for p in preds[k]] for k in gts}, gts, scale, "F1")
    if variant.evidence_metrics:
        # D2VLM scores every evidence span (no proposal cap) with the answer parse rate.
        out |= _detection_f1(evidence, gts, scale, "F1_evi", max_proposals=None)

    rng = random.Random(FILLER_SEED)
    pairs_per_thr: list[dict[Any, list[tuple[str, str]]]] = []
    for thr in ETBENCH_THRESHOLDS:
        video_pairs: dict[Any, list[tuple[str, str]]] = {}
        for key, (gt_spans, gt_caps) in gts.items():
            pairs: list[tuple[str, str]] = []
            for span, caption in preds[key]:
                matched = [gt_caps[j] for j, gt in enumerate(gt_spans) if dense_iou(span, gt) >= thr]
                if matched:
                    pairs.extend((caption, ref) for ref in matched)
                else:
                    pairs.append((caption, filler_string(rng)))
            video_pairs[key] = pairs
        pairs_per_thr.append(video_pairs)
    tokenize = caption_tokenizer(with_coco)
    raw_texts = sorted({t for vp in pairs_per_thr for pairs in vp.values() for pair in pairs for t in pair})
    tokens = dict(zip(raw_texts, tokenize(raw_texts)))
    pairs_per_thr = [{key: [(tokens[p], tokens[r]) for p, r in pairs] for key, pairs in vp.items()}
                     for vp in pairs_per_thr]

    if not gts:
        out["SentSim"] = 0.0
        return out
    sim = similarity()
    unique = sorted({t for vp in pairs_per_thr for pairs in vp.values() for pair in pairs for t in pair})
    embeddings = dict(zip(unique, sim.embed(unique)))
    sim_per_thr = []
    for video_pairs in pairs_per_thr:
        per_video = [float(np.mean([np.dot(embeddings[p], embeddings[r]) for p, r in pairs]))
                     for pairs in video_pairs.values()]
        sim_per_thr.append(float(np.mean(per_video)))
    out["SentSim"] = _r5(sum(sim_per_thr) / len(sim_per_thr))

    if with_coco and coco.unavailable_reason() is None:
        per_thr_scores: dict[str, list[float]] = {k: [] for k in coco.COCO_KEYS}
        for video_pairs in pairs_per_thr:
            per_video_scores: dict[str, list[float]] = {k: [] for k in coco.COCO_KEYS}
            for pairs in video_pairs.values():
                refs = {i: [r] for i, (_, r) in enumerate(pairs)}
                hyps = {i: [p] for i, (p, _) in enumerate(pairs)}
                for name, value in coco.corpus_scores(refs, hyps).items():
                    per_video_scores[name].append(value)
            for name in coco.COCO_KEYS:
                per_thr_scores[name].append(float(np.mean(per_video_scores[name])))
        for name in coco.COCO_KEYS:
            out[name] = _r5(sum(per_thr_scores[name]) / len(per_thr_scores[name]))
    return out


def evaluate_task(
    task: str, samples: list[dict[str, Any]], variant: Variant, similarity: SimilarityFn, with_coco: bool = True
) -> dict[str, Any]:
    """Score one non-empty (task, source) group.

    Raises:
        ValueError: For an unknown task code or an empty group.
    """
    if not samples:
        raise ValueError(f"no samples for task {task!r}")
    if task in ("tvg", "epm"):
        return eval_tvg(samples, variant)
    if task == "tem":
        return eval_tem(samples, variant)
    if task == "tal":
        return eval_tal(samples, variant)
    if task == "evs":
        return eval_evs(samples, variant)
    if task == "vhd":
        return eval_vhd(samples, variant)
    if task in REFERRING_TASKS:
        return eval_referring(samples, variant, similarity)
    if task == "gvq":
        return eval_gvq(samples, variant, similarity)
    if task in CAPTIONING_TASKS:
        return eval_dvc(samples, variant, similarity, with_coco)
    raise ValueError(f"unknown E.T. Bench task {task!r}; expected one of {TASKS}")


def summarize(collected: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per-task means, the ``Overall`` row and the ``Merged`` averages.

    Each task value is the unweighted mean over its sources rounded to 5
    decimals; ``Overall`` shows ×100 rounded to 1 decimal for the tasks present;
    ``Merged`` groups are ``None`` unless all their tasks are present.

    Args:
        collected: ``{task: {source: metric dict}}``.

    Returns:
        ``{"Overall": {...}, "Merged": {...}}``.
    """
    task_values: dict[tuple[str, str], float] = {}
    for _, task, key in _OVERALL_COLUMNS:
        if task in collected:
            values = [d[key] for d in collected[task].values()]
            task_values[(task, key)] = round(sum(values) / len(values), 5)
    overall = {column: round(task_values[(task, key)] * 100, 1)
               for column, task, key in _OVERALL_COLUMNS if (task, key) in task_values}

    def merged(keys: list[tuple[str, str]]) -> float | None:
        if not all(k in task_values for k in keys):
            return None
        # Same operation order as the official script: sum × 100 / count.
        return round(sum(task_values[k] for k in keys) * 100 / len(keys), 1)

    merged_row = {
        "Acc (ref)": merged([(t, "Acc") for t in REFERRING_TASKS]),
        "F1 (gnd)": merged([(t, "F1") for t in GROUNDING_TASKS]),
        "F1 (cap)": merged([(t, "F1") for t in CAPTIONING_TASKS]),
        "Sim (cap)": merged([(t, "SentSim") for t in CAPTIONING_TASKS]),
        "Rec (com)": merged([(t, "mRec") for t in COMPLEX_TASKS]),
    }
    return {"Overall": overall, "Merged": merged_row}


def evaluate_etbench(
    samples: list[dict[str, Any]],
    variant: str = "official",
    similarity: SentenceSimilarity | None = None,
    with_coco: bool = True,
) -> dict[str, Any]:
    """Score E.T. Bench prediction records.

    Args:
        samples: Records with ``task``, ``source``, ``a`` and the task's GT
            fields (``tgt``, ``p``, ``o``, ``g``, ``video``).
        variant: ``official``, ``d2vlm``, ``d2vlm-strict`` or ``fixed``.
        similarity: A loaded model to reuse; built lazily when a task needs it.
        with_coco: Compute Bleu/METEOR/ROUGE_L/CIDEr for dvc/slc when available.

    Returns:
        ``{task: {source: metrics}}`` plus ``Overall``, ``Merged``, ``variant``
        and ``notes`` (reasons for omitted keys).

    Raises:
        ValueError: Unknown variant or task, or a record without the needed fields.
    """
    config = get_variant(variant)
    if not samples:
        raise ETBenchInputError("no E.T. Bench prediction records to score")
    lazy = _LazySimilarity(similarity)
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for record in samples:
        if not isinstance(record, dict) or "task" not in record or "a" not in record:
            raise ValueError("every prediction record needs 'task' and 'a'")
        if not isinstance(record["a"], str):
            raise ValueError("field 'a' must be a string")
        groups.setdefault(record["task"], {}).setdefault(record.get("source", ""), []).append(record)
    collected: dict[str, Any] = {}
    for task, sources in groups.items():
        for source, group in sources.items():
            try:
                collected.setdefault(task, {})[source] = evaluate_task(task, group, config, lazy, with_coco)
            except (KeyError, TypeError, IndexError) as exc:
                raise ValueError(f"malformed record in {task}/{source}: {exc!r}") from exc
    notes = []
    if with_coco and any(t in groups for t in CAPTIONING_TASKS):
        reason = coco.unavailable_reason()
        if reason:
            notes.append(reason)
    if any(t in groups for t in CAPTIONING_TASKS) and (not with_coco or coco.unavailable_reason()):
        notes.append("dvc/slc captions tokenized with the pure-Python PTB approximation, not the Java "
                     "PTBTokenizer the official scorer runs; SentSim may differ from official in the 4th decimal")
    return collected | summarize(collected) | {"variant": config.name, "notes": notes}
