"""The Serve application serving a Grounded-VideoLLM checkpoint, over loopback HTTP.

The app (serve/test.yaml with temporary paths) is deployed once for the module from a tiny
``tiny-gvl`` checkpoint rewired so that greedy decoding writes a span as a temporal-token
pair, closes the grounding part with ``</evi>`` and cites a second span in the answer
(see :func:`make_gvl_chain_checkpoint`). Every layer still runs, so the HTTP responses
are compared with the model core's ``ground``/``answer`` on the features the app cached.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from d2vlm_ray.cache import FeatureCache, FeatureSpec, video_sha256
from d2vlm_ray.cache.source import find_entry
from d2vlm_ray.config import DecodeSettings, ModelConfig, from_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.model.checkpoint import from_pretrained, init_checkpoint, load_frame_encoder, save_pretrained
from d2vlm_ray.model.generation import answer, ground
from d2vlm_ray.model.inputs import build_batch

REPO = Path(__file__).resolve().parents[1]
APP = "gvl-test"
HTTP_TIMEOUT_S = 60
QUESTION = "when does the red circle move ?"
GROUNDING_TOKENS = 4
ANSWER_TOKENS = 9
# Greedy decoding follows this chain: a span <10><30>, </evi>, then an answer citing <50><70>.
CHAIN = ["<|assistant|>", "<10>", "<30>", "</evi>", "the", "event", "happens", "in", "<50>", "<70>", "<|end|>"]

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_gvl_chain_checkpoint(src: Path, out: Path) -> Path:
    """Rewire a random ``tiny-gvl`` checkpoint so greedy decoding follows :data:`CHAIN`.

    As ``make_chain_checkpoint`` of test_serving_core does for D2VLM: embeddings are scaled
    up so each position's last hidden state points mostly along its input token's
    embedding, and each output row gets the normalised embedding of its predecessor.
    """
    model, tokenizers, cfg = from_pretrained(src)
    lm = model.causal_lm
    ids = tokenizers.llm.convert_tokens_to_ids(CHAIN)
    assert len(set(ids)) == len(CHAIN), "every chain token must be a distinct single token"
    with torch.no_grad():
        emb = lm.model.embed_tokens.weight  # [V, D]
        emb *= 20.0
        for prev, nxt in zip(ids, ids[1:]):
            h = emb[prev] / emb[prev].pow(2).mean().sqrt() * lm.model.norm.weight  # [D], as the final RMSNorm sees it
            lm.lm_head.weight[nxt] += 10.0 * h / h.pow(2).sum()
    return save_pretrained(model, cfg, tokenizers, out)


@pytest.fixture(scope="module")
def app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from d2vlm_ray.serving.app import start_app, stop_app

    root = tmp_path_factory.mktemp("serving_gvl")
    random_ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny-gvl"}), root / "random", seed=0)
    ckpt = make_gvl_chain_checkpoint(random_ckpt, root / "chain")
    videos = root / "videos"
    videos.mkdir()
    write_barcode_clip(videos / "a.mp4", fps=4, duration_s=6)

    config = yaml.safe_load((REPO / "serve" / "test.yaml").read_text())["applications"][0]
    args = dict(config["args"], checkpoint_dir=str(ckpt), media_roots=[str(videos)], preset="tiny-gvl")
    args["features"] = dict(args["features"], cache_root=str(root / "cache"))
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in config["deployments"]}
    url = start_app(args, port=_free_port(), name=APP, deployment_options=options)
    try:
        yield {"url": url, "args": args, "ckpt": ckpt, "videos": videos}
    finally:
        stop_app(APP)


def _post(app: dict[str, Any], path: str, body: dict[str, Any]) -> requests.Response:
    response = requests.post(app["url"] + path, json=body, timeout=HTTP_TIMEOUT_S)
    assert "Traceback" not in response.text and 'File "' not in response.text
    return response


def _reference(app: dict[str, Any], video: str) -> tuple[Any, Any]:
    """The model core's ``ground`` then ``answer`` in float64 on the features the app cached."""
    ckpt, features = app["ckpt"], app["args"]["features"]
    encoder = load_frame_encoder(ckpt)
    spec = FeatureSpec(fps=features["fps"], max_frames=features["max_frames"])
    found = find_entry(FeatureCache(features["cache_root"]), video_sha256(video), spec, encoder.transform_id,
                       encoder.encoder_id)
    assert found is not None, "the FrameEncoder should have written the two-stream features"
    feats = found[1]
    model, tokenizers, _ = from_pretrained(ckpt, dtype=torch.float64)
    batch = build_batch(
        tokenizers.llm, tokenizers.qformer, [QUESTION], [feats.patches], [feats.timestamps_s], [feats.duration_s]
    )
    (grounding,) = ground(model, tokenizers.llm, batch, [QUESTION], DecodeSettings(max_new_tokens=GROUNDING_TOKENS))
    (result,) = answer(
        model, tokenizers.llm, tokenizers.qformer, [grounding], DecodeSettings(max_new_tokens=ANSWER_TOKENS)
    )
    return grounding, result


