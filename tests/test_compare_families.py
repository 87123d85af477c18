"""The family comparison job: its stage plan, its data, and a smoke run of every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from d2vlm_ray.config import from_dict
from d2vlm_ray.types import VideoRecord
from d2vlm_ray.data.annotations import caption_records
from jobs.compare_families import SMOKE, CompareConfig, main, run, stage_steps


def test_stage_steps_split_the_budget_exactly() -> None:
    for total in (3, 7, 100, 2200):
        steps = stage_steps(total, [0.1, 0.3, 0.6])
        assert sum(steps) == total and min(steps) >= 1
    assert stage_steps(2200, [0.1, 0.3, 0.6]) == [220, 660, 1320]


def test_caption_records_drop_times_and_keep_dense_captions_only() -> None:
    dvc = VideoRecord(
        video="a.mp4",
        duration_s=10.0,
        query="Describe the events.",
        task="dvc",
        spans_s=((0.0, 2.0), (4.0, 6.0)),
        captions=("the red disc grows", "the blue square moves left."),
        answer="<evi><evi></evi> At <evi>, the red disc grows. At <evi>, the blue square moves left.",
        sample_id="s1",
    )
    tvg = VideoRecord(video="a.mp4", duration_s=10.0, query="When?", task="tvg", spans_s=((0.0, 2.0),), sample_id="s2")
    (cap,) = caption_records([dvc, tvg])
    assert cap.answer == "the red disc grows. the blue square moves left."
    assert cap.spans_s == () and "<evi>" not in cap.answer and cap.task == "cap"


def test_bad_settings_are_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="gvl_stage_fractions"):
        from_dict(CompareConfig, {"gvl_stage_fractions": [0.5, 0.5, 0.5]})
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "smoke", "--seed", "x"])
    assert exc.value.code == 2


def test_the_three_gvl_stage_configs_load_as_training_jobs(tmp_path: Path) -> None:
    from d2vlm_ray.config import load_config
    from d2vlm_ray.train.config import SFTJobConfig
    from d2vlm_ray.train.data import load_sft_records

    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    stages = [load_config(SFTJobConfig, configs / f"gvl_stage{i}_tiny.yaml", []) for i in (1, 2, 3)]
    assert [s.model.family for s in stages] == ["grounded_videollm"] * 3
    assert [s.model.lora.tuning_mode for s in stages] == ["projectors", "attention", "attention"]
    assert [s.data.captions_only for s in stages] == [True, False, False]
    assert stages[1].init_from.endswith("gvl_stage1_tiny") and stages[2].init_from.endswith("gvl_stage2_tiny")
    # Stage 1's rows are the caption pairs of the file's dense-captioning records.
    from d2vlm_ray.data.annotations import write_evi_json

    dvc = VideoRecord(video="a.mp4", duration_s=9.0, query="Describe.", task="dvc", spans_s=((0.0, 2.0),),
                      captions=("a disc grows",), answer="<evi></evi> At <evi>, a disc grows.", sample_id="d")
    tvg = VideoRecord(video="a.mp4", duration_s=9.0, query="When?", task="tvg", spans_s=((0.0, 2.0),),
                      answer="<evi></evi> At <evi>.", sample_id="t")
    write_evi_json([dvc, tvg], tmp_path / "train.json")
    (row,) = load_sft_records(str(tmp_path / "train.json"), captions_only=True)
    assert row.task == "cap" and row.answer == "a disc grows."


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_comparison_trains_and_evaluates_both_families(ray_cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    summary = run(from_dict(CompareConfig, {**SMOKE, "out_dir": str(out)}))
    assert set(summary["families"]) == {"d2vlm", "grounded_videollm"}
    for family, metrics in summary["families"].items():
        for key in ("R@0.3", "R@0.5", "R@0.7", "mIoU", "dvc_F1", "gqa_acc"):
            assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0, (family, key)
        assert metrics["train_s_per_step"] > 0 and metrics["inference_ms_per_sample"] > 0
        assert metrics["steps"] == SMOKE["steps"], "both families train for the same step budget"
    assert set(summary["baselines_r1_iou_0_5"]) == {"whole_video", "training_mean_span"}
    assert set(summary["quantisation"]) == {"50", "100", "300"}
    errors = [summary["quantisation"][m]["max_abs_s"] for m in ("50", "100", "300")]
    assert errors == sorted(errors, reverse=True), "finer temporal tokens quantise less"
    assert Path(summary["plot"]).is_file()
    assert json.loads((out / "summary.json").read_text())["families"].keys() == summary["families"].keys()
    # Stage 1 (video-caption alignment) trains the projectors and nothing else.
    init = load_file(str(out / "grounded_videollm" / "init" / "model.safetensors"))
    (stage1,) = (out / "grounded_videollm" / "stage1_align").glob("train/sft/checkpoint_*/model/model.safetensors")
    after = load_file(str(stage1))
    changed = {name.split(".")[0] for name in init if not (init[name] == after[name]).all()}
    assert changed == {"compressor"}, changed
