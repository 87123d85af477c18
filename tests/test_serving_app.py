"""The Serve application end to end: handles, HTTP on loopback, bad input, concurrency.

One app (serve/test.yaml with temporary paths, 0.25 CPU per replica) is deployed once
for the module and deleted at the end. The model is the "chain" tiny checkpoint of
test_serving_core (it emits evidence tokens) in float64, so answers can be compared
exactly with the model core's single-call ``generate``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml
from test_serving_core import make_chain_checkpoint

from d2vlm_ray.cache import FeatureCache, FeatureSpec, storage_key, video_sha256
from d2vlm_ray.cache.source import find_entry
from d2vlm_ray.config import DecodeSettings, ModelConfig, from_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.model.checkpoint import from_pretrained, init_checkpoint, load_frame_encoder
from d2vlm_ray.model.generation import generate
from d2vlm_ray.model.inputs import build_batch
from tests.helpers_decode import lossy_decoder, write_damaged_clip

REPO = Path(__file__).resolve().parents[1]
APP = "d2vlm-test"
HTTP_TIMEOUT_S = 60
QUESTIONS = ["when does the red circle move ?", "what happens ?", "where is the blue square ?"]

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from d2vlm_ray.serving.app import start_app, stop_app

    root = tmp_path_factory.mktemp("serving_app")
    random_ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), root / "random", seed=0)
    ckpt = make_chain_checkpoint(random_ckpt, root / "chain")
    videos = root / "videos"
    videos.mkdir()
    write_barcode_clip(videos / "a.mp4", fps=4, duration_s=6)
    write_barcode_clip(videos / "b.mp4", fps=4, duration_s=5, width=64, height=48)
    write_barcode_clip(videos / "long.mp4", fps=2, duration_s=12)
    (videos / "notes.txt").write_text("not a video")
    (root / "outside.mp4").write_bytes((videos / "a.mp4").read_bytes())
    write_barcode_clip(videos / "partial.mp4", fps=2, duration_s=9.5)  # 10 frames sampled at 1 fps
    write_barcode_clip(videos / "lossy.mp4", fps=2, duration_s=6)
    write_damaged_clip(videos / "damaged.mp4")

    config = yaml.safe_load((REPO / "serve" / "test.yaml").read_text())["applications"][0]
    args = dict(config["args"], checkpoint_dir=str(ckpt), media_roots=[str(videos)])
    args["features"] = dict(args["features"], cache_root=str(root / "cache"))
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in config["deployments"]}
    url = start_app(args, port=_free_port(), name=APP, deployment_options=options)
    try:
        yield {
            "url": url,
            "args": args,
            "ckpt": ckpt,
            "videos": videos,
            "root": root,
            "handle": lambda name: serve.get_deployment_handle(name, app_name=APP),
        }
    finally:
        stop_app(APP)


def _reference(app: dict[str, Any], video: str, question: str, max_new_tokens: int):
    """``generate`` in float64 on the features the app cached (as the Grounder reads them)."""
    ckpt = app["ckpt"]
    args = app["args"]
    encoder = load_frame_encoder(ckpt)
    spec = FeatureSpec(fps=args["features"]["fps"], max_frames=args["features"]["max_frames"])
    found = find_entry(FeatureCache(args["features"]["cache_root"]), video_sha256(video), spec, encoder.transform_id,
                       encoder.encoder_id)
    assert found is not None, "the FrameEncoder should have written the features"
    feats = found[1]
    model, tokenizers, _ = from_pretrained(ckpt, dtype=torch.float64)
    batch = build_batch(
        tokenizers.llm, tokenizers.qformer, [question], [feats.patches], [feats.timestamps_s], [feats.duration_s]
    )
    return generate(model, tokenizers.llm, batch, DecodeSettings(max_new_tokens=max_new_tokens))[0]


def _post(app: dict[str, Any], path: str, **kwargs: Any) -> requests.Response:
    response = requests.post(app["url"] + path, timeout=HTTP_TIMEOUT_S, **kwargs)
    assert "Traceback" not in response.text and 'File "' not in response.text
    return response


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.timeout(420)
def test_handles_compose_and_batch(app: dict[str, Any]) -> None:
    from d2vlm_ray.serving.deployments import AnswerItem, GroundItem

    encoder, grounder, answerer = (app["handle"](n) for n in ("FrameEncoder", "Grounder", "Answerer"))
    video = str(app["videos"] / "a.mp4")
    ref = encoder.features.remote("a.mp4").result(timeout_s=HTTP_TIMEOUT_S)
    assert not ref.cache_hit and ref.num_frames == 6
    assert encoder.features.remote(video).result(timeout_s=HTTP_TIMEOUT_S).cache_hit

    deadline = time.time() + 120
    ground_settings, answer_settings = DecodeSettings(max_new_tokens=4), DecodeSettings(max_new_tokens=9)
    # Fired together, the grounding calls share batches (a long batch wait makes it certain).
    grounder.reconfigure.remote({"batch_wait_timeout_s": 1.0}).result(timeout_s=HTTP_TIMEOUT_S)
    try:
        calls = [grounder.ground.remote(GroundItem(ref, q, [], ground_settings, deadline)) for q in QUESTIONS]
        groundings = [c.result(timeout_s=HTTP_TIMEOUT_S) for c in calls]
    finally:
        grounder.reconfigure.remote({"batch_wait_timeout_s": app["args"]["batch_wait_timeout_s"]}).result(
            timeout_s=HTTP_TIMEOUT_S
        )
    assert grounder.counters.remote().result(timeout_s=HTTP_TIMEOUT_S)["max_batch_size_seen"] >= 2
    with pytest.raises(Exception, match="cannot change at runtime"):
        grounder.reconfigure.remote({"dtype": "float32"}).result(timeout_s=HTTP_TIMEOUT_S)
    answers = [answerer.answer.remote(AnswerItem(g, answer_settings, deadline)) for g in groundings]
    results = [a.result(timeout_s=HTTP_TIMEOUT_S) for a in answers]
    for question, grounding, result in zip(QUESTIONS, groundings, results):
        expected = _reference(app, video, question, len(grounding.token_ids) + 9)
        assert result.token_ids == expected.token_ids
        assert result.spans_s == expected.spans_s and result.text == expected.text
        assert grounding.frame_tokens.shape[0] == 6 and grounding.scores.shape[1] == 6
    counts = encoder.counters.remote().result(timeout_s=HTTP_TIMEOUT_S)
    assert (counts["decodes"], counts["encodes"]) == (1, 1)


@pytest.mark.timeout(240)
def test_http_endpoints_cache_and_stream(app: dict[str, Any]) -> None:
    url = app["url"]
    assert requests.get(url + "/healthz", timeout=HTTP_TIMEOUT_S).json() == {"status": "ok"}
    (model,) = requests.get(url + "/v1/models", timeout=HTTP_TIMEOUT_S).json()["data"]
    assert model["preset"] == "tiny" and model["max_new_tokens"] == 32
    assert requests.get(url + "/docs", timeout=HTTP_TIMEOUT_S).status_code == 200
    spec = requests.get(url + "/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    assert {"/v1/ground", "/v1/answer", "/healthz", "/v1/models"} <= set(spec["paths"])
    assert "AnswerRequest" in spec["components"]["schemas"]

    encoder = app["handle"]("FrameEncoder")
    before = encoder.counters.remote().result(timeout_s=HTTP_TIMEOUT_S)
    body = {"video": "b.mp4", "query": "what happens ?", "options": {"max_grounding_tokens": 4}}
    first = _post(app, "/v1/ground", json=body)
    second = _post(app, "/v1/ground", json=body)
    assert first.status_code == second.status_code == 200, first.text
    assert (first.json()["cache"], second.json()["cache"]) == ("miss", "hit")
    after = encoder.counters.remote().result(timeout_s=HTTP_TIMEOUT_S)
    assert after["decodes"] - before["decodes"] == 1 and after["encodes"] - before["encodes"] == 1
    grounded = second.json()
    assert len(grounded["spans_s"]) == 1
    assert len(grounded["scores"][0]) == len(grounded["timestamps_s"]) == 5 and grounded["duration_s"] == 5.0

    question = "when does the red circle move ?"
    request = {"video": "b.mp4", "question": question, "options": {"max_new_tokens": 9, "max_grounding_tokens": 4}}
    answered = _post(app, "/v1/answer", json=request)
    assert answered.status_code == 200, answered.text
    out = answered.json()
    expected = _reference(app, str(app["videos"] / "b.mp4"), question, 2 + 9)
    assert out["response"] == expected.text
    assert [tuple(out["grounding"]["spans_s"][0])] + [tuple(e["span_s"]) for e in out["evidence"]] == expected.spans_s
    assert out["evidence"]
    assert all(out["answer"][e["char_start"] : e["char_end"]] == e["text_ref"] for e in out["evidence"])
    assert out["truncated"] and out["grounding"]["cache"] == "hit"

    streamed = _post(app, "/v1/answer", json={**request, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _sse(streamed.text)
    names = [name for name, _ in events]
    assert names[0] == "grounding" and names[-1] == "answer" and names.count("token") == 9
    final = events[-1][1]
    assert final["response"] == out["response"] and final["evidence"] == out["evidence"]
    assert [data["span_s"] for name, data in events if name == "token" and data["span_s"]] == [
        e["span_s"] for e in out["evidence"]
    ]

    # Upload: multipart with the file and the JSON request (without "video").
    files = {"file": ("clip.mp4", (app["videos"] / "b.mp4").read_bytes(), "video/mp4")}
    meta = json.dumps({k: v for k, v in request.items() if k != "video"})
    uploaded = _post(app, "/v1/answer", files=files, data={"request": meta})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["response"] == out["response"] and uploaded.json()["grounding"]["cache"] == "hit"


@pytest.mark.timeout(240)
def test_http_bad_input_gets_clear_4xx(app: dict[str, Any]) -> None:
    videos, root = app["videos"], app["root"]

    def check(status: int, reason: str | None, response: requests.Response) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body = response.json()
        if reason is not None:
            assert body["reason"] == reason, body
        return body

    check(422, "validation_error", _post(app, "/v1/answer", json={"video": "a.mp4"}))
    body = check(422, "validation_error", _post(app, "/v1/ground", json={"video": "a.mp4", "query": "q", "top_k": 3}))
    assert body["detail"][0]["loc"] == ["body", "top_k"]
    check(422, "validation_error", _post(app, "/v1/answer", json={"video": "a.mp4", "question": "  "}))
    too_many = {"video": "a.mp4", "question": "q", "options": {"max_new_tokens": 10_000}}
    check(422, "validation_error", _post(app, "/v1/answer", json=too_many))
    not_json = {"data": b"{not json", "headers": {"content-type": "application/json"}}
    check(422, "invalid_json", _post(app, "/v1/answer", **not_json))
    body = check(422, "corrupt", _post(app, "/v1/answer", json={"video": "notes.txt", "question": "q"}))
    assert "cannot decode" in body["detail"] and str(videos) not in body["detail"]
    check(422, "not_found", _post(app, "/v1/ground", json={"video": "missing.mp4", "query": "q"}))
    garbage = {"files": {"file": ("x.mp4", b"\x00" * 1000)}, "data": {"request": '{"query": "q"}'}}
    check(422, "corrupt", _post(app, "/v1/ground", **garbage))
    check(403, "path_not_allowed", _post(app, "/v1/ground", json={"video": str(root / "outside.mp4"), "query": "q"}))
    check(403, "path_not_allowed", _post(app, "/v1/ground", json={"video": "../outside.mp4", "query": "q"}))
    check(403, "scheme_not_allowed", _post(app, "/v1/ground", json={"video": "http://example.com/a.mp4", "query": "q"}))
    check(413, "too_long", _post(app, "/v1/ground", json={"video": "long.mp4", "query": "q"}))
    big = b"\x00" * (app["args"]["max_upload_bytes"] + 1)
    check(413, None, _post(app, "/v1/ground", files={"file": ("big.mp4", big)}, data={"request": '{"query": "q"}'}))
    hurried = {"video": "a.mp4", "question": "q", "options": {"deadline_s": 0.001}}
    check(504, "deadline_exceeded", _post(app, "/v1/answer", json=hurried))
    assert requests.get(app["url"] + "/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200
    assert _post(app, "/v1/ground", json={"video": "a.mp4", "query": "q"}).status_code == 200


@pytest.mark.timeout(240)
def test_http_concurrent_requests_and_overload(app: dict[str, Any]) -> None:
    cases = [(video, q) for video in ("a.mp4", "b.mp4") for q in QUESTIONS]
    options = {"max_new_tokens": 6, "max_grounding_tokens": 4}
    sequential = {
        (v, q): _post(app, "/v1/answer", json={"video": v, "question": q, "options": options}).json() for v, q in cases
    }

    def fire(bodies: list[dict[str, Any]]) -> list[requests.Response]:
        results: list[Any] = [None] * len(bodies)
        barrier = threading.Barrier(len(bodies))

        def one(i: int) -> None:
            barrier.wait(timeout=30)
            results[i] = requests.post(app["url"] + "/v1/answer", json=bodies[i], timeout=HTTP_TIMEOUT_S)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=HTTP_TIMEOUT_S + 30)
        return results

    concurrent = fire([{"video": v, "question": q, "options": options} for v, q in cases])
    for case, response in zip(cases, concurrent):
        assert response.status_code == 200, response.text
        got, want = response.json(), sequential[case]
        assert (got["response"], got["evidence"], got["grounding"]["spans_s"]) == (
            want["response"], want["evidence"], want["grounding"]["spans_s"]
        )

    ingress = app["handle"]("Ingress")
    ingress.reconfigure.remote({"max_inflight_requests": 1}).result(timeout_s=HTTP_TIMEOUT_S)
    try:
        heavy = {"options": {"max_new_tokens": 32, "max_grounding_tokens": 16}}
        burst = fire([{"video": v, "question": q, **heavy} for v, q in cases])
    finally:
        ingress.reconfigure.remote({"max_inflight_requests": app["args"]["max_inflight_requests"]}).result(
            timeout_s=HTTP_TIMEOUT_S
        )
    codes = sorted(r.status_code for r in burst)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    rejected = next(r for r in burst if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1" and rejected.json()["reason"] == "overloaded"
    assert _post(app, "/v1/ground", json={"video": "a.mp4", "query": "q"}).status_code == 200


@pytest.mark.timeout(240)
def test_http_reports_partial_decodes(app: dict[str, Any]) -> None:
    """Warnings stored in the cache come back on a hit; a decode over the policy is 422 partial_decode."""
    from d2vlm_ray.cache.features import encode_video
    from d2vlm_ray.data.video import decode_video

    videos, args = app["videos"], app["args"]
    encoder = load_frame_encoder(app["ckpt"])  # float32, as the FrameEncoder: same encoder id, same key
    cache = FeatureCache(args["features"]["cache_root"])

    def cache_lossy(name: str, drop_idx: list[int]) -> Any:
        """Put the features of a decode that lost ``drop_idx`` where the FrameEncoder looks them up."""
        source = str(videos / name)
        decoded = lossy_decoder(drop_idx)(source, args["features"]["fps"], max_frames=args["features"]["max_frames"])
        feats = encode_video(encoder, decoded, source)
        spec = FeatureSpec(fps=args["features"]["fps"], max_frames=args["features"]["max_frames"])
        cache.put(storage_key(video_sha256(source), feats.n_sampled, spec, encoder.transform_id, encoder.encoder_id),
                  feats)
        return decoded

    partial = cache_lossy("partial.mp4", [4])  # 1 of 10: within max_missing_frames_fraction 0.1
    cache_lossy("lossy.mp4", [0, 1])  # 2 of 6: beyond it
    assert partial.missing_timestamps_s == [4.0]

    ground = _post(app, "/v1/ground", json={"video": "partial.mp4", "query": "q"})
    assert ground.status_code == 200, ground.text
    body = ground.json()
    assert body["cache"] == "hit" and body["warnings"] == partial.warnings and body["missing_timestamps_s"] == [4.0]
    assert len(body["timestamps_s"]) == 9
    answer = _post(app, "/v1/answer", json={"video": "partial.mp4", "question": "what happens ?"}).json()
    assert answer["warnings"] == partial.warnings and answer["missing_timestamps_s"] == [4.0]
    assert answer["grounding"]["warnings"] == partial.warnings
    upload = {"files": {"file": ("p.mp4", (videos / "partial.mp4").read_bytes())}, "data": {"request": '{"query": "q"}'}}
    assert _post(app, "/v1/ground", **upload).json()["warnings"] == partial.warnings
    streamed = _post(app, "/v1/answer", json={"video": "partial.mp4", "question": "q", "stream": True})
    events = dict(_sse(streamed.text))
    assert events["grounding"]["missing_timestamps_s"] == [4.0] and events["answer"]["warnings"] == partial.warnings
    clean = _post(app, "/v1/ground", json={"video": "a.mp4", "query": "q"}).json()
    assert clean["warnings"] == [] and clean["missing_timestamps_s"] == []

    over = _post(app, "/v1/ground", json={"video": "lossy.mp4", "query": "q"})
    assert over.status_code == 422 and over.json()["reason"] == "partial_decode", over.text
    assert "2 of 6 sampled frames" in over.json()["detail"] and str(videos) not in over.text

    # A really damaged file on a miss: the response says what the decoder reports, nothing less.
    decoded = decode_video(str(videos / "damaged.mp4"), args["features"]["fps"], max_frames=args["features"]["max_frames"])
    assert decoded.warnings, "the damaged clip decodes without a warning; damage it more"
    damaged = _post(app, "/v1/ground", json={"video": "damaged.mp4", "query": "q"})
    if decoded.missing_fraction > args["features"]["max_missing_frames_fraction"]:
        assert damaged.status_code == 422 and damaged.json()["reason"] == "partial_decode", damaged.text
    else:
        assert damaged.status_code == 200 and damaged.json()["cache"] == "miss", damaged.text
        assert damaged.json()["missing_timestamps_s"] == decoded.missing_timestamps_s
        assert len(damaged.json()["warnings"]) == len(decoded.warnings)


@pytest.mark.timeout(240)
def test_http_playlist_never_opens_files_outside_the_media_roots(app: dict[str, Any]) -> None:
    """An HLS playlist inside a media root (or uploaded) naming a segment outside every root is refused.

    Needs the decoder's container-format whitelist (issue 21, point 5): without it FFmpeg's
    HLS demuxer opens the segment and the request succeeds.
    """
    root, videos = app["root"], app["videos"]
    segment = root / "outside_segment.ts"
    write_barcode_clip(segment, fps=4, duration_s=3)
    playlist = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:3.0,\n{segment}\n#EXT-X-ENDLIST\n"
    )
    (videos / "list.m3u8").write_text(playlist)

    def age_atime(path: Path) -> float:
        """Set the access time before the modification time, so that any read moves it (relatime)."""
        mtime_s = path.stat().st_mtime
        os.utime(path, (mtime_s - 100.0, mtime_s))
        return path.stat().st_atime

    control = root / "control.bin"
    control.write_bytes(b"x" * 100)
    control_atime_s = age_atime(control)
    control.read_bytes()
    reads_move_atime = control.stat().st_atime != control_atime_s
    segment_atime_s = age_atime(segment)

    by_path = _post(app, "/v1/ground", json={"video": "list.m3u8", "query": "q"})
    uploaded = _post(app, "/v1/ground", files={"file": ("list.m3u8", playlist.encode())}, data={"request": '{"query": "q"}'})
    for response in (by_path, uploaded):
        assert response.status_code in (403, 422), response.text
        assert str(segment) not in response.text
    if reads_move_atime:  # on a noatime mount the status codes are the only evidence
        assert segment.stat().st_atime == segment_atime_s, "the segment outside the media roots was read"
