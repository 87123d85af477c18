"""Optional caption metrics from ``pycocoevalcap`` (Bleu, METEOR, ROUGE_L, CIDEr).

These need the ``pycocoevalcap`` package and a ``java`` binary (METEOR 1.5 runs
as a Java subprocess). Neither is a hard dependency: when one is missing,
``unavailable_reason`` says why and callers omit those keys with a note instead
of failing. Texts passed here are already normalised with
``similarity.ptb_normalize`` (the Java PTB tokenizer is not used).
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from typing import Any

COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def unavailable_reason() -> str | None:
    """``None`` when pycocoevalcap and java are usable, else a one-line reason."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (optional extra); Bleu/METEOR/ROUGE_L/CIDEr omitted"
    if shutil.which("java") is None:
        return "java is not on PATH (needed by METEOR); Bleu/METEOR/ROUGE_L/CIDEr omitted"
    return None


@lru_cache(maxsize=1)
def _scorers() -> list[tuple[Any, Any]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    return [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"),
            (Cider(), "CIDEr")]


def corpus_scores(refs: dict[int, list[str]], hyps: dict[int, list[str]]) -> dict[str, float]:
    """Corpus-level Bleu_1..4, METEOR, ROUGE_L and CIDEr(-D as in pycocoevalcap) of aligned captions.

    Args:
        refs: Id -> list of reference captions.
        hyps: Id -> one-element list with the hypothesis caption.

    Returns:
        Metric name -> score (fractions, unrounded).
    """
    out: dict[str, float] = {}
    for scorer, names in _scorers():
        score, _ = scorer.compute_score(refs, hyps)
        if isinstance(names, list):
            out.update({name: float(value) for name, value in zip(names, score)})
        else:
            out[names] = float(score)
    return out


def meteor_pair(ref: str, hyp: str) -> float:
    """METEOR of one caption pair (used by SODA_c)."""
    for scorer, names in _scorers():
        if names == "METEOR":
            score, _ = scorer.compute_score({0: [ref]}, {0: [hyp]})
            return float(score)
    raise RuntimeError("METEOR scorer missing")