def _check_spans(spans_s: list[list[float]], duration_s: float) -> None:
    for span in spans_s:
        assert len(span) == 2 and all(math.isfinite(t) for t in span), span
        assert 0.0 <= span[0] <= span[1] <= duration_s, (span, duration_s)


def _check_grounding(body: dict[str, Any], n_frames: int) -> None:
    assert isinstance(body["spans_s"], list) and body["spans_s"], body
    _check_spans(body["spans_s"], body["duration_s"])
    assert len(body["timestamps_s"]) == n_frames and body["timestamps_s"] == sorted(body["timestamps_s"])
    assert all(0.0 <= t <= body["duration_s"] for t in body["timestamps_s"])
    assert len(body["scores"]) == len(body["spans_s"]) and all(len(row) == n_frames for row in body["scores"])
    assert isinstance(body["text"], str) and isinstance(body["complete"], bool)
    assert body["cache"] in ("hit", "miss") and isinstance(body["timings_ms"], dict)
    assert body["warnings"] == [] and body["missing_timestamps_s"] == [] and body["output_warnings"] == []


@pytest.mark.timeout(420)
def test_gvl_app_grounds_and_answers_over_http(app: dict[str, Any]) -> None:
    url = app["url"]
    assert requests.get(url + "/healthz", timeout=HTTP_TIMEOUT_S).json() == {"status": "ok"}
    (model,) = requests.get(url + "/v1/models", timeout=HTTP_TIMEOUT_S).json()["data"]
    assert model["preset"] == "tiny-gvl" and model["family"] == "grounded_videollm"
    assert model["encoder_id"].startswith("two-stream/")

    options = {"max_grounding_tokens": GROUNDING_TOKENS}
    first = _post(app, "/v1/ground", {"video": "a.mp4", "query": QUESTION, "options": options})
    second = _post(app, "/v1/ground", {"video": "a.mp4", "query": QUESTION, "options": options})
    assert first.status_code == second.status_code == 200, first.text
    grounded = first.json()
    assert (grounded["cache"], second.json()["cache"]) == ("miss", "hit")
    assert grounded["duration_s"] == 6.0
    _check_grounding(grounded, n_frames=6)

    ref_grounding, ref_answer = _reference(app, str(app["videos"] / "a.mp4"))
    assert ref_grounding.spans_s, "the chain checkpoint should ground one span"
    assert [tuple(s) for s in grounded["spans_s"]] == [tuple(s) for s in ref_grounding.spans_s]
    assert grounded["complete"] and second.json()["spans_s"] == grounded["spans_s"]

    request = {
        "video": "a.mp4",
        "question": QUESTION,
        "options": {"max_new_tokens": ANSWER_TOKENS, "max_grounding_tokens": GROUNDING_TOKENS},
    }
    answered = _post(app, "/v1/answer", request)
    assert answered.status_code == 200, answered.text
    out = answered.json()
    assert {"answer", "evidence", "response", "truncated", "grounding", "timings_ms", "warnings"} <= set(out)
    _check_grounding(out["grounding"], n_frames=6)
    assert out["grounding"]["cache"] == "hit" and out["grounding"]["spans_s"] == grounded["spans_s"]
    assert out["response"] == ref_answer.text and out["truncated"] == ref_answer.truncated
    assert out["evidence"], "the chain checkpoint should cite a span in the answer"
    _check_spans([e["span_s"] for e in out["evidence"]], grounded["duration_s"])
    cited = [tuple(s) for s in grounded["spans_s"]] + [tuple(e["span_s"]) for e in out["evidence"]]
    assert cited == [tuple(s) for s in ref_answer.spans_s]
    assert all(out["answer"][e["char_start"] : e["char_end"]] == e["text_ref"] for e in out["evidence"])
    assert out["warnings"] == [] and out["missing_timestamps_s"] == [] and out["output_warnings"] == []
