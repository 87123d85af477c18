"""The Ray-free serving core: resolve → features → ground → answer.

Three services hold the heavy objects and do the work; the Serve deployments
(:mod:`d2vlm_ray.serving.deployments`) and the offline CLI (:mod:`d2vlm_ray.serving.offline`)
are thin wrappers around them, so both paths give the same answers:

* :class:`FeatureService` — the frozen frame encoder plus the shared feature cache. A
  cached video is neither decoded nor encoded again; misses decode, encode and write
  the entry (the FrameEncoder deployment is the only writer).
* :class:`GroundingService` — the model's compressor and LLM up to ``</evi>``; returns a
  :class:`~d2vlm_ray.types.GroundingResult` per request (batched).
* :class:`AnsweringService` — continues from a ``GroundingResult``; it is built without
  the compressor or frame encoder, so it cannot re-run them.

The model objects hold no per-request state (:mod:`d2vlm_ray.model.generation` keeps it in
a ``DecodeState`` value), so one service may run several batches from several threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2vlm_ray.cache import (
    DEFAULT_MAX_MISSING_FRAMES_FRACTION,
    CachedFeatures,
    FeatureCache,
    FeatureSource,
    FeatureSpec,
)
from d2vlm_ray.config.schema import DecodeSettings, ModelConfig
from d2vlm_ray.data.video import VideoDecodeError
from d2vlm_ray.model.builders import Tokenizers
from d2vlm_ray.model.checkpoint import CONFIG_NAME, FORMAT, checkpoint_family, from_pretrained, load_frame_encoder
from d2vlm_ray.model.d2vlm import D2VLM
from d2vlm_ray.model.generation import GenerationResult, answer, decode, ground, prefill
from d2vlm_ray.model.grounding import span_idx_to_s
from d2vlm_ray.model.inputs import build_batch
from d2vlm_ray.model.tokenizer import (
    EVI_END_TOKEN,
    TokenIds,
    detokenize,
    detokenize_with_refs,
    format_span,
    load_llm_tokenizer,
)
from d2vlm_ray.serving.errors import BadVideo, FeaturesUnavailable, InvalidRequest, ServiceError, TooLarge
from d2vlm_ray.types import FeatureKey, FrameEncoder, GroundingResult, SpanS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; other names pass through."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _ms(start_s: float) -> float:
    return round((time.perf_counter() - start_s) * 1000.0, 3)


# --- features -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSettings:
    """How videos are sampled, and which ones are refused.

    Attributes:
        fps: Frame sampling rate (part of the cache key).
        max_frames: Frame cap (part of the cache key; ``None`` for none).
        max_duration_s: Longer videos are refused with 413 (``None`` for no limit).
        max_missing_frames_fraction: A decode that lost a larger share of its sampled
            frames is refused with 422 ``partial_decode``; a smaller loss is served with
            its warnings. Checked on cache hits too.
    """

    fps: float = 1.0
    max_frames: int | None = 128
    max_duration_s: float | None = None
    max_missing_frames_fraction: float = DEFAULT_MAX_MISSING_FRAMES_FRACTION

    def spec(self, cache_root: str = "") -> FeatureSpec:
        """The shared :class:`FeatureSpec` these settings sample under (``max_duration_s`` is a request limit)."""
        return FeatureSpec(
            fps=self.fps,
            max_frames=int(self.max_frames or 0),
            max_missing_frames_fraction=self.max_missing_frames_fraction,
            cache_root=cache_root,
        )


@dataclass
class FeatureResult:
    """Features of one video and how they were obtained.

    Attributes:
        key: The cache key.
        features: Patch features ``[F, P, C]`` with frame times.
        cache_hit: True if nothing was decoded or encoded.
        timings_ms: ``hash``, ``cache_read`` and, on a miss, ``decode``, ``encode``, ``cache_write``.
    """

    key: FeatureKey
    features: CachedFeatures
    cache_hit: bool
    timings_ms: dict[str, float] = field(default_factory=dict)

    def ref(self) -> FeatureRef:
        """The small record a Grounder needs to read these features from the cache."""
        return FeatureRef(
            key=self.key,
            num_frames=self.features.num_frames,
            duration_s=self.features.duration_s,
            cache_hit=self.cache_hit,
            timings_ms=dict(self.timings_ms),
            warnings=list(self.features.warnings),
            missing_timestamps_s=list(self.features.missing_timestamps_s),
        )


@dataclass(frozen=True)
class FeatureRef:
    """What the FrameEncoder hands on: the cache key of the features, not the features.

    Attributes:
        key: Cache key the Grounder reads.
        num_frames: Number of sampled frames ``F``.
        duration_s: Video duration.
        cache_hit: Whether the FrameEncoder found the entry already cached.
        timings_ms: The FrameEncoder's timings.
        warnings: The decode's warnings (empty for a clean decode), for the response.
        missing_timestamps_s: Sampled frames the decode lost, for the response.
    """

    key: FeatureKey
    num_frames: int
    duration_s: float
    cache_hit: bool
    timings_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    missing_timestamps_s: list[float] = field(default_factory=list)


def _decode_error(exc: VideoDecodeError) -> ServiceError:
    if exc.reason == "too_long":
        return TooLarge(f"video: {exc.message}", reason="too_long")
    # Server-side paths (for uploads, a temp file) stay out of responses.
    message = exc.message.replace(exc.source, "<video>") if exc.source else exc.message
    return BadVideo(f"video: cannot decode ({exc.reason}): {message}", reason=exc.reason)


class FeatureService:
    """Patch features of videos through the shared cache.

    Args:
        encoder: The frozen frame encoder.
        cache: The shared feature cache, or ``None`` to always decode and encode.
        settings: Sampling and limits.
    """

    def __init__(self, encoder: FrameEncoder, cache: FeatureCache | None, settings: FeatureSettings) -> None:
        self.encoder = encoder
        self.cache = cache
        self.settings = settings
        self.source = FeatureSource(encoder, settings.spec(cache.root if cache is not None else ""), cache=cache)
        self._counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        *,
        cache_root: str | None,
        settings: FeatureSettings,
        device: str = "cpu",
        dtype: str = "float32",
        cache_memory_bytes: int = 256 << 20,
        cache_storage_dtype: str = "float16",
        cache_quota_bytes: int = 0,
    ) -> FeatureService:
        """Load only the frame encoder of a checkpoint and open the cache at ``cache_root``.

        ``cache_quota_bytes`` (0 = unbounded) is enforced on every write, as in the jobs:
        this service is the server's only cache writer.
        """
        encoder = load_frame_encoder(ckpt_dir, device=resolve_device(device), dtype=DTYPES[dtype])
        cache = (
            FeatureCache(
                cache_root,
                memory_bytes=cache_memory_bytes,
                storage_dtype=cache_storage_dtype,
                quota_bytes=cache_quota_bytes or None,
            )
            if cache_root
            else None
        )
        return cls(encoder, cache, settings)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._counters.update(amounts)

    def counters(self) -> dict[str, Any]:
        """``decodes``, ``encodes``, ``frames_encoded``, ``requests``, ``cache_hits`` and the cache's own stats."""
        with self._lock:
            out: dict[str, Any] = {name: int(self._counters[name]) for name in ("requests", "cache_hits")}
        made = self.source.counters()
        out.update({name: made[name] for name in ("decodes", "encodes", "frames_encoded")})
        out["cache"] = self.cache.stats() if self.cache is not None else {}
        return out

    def _check_duration(self, duration_s: float) -> None:
        limit = self.settings.max_duration_s
        if limit is not None and duration_s > limit + 1e-6:
            raise TooLarge(f"video: duration {duration_s:.3f} s exceeds the limit of {limit} s", reason="too_long")

    def features(self, source: str) -> FeatureResult:
        """Features of ``source`` (a local path or fsspec URL), from the cache when possible.

        Concurrent requests for the same video in one process decode it once. The result
        carries the decode's warnings and missing frame times, from the cache on a hit.

        Raises:
            BadVideo: The video is missing, unreadable or not a video (``reason`` says which),
                or (``partial_decode``) its decode lost more than
                ``settings.max_missing_frames_fraction`` of the sampled frames.
            TooLarge: The video is longer than ``settings.max_duration_s``.
        """
        self._count(requests=1)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            sha = self.source.sha256(source)
        except FileNotFoundError:
            raise BadVideo("video: no such file", reason="not_found") from None
        except OSError as exc:
            raise BadVideo(f"video: cannot read it ({type(exc).__name__})", reason="unreadable") from None
        timings["hash"] = _ms(start)
        return self._features(source, sha, timings)

    def _features(self, source: str, sha: str, timings: dict[str, float]) -> FeatureResult:
        try:
            result = self.source.features_of(
                source, sha, max_duration_s=self.settings.max_duration_s, timings_ms=timings
            )
        except VideoDecodeError as exc:
            raise _decode_error(exc) from None
        if result.cache_hit:
            self._count(cache_hits=1)
            self._check_duration(result.features.duration_s)
        return FeatureResult(result.key, result.features, result.cache_hit, timings)

    def features_from_bytes(self, data: bytes, suffix: str = ".mp4") -> FeatureResult:
        """Features of an uploaded video: written to a private temp file, processed, removed.

        The cache key is the content hash, so the same upload twice is a cache hit.
        """
        if not data:
            raise BadVideo("file: the upload is empty", reason="empty")
        suffix = suffix if suffix.startswith(".") and len(suffix) <= 8 and suffix[1:].isalnum() else ".bin"
        fd, path = tempfile.mkstemp(prefix="d2vlm-upload-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            self._count(requests=1)
            # The bytes are at hand: hash them here rather than record a temp path in the manifest.
            return self._features(path, hashlib.sha256(data).hexdigest(), {})
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def read(self, ref: FeatureRef) -> CachedFeatures:
        """Read features a FrameEncoder put in the shared cache.

        Raises:
            FeaturesUnavailable: The entry is not (or no longer) in the cache.
        """
        found = self.cache.get(ref.key) if self.cache is not None else None
        if found is None:
            raise FeaturesUnavailable(
                "features are not in the shared cache (is features.cache_root shared by every replica?)", retry_after_s=1
            )
        return found


# --- the model ------------------------------------------------------------------------


class _Removed(nn.Module):
    """Stands in for a submodule a service must never run (and should not hold in memory)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._removed_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise RuntimeError(f"model.{self._removed_name} was removed from this service and must not run")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            return super().__getattr__(name)
        raise RuntimeError(f"model.{self._removed_name} was removed from this service (asked for {name!r})")


def load_model(
    ckpt_dir: str | Path, *, dtype: str = "float32", device: str = "auto", drop: Sequence[str] = ()
) -> tuple[D2VLM, Tokenizers, ModelConfig]:
    """Load a checkpoint for serving, replacing the submodules in ``drop`` with guards.

    Args:
        ckpt_dir: d2vlm_ray checkpoint directory.
        dtype: One of :data:`DTYPES`.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        drop: Submodules this service never runs (``vision``, ``compressor``).
    """
    model, tokenizers, cfg = from_pretrained(ckpt_dir, dtype=DTYPES[dtype], device=resolve_device(device))
    for name in drop:
        setattr(model, name, _Removed(name))
    return model, tokenizers, cfg


def load_llm_tokenizer_for(ckpt_dir: str | Path) -> tuple[Any, str, str]:
    """The LLM tokenizer of a checkpoint (for rendering text), its preset name and its model family.

    Cheap compared with :func:`load_model`: the Ingress renders responses with it.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / CONFIG_NAME).read_text())
    family = checkpoint_family(ckpt_dir)
    if meta.get("format") == FORMAT:
        return load_llm_tokenizer(ckpt_dir / "tokenizer"), str(meta.get("model", {}).get("preset", "")), family
    return load_llm_tokenizer(ckpt_dir), "phi3-mini", family


