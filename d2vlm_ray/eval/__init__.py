"""Evaluation metrics: E.T. Bench (official and D2VLM variants), Charades-STA, YouCook2.

Pure Python/numpy (the MiniLM similarity uses sentence-transformers); nothing here
imports Ray. Reusable span metrics for structured predictions:

* ``temporal_iou(a, b)``: IoU of two ``[start_s, end_s]`` spans;
* ``recall_at_iou(preds, gts, thresholds)``: R@1 at each IoU and mIoU over all queries;
* ``dense_caption_f1(pred_spans, gt_spans, thresholds)``: E.T. Bench-style DVC F1.
"""

from d2vlm_ray.eval.spans import dense_caption_f1, recall_at_iou, temporal_iou

__all__ = ["dense_caption_f1", "recall_at_iou", "temporal_iou"]
