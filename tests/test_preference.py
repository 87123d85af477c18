"""The FPO pair forward equals separate single forwards, branch by branch (float64)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from d2vlm_ray.losses.fpo import fpo_loss, grounding_loglik, sequence_logps
from d2vlm_ray.losses.sft import sft_loss
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.preference import build_pair_batch, pair_forward
from d2vlm_ray.types import PreferencePair
from tests.helpers_model import tiny_model, tiny_tokenizers

DVC = "<evi><evi></evi><evi>, the red square jumps. <evi>, the blue circle grows."
PAIRS = [
    PreferencePair(
        "a", "temporal_shift", 0, "a.mp4", 8.0, "dvc", "Describe all the events in the video.",
        DVC, [(1.0, 3.0), (4.0, 6.0)], DVC, [(0.0, 1.0), (6.0, 8.0)],
    ),
    PreferencePair(
        "b", "textual_attribute", 0, "b.mp4", 5.0, "gqa", "What happens during <evi>?",
        "<evi></evi>At <evi>, it turned green.", [(1.0, 2.0)],
        "<evi></evi>At <evi>, it turned red and it jumped.", [(1.0, 2.0)], src_spans_s=[(0.0, 1.0)],
    ),
    PreferencePair(
        "c", "temporal_drop", 0, "c.mp4", 6.0, "tal", "Find every occurrence of the action.",
        "<evi><evi></evi><evi>, <evi>.", [(0.0, 1.0), (3.0, 5.0)], "<evi></evi><evi>.", [(3.0, 5.0)],
    ),
]
FRAMES = [9, 6, 7]


@pytest.fixture(scope="module")
def setup() -> dict:
    model = tiny_model(seed=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    patches = [torch.randn(f, 16, 48, generator=gen, dtype=torch.float64) for f in FRAMES]
    times = [np.arange(f, dtype=np.float64) for f in FRAMES]
    durations = [float(f - 1) for f in FRAMES]
    return {"model": model, "patches": patches, "times": times, "durations": durations}


def _single(setup: dict, branch: str) -> tuple:
    tok = tiny_tokenizers()
    batch = build_batch(
        tok.llm, tok.qformer, [p.prompt for p in PAIRS], setup["patches"], setup["times"], setup["durations"],
        responses=[getattr(p, f"{branch}_text") for p in PAIRS],
        spans_s=[getattr(p, f"{branch}_spans_s") for p in PAIRS],
        src_spans_s=[p.src_spans_s for p in PAIRS],
    )
    return setup["model"](batch)


def _pair(setup: dict, pairs=PAIRS):
    batch = build_pair_batch(tiny_tokenizers(), pairs, setup["patches"], setup["times"], setup["durations"])
    return pair_forward(setup["model"], batch)


def test_chosen_branch_sft_equals_single_forward(setup: dict) -> None:
    with torch.no_grad():
        out = _pair(setup)
        ref = _single(setup, "chosen")
    ours = sft_loss(out.logits, out.labels, out.evidence_logits, out.evidence_queries, out.evidence_spans_idx)
    theirs = sft_loss(ref.logits, ref.labels, ref.evidence_logits, ref.evidence_queries, ref.evidence_spans_idx)
    for name in ("total", "lm", "grounding", "consistency"):
        assert getattr(ours, name).item() == pytest.approx(getattr(theirs, name).item(), abs=1e-6), name
    for b in range(len(PAIRS)):
        assert torch.allclose(out.evidence_logits[b], ref.evidence_logits[b], atol=1e-10)
        assert torch.equal(out.evidence_spans_idx[b], ref.evidence_spans_idx[b])
        n = int((ref.labels[b] != -100).nonzero().max()) + 1
        assert torch.allclose(out.logits[b, :n], ref.logits[b, :n], atol=1e-10)
    text = sequence_logps(ref.logits, ref.labels)
    assert torch.allclose(out.chosen_text_logp, text, atol=1e-9)


def test_rejected_branch_equals_separate_forward(setup: dict) -> None:
    with torch.no_grad():
        out = _pair(setup)
        ref = _single(setup, "rejected")
    text = sequence_logps(ref.logits, ref.labels)
    ground = torch.stack([grounding_loglik(lg, s) for lg, s in zip(ref.evidence_logits, ref.evidence_spans_idx)])
    assert torch.allclose(out.rejected_text_logp, text, atol=1e-9)
    assert torch.allclose(out.rejected_grounding_logp, ground, atol=1e-9)
    assert torch.allclose(out.rejected_logp, text + ground, atol=1e-9)
    # The rejected branch is injected with its own spans: its evidence targets are the rejected ones.
    assert out.rejected_evidence_spans_idx[0].tolist() == [[0, 1], [6, 8], [0, 1], [6, 8]]
    assert not torch.allclose(out.rejected_logp, out.chosen_logp)


def test_branches_are_independent(setup: dict) -> None:
    changed = [replace(PAIRS[0], rejected_text="<evi></evi>The event happens in <evi>.", rejected_spans_s=[(2.0, 5.0)])]
    with torch.no_grad():
        base = _pair(setup)
        batch = build_pair_batch(
            tiny_tokenizers(), changed + PAIRS[1:], setup["patches"], setup["times"], setup["durations"]
        )
        other = pair_forward(setup["model"], batch)
    assert torch.allclose(base.chosen_logp, other.chosen_logp, atol=1e-10)
    assert torch.allclose(base.rejected_logp[1:], other.rejected_logp[1:], atol=1e-10)
    assert not torch.allclose(base.rejected_logp[:1], other.rejected_logp[:1])


def test_video_encoded_once_and_gradients_reach_it(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = setup["model"]
    calls = {"compress": 0, "prefill": 0}
    compress, prefill = model.compress, model.prefill_prefix

    def counting_compress(batch):
        calls["compress"] += 1
        return compress(batch)

    def counting_prefill(batch, tokens):
        calls["prefill"] += 1
        return prefill(batch, tokens)

    monkeypatch.setattr(model, "compress", counting_compress)
    monkeypatch.setattr(model, "prefill_prefix", counting_prefill)
    model.zero_grad()
    loss = fpo_loss(_pair(setup))
    loss.total.backward()
    assert calls == {"compress": 1, "prefill": 1}
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("compressor.") and p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads), "no gradient reached the compressor"
    model.zero_grad()


def test_bad_rejected_response_names_the_branch(setup: dict) -> None:
    bad = [replace(PAIRS[0], rejected_spans_s=[(1.0, 2.0)])]
    with pytest.raises(ValueError, match="rejected branch: spans_s"):
        build_pair_batch(tiny_tokenizers(), bad, setup["patches"][:1], setup["times"][:1], setup["durations"][:1])
    with pytest.raises(ValueError, match="patches"):
        build_pair_batch(tiny_tokenizers(), PAIRS, setup["patches"][:1], setup["times"], setup["durations"])


def test_loglik_targets_use_unrounded_spans_and_the_sft_bce_rounds(setup: dict) -> None:
    """Official calculate_logps measures distances from the annotation spans as they are."""
    frac = [
        replace(PAIRS[0], chosen_spans_s=[(1.4, 3.6), (4.2, 5.5)], rejected_spans_s=[(0.3, 1.2), (5.7, 7.6)]),
    ]
    batch = build_pair_batch(tiny_tokenizers(), frac, setup["patches"][:1], setup["times"][:1], setup["durations"][:1])
    out = pair_forward(setup["model"], batch)
    pos_chosen = torch.tensor([(1.4, 3.6), (4.2, 5.5)] * 2, dtype=torch.float64)
    pos_rejected = torch.tensor([(0.3, 1.2), (5.7, 7.6)] * 2, dtype=torch.float64)
    want_c = grounding_loglik(out.evidence_logits[0], pos_chosen)
    want_r = grounding_loglik(out.rejected_evidence_logits[0], pos_rejected)
    torch.testing.assert_close(out.chosen_grounding_logp[0], want_c, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.rejected_grounding_logp[0], want_r, rtol=0, atol=1e-9)
    rounded = grounding_loglik(out.evidence_logits[0], out.evidence_spans_idx[0])
    assert abs(float(rounded - want_c)) > 1e-3, "the unrounded targets must matter on this case"
    assert out.evidence_spans_idx[0].tolist() == [[1, 4], [4, 6], [1, 4], [4, 6]], "the SFT BCE rounds"