@dataclass
class GroundingRequest:
    """One question to ground.

    Attributes:
        question: Question text (``<evi>`` marks question-side spans).
        features: The video's patch features.
        src_spans_s: One span per question-side ``<evi>``.
        settings: Decoding settings; ``max_new_tokens`` bounds the grounding part.
    """

    question: str
    features: CachedFeatures
    src_spans_s: list[SpanS]
    settings: DecodeSettings


class _ModelService:
    def __init__(self, model: D2VLM, tokenizers: Tokenizers, cfg: ModelConfig) -> None:
        self.model = model
        self.tokenizers = tokenizers
        self.cfg = cfg
        self.token_ids = TokenIds.from_tokenizer(tokenizers.llm)
        self.stop_ids = {self.token_ids.end}
        if tokenizers.llm.eos_token_id is not None:
            self.stop_ids.add(int(tokenizers.llm.eos_token_id))


def _settings_key(settings: DecodeSettings) -> tuple[Any, ...]:
    return astuple(settings)


def _run_isolated(run: Any, members: list[int]) -> list[Any]:
    """``run(members)``; if the model core rejects the group (``ValueError``), run each alone.

    So one request the model refuses (e.g. too long for the context with its token
    bound) gets a 422 in its own slot instead of failing the requests batched with it.
    """
    try:
        return list(run(members))
    except ValueError as exc:
        if len(members) == 1:
            return [InvalidRequest(_field_message(str(exc)))]
    return [_run_isolated(run, [i])[0] for i in members]


