"""The Ray-free serving core, schemas, media policy, Serve configs and the offline CLI.

Two tiny checkpoints: a random one (attention fully active; it never emits ``<evi>``) and
a "chain" one whose embeddings and output rows are wired so that greedy decoding emits
``<evi> </evi> the event happens in <evi> </evi> ...`` — grounding, evidence injection and
answer-side evidence then all run. Both still run every layer, so parity checks cover
the real arithmetic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from d2vlm_ray.cache import FeatureCache, FeatureSource, FeatureSpec, video_sha256
from d2vlm_ray.cache.source import find_entry
from d2vlm_ray.config import DecodeSettings, ModelConfig, from_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.model.checkpoint import from_pretrained, init_checkpoint, load_frame_encoder, save_pretrained
from d2vlm_ray.model.generation import generate
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.tokenizer import TokenIds, detokenize
from d2vlm_ray.serving import offline
from d2vlm_ray.serving.args import ServeArgs
from d2vlm_ray.serving.core import (
    AnsweringService,
    FeatureService,
    FeatureSettings,
    GroundingRequest,
    GroundingService,
    StreamToken,
    answer_payload,
    evidence_refs,
)
from d2vlm_ray.serving.errors import BadVideo, Forbidden, InvalidRequest, TooLarge
from d2vlm_ray.serving.media import MediaPolicy
from d2vlm_ray.serving.schemas import AnswerRequest, AnswerResponse, GroundRequest

REPO = Path(__file__).resolve().parents[1]
CHAIN = ["<|assistant|>", "<evi>", "</evi>", "the", "event", "happens", "in", "<evi>"]


def make_chain_checkpoint(src: Path, out: Path) -> Path:
    """Rewire a random tiny checkpoint so greedy decoding follows :data:`CHAIN` (then loops).

    Embeddings are scaled up so each position's last hidden state points mostly along its
    input token's embedding (the layers still add their part); each output row gets the
    normalised embedding of its predecessor in the chain. ``<evi>`` is scaled further so
    the evidence vector added to it does not change what follows it.
    """
    model, tokenizers, cfg = from_pretrained(src)
    lm = model.causal_lm
    ids = tokenizers.llm.convert_tokens_to_ids(CHAIN)
    with torch.no_grad():
        emb = lm.model.embed_tokens.weight  # [V, D]
        emb *= 20.0
        emb[ids[1]] *= 5.0
        for prev, nxt in zip(ids, ids[1:]):
            h = emb[prev] / emb[prev].pow(2).mean().sqrt() * lm.model.norm.weight  # [D], as the final RMSNorm sees it
            lm.lm_head.weight[nxt] += 10.0 * h / h.pow(2).sum()
    return save_pretrained(model, cfg, tokenizers, out)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving_core")
    random_ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), root / "random", seed=0)
    chain_ckpt = make_chain_checkpoint(random_ckpt, root / "chain")
    videos = root / "videos"
    videos.mkdir()
    write_barcode_clip(videos / "a.mp4", fps=4, duration_s=6)
    write_barcode_clip(videos / "b.mp4", fps=4, duration_s=4, width=64, height=48)
    write_barcode_clip(videos / "long.mp4", fps=2, duration_s=12)
    (videos / "notes.txt").write_text("not a video")
    return {"root": root, "random": random_ckpt, "chain": chain_ckpt, "videos": videos}


def _reference(ckpt: Path, video: Path, question: str, max_new_tokens: int, src_spans_s=None):
    """The model core's single-call ``generate`` in float64 on the same features."""
    model, tokenizers, _ = from_pretrained(ckpt, dtype=torch.float64)
    feats = compute_features_(load_frame_encoder(ckpt), str(video), fps=1.0, max_frames=128)
    batch = build_batch(
        tokenizers.llm,
        tokenizers.qformer,
        [question],
        [feats.patches],
        [feats.timestamps_s],
        [feats.duration_s],
        src_spans_s=[src_spans_s or []],
    )
    return generate(model, tokenizers.llm, batch, DecodeSettings(max_new_tokens=max_new_tokens))[0], tokenizers


