"""Pair tables: the official FPO reader, Parquet round trips, splits, and the Ray Data job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2vlm_ray.data.annotations import AnnotationError
from d2vlm_ray.data.fpo_annotations import (
    family_from_key,
    read_fpo_annotation,
    read_pairs,
    split_pairs,
    write_pairs,
)
from d2vlm_ray.types import PreferencePair

HUMAN = {"from": "human", "value": "<image>\nDescribe all the events with their times."}
OFFICIAL = [
    {
        "task": "dvc", "source": "youcook2", "video": "yc/abc.mp4", "duration": 60.0,
        "conversations": {
            "chosen": [HUMAN, {"from": "gpt", "value": "<evi><evi></evi><evi>, crack eggs. <evi>, whisk them."}],
            "rej_0_shift_0": [HUMAN, {"from": "gpt", "value": "<evi><evi></evi><evi>, crack eggs. <evi>, whisk them."}],
            "rej_0_f_0": [HUMAN, {"from": "gpt", "value": "<evi><evi></evi><evi>, whisk them. <evi>, crack eggs."}],
            "rej_1_shift_0": [HUMAN, {"from": "gpt", "value": "<evi></evi><evi>, crack eggs."}],
            "rej_0_qwen": [HUMAN, {"from": "gpt", "value": "</evi>They bake a cake."}],
        },
        "tgt": {
            "chosen": [3, 15, 20, 41],
            "rej_0_shift_0": [30, 42, 20, 41],
            "rej_0_f_0": [3, 15, 20, 41],
            "rej_1_shift_0": [3, 70],
        },
    },
    {
        "task": "tvc", "source": "x", "video": "/abs/v.mp4", "duration": 20.0, "id": "custom-id",
        "conversations": {
            "chosen": [{"from": "human", "value": "<image>\nWhat happens in <evi>?"},
                       {"from": "gpt", "value": "</evi>A dog runs."}],
            "a_b_repeat": [{"from": "human", "value": "<image>\nWhat happens in <evi>?"},
                           {"from": "gpt", "value": "</evi>A dog runs. A dog runs."}],
        },
        "src": {"chosen": [2, 5]},
    },
    {
        "task": "tvg", "video": "bad.mp4", "duration": 10.0,
        "conversations": {"chosen": [HUMAN, {"from": "gpt", "value": "<evi></evi><evi>."}]},
        "tgt": {"chosen": [1, 2, 3, 4]},
    },
]


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "fpo_annotation.json"
    path.write_text(json.dumps(data))
    return path


def test_official_reader_converts_every_variant(tmp_path: Path) -> None:
    result = read_fpo_annotation(_write(tmp_path, OFFICIAL), video_root="/data", on_error="collect")
    assert [(p.sample_id, p.family, p.variant_idx) for p in result.pairs] == [
        ("0", "shift", 0), ("0", "f", 0), ("0", "shift", 1), ("0", "qwen", 0), ("custom-id", "repeat", 0),
    ]
    first = result.pairs[0]
    assert first.video == "/data/yc/abc.mp4" and first.prompt == "Describe all the events with their times."
    assert first.chosen_spans_s == ((3.0, 15.0), (20.0, 41.0))
    assert first.rejected_spans_s == ((30.0, 42.0), (20.0, 41.0))
    assert result.pairs[2].rejected_spans_s == ((3.0, 60.0),)  # clipped to the duration
    assert result.pairs[3].rejected_spans_s == () and result.pairs[3].rejected_text == "</evi>They bake a cake."
    src = result.pairs[4]
    assert src.video == "/abs/v.mp4" and src.src_spans_s == ((2.0, 5.0),) and src.chosen_spans_s == ()
    assert len(result.errors) == 1 and result.errors[0].record == "2" and "tgt" in result.errors[0].reason
    assert result.counters["spans_clipped"] == 1 and result.counters["family.shift"] == 2
    with pytest.raises(AnnotationError, match="record 2"):
        read_fpo_annotation(_write(tmp_path, OFFICIAL), on_error="fail")
    assert family_from_key("reject_x_drop_3") == "drop" and family_from_key("qwen") == "qwen"


def test_official_reader_rejects_sft_layout(tmp_path: Path) -> None:
    sft = [{"video": "v.mp4", "duration": 5.0, "conversations": [HUMAN, {"from": "gpt", "value": "</evi>x"}]}]
    result = read_fpo_annotation(_write(tmp_path, sft), on_error="collect")
    assert not result.pairs and "dict with a 'chosen' key" in result.errors[0].reason
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(AnnotationError, match="invalid JSON"):
        read_fpo_annotation(tmp_path / "broken.json")


def test_parquet_round_trip_and_split(tmp_path: Path) -> None:
    pairs = read_fpo_annotation(_write(tmp_path, OFFICIAL), on_error="skip").pairs
    write_pairs(pairs, tmp_path / "pairs" / "part.parquet")
    back = read_pairs(tmp_path / "pairs")
    assert sorted(pairs, key=lambda p: (p.sample_id, p.family, p.variant_idx)) == back
    many = [PreferencePair(f"s{i}", "temporal_shift", 0, "v", 9.0, "tvg", "q", "a", [], "b", []) for i in range(400)]
    train, val = split_pairs(many, 0.25, seed=1)
    assert 70 < len(val) < 130 and len(train) + len(val) == 400
    assert split_pairs(many, 0.25, seed=1) == (train, val)
    assert not {p.sample_id for p in train} & {p.sample_id for p in val}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(tmp_path / "missing")


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_synthesis_job_is_deterministic_across_workers_and_runs(ray_cluster, tmp_path: Path) -> None:
    from d2vlm_ray.data.synthetic import generate_benchmark
    from d2vlm_ray.pipelines.synth_pairs import synthesize_pairs
    from jobs.synth_pairs import main

    bench = tmp_path / "bench"
    generate_benchmark(bench, n_videos=10, seed=1, render=False)
    base = {
        "annotations": [str(bench / "annotations" / "train.json")],
        "video_root": str(bench),
        "val_fraction": 0.25,
        "batch_size": 8,
        "perturb": {"seed": 5, "variants_per_sample": 2},
    }
    one = synthesize_pairs({**base, "out_dir": str(tmp_path / "one"), "num_workers": 1, "num_blocks": 1})
    two = synthesize_pairs({**base, "out_dir": str(tmp_path / "two"), "num_workers": 2, "num_blocks": 5})
    overrides = [f"{k}={json.dumps(v)}" for k, v in base.items() if k != "perturb"]
    overrides += ["perturb.seed=5", "perturb.variants_per_sample=2", f"out_dir={tmp_path / 'job'}", "num_workers=2"]
    assert main(["--config", "jobs/configs/synth_pairs_tiny.yaml", *overrides]) == 0

    tables = {}
    for name in ("one", "two", "job"):
        tables[name] = (read_pairs(tmp_path / name / "train"), read_pairs(tmp_path / name / "val"))
    assert tables["one"] == tables["two"] == tables["job"]
    train, val = tables["one"]
    assert train and val and not {p.sample_id for p in train} & {p.sample_id for p in val}
    assert one["families"] == two["families"] and one["n_pairs"] == len(train) + len(val) == two["n_pairs"]
    assert one["n_val_pairs"] == len(val)
    for family, counts in one["families"].items():
        assert counts["applied"] == sum(p.family == family for p in train + val)
    assert sum(c["skipped"] for c in one["families"].values()) > 0
    assert json.loads((tmp_path / "one" / "report.json").read_text())["n_pairs"] == one["n_pairs"]
    assert (tmp_path / "job" / "config.yaml").is_file()
    assert all(p.video.startswith(str(bench)) for p in train)