def _field_message(message: str) -> str:
    """Model-core messages name batch slots (``questions[0]``); a request has one sample."""
    return message.replace("questions[0]", "question").replace("[0]", "")


class GroundingService(_ModelService):
    """Runs the compressor and the LLM through the grounding part (``n × <evi>``, ``</evi>``)."""

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, *, dtype: str = "float32", device: str = "auto") -> GroundingService:
        """Load the model without its frame encoder (features come from the cache)."""
        return cls(*load_model(ckpt_dir, dtype=dtype, device=device, drop=("vision",)))

    def _batch(self, requests: Sequence[GroundingRequest]) -> Any:
        return build_batch(
            self.tokenizers.llm,
            self.tokenizers.qformer,
            [r.question for r in requests],
            [r.features.patches for r in requests],
            [r.features.timestamps_s for r in requests],
            [r.features.duration_s for r in requests],
            src_spans_s=[list(r.src_spans_s) for r in requests],
            max_text_tokens=self.cfg.qformer.max_text_tokens,
            max_context=self.cfg.llm.max_position_embeddings,
        )

    def check(self, request: GroundingRequest) -> None:
        """Validate one request as the model sees it (span count, context length).

        Raises:
            InvalidRequest: With the model core's message, naming the field.
        """
        try:
            request.settings.validate()
            self._batch([request])
        except ValueError as exc:
            raise InvalidRequest(_field_message(str(exc))) from None

    def ground_many(self, requests: Sequence[GroundingRequest]) -> list[GroundingResult | ServiceError]:
        """Ground a batch; requests with equal settings decode together.

        A request that fails validation gets its :class:`ServiceError` in its slot and
        does not affect the others.
        """
        out: list[GroundingResult | ServiceError | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(requests):
            try:
                self.check(request)
            except ServiceError as exc:
                out[i] = exc
                continue
            groups.setdefault(_settings_key(request.settings), []).append(i)

        def run(members: list[int]) -> list[GroundingResult]:
            chosen = [requests[i] for i in members]
            batch = self._batch(chosen)
            return ground(
                self.model,
                self.tokenizers.llm,
                batch,
                [r.question for r in chosen],
                chosen[0].settings,
                src_spans_s=[list(r.src_spans_s) for r in chosen],
            )

        for members in groups.values():
            for i, result in zip(members, _run_isolated(run, members)):
                out[i] = result
        return [r for r in out if r is not None]


@dataclass
class StreamToken:
    """One generated answer token, as the stream reports it.

    Attributes:
        token_id: The id.
        text: Its surface text (an ``<evi>`` shows its span as ``"s - e"``; stop ids are empty).
        span_s: The span of an ``<evi>``, else ``None``.
        index: Position among the generated answer tokens.
    """

    token_id: int
    text: str
    span_s: SpanS | None
    index: int


class AnsweringService(_ModelService):
    """Continues from a :class:`GroundingResult` to the answer with interleaved evidence.

    Built without the frame encoder and the compressor: answering reads only the frame
    tokens carried by the grounding result.
    """

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, *, dtype: str = "float32", device: str = "auto") -> AnsweringService:
        """Load the model without the frame encoder and the compressor."""
        return cls(*load_model(ckpt_dir, dtype=dtype, device=device, drop=("vision", "compressor")))

    def answer_many(
        self, groundings: Sequence[GroundingResult], settings: Sequence[DecodeSettings]
    ) -> list[GenerationResult | ServiceError]:
        """Answer a batch; groundings with equal settings decode together."""
        out: list[GenerationResult | ServiceError | None] = [None] * len(groundings)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, s in enumerate(settings):
            try:
                s.validate()
            except ValueError as exc:
                out[i] = InvalidRequest(str(exc))
                continue
            groups.setdefault(_settings_key(s), []).append(i)

        def run(members: list[int]) -> list[GenerationResult]:
            chosen = [groundings[i] for i in members]
            return answer(
                self.model,
                self.tokenizers.llm,
                self.tokenizers.qformer,
                chosen,
                settings[members[0]],
            )

        for members in groups.values():
            for i, result in zip(members, _run_isolated(run, members)):
                out[i] = result
        return [r for r in out if r is not None]

    def _token_text(self, token_id: int, span_s: SpanS | None) -> str:
        if span_s is not None:
            return format_span(span_s)
        if token_id == self.token_ids.evi_end:
            return EVI_END_TOKEN
        if token_id in self.stop_ids or token_id == self.token_ids.pad:
            return ""
        return self.tokenizers.llm.decode([token_id], skip_special_tokens=False).strip()

    def stream(self, grounding: GroundingResult, settings: DecodeSettings) -> Iterator[StreamToken | GenerationResult]:
        """Answer one grounding token by token; the last item is the full :class:`GenerationResult`.

        Greedy decoding gives exactly :meth:`answer_many`'s result. With sampling, step k
        draws with seed ``settings.seed + k``, so a streamed sample is reproducible but
        differs from the non-streamed one.
        """
        try:
            settings.validate()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if self.model.family != "d2vlm":
            yield from self._stream_whole(grounding, settings)
            return
        tok = self.tokenizers
        batch = build_batch(
            tok.llm,
            tok.qformer,
            [grounding.question],
            [grounding.frame_tokens[:, None, :]],  # [F, 1, D]: only the frame count is read
            [grounding.timestamps_s],
            [grounding.duration_s],
            src_spans_s=[list(grounding.src_spans_s)],
        )
        try:
            state = prefill(
                self.model,
                batch,
                settings,
                frame_tokens=[grounding.frame_tokens],
                forced_ids=[list(grounding.token_ids)],
                forced_spans_idx=[list(grounding.spans_idx)],
            )
        except ValueError as exc:
            raise InvalidRequest(_field_message(str(exc))) from None
        state.finished = [bool(grounding.token_ids) and grounding.token_ids[-1] in self.stop_ids]
        state.probs = [list(grounding.scores)]
        for step in range(settings.max_new_tokens):
            if state.finished[0]:
                break
            n_spans = len(state.spans_idx[0])
            step_settings = replace(settings, max_new_tokens=1, seed=settings.seed + step)
            state = decode(self.model, state, step_settings, self.token_ids, stop_ids=self.stop_ids)
            token_id = state.tokens[0][-1]
            span_s = (
                span_idx_to_s(state.spans_idx[0][-1], state.timestamps_s[0])
                if len(state.spans_idx[0]) > n_spans
                else None
            )
            yield StreamToken(token_id, self._token_text(token_id, span_s), span_s, step)
        ids = state.tokens[0]
        spans_s = [span_idx_to_s(s, state.timestamps_s[0]) for s in state.spans_idx[0]]
        n_frames = len(state.timestamps_s[0])
        yield GenerationResult(
            token_ids=list(ids),
            spans_idx=list(state.spans_idx[0]),
            spans_s=spans_s,
            probs=torch.stack(state.probs[0]) if state.probs[0] else torch.zeros(0, n_frames),
            text=detokenize(tok.llm, ids, spans_s),
            truncated=not (ids and ids[-1] in self.stop_ids),
        )


    def _stream_whole(
        self, grounding: GroundingResult, settings: DecodeSettings
    ) -> Iterator[StreamToken | GenerationResult]:
        """Stream a family without step-wise decode state (Grounded-VideoLLM): the answer is
        generated whole, then reported token by token in the same shape as :meth:`stream`."""
        (result,) = self.answer_many([grounding], [settings])
        if isinstance(result, ServiceError):
            raise result
        n_ground = len(grounding.token_ids)
        spans = iter(result.spans_s[len(grounding.spans_s) :])
        for index, token_id in enumerate(result.token_ids[n_ground:]):
            span_s = next(spans, None) if token_id == self.token_ids.evi else None
            yield StreamToken(token_id, self._token_text(token_id, span_s), span_s, index)
        yield result


