"""Batch inference: samples, decoding presets, shards/resume, the UDF without Ray, and one
end-to-end ``jobs.evaluate`` run on the session Ray cluster (with resume and a corrupt video)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from d2vlm_ray.config import ConfigError, from_dict, to_dict
from d2vlm_ray.config.schema import ModelConfig
from d2vlm_ray.data.synthetic import generate_benchmark
from d2vlm_ray.model.checkpoint import init_checkpoint
from d2vlm_ray.pipelines.inference import (
    DecodingConfig,
    EvaluateConfig,
    PredictBatch,
    ShardStore,
    as_config,
    blank_timestamps_s,
    load_samples,
    merge_predictions,
    sample_seed,
)

CORRUPT_ID = "zz_corrupt_tvg_0"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3 tiny rendered videos (all in test), one extra record on a corrupt video, a tiny checkpoint."""
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, n_videos=3, seed=0, fractions=(0.0, 0.0, 1.0), size=64)
    ann = root / "annotations" / "test.json"
    items = json.loads(ann.read_text())
    corrupt = dict(next(i for i in items if i["task"] == "tvg"))
    corrupt |= {"id": CORRUPT_ID, "video": "videos/corrupt.mp4"}
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    items.append(corrupt)
    ann.write_text(json.dumps(items))
    ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), root / "ckpt", seed=0)
    return {"root": root, "ann": ann, "ckpt": Path(ckpt)}


def _cfg(bench: dict[str, Path], out: Path, **extra) -> EvaluateConfig:
    data = {"checkpoint_dir": str(bench["ckpt"]), "annotations": str(bench["ann"]), "output_dir": str(out),
            "decoding": {"max_new_tokens": 12}} | extra
    return as_config(data)


def test_samples_resolve_videos_and_keep_etbench_fields(bench: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(bench, tmp_path)
    sample_set = load_samples(cfg)
    assert sample_set.format == "evi"
    # video_root "" falls back to the annotation folder's parent (<root>/videos/...).
    assert Path(sample_set.video_root) == bench["root"]
    assert all(Path(s.record["video"]).is_file() for s in sample_set.samples)
    first = sample_set.samples[0].base
    assert {"idx", "task", "source", "video", "duration", "tgt", "q", "sample_id"} <= set(first)
    gqa = next(s.base for s in sample_set.samples if s.base["task"] == "gqa")
    assert isinstance(gqa["p"], int) and len(gqa["o"]) == 4
    assert len(load_samples(_cfg(bench, tmp_path, limit=2)).samples) == 2

    items = json.loads(bench["ann"].read_text())
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(items + items[:1]))
    with pytest.raises(ValueError, match="duplicate sample id"):
        load_samples(_cfg(bench, tmp_path, annotations=str(dup), video_root=str(bench["root"])))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_samples(_cfg(bench, tmp_path, annotations=str(bad)))


def test_etbench_file_keeps_its_original_fields(bench: dict[str, Path], tmp_path: Path) -> None:
    items = [
        {"version": 1.0, "idx": 7, "task": "vhd", "source": "qvhighlights", "video": "videos/a.mp4", "duration": 30.0,
         "tgt": [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]], "q": "When is the highlight?"},
        {"version": 1.0, "idx": 3, "task": "rvq", "source": "star", "video": "videos/b.mp4", "duration": 20.0,
         "o": ["x", "y"], "p": 1, "q": "Which?", "a": "stale answer"},
    ]
    path = tmp_path / "etbench.json"
    path.write_text(json.dumps(items))
    sample_set = load_samples(_cfg(bench, tmp_path, annotations=str(path)))
    assert sample_set.format == "etbench"
    assert [s.sample_id for s in sample_set.samples] == ["7", "3"]
    # The scorer needs the original nesting (VHD annotators), and an old answer is dropped.
    assert sample_set.samples[0].base["tgt"] == items[0]["tgt"]
    assert "a" not in sample_set.samples[1].base and sample_set.samples[1].base["p"] == 1
    assert sample_set.samples[0].record["video"] == str(tmp_path / "videos" / "a.mp4")


