"""The ``metrics`` CLI: one JSON object on stdout, exit 2 with a JSON error on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2vlm_ray.eval.cli import main


def _write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(argv)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return code, json.loads(lines[0])


def test_etbench_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [{"task": "tvg", "source": "s", "a": "0 - 5", "tgt": [0, 10]},
            {"task": "tvg", "source": "s", "a": "12 - 12", "tgt": [12, 12]}]
    path = _write(tmp_path / "pred.json", recs)
    code, out = _run(["--benchmark", "etbench", str(path)], capsys)
    assert code == 0
    assert out["tvg"]["s"]["F1"] == 0.375 and out["tvg"]["s"]["mIoU"] is None  # NaN -> null
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(shards / "etbench_0.json", recs[:1])
    (shards / "etbench_1.jsonl").write_text(json.dumps(recs[1]) + "\n")
    _write(shards / "metrics.json", {"stale": True})
    code, out = _run(["--benchmark", "etbench", "--variant", "fixed", str(shards)], capsys)
    assert code == 0 and out["tvg"]["s"]["Total"] == 2 and out["tvg"]["s"]["mIoU"] == 0.25


def test_charades_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "c.json", [{"a": "0 - 5", "tgt": [0, 10], "duration": 30}])
    code, out = _run(["--benchmark", "charades", str(path)], capsys)
    assert code == 0 and out["R@0.5"] == 1.0 and out["R@0.7"] == 0.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--benchmark", "etbench", "does/not/exist.json"],
        ["--benchmark", "nope", "x.json"],
        ["--benchmark", "etbench", "--variant", "nope", "PRED"],
        ["--benchmark", "etbench", "BADJSON"],
        ["--benchmark", "etbench", "NOFIELDS"],
        ["--benchmark", "charades", "--variant", "timechat", "DICT"],
        [],
    ],
)
def test_bad_input_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {
        "PRED": _write(tmp_path / "p.json", [{"task": "tvg", "source": "s", "a": "0 - 5", "tgt": [0, 10]}]),
        "BADJSON": tmp_path / "bad.json",
        "NOFIELDS": _write(tmp_path / "nf.json", [{"task": "tvg", "source": "s", "a": "0 - 5"}]),
        "DICT": _write(tmp_path / "d.json", {"0": {"timestamp": [[0, 5]]}}),
    }
    files["BADJSON"].write_text("{not json")
    argv = [str(files[a]) if a in files else a for a in argv]
    code, out = _run(argv, capsys)
    assert code == 2
    assert isinstance(out["error"], str) and out["error"]


@pytest.mark.parametrize(
    ("benchmark", "content", "gt", "needle"),
    [
        ("etbench", [], None, "no E.T. Bench prediction records"),
        ("charades", [], None, "no Charades predictions"),
        ("youcook2", [], None, "no YouCook2 videos"),
        ("etbench", [{"task": "dvc", "source": "s", "video": "v", "a": "0 - 10 seconds, crack the eggs.",
                      "tgt": [[0, 10], [10, 20]], "g": ["crack the eggs"]}], None, "one caption per 'tgt' span"),
        ("youcook2", [{"a": "0 - 10 seconds, crack the eggs.", "tgt": [[0, 10], [10, 20]], "g": ["crack"]}],
         None, "one caption per 'tgt' span"),
        ("youcook2", {"v.mp4": []}, {"annotations": [{"image_id": "v.mp4", "segments": [[0, 5]]}]},
         "'pure_cap'"),
        ("youcook2", {"v.mp4": [{"timestamp": [0, 5]}]},
         {"annotations": [{"image_id": "v.mp4", "segments": [[0, 5]], "pure_cap": "add salt"}]}, "'caption'"),
    ],
)
def test_bad_scorer_input_is_one_typed_error(benchmark: str, content: object, gt: object, needle: str,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Empty lists exit 2 for every benchmark (official E.T. Bench: exit 0); a short `g` or a missing
    `pure_cap`/`caption` names the field (official: IndexError / KeyError tracebacks)."""
    argv = ["--benchmark", benchmark, str(_write(tmp_path / "p.json", content))]
    if gt is not None:
        argv += ["--gt", str(_write(tmp_path / "gt.json", gt))]
    code, out = _run(argv, capsys)
    assert code == 2
    assert needle in out["error"] and "Error:" in out["error"], out["error"]
    assert not out["error"].startswith(("IndexError", "KeyError"))


def test_caption_metrics_keep_stdout_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With pycocoevalcap installed, Bleu would print its statistics; stdout must stay one JSON object."""
    from d2vlm_ray.eval import coco

    if coco.unavailable_reason() is not None:
        pytest.skip(coco.unavailable_reason())
    recs = [{"task": "dvc", "source": "s", "video": "v", "a": "0 - 10 seconds, crack the eggs into a bowl.",
             "tgt": [[0, 10]], "g": ["crack two eggs into a bowl"]}]
    code, out = _run(["--benchmark", "etbench", str(_write(tmp_path / "p.json", recs))], capsys)
    assert code == 0 and 0.0 < out["dvc"]["s"]["Bleu_1"] <= 1.0 and "CIDEr" in out["dvc"]["s"]