# --- responses (shared by the HTTP API and the offline CLI) ----------------------------


def grounding_payload(
    grounding: GroundingResult,
    tokenizer: Any,
    *,
    cache_hit: bool,
    timings_ms: dict[str, float],
    warnings: Sequence[str] = (),
    missing_timestamps_s: Sequence[float] = (),
) -> dict[str, Any]:
    """The ``/v1/ground`` response body for one grounding result.

    ``warnings`` and ``missing_timestamps_s`` are the video decode's (see
    :class:`FeatureRef`): a response on a partially decoded video says so.
    """
    ids = TokenIds.from_tokenizer(tokenizer)
    tokens = grounding.token_ids
    return {
        "spans_s": [[float(s), float(e)] for s, e in grounding.spans_s],
        "scores": grounding.scores.float().tolist(),
        "timestamps_s": [float(t) for t in grounding.timestamps_s],
        "duration_s": float(grounding.duration_s),
        "text": detokenize(tokenizer, tokens, grounding.spans_s),
        "complete": bool(tokens) and tokens[-1] in (ids.evi_end, ids.end),
        "cache": "hit" if cache_hit else "miss",
        "timings_ms": dict(timings_ms),
        "warnings": [str(w) for w in warnings],
        "output_warnings": [str(w) for w in grounding.warnings],
        "missing_timestamps_s": [float(t) for t in missing_timestamps_s],
    }


