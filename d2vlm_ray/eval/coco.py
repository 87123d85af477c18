"""Optional caption metrics from ``pycocoevalcap`` (Bleu, METEOR, ROUGE_L, CIDEr) and its PTB tokenizer.

These need the ``pycocoevalcap`` package (``captioning`` extra) and a ``java``
binary: METEOR 1.5 and the Stanford PTBTokenizer (stanford-corenlp 3.4.1) run as
Java subprocesses from the jars that ship inside pycocoevalcap. Neither is a
hard dependency: when one is missing, ``unavailable_reason`` says why and callers
omit those keys (or fall back to ``similarity.ptb_normalize``) with a note
instead of failing.

``ptb_tokenize`` runs the same jar with the same flags (``-preserveLines
-lowerCase``) and drops the same punctuation tokens as pycocoevalcap's
``PTBTokenizer``, which both official scorers (E.T. Bench, TimeChat) call. It is
our own wrapper because pycocoevalcap's writes its temporary file into
site-packages, which may be read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"})
"""Tokens pycocoevalcap removes after PTB tokenization."""
PTB_JAR = "stanford-corenlp-3.4.1.jar"


class CaptionScorerError(RuntimeError):
    """The Java PTB tokenizer or METEOR returned something unreadable."""


def unavailable_reason() -> str | None:
    """``None`` when pycocoevalcap and java are usable, else a one-line reason."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (optional extra); Bleu/METEOR/ROUGE_L/CIDEr omitted"
    if shutil.which("java") is None:
        return "java is not on PATH (needed by METEOR); Bleu/METEOR/ROUGE_L/CIDEr omitted"
    return None


def _package_dir() -> Path:
    import pycocoevalcap

    # pycocoevalcap 1.2 is a namespace package (no __init__.py), so __file__ is None.
    return Path(next(iter(pycocoevalcap.__path__)))


@lru_cache(maxsize=1)
def _scorers() -> list[tuple[Any, Any]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    return [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"),
            (Cider(), "CIDEr")]


def _scorer(name: str) -> Any:
    for scorer, names in _scorers():
        if names == name or (isinstance(names, list) and name in names):
            return scorer
    raise KeyError(name)


def corpus_scores(refs: dict[Any, list[str]], hyps: dict[Any, list[str]],
                  names: tuple[str, ...] = COCO_KEYS) -> dict[str, float]:
    """Corpus-level Bleu_1..4, METEOR, ROUGE_L and CIDEr(-D as in pycocoevalcap) of aligned captions.

    Args:
        refs: Id -> list of (tokenized) reference captions.
        hyps: Id -> one-element list with the (tokenized) hypothesis caption.
        names: Which metrics to compute (a subset of ``COCO_KEYS``).

    Returns:
        Metric name -> score (fractions, unrounded).
    """
    out: dict[str, float] = {}
    for scorer, scorer_names in _scorers():
        wanted = scorer_names if isinstance(scorer_names, list) else [scorer_names]
        if not set(wanted) & set(names):
            continue
        if isinstance(scorer_names, list):
            # verbose=0: Bleu otherwise prints its n-gram statistics to stdout, which
            # would break the CLI's one-JSON-object output.
            score, _ = scorer.compute_score(refs, hyps, verbose=0)
            out.update({name: float(value) for name, value in zip(scorer_names, score)})
        else:
            score, _ = scorer.compute_score(refs, hyps)
            out[scorer_names] = float(score)
    return {name: value for name, value in out.items() if name in names}


def meteor_items(pairs: list[tuple[str, str]]) -> list[float]:
    """Segment-level METEOR 1.5 of many ``(reference, hypothesis)`` pairs in one call.

    Args:
        pairs: Tokenized ``(reference, hypothesis)`` captions.

    Returns:
        One score per pair, in the order given.
    """
    if not pairs:
        return []
    refs = {idx: [ref] for idx, (ref, _) in enumerate(pairs)}
    hyps = {idx: [hyp] for idx, (_, hyp) in enumerate(pairs)}
    _, scores = _scorer("METEOR").compute_score(refs, hyps)
    return [float(score) for score in scores]


def meteor_pair(ref: str, hyp: str) -> float:
    """METEOR of one caption pair."""
    return meteor_items([(ref, hyp)])[0]


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Stanford PTB tokenization (Java) plus pycocoevalcap's punctuation filter.

    Args:
        texts: Raw captions; newlines inside one caption become spaces.

    Returns:
        One lower-cased, space-joined token string per input, in order.

    Raises:
        CaptionScorerError: If java/pycocoevalcap are missing or the tokenizer's
            output does not line up with the input.
    """
    if not texts:
        return []
    reason = unavailable_reason()
    if reason is not None:
        raise CaptionScorerError(reason)
    jar = _package_dir() / "tokenizer" / PTB_JAR
    sentences = "\n".join(text.replace("\n", " ") for text in texts)
    fd, tmp_name = tempfile.mkstemp(suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(sentences)
        proc = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
             tmp_name],
            capture_output=True, check=False,
        )
    finally:
        os.remove(tmp_name)
    if proc.returncode != 0:
        raise CaptionScorerError(f"PTBTokenizer failed: {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    # pycocoevalcap zips inputs with output lines, so a trailing empty line is harmless;
    # fewer lines than inputs would silently drop captions.
    if len(lines) < len(texts):
        raise CaptionScorerError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} captions")
    return [" ".join(tok for tok in line.rstrip().split(" ") if tok not in PTB_PUNCTUATION)
            for line in lines[: len(texts)]]