def test_config_errors_name_the_field(
    bench: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        as_config({"annotations": "a.json", "output_dir": "o"})
    with pytest.raises(ConfigError, match="decoding.nope"):
        _cfg(bench, tmp_path, decoding={"nope": 1})
    with pytest.raises(ConfigError, match="etbench_variant"):
        _cfg(bench, tmp_path, etbench_variant="unknown")
    from jobs.evaluate import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"checkpoint_dir": "x", "annotations": "y", "output_dir": str(tmp_path)}))
    assert main(["--config", str(cfg_path), "compute.batch_size=0"]) == 2
    # Missing inputs are reported before any Ray cluster is started.
    assert main(["--config", str(cfg_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_decoding_presets_and_seeds() -> None:
    greedy = DecodingConfig().settings_for("rar", "a")
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.repetition_penalty) == (False, 64, 1.0)
    official = DecodingConfig(preset="official", seed=3)
    rar, tvg = official.settings_for("rar", "a"), official.settings_for("tvg", "a")
    assert rar.do_sample and rar.temperature == 0.2 and rar.max_new_tokens == 2048
    assert (rar.repetition_penalty, tvg.repetition_penalty) == (1.2, 1.0)
    assert rar.seed == sample_seed(3, "a") != official.settings_for("rar", "b").seed
    assert DecodingConfig(max_new_tokens=7, inject_evidence=False).settings_for("tvg", "a").inject_evidence is False


def test_blank_timestamps() -> None:
    assert blank_timestamps_s(2.5, 1.0).tolist() == [0.0, 1.0, 2.0]
    assert len(blank_timestamps_s(30.0, 1.0, max_frames=8)) == 8
    with pytest.raises(ValueError, match="positive duration"):
        blank_timestamps_s(0.0, 1.0)


def test_shards_merge_sorted_and_later_shard_wins(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    store.write([{"sample_id": "10", "status": "ok"}, {"sample_id": "b", "status": "failed"}])
    store.write([{"sample_id": "2", "status": "ok"}])
    store.write([{"sample_id": "b", "status": "ok", "a": "retried"}])
    assert store.write([]) is None
    assert [p.name for p in store.shard_paths()] == ["part-000000.jsonl", "part-000001.jsonl", "part-000002.jsonl"]
    merged = merge_predictions(store, ["b", "2", "10", "not-predicted"])
    assert [m["sample_id"] for m in merged] == ["2", "10", "b"]
    assert merged[-1]["a"] == "retried"
    assert store.done_ids(include_failed=False) == {"2", "10", "b"}


def test_udf_without_ray_records_failures_blank_frames_and_spans(bench: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(bench, tmp_path, features={"cache_root": str(tmp_path / "cache")})
    samples = load_samples(cfg).samples
    corrupt = next(s for s in samples if s.sample_id == CORRUPT_ID)
    good = [s for s in samples if s.sample_id != CORRUPT_ID][:3]
    udf = PredictBatch(to_dict(cfg))
    batch = {"sample_id": [s.sample_id for s in [*good, corrupt]],
             "record_json": [json.dumps(s.record) for s in [*good, corrupt]],
             "base_json": [json.dumps(s.base) for s in [*good, corrupt]]}
    out = udf(batch)
    preds = {sid: json.loads(p) for sid, p in zip(out["sample_id"], out["prediction_json"])}
    assert set(preds) == {s.sample_id for s in [*good, corrupt]}
    bad = preds[CORRUPT_ID]
    assert bad["status"] == "failed" and bad["error"]["reason"] == "video:corrupt" and bad["a"] == ""
    for s in good:
        p = preds[s.sample_id]
        assert p["status"] == "ok" and 0 < p["n_output_tokens"] <= 12
        # 1 fps over the video: one frame per started second (the decoder's duration may differ slightly).
        assert abs(p["n_frames"] - math.ceil(s.record["duration_s"])) <= 1
        assert p["truncated"] == (p["n_output_tokens"] == 12)
        assert p["tgt"] == s.base["tgt"] and isinstance(p["pred_spans_s"], list)
    # The same video again: served by the feature cache.
    again = udf.predict([(good[0].sample_id, good[0].record, good[0].base)])[0]
    assert again["cache_hit"] and again["a"] == preds[good[0].sample_id]["a"]

    tight = PredictBatch(to_dict(_cfg(bench, tmp_path, max_input_tokens=5)))
    assert tight.predict([(good[0].sample_id, good[0].record, good[0].base)])[0]["error"]["reason"] == "too_long"

    blank = PredictBatch(to_dict(_cfg(bench, tmp_path, blank_frames=True, decoding={"max_new_tokens": 12,
                                                                                    "inject_evidence": False})))
    blank_preds = blank.predict([(s.sample_id, s.record, s.base) for s in [good[0], corrupt]])
    # The blank baseline never opens the video, so the corrupt file does not matter.
    assert [p["status"] for p in blank_preds] == ["ok", "ok"]
    assert blank_preds[0]["n_frames"] == len(blank_timestamps_s(good[0].record["duration_s"], 1.0))


def test_resume_refuses_other_settings(bench: dict[str, Path], tmp_path: Path) -> None:
    from d2vlm_ray.pipelines.inference import check_resume

    cfg = _cfg(bench, tmp_path)
    store = ShardStore(tmp_path)
    check_resume(cfg, tmp_path, store)
    store.write([{"sample_id": "x", "status": "ok"}])
    check_resume(cfg, tmp_path, store)  # same settings: fine
    with pytest.raises(ValueError, match="blank_frames"):
        check_resume(_cfg(bench, tmp_path, blank_frames=True), tmp_path, store)
    with pytest.raises(ValueError, match="max_missing_frames_fraction"):
        check_resume(_cfg(bench, tmp_path, features={"max_missing_frames_fraction": 0.5}), tmp_path, store)
    # A run from before the partial-decode policy predicted every partial decode (a limit of 1).
    settings = tmp_path / "inference_settings.json"
    old = json.loads(settings.read_text())
    del old["max_missing_frames_fraction"]
    settings.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="max_missing_frames_fraction"):
        check_resume(cfg, tmp_path, store)
    settings.write_text(json.dumps(old))
    check_resume(_cfg(bench, tmp_path, features={"max_missing_frames_fraction": 1.0}), tmp_path, store)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_evaluate_job_end_to_end_with_resume(bench: dict[str, Path], tmp_path: Path, ray_cluster: None) -> None:
    from jobs.evaluate import evaluate, main

    out = tmp_path / "run"
    cfg = {"checkpoint_dir": str(bench["ckpt"]), "annotations": str(bench["ann"]), "output_dir": str(out),
           "features": {"cache_root": str(tmp_path / "cache")}, "decoding": {"max_new_tokens": 12},
           "compute": {"batch_size": 4}, "report": {"timeline_samples": 4}}
    cfg_path = tmp_path / "evaluate.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    n_samples = len(json.loads(bench["ann"].read_text()))

    assert main(["--config", str(cfg_path)]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["sample_id"] for p in preds] == sorted(p["sample_id"] for p in preds)
    assert len(preds) == n_samples
    failed = [p for p in preds if p["status"] == "failed"]
    assert [(p["sample_id"], p["error"]["reason"]) for p in failed] == [(CORRUPT_ID, "video:corrupt")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == "synthetic" and metrics["counts"]["failed"] == 1
    assert set(metrics["tasks"]) == {"tvg", "dvc", "tal", "gqa"} & {p["task"] for p in preds}
    assert metrics["tasks"]["tvg"]["failed"] >= 1
    assert {"R@0.3", "R@0.5", "R@0.7", "mIoU"} <= set(metrics["tasks"]["tvg"]["text"])
    assert metrics["run"]["seed"] == 0 and metrics["run"]["n_predicted"] == n_samples
    summary = (out / "summary.md").read_text()
    assert "video:corrupt" in summary and "| tvg | R@0.5 |" in summary
    for png in ("timelines.png", "recall_iou.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    first_bytes = (out / "predictions.json").read_bytes()

    # Rerun: everything is already predicted (the corrupt sample's failure included).
    again = evaluate(cfg)
    assert again["n_predicted"] == 0 and again["n_resumed"] == n_samples and again["n_failed"] == 1
    assert (out / "predictions.json").read_bytes() == first_bytes
    assert len(list((out / "shards").glob("part-*.jsonl"))) >= 1

    # An actor no node can host would wait forever: refused up front instead.
    with pytest.raises(ValueError, match="GPUs"):
        evaluate(cfg | {"output_dir": str(tmp_path / "gpu"), "limit": 1, "compute": {"device": "cuda"}})