def evidence_refs(tokenizer: Any, token_ids: Sequence[int], spans_s: Sequence[SpanS]) -> list[dict[str, Any]]:
    """Where each ``<evi>`` of an answer sits in its detokenized text.

    Returns:
        One ``{"span_s", "text_ref", "char_start", "char_end"}`` per ``<evi>``, where
        ``text[char_start:char_end] == text_ref`` is the ``"s - e"`` the span became.
    """
    detok = detokenize_with_refs(tokenizer, token_ids, spans_s)
    refs = []
    for span_s, (start, end) in zip(spans_s, detok.evidence_chars):
        refs.append(
            {
                "span_s": [float(span_s[0]), float(span_s[1])],
                "text_ref": detok.text[start:end],
                "char_start": start,
                "char_end": end,
            }
        )
    return refs


def answer_payload(
    grounding: GroundingResult,
    result: GenerationResult,
    tokenizer: Any,
    *,
    cache_hit: bool,
    timings_ms: dict[str, float],
    warnings: Sequence[str] = (),
    missing_timestamps_s: Sequence[float] = (),
) -> dict[str, Any]:
    """The ``/v1/answer`` response body: answer text, evidence references and the grounding.

    The decode's ``warnings`` and ``missing_timestamps_s`` appear at the top level and in
    the nested grounding.
    """
    n_ground = len(grounding.token_ids)
    answer_ids = result.token_ids[n_ground:]
    answer_spans = result.spans_s[len(grounding.spans_s) :]
    return {
        "answer": detokenize(tokenizer, answer_ids, answer_spans),
        "evidence": evidence_refs(tokenizer, answer_ids, answer_spans),
        "response": result.text,
        "truncated": bool(result.truncated),
        "grounding": grounding_payload(
            grounding,
            tokenizer,
            cache_hit=cache_hit,
            timings_ms={},
            warnings=warnings,
            missing_timestamps_s=missing_timestamps_s,
        ),
        "timings_ms": dict(timings_ms),
        "warnings": [str(w) for w in warnings],
        "output_warnings": [str(w) for w in result.warnings],
        "missing_timestamps_s": [float(t) for t in missing_timestamps_s],
    }


