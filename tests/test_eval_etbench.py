"""E.T. Bench task metrics, variants and aggregation, with hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from d2vlm_ray.eval.etbench import VARIANTS, evaluate_etbench, get_variant, summarize
from d2vlm_ray.eval.similarity import SentenceSimilarity


@pytest.fixture(scope="session")
def minilm() -> Iterator[SentenceSimilarity]:
    """The packaged MiniLM, loaded once per test session."""
    yield SentenceSimilarity()


def _rec(task: str, a: str, **fields: object) -> dict:
    return {"task": task, "source": fields.pop("source", "src"), "a": a, **fields}


def test_tvg_official_first_interval() -> None:
    """GT [0,10]: "0 - 5" IoU .5; "2 - 12" IoU 8/12; failure; "20 - 30 and 0 - 10" first interval IoU 0.
    R@.1=R@.3=R@.5=2/4, R@.7=0 -> F1=(.5*3)/4=.375; mIoU=(.5+.66667)/4=.29167."""
    recs = [_rec("tvg", a, tgt=[0, 10]) for a in ("0 - 5", "2 - 12", "no answer", "20 - 30 and 0 - 10")]
    out = evaluate_etbench(recs)["tvg"]["src"]
    assert out["Total"] == 4 and out["Failed"] == 1
    assert [out[f"F1@{t}"] for t in (0.1, 0.3, 0.5, 0.7)] == [0.5, 0.5, 0.5, 0.0]
    assert out["F1"] == 0.375
    assert out["mIoU"] == 0.29167


def test_tvg_d2vlm_max_iou_and_delimiter() -> None:
    """D2VLM takes the best of all answer intervals (IoU 1) and fails text without </evi>."""
    recs = [_rec("tvg", "0 - 10 </evi> 20 - 30 and 0 - 10", tgt=[0, 10]), _rec("tvg", "0 - 10", tgt=[0, 10])]
    d2 = evaluate_etbench(recs, variant="d2vlm")["tvg"]["src"]
    assert d2["Failed"] == 1 and d2["F1"] == 0.5 and d2["mIoU"] == 0.5
    official = evaluate_etbench(recs, variant="official")["tvg"]["src"]
    # official: first interval of the whole text is [0,10] for both -> all hits
    assert official["F1"] == 1.0


def test_tvg_malformed_and_zero_length() -> None:
    """'1..5 - 3' is a failure (official crashes); '12 - 12' on GT [12,12] gives NaN mIoU officially, 0 fixed."""
    recs = [_rec("tvg", "1..5 - 3", tgt=[0, 10]), _rec("tvg", "12 - 12", tgt=[12, 12])]
    official = evaluate_etbench(recs)["tvg"]["src"]
    assert official["Failed"] == 1 and official["F1"] == 0.0 and math.isnan(official["mIoU"])
    fixed = evaluate_etbench(recs, variant="fixed")["tvg"]["src"]
    assert fixed["mIoU"] == 0.0


def test_tal_duplicates_and_failures() -> None:
    """GT [[0,10],[20,30]], pred 3× [0,10]: rec 1/2, prc 1 -> F1 2/3; plus a failure -> 1/3 per θ."""
    recs = [_rec("tal", "0-10, 0-10, 0-10", tgt=[[0, 10], [20, 30]]), _rec("tal", "nothing", tgt=[[0, 10]])]
    out = evaluate_etbench(recs)["tal"]["src"]
    assert out["F1@0.5"] == 0.33333 and out["F1"] == 0.33333 and out["Failed"] == 1
    dup = evaluate_etbench([_rec("tal", "0-10, 0-10, 0-10", tgt=[[0, 10]])])["tal"]["src"]
    assert dup["F1"] == 1.0


def test_tal_nan_reset_d2vlm() -> None:
    """A NaN IoU (point on point) gives rec = prc = 0: official crashes (here: adds 0);
    D2VLM resets the running sum, wiping the earlier perfect sample."""
    official = evaluate_etbench([_rec("tal", "0 - 10", tgt=[[0, 10]]), _rec("tal", "5 - 5", tgt=[[5, 5]])])
    assert official["tal"]["src"]["F1"] == 0.5
    d2 = evaluate_etbench([_rec("tal", "e </evi> 0 - 10", tgt=[[0, 10]]), _rec("tal", "e </evi> 5 - 5", tgt=[[5, 5]])],
                          variant="d2vlm")
    assert d2["tal"]["src"]["F1"] == 0.0


def test_evs_bins_rounding_and_denominator() -> None:
    """[0.6,10.4] vs GT [0.4,10.6]: bins 1..9 vs 0..10 -> P=1, R=9/11, F1=.9.
    '0 - 2000' vs [0,10]: 1000 bins, TP 10 -> F1 = .02/1.01 = .019802.
    [2.5,4.5] vs [2,4]: half-even rounding gives bins 2,3 -> F1 1 (half-up would give .5).
    A failure leaves the denominator: mean(.9, .019802, 1) = .63993."""
    recs = [
        _rec("evs", "0.6 - 10.4", tgt=[[0.4, 10.6]]),
        _rec("evs", "0 - 2000", tgt=[[0, 10]]),
        _rec("evs", "2.5 - 4.5", tgt=[[2, 4]]),
        _rec("evs", "no idea", tgt=[[0, 10]]),
    ]
    out = evaluate_etbench(recs)["evs"]["src"]
    assert out["Failed"] == 1
    assert out["F1"] == round((0.9 + 0.02 / 1.01 + 1.0) / 3, 5) == 0.63993


def test_evs_d2vlm_union_with_evidence() -> None:
    """Answer [0,5] ∪ evidence [5,10] covers GT [0,10] -> F1 1 under d2vlm (answer alone: 2/3)."""
    out = evaluate_etbench([_rec("evs", "5 - 10 </evi> 0 - 5", tgt=[[0, 10]])], variant="d2vlm")
    assert out["evs"]["src"]["F1"] == 1.0
    alone = evaluate_etbench([_rec("evs", "0 - 5", tgt=[[0, 10]])])
    assert alone["evs"]["src"]["F1"] == 0.66667


def test_vhd_official_and_midpoint() -> None:
    """Window [10,14]: 'clip 3 at 12.0s' reads 3 (miss), '12' hit, '10' boundary hit, 'none' failure -> 2/4."""
    recs = [_rec("vhd", a, tgt=[[10, 14]]) for a in ("clip 3 at 12.0s", "at 12", "10", "none")]
    out = evaluate_etbench(recs)["vhd"]["src"]
    assert out["F1"] == 0.5 and out["Failed"] == 1
    multi = [_rec("vhd", "e </evi> 8 - 16", tgt=[[[0, 1]], [[10, 14]]]), _rec("vhd", "e </evi> 12.5", tgt=[[10, 14]])]
    d2 = evaluate_etbench(multi, variant="d2vlm")["vhd"]["src"]
    assert d2["F1"] == 0.5 and d2["Failed"] == 1


def test_tem_best_gt_segment() -> None:
    """GT [[0,10],[20,30]], pred '20 - 25' -> IoU .5 with the 2nd segment: R@.1/.3/.5 hit -> mRec .75."""
    out = evaluate_etbench([_rec("tem", "20 - 25", tgt=[[0, 10], [20, 30]])])["tem"]["src"]
    assert out["mRec"] == 0.75 and out["R@0.7"] == 0.0 and out["mIoU"] == 0.5


def test_gvq_letter_is_final_and_joint_recall() -> None:
    """'B. 0 - 5' correct (p=1), IoU .5; 'A 0 - 10' wrong letter (final). R = [1/2,1/2,1/2,0] -> mRec .375."""
    opts = ["w", "x", "y", "z"]
    recs = [_rec("gvq", "B. 0 - 5", o=opts, p=1, tgt=[0, 10]), _rec("gvq", "A 0 - 10", o=opts, p=1, tgt=[0, 10])]
    out = evaluate_etbench(recs)["gvq"]["src"]
    assert out["Acc"] == 0.5 and out["mRec"] == 0.375 and out["Failed"] == 0


def test_referring_variants(minilm: SentenceSimilarity) -> None:
    """'(A) but actually the woman cooks' with answer B: official falls through to similarity (correct),
    d2vlm-strict and d2vlm take the letter A as final (wrong). An empty answer is a failure."""
    opts = ["the man opens the door", "the woman cooks", "the dog sleeps", "the child runs"]
    recs = [
        _rec("rvq", "(A) but actually the woman cooks", o=opts, p=1),
        _rec("rvq", "", o=opts, p=0),
        _rec("rvq", "A man opens the door", o=opts, p=0),
    ]
    official = evaluate_etbench(recs, similarity=minilm)["rvq"]["src"]
    assert official["Acc"] == round(2 / 3, 5) and official["Failed"] == 1
    strict = evaluate_etbench(recs, variant="d2vlm-strict", similarity=minilm)["rvq"]["src"]
    assert strict["Acc"] == round(1 / 3, 5)
    d2 = evaluate_etbench(recs, variant="d2vlm", similarity=minilm)["rvq"]["src"]
    assert d2["Acc"] == round(1 / 3, 5)
    assert d2["Matched_count"] == 2


def test_dvc_f1_and_sim(minilm: SentenceSimilarity) -> None:
    """Video 1: preds [0,10] 'crack the eggs' (exact GT caption) and [40,50] (no match); video 2 fails.
    Detection: P = R = 1/2 on parsed videos, s = 1/2 -> F1 .25. Sim: the unmatched prediction is paired
    with a seeded filler string, so Sim < 1 and is identical on a second run."""
    text = "0 - 10 seconds, crack the eggs.\n40 - 50 seconds, stir the bowl slowly."
    recs = [
        _rec("dvc", text, video="v1", tgt=[[0, 10], [20, 30]], g=["crack the eggs", "whisk the eggs"]),
        _rec("dvc", "no captions", video="v2", tgt=[[0, 5]], g=["something"]),
    ]
    first = evaluate_etbench(recs, similarity=minilm, with_coco=False)["dvc"]["src"]
    assert first["F1"] == 0.25 and first["Failed"] == 1
    assert 0.3 < first["SentSim"] < 0.9
    second = evaluate_etbench(recs, similarity=minilm, with_coco=False)["dvc"]["src"]
    assert second["SentSim"] == first["SentSim"]
    perfect = evaluate_etbench([_rec("dvc", "0 - 10 seconds, crack the eggs.", video="v", tgt=[[0, 10]],
                                     g=["Crack the eggs"])], similarity=minilm, with_coco=False)
    assert perfect["dvc"]["src"]["SentSim"] == 1.0 and perfect["dvc"]["src"]["F1"] == 1.0


def test_partial_task_set_and_unknown_inputs() -> None:
    """Only TVG present: official crashes in its Merged table; here Overall lists TVG, Merged is None."""
    out = evaluate_etbench([_rec("tvg", "0 - 10", tgt=[0, 10])])
    assert out["Overall"] == {"TVG (F1)": 100.0}
    assert all(v is None for v in out["Merged"].values())
    with pytest.raises(ValueError):
        evaluate_etbench([_rec("xyz", "0 - 10", tgt=[0, 10])])
    with pytest.raises(ValueError):
        get_variant("nope")
    assert set(VARIANTS) == {"official", "d2vlm", "d2vlm-strict", "fixed"}


def test_summarize_all_tasks() -> None:
    """Per-task means over sources (5 dp), Overall ×100 (1 dp), Merged = sum×100/count (1 dp).
    rar has two sources .4 and .6 -> .5; Acc(ref) = (.5+.2+.3)×100/3 = 33.3;
    F1(gnd) = (.1+.2+.3+.4+.5)×100/5 = 30.0; F1(cap) = (.6+.2)/2 = 40.0; Sim(cap) = (.5+.3)/2 = 40.0;
    Rec(com) = (.125+.25)×100/2 = 18.75 exactly -> 18.8 (round-half-even keeps the even 8)."""
    collected = {
        "rar": {"a": {"Acc": 0.4}, "b": {"Acc": 0.6}}, "eca": {"a": {"Acc": 0.2}}, "rvq": {"a": {"Acc": 0.3}},
        "tvg": {"a": {"F1": 0.1}}, "epm": {"a": {"F1": 0.2}}, "tal": {"a": {"F1": 0.3}},
        "evs": {"a": {"F1": 0.4}}, "vhd": {"a": {"F1": 0.5}},
        "dvc": {"a": {"F1": 0.6, "SentSim": 0.5}}, "slc": {"a": {"F1": 0.2, "SentSim": 0.3}},
        "tem": {"a": {"mRec": 0.125}}, "gvq": {"a": {"mRec": 0.25}},
    }
    out = summarize(collected)
    assert out["Overall"]["RAR (Acc)"] == 50.0 and out["Overall"]["GVQ (Rec)"] == 25.0
    assert len(out["Overall"]) == 14
    assert out["Merged"] == {"Acc (ref)": 33.3, "F1 (gnd)": 30.0, "F1 (cap)": 40.0, "Sim (cap)": 40.0,
                             "Rec (com)": 18.8}


# D2VLM evidence metrics (`*_evi`): scored on the spans before `</evi>` as D2VLM's new_compute_metrics.py does.


def test_tvg_d2vlm_evidence_metrics() -> None:
    """GT [0,10]. Answer IoUs: 1 ('0 - 10'), 8/12 ('2 - 12'), 0 ('20 - 30'), failure (no </evi>).
    Evidence IoUs (best of all evidence spans; none -> the answer spans): '0 - 5' .5; none -> 8/12;
    '25 - 20 and 0 - 8' -> max(0 (reversed span kept reversed), .8) = .8.
    mIoU_evi = (.5 + .66667 + .8)/4 = .49167; R_evi = [3/4, 3/4, 3/4, 1/4] -> F1_evi = 2.5/4 = .625.
    Answer side: R = [2/4, 2/4, 2/4, 1/4] -> F1 .4375, mIoU (1 + .66667)/4 = .41667."""
    recs = [_rec("tvg", a, tgt=[0, 10]) for a in
            ("0 - 5 </evi> 0 - 10", "</evi> 2 - 12", "25 - 20 and 0 - 8 </evi> 20 - 30", "0 - 10")]
    out = evaluate_etbench(recs, variant="d2vlm")["tvg"]["src"]
    assert out["Failed"] == 1
    assert [out[f"F1_evi@{t}"] for t in (0.1, 0.3, 0.5, 0.7)] == [0.75, 0.75, 0.75, 0.25]
    assert out["F1_evi"] == 0.625 and out["mIoU_evi"] == 0.49167
    assert out["F1"] == 0.4375 and out["mIoU"] == 0.41667
    for variant in ("official", "d2vlm-strict", "fixed"):
        assert not any("evi" in key for key in evaluate_etbench(recs, variant=variant)["tvg"]["src"])


def test_tem_d2vlm_evidence_metrics() -> None:
    """GT [[0,10],[20,30]]. '20 - 25 </evi> 0 - 10': answer IoU 1, first evidence [20,25] best GT IoU .5;
    '</evi> 22 - 30': no evidence -> the answer [22,30], IoU .8 both.
    mIoU_evi = (.5 + .8)/2 = .65; R_evi = [1, 1, 1, 1/2] -> mRec_evi .875."""
    recs = [_rec("tem", a, tgt=[[0, 10], [20, 30]]) for a in ("20 - 25 </evi> 0 - 10", "</evi> 22 - 30")]
    out = evaluate_etbench(recs, variant="d2vlm")["tem"]["src"]
    assert out["mIoU_evi"] == 0.65 and out["mRec_evi"] == 0.875
    assert [out[f"R_evi@{t}"] for t in (0.1, 0.3, 0.5, 0.7)] == [1.0, 1.0, 1.0, 0.5]
    assert out["mRec"] == 1.0


def test_tal_d2vlm_evidence_reset_and_answer_guard() -> None:
    """GT [[0,10]]. s1 '0 - 10 </evi> 0 - 10': F1 1 and F1_evi 1 at every θ. s2 '50 - 60 </evi> 0 - 10':
    answer F1 1, evidence rec = prc = 0, which RESETS the evidence running sum to 0 (D2VLM's guard).
    s3 '0 - 10 </evi> 40 - 50': the answer reaches no θ, so its perfect evidence is never counted.
    F1@θ = 2/3; F1_evi = 0. In the order s2, s1, s3 the reset comes first: F1_evi = 1/3."""
    s1, s2, s3 = (_rec("tal", a, tgt=[[0, 10]]) for a in
                  ("0 - 10 </evi> 0 - 10", "50 - 60 </evi> 0 - 10", "0 - 10 </evi> 40 - 50"))
    out = evaluate_etbench([s1, s2, s3], variant="d2vlm")["tal"]["src"]
    assert out["F1"] == 0.66667 and out["F1@0.7"] == 0.66667
    assert out["F1_evi"] == 0.0 and out["F1_evi@0.1"] == 0.0
    swapped = evaluate_etbench([s2, s1, s3], variant="d2vlm")["tal"]["src"]
    assert swapped["F1_evi"] == 0.33333 and swapped["F1"] == 0.66667


def test_vhd_and_evs_d2vlm_evidence_metrics() -> None:
    """VHD window [12,18]: '40 - 50 </evi> 14 - 16' answer 15 hit, evidence midpoint 45 miss;
    '</evi> 13 - 15' no evidence -> the answer point 14, hit. F1 1, F1_evi .5.
    EVS: D2VLM paints answer and evidence into one mask, so F1_evi equals F1 (here 1)."""
    recs = [_rec("vhd", a, tgt=[[12, 18]]) for a in ("40 - 50 </evi> 14 - 16", "</evi> 13 - 15")]
    out = evaluate_etbench(recs, variant="d2vlm")["vhd"]["src"]
    assert out["F1"] == 1.0 and out["F1_evi"] == 0.5
    evs = evaluate_etbench([_rec("evs", "5 - 10 </evi> 0 - 5", tgt=[[0, 10]])], variant="d2vlm")["evs"]["src"]
    assert evs["F1"] == evs["F1_evi"] == 1.0


def test_gvq_d2vlm_matched_counts_and_evidence() -> None:
    """GT [10,20], p=1 unless noted. g1 '12 - 20 </evi> (B) at 10 - 20': letter b, correct; answer IoU 1,
    evidence [12,20] IoU .8. g2 '</evi> C. at 10 - 20': letter c, wrong. g3 '</evi> B) at 0 - 20': correct,
    answer IoU .5, no evidence -> [0,0], IoU 0. g4 '</evi>' (p=0): empty answer, a failure, not matched.
    Matched 3 of 4 (.75), correct within matched 2 -> 2/(3 + 1e-7). Acc 2/4.
    R = [2/4, 2/4, 2/4, 1/4] -> mRec .4375, mIoU 1.5/4 = .375; R_evi = [1/4]*4 -> mRec_evi .25, mIoU_evi .2."""
    opts = ["w", "x", "y", "z"]
    recs = [
        _rec("gvq", "12 - 20 </evi> (B) at 10 - 20", o=opts, p=1, tgt=[10, 20]),
        _rec("gvq", "</evi> C. at 10 - 20", o=opts, p=1, tgt=[10, 20]),
        _rec("gvq", "</evi> B) at 0 - 20", o=opts, p=1, tgt=[10, 20]),
        _rec("gvq", "</evi>", o=opts, p=0, tgt=[10, 20]),
    ]
    out = evaluate_etbench(recs, variant="d2vlm")["gvq"]["src"]
    assert out["Matched count"] == 3 and out["Matched ratio"] == 0.75
    assert out["correct count within matched"] == 2
    assert out["correct ratio within matched"] == pytest.approx(2 / 3, abs=1e-6)
    assert out["Acc"] == 0.5 and out["Failed"] == 1
    assert out["mRec"] == 0.4375 and out["mIoU"] == 0.375
    assert [out[f"R_evi@{t}"] for t in (0.1, 0.3, 0.5, 0.7)] == [0.25] * 4
    assert out["mRec_evi"] == 0.25 and out["mIoU_evi"] == 0.2


def test_dvc_d2vlm_evidence_detection(minilm: SentenceSimilarity) -> None:
    """v1: answer [0,10], [20,30] on GT [[0,10],[20,30]] (P = R = 1); evidence '0 - 10, 30 - 20': the reversed
    span is kept reversed and covers nothing, so P_evi = R_evi = 1/2. v2: answer [0,10] on GT [[0,10],[40,50]]
    (P 1, R 1/2); no evidence -> P_evi = R_evi = 0. v3 has no </evi>: a failure, parse rate s = 2/3.
    F1: P = 1, R = .75 -> (2/3, 1/2) scaled -> 2·(2/3)(1/2)/(7/6) = 4/7 = .57143 at every θ.
    F1_evi: P = R = 1/4 -> 1/6 scaled -> F1_evi 1/6 = .16667 at every θ."""
    recs = [
        _rec("dvc", "0 - 10, 30 - 20 </evi> 0 - 10 seconds, crack the eggs.\n20 - 30 seconds, whisk them well.",
             video="v1", tgt=[[0, 10], [20, 30]], g=["crack the eggs", "whisk the eggs"]),
        _rec("dvc", "</evi> 0 - 10 seconds, chop the onion.", video="v2", tgt=[[0, 10], [40, 50]],
             g=["chop the onion", "fry the onion"]),
        _rec("dvc", "0 - 5 seconds, slice the bread.", video="v3", tgt=[[0, 5]], g=["slice bread"]),
    ]
    out = evaluate_etbench(recs, variant="d2vlm", similarity=minilm, with_coco=False)["dvc"]["src"]
    assert out["Failed"] == 1
    assert out["F1"] == 0.57143 and out["F1@0.7"] == 0.57143
    assert out["F1_evi"] == 0.16667 and [out[f"F1_evi@{t}"] for t in (0.1, 0.3, 0.5, 0.7)] == [0.16667] * 4