def _json_documents(text: str) -> list[dict]:
    """Every JSON document printed one after another (the CLI pretty-prints each)."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
    return docs


# --- media policy ---------------------------------------------------------------------


def test_media_policy_roots_schemes_and_symlinks(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    os.symlink(outside, media / "link.mp4")
    policy = MediaPolicy.create([str(media)], ["file", "s3"])

    assert policy.resolve("clip.mp4") == str((media / "clip.mp4").resolve())
    assert policy.resolve(str(media / "clip.mp4")) == str((media / "clip.mp4").resolve())
    assert policy.resolve(f"file://{media / 'clip.mp4'}") == str((media / "clip.mp4").resolve())
    assert policy.resolve("s3://bucket/v.mp4") == "s3://bucket/v.mp4"
    for bad in (str(outside), "../secret.mp4", "link.mp4", f"file://{outside}", "/etc/passwd"):
        with pytest.raises(Forbidden, match="outside the configured media roots"):
            policy.resolve(bad)
    for url in ("http://example.com/v.mp4", "gs://b/v.mp4", "memory://v.mp4"):
        with pytest.raises(Forbidden, match="not allowed") as info:
            policy.resolve(url)
        assert info.value.status_code == 403
    with pytest.raises(InvalidRequest):
        policy.resolve("   ")
    with pytest.raises(Forbidden, match="no media_roots"):
        MediaPolicy.create([], ["file"]).resolve("clip.mp4")


# --- request schemas -------------------------------------------------------------------


def _errors(model, payload, **context):
    ctx = {"upload": False, "max_new_tokens": 32, "max_grounding_tokens": 16, "max_deadline_s": 60.0, **context}
    with pytest.raises(Exception) as info:
        model.model_validate(payload, context=ctx)
    return json.dumps(info.value.errors(include_url=False, include_input=False, include_context=False))


def test_request_schemas_reject_bad_input() -> None:
    ctx = {"upload": False, "max_new_tokens": 32, "max_grounding_tokens": 16, "max_deadline_s": 60.0}
    ok = AnswerRequest.model_validate(
        {"video": "a.mp4", "question": "what after <evi> ?", "src_spans_s": [[1, 2]], "options": {"max_new_tokens": 8}},
        context=ctx,
    )
    assert ok.src_spans_s == [(1.0, 2.0)] and ok.options.settings(8).max_new_tokens == 8
    assert "missing" in _errors(GroundRequest, {"video": "a.mp4"})
    assert "extra_forbidden" in _errors(GroundRequest, {"video": "a.mp4", "query": "q", "colour": 1})
    assert "extra_forbidden" in _errors(AnswerRequest, {"video": "a.mp4", "question": "q", "options": {"beams": 4}})
    assert "must not be empty" in _errors(AnswerRequest, {"video": "a.mp4", "question": "   "})
    assert "1 spans for 0 <evi>" in _errors(AnswerRequest, {"video": "a.mp4", "question": "q", "src_spans_s": [[1, 2]]})
    assert "start_s <= end_s" in _errors(GroundRequest, {"video": "a", "query": "a <evi>", "src_spans_s": [[3, 2]]})
    assert "at most 32" in _errors(AnswerRequest, {"video": "a", "question": "q", "options": {"max_new_tokens": 33}})
    assert "at most 60" in _errors(AnswerRequest, {"video": "a", "question": "q", "options": {"deadline_s": 61}})
    assert "video: field required" in _errors(AnswerRequest, {"question": "q"})
    assert "not both" in _errors(AnswerRequest, {"video": "a", "question": "q"}, upload=True)


# --- Serve configs and args ------------------------------------------------------------


@pytest.mark.parametrize("name", ["local.yaml", "test.yaml", "autoscale.yaml"])
def test_serve_configs_are_valid(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / name).read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "d2vlm_ray.serving.app:build_app"
    ServeArgs.model_validate(app["args"])
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "FrameEncoder", "Grounder", "Answerer"}
    if name != "autoscale.yaml":
        assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
        for dep in app["deployments"]:
            # Four deployments must fit a 2-CPU test cluster beside other work.
            assert dep["ray_actor_options"]["num_cpus"] <= 0.25, dep["name"]
    else:
        assert all("autoscaling_config" in d for d in app["deployments"])


def test_serve_args_resolve_paths_and_explain_missing_checkpoint(tmp_path: Path, assets: dict[str, Path]) -> None:
    args = ServeArgs.load({"checkpoint_dir": str(assets["random"]), "features": {"cache_root": "cache"}, "media_roots": ["v"]},
                          base_dir=str(tmp_path))
    assert args.features.cache_root == str(tmp_path / "cache") and args.media_roots == [str(tmp_path / "v")]
    with pytest.raises(FileNotFoundError, match="init_checkpoint") as info:
        ServeArgs.load({"checkpoint_dir": "missing/ckpt", "features": {"cache_root": "c"}, "preset": "tiny"}, base_dir=str(tmp_path))
    assert "does not exist" in str(info.value)
    with pytest.raises(FileNotFoundError, match="trained d2vlm_ray checkpoint"):
        ServeArgs.load({"checkpoint_dir": "missing", "features": {"cache_root": "c"}, "preset": "phi3-mini"}, base_dir=str(tmp_path))
    with pytest.raises(Exception, match="extra"):
        ServeArgs.model_validate({"checkpoint_dir": "x", "features": {"cache_root": "c"}, "replicas": 3})


# --- features ----------------------------------------------------------------------------


def test_feature_service_caches_and_rejects(tmp_path: Path, assets: dict[str, Path]) -> None:
    videos = assets["videos"]
    settings = FeatureSettings(fps=1.0, max_frames=16, max_duration_s=10.0)
    service = FeatureService.from_checkpoint(assets["random"], cache_root=str(tmp_path / "cache"), settings=settings)

    first = service.features(str(videos / "a.mp4"))
    second = service.features(str(videos / "a.mp4"))
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.features.patches, second.features.patches)
    counts = service.counters()
    assert (counts["decodes"], counts["encodes"], counts["cache_hits"]) == (1, 1, 1)
    # A fresh process (another replica) on the same root hits the shared tier.
    other = FeatureService.from_checkpoint(assets["random"], cache_root=str(tmp_path / "cache"), settings=settings)
    assert other.features(str(videos / "a.mp4")).cache_hit and other.counters()["decodes"] == 0
    # Uploads are keyed by content: the same bytes are a hit.
    assert other.features_from_bytes((videos / "a.mp4").read_bytes(), ".mp4").cache_hit

    with pytest.raises(TooLarge, match="exceeds") as too_long:
        service.features(str(videos / "long.mp4"))
    assert too_long.value.status_code == 413
    with pytest.raises(BadVideo) as not_video:
        service.features(str(videos / "notes.txt"))
    assert not_video.value.status_code == 422 and not_video.value.reason == "corrupt"
    assert str(videos) not in not_video.value.message
    with pytest.raises(BadVideo) as missing:
        service.features(str(videos / "nope.mp4"))
    assert missing.value.reason == "not_found"
    with pytest.raises(BadVideo, match="empty"):
        service.features_from_bytes(b"")


# --- ground + answer parity ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["random", "chain"])
def test_two_deployment_split_matches_single_generate(which: str, assets: dict[str, Path]) -> None:
    ckpt, video = assets[which], assets["videos"] / "a.mp4"
    question = "when does the red circle move ?"
    grounding_svc = GroundingService.from_checkpoint(ckpt, dtype="float64", device="cpu")
    answering_svc = AnsweringService.from_checkpoint(ckpt, dtype="float64", device="cpu")
    feats = compute_features_(load_frame_encoder(ckpt), str(video), fps=1.0, max_frames=128)
    other = compute_features_(load_frame_encoder(ckpt), str(assets["videos"] / "b.mp4"), fps=1.0, max_frames=128)
    ground_settings, answer_settings = DecodeSettings(max_new_tokens=4), DecodeSettings(max_new_tokens=10)

    # Batched with a different video and question: padding must not change the result.
    requests = [
        GroundingRequest(question, feats, [], ground_settings),
        GroundingRequest("what happens ?", other, [], ground_settings),
    ]
    grounding, _ = grounding_svc.ground_many(requests)
    results = answering_svc.answer_many([grounding, grounding], [answer_settings, DecodeSettings(max_new_tokens=3)])
    result = results[0]
    ref, tokenizers = _reference(ckpt, video, question, len(grounding.token_ids) + 10)
    assert result.token_ids == ref.token_ids
    assert result.spans_s == ref.spans_s and result.spans_idx == ref.spans_idx
    assert result.text == ref.text
    assert len(results[1].token_ids) == len(grounding.token_ids) + 3

    # Streaming yields the same tokens one at a time, then the same result.
    steps = list(answering_svc.stream(grounding, answer_settings))
    tokens, final = [s for s in steps if isinstance(s, StreamToken)], steps[-1]
    assert [t.token_id for t in tokens] == result.token_ids[len(grounding.token_ids) :]
    assert final.token_ids == result.token_ids and final.spans_s == result.spans_s and final.text == result.text

    evi = TokenIds.from_tokenizer(tokenizers.llm).evi
    if which == "chain":
        assert grounding.token_ids == tokenizers.llm.convert_tokens_to_ids(["<evi>", "</evi>"])
        assert grounding.evidence_vectors.shape == (1, grounding.frame_tokens.shape[-1])
        assert result.token_ids.count(evi) >= 2 and any(t.span_s is not None for t in tokens)
        body = answer_payload(grounding, result, tokenizers.llm, cache_hit=False, timings_ms={})
        AnswerResponse.model_validate(body)
        assert body["evidence"] and body["answer"].startswith("the event happens in")
        for ref_item in body["evidence"]:
            assert body["answer"][ref_item["char_start"] : ref_item["char_end"]] == ref_item["text_ref"]
    # The answering service holds no compressor and no frame encoder.
    with pytest.raises(RuntimeError, match="removed"):
        answering_svc.model.compressor(None)
    with pytest.raises(RuntimeError, match="removed"):
        grounding_svc.model.vision(None)


def test_grounding_rejects_per_request_without_failing_the_batch(assets: dict[str, Path]) -> None:
    svc = GroundingService.from_checkpoint(assets["random"], dtype="float32", device="cpu")
    feats = compute_features_(load_frame_encoder(assets["random"]), str(assets["videos"] / "a.mp4"))
    settings = DecodeSettings(max_new_tokens=2)
    good = GroundingRequest("what happens ?", feats, [], settings)
    outside = GroundingRequest("after <evi> ?", feats, [(50.0, 60.0)], settings)
    out = svc.ground_many([outside, good])
    assert isinstance(out[0], InvalidRequest) and "src_spans_s" in out[0].message
    assert len(out[1].token_ids) == 2


def test_a_rejected_request_does_not_fail_its_batch() -> None:
    from d2vlm_ray.serving.core import _run_isolated

    calls = []

    def run(members: list[int]) -> list[str]:
        calls.append(list(members))
        if 1 in members:
            raise ValueError("questions[0]: 2000 tokens exceed the model's context of 1024")
        return [f"ok{i}" for i in members]

    out = _run_isolated(run, [0, 1, 2])
    assert out[0] == "ok0" and out[2] == "ok2" and calls[0] == [0, 1, 2]
    assert isinstance(out[1], InvalidRequest) and out[1].message.startswith("question: 2000 tokens")


def test_evidence_refs_point_into_the_answer(assets: dict[str, Path]) -> None:
    _, tokenizers, _ = from_pretrained(assets["random"])
    tok = tokenizers.llm
    ids = tok.convert_tokens_to_ids(["the", "<evi>", "event", "happens", "<evi>", "<evi>", "."])
    spans = [(1.0, 2.5), (3.0, 4.0), (0.0, 10.0)]
    text = detokenize(tok, ids, spans)
    refs = evidence_refs(tok, ids, spans)
    assert [r["text_ref"] for r in refs] == ["1 - 2.5", "3 - 4", "0 - 10"]
    assert [text[r["char_start"] : r["char_end"]] for r in refs] == [r["text_ref"] for r in refs]
    assert refs[0]["char_start"] == len("the ")


# --- offline CLI --------------------------------------------------------------------------


def test_offline_cli_matches_generate_and_reports_errors(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, video = assets["chain"], assets["videos"] / "a.mp4"
    question = "when does it move after <evi> ?"
    cache = str(tmp_path / "cache")
    argv = [str(video), question, "--ckpt", str(ckpt), "--src-span-s", "1,2", "--max-new-tokens", "9",
            "--max-grounding-tokens", "4", "--dtype", "float64", "--device", "cpu", "--cache-root", cache]
    assert offline.main(argv) == 0 and offline.main(argv) == 0
    first, second = _json_documents(capsys.readouterr().out)
    assert (first["grounding"]["cache"], second["grounding"]["cache"]) == ("miss", "hit")
    assert first["response"] == second["response"]

    # The single-call reference on the features the cache holds (what the CLI read).
    encoder = load_frame_encoder(ckpt)
    spec = FeatureSpec(fps=1.0, max_frames=128)
    _, feats = find_entry(FeatureCache(cache), video_sha256(str(video)), spec, encoder.transform_id, encoder.encoder_id)
    model, tokenizers, _ = from_pretrained(ckpt, dtype=torch.float64)
    batch = build_batch(tokenizers.llm, tokenizers.qformer, [question], [feats.patches], [feats.timestamps_s],
                        [feats.duration_s], src_spans_s=[[(1.0, 2.0)]])
    ref = generate(model, tokenizers.llm, batch, DecodeSettings(max_new_tokens=2 + 9))[0]
    assert first["response"] == ref.text
    assert [tuple(e["span_s"]) for e in first["evidence"]] == ref.spans_s[1:]
    assert [tuple(s) for s in first["grounding"]["spans_s"]] == ref.spans_s[:1]
    assert first["evidence"] and first["truncated"]

    assert offline.main([str(assets["videos"] / "notes.txt"), "q", "--ckpt", str(ckpt)]) == 1
    err = json.loads(capsys.readouterr().err)
    assert err["status"] == 422 and err["reason"] == "corrupt"
    assert offline.main([str(video), "q <evi>", "--ckpt", str(ckpt)]) == 1
    assert "src_spans_s" in json.loads(capsys.readouterr().err)["detail"]
    assert offline.main([str(video), "q", "--ckpt", str(tmp_path / "none")]) == 2
    assert offline.main([str(video), "q", "--ckpt", str(ckpt), "--src-span-s", "5"]) == 2
    capsys.readouterr()


def test_serving_core_modules_import_no_ray_or_web_stack() -> None:
    """The offline path (offline, core, args, schemas, media, errors) never imports Ray or FastAPI."""
    import ast

    ray_free = {"offline", "core", "args", "schemas", "media", "errors"}
    for name in ray_free:
        tree = ast.parse((REPO / "d2vlm_ray" / "serving" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in {"ray", "fastapi", "starlette", "deepspeed"}, (name, module)
                if module.startswith("d2vlm_ray.serving."):
                    assert module.rsplit(".", 1)[1] in ray_free, (name, module)


def compute_features_(encoder: Any, source: str, fps: float = 1.0, max_frames: int = 0) -> Any:
    """Decode and encode a video with no cache involved."""
    spec = FeatureSpec(fps=fps, max_frames=max_frames)
    return FeatureSource(encoder, spec, cache=None).features(source).features


def test_feature_service_enforces_the_cache_quota(tmp_path: Path, assets: dict[str, Path]) -> None:
    """The server's only cache writer applies ``features.cache_quota_bytes`` (it used to ignore it)."""
    videos = assets["videos"]
    settings = FeatureSettings(fps=1.0, max_frames=16, max_duration_s=10.0)
    root = str(tmp_path / "cache")
    unbounded = FeatureService.from_checkpoint(assets["random"], cache_root=root, settings=settings)
    unbounded.features(str(videos / "a.mp4"))
    one_entry_bytes = unbounded.cache.store.used_bytes()
    bounded = FeatureService.from_checkpoint(
        assets["random"], cache_root=root, settings=settings, cache_quota_bytes=one_entry_bytes
    )
    assert bounded.cache.quota_bytes == one_entry_bytes
    bounded.features(str(videos / "b.mp4"))
    assert bounded.cache.stats()["shared_evictions"] >= 1
    assert bounded.cache.store.used_bytes() <= one_entry_bytes