@dataclass
class LocalPipeline:
    """The whole path in one process (the offline CLI): features → ground → answer.

    One model serves both grounding and answering; the frame encoder is its vision tower.
    """

    features: FeatureService
    grounding: GroundingService
    answering: AnsweringService

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        *,
        cache_root: str | None,
        settings: FeatureSettings,
        dtype: str = "float32",
        device: str = "auto",
    ) -> LocalPipeline:
        """Load one model and share it between the three services."""
        model, tokenizers, cfg = load_model(ckpt_dir, dtype=dtype, device=device)
        features = FeatureService.from_checkpoint(ckpt_dir, cache_root=cache_root, settings=settings, device=device)
        # The frame encoder was loaded on its own (float32); the model's copy is never run.
        model.vision = _Removed("vision")
        return cls(features, GroundingService(model, tokenizers, cfg), AnsweringService(model, tokenizers, cfg))

    def run(
        self,
        source: str,
        question: str,
        *,
        src_spans_s: Sequence[SpanS] = (),
        ground_settings: DecodeSettings,
        answer_settings: DecodeSettings,
    ) -> dict[str, Any]:
        """Answer ``question`` about ``source``; returns the ``/v1/answer`` body.

        Raises:
            ServiceError: On bad input (see :mod:`d2vlm_ray.serving.errors`).
        """
        total = time.perf_counter()
        feats = self.features.features(source)
        start = time.perf_counter()
        request = GroundingRequest(question, feats.features, list(src_spans_s), ground_settings)
        (grounding,) = self.grounding.ground_many([request])
        if isinstance(grounding, ServiceError):
            raise grounding
        ground_ms = _ms(start)
        start = time.perf_counter()
        (result,) = self.answering.answer_many([grounding], [answer_settings])
        if isinstance(result, ServiceError):
            raise result
        timings = {"features": sum(feats.timings_ms.values()), "ground": ground_ms, "answer": _ms(start)}
        timings["total"] = _ms(total)
        return answer_payload(
            grounding,
            result,
            self.answering.tokenizers.llm,
            cache_hit=feats.cache_hit,
            timings_ms=timings,
            warnings=feats.features.warnings,
            missing_timestamps_s=feats.features.missing_timestamps_s,
        )
