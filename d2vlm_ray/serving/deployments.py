"""Ray Serve deployments: FrameEncoder, Grounder, Answerer and the FastAPI Ingress.

Each deployment is a thin wrapper around a Ray-free service of
:mod:`d2vlm_ray.serving.core` and is scaled on its own from the Serve config
(``deployments:`` in ``serve/*.yaml``). Data flow per request::

    Ingress ──video ref / upload──► FrameEncoder ──FeatureRef (cache key)──► Ingress
    Ingress ──FeatureRef + question──► Grounder (reads the shared cache) ──GroundingResult──►
    Ingress ──GroundingResult──► Answerer (no cache, no compressor) ──GenerationResult / token stream

Only the FrameEncoder writes the feature cache; the Grounder reads it by key, so a
repeated video is decoded and encoded once for the whole application. Grounder and
Answerer batch concurrent requests with ``@serve.batch`` and run the model in a worker
thread, so the replica's event loop keeps accepting requests; the model keeps no
per-request state. Heavy work runs in threads (``asyncio.to_thread``); torch releases
the GIL.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures
# (``request: Request``) at runtime, and Serve's class-based ingress re-binds them.
import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.formparsers import MultiPartException

from d2vlm_ray import telemetry
from d2vlm_ray.cache import FeatureCache
from d2vlm_ray.config.schema import DecodeSettings
from d2vlm_ray.model.generation import GenerationResult
from d2vlm_ray.serving.args import ServeArgs
from d2vlm_ray.serving.core import (
    AnsweringService,
    FeatureRef,
    FeatureService,
    GroundingRequest,
    GroundingService,
    StreamToken,
    answer_payload,
    grounding_payload,
    load_llm_tokenizer_for,
)
from d2vlm_ray.serving.errors import (
    DeadlineExceeded,
    FeaturesUnavailable,
    InvalidRequest,
    Overloaded,
    ReplicaLost,
    ServiceError,
    TooLarge,
    unwrap_service_error,
)
from d2vlm_ray.serving.media import MediaPolicy
from d2vlm_ray.serving.schemas import (
    AnswerRequest,
    AnswerResponse,
    ErrorResponse,
    GroundRequest,
    GroundResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
)
from d2vlm_ray.types import GroundingResult, SpanS

logger = logging.getLogger("ray.serve")

# Multipart framing (boundaries, part headers, the JSON request field) on top of the file.
_MULTIPART_OVERHEAD_BYTES = 64 << 10
# An in-flight slot outlives its request's deadline by this much at most.
_SLOT_GRACE_S = 5.0
# First pause before retrying work whose replica died; doubles per retry. The router
# itself waits for a healthy replica, so this only keeps a flapping replica from a hot loop.
_RETRY_BACKOFF_S = 0.05
# What Ray raises to a caller whose replica (or its process or node) went away mid-call.
_REPLICA_GONE = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)
# How often Serve's controller probes each replica. A dead replica is replaced only once a
# probe fails; Serve's default (10 s) added 5 s on average to every replacement, while a
# probe of these replicas costs a no-op call on their event loop (the model runs in threads).
_HEALTH_CHECK_PERIOD_S = 2.0


@dataclass
class GroundItem:
    """A grounding request as the Grounder receives it.

    Attributes:
        ref: Where the FrameEncoder put the video's features.
        question: Question text.
        src_spans_s: Question-side spans.
        settings: Decoding settings (``max_new_tokens`` bounds the grounding part).
        deadline_unix_s: Wall-clock deadline; expired work is skipped.
    """

    ref: FeatureRef
    question: str
    src_spans_s: list[SpanS]
    settings: DecodeSettings
    deadline_unix_s: float


@dataclass
class AnswerItem:
    """An answering request: continue from ``grounding`` under ``settings``."""

    grounding: GroundingResult
    settings: DecodeSettings
    deadline_unix_s: float


def _check_deadline(deadline_unix_s: float) -> None:
    if time.time() >= deadline_unix_s:
        raise DeadlineExceeded("the request's deadline passed before the work started")


_BATCH_KNOBS = frozenset({"max_batch_size", "batch_wait_timeout_s"})
_INGRESS_KNOBS = frozenset(
    {
        "max_inflight_requests",
        "retry_after_s",
        "max_replica_retries",
        "default_max_new_tokens",
        "max_new_tokens",
        "default_max_grounding_tokens",
        "max_grounding_tokens",
        "default_deadline_s",
        "max_deadline_s",
        "max_json_bytes",
    }
)


def _retuned(args: ServeArgs, user_config: dict[str, Any], allowed: frozenset[str], deployment: str) -> ServeArgs:
    """``args`` with the hot-tunable values of ``user_config`` applied (validated)."""
    unknown = set(user_config) - allowed
    if unknown:
        raise ValueError(
            f"{deployment} user_config: {sorted(unknown)} cannot change at runtime; tunable: {sorted(allowed)}"
        )
    return ServeArgs.model_validate({**args.model_dump(), **user_config})


class _BatchCounters:
    """Requests, batches and the largest batch seen (reported by the deployments' ``counters()``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, size: int) -> None:
        self.counts.update(requests=size, batches=1)
        self.counts["max_batch_size_seen"] = max(self.counts["max_batch_size_seen"], size)

    def snapshot(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.counts.items()}


class _BatchedModel:
    """What Grounder and Answerer share: a ``@serve.batch`` method named ``_batched``,
    its knobs (hot-tunable through ``reconfigure``) and the batch counters.

    Subclasses set ``self.args`` and call :meth:`_init_batching` in ``__init__``, and
    run each batch through :meth:`_run_live`.
    """

    args: ServeArgs
    _batched: Any

    def _init_batching(self) -> None:
        self._apply_batching()
        self.batches = _BatchCounters()
        self.in_flight = 0

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Count one request as held by this replica while the block runs (``counters()["in_flight"]``)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _apply_batching(self) -> None:
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``) without a restart."""
        self.args = _retuned(self.args, user_config, _BATCH_KNOBS, type(self).__name__)
        self._apply_batching()

    async def _run_live(self, deadlines_unix_s: list[float], run: Callable[[list[int]], list[Any]]) -> list[Any]:
        """``run(live)`` in a worker thread on the members whose deadline has not passed.

        The others get :class:`DeadlineExceeded` in their slots; ``run`` returns one
        result (or :class:`ServiceError`) per live member.
        """
        now = time.time()
        live = [i for i, deadline in enumerate(deadlines_unix_s) if deadline > now]
        out: list[Any] = [
            DeadlineExceeded("the request's deadline passed while it waited for a batch") for _ in deadlines_unix_s
        ]
        if live:
            self.batches.record(len(live))
            for i, result in zip(live, await asyncio.to_thread(run, live)):
                out[i] = result
        return out

    def counters(self) -> dict[str, int]:
        """Requests and batches seen, and the requests this replica holds now (``in_flight``)."""
        return {**self.batches.snapshot(), "in_flight": self.in_flight}


@serve.deployment(
    name="FrameEncoder",
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=_HEALTH_CHECK_PERIOD_S,
    max_ongoing_requests=4,
    max_queued_requests=32,
)
class FrameEncoder:
    """Resolves a video, returns its cached patch features' key, or decodes + encodes and writes the cache."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.media = MediaPolicy.create(self.args.media_roots, self.args.allowed_url_schemes)
        self.service = FeatureService.from_checkpoint(
            self.args.checkpoint_dir,
            cache_root=self.args.features.cache_root,
            settings=self.args.feature_settings(),
            device=self.args.device,
            dtype=self.args.encoder_dtype,
            cache_memory_bytes=self.args.features.cache_memory_bytes,
            cache_storage_dtype=self.args.features.cache_storage_dtype,
            cache_quota_bytes=self.args.features.cache_quota_bytes,
        )

    async def features(self, video: str, deadline_unix_s: float | None = None) -> FeatureRef:
        """Features of a video named by path or URL (checked against the media policy)."""
        source = self.media.resolve(video)
        if deadline_unix_s is not None:
            _check_deadline(deadline_unix_s)
        result = await asyncio.to_thread(self.service.features, source)
        return result.ref()

    async def features_upload(self, data: bytes, filename: str, deadline_unix_s: float | None = None) -> FeatureRef:
        """Features of uploaded bytes (cached by content hash like any other video)."""
        if len(data) > self.args.max_upload_bytes:
            raise TooLarge(f"file: the upload exceeds {self.args.max_upload_bytes} bytes", reason="upload_too_large")
        if deadline_unix_s is not None:
            _check_deadline(deadline_unix_s)
        suffix = Path(filename or "upload.mp4").suffix.lower() or ".mp4"
        result = await asyncio.to_thread(self.service.features_from_bytes, data, suffix)
        return result.ref()

    def info(self) -> dict[str, str]:
        """Ids of the frame encoder (they are part of every cache key)."""
        return {"encoder_id": self.service.encoder.encoder_id, "transform_id": self.service.encoder.transform_id}

    def counters(self) -> dict[str, Any]:
        """Decode/encode counters and the cache's stats."""
        return self.service.counters()


@serve.deployment(
    name="Grounder",
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=_HEALTH_CHECK_PERIOD_S,
    max_ongoing_requests=16,
    max_queued_requests=64,
)
class Grounder(_BatchedModel):
    """Compressor + LLM through the grounding part; reads features from the shared cache."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.service = GroundingService.from_checkpoint(
            self.args.checkpoint_dir, dtype=self.args.dtype, device=self.args.device
        )
        self.cache = FeatureCache(
            self.args.features.cache_root,
            memory_bytes=self.args.features.cache_memory_bytes,
            storage_dtype=self.args.features.cache_storage_dtype,
        )
        self._init_batching()

    def _read(self, ref: FeatureRef) -> Any:
        found = self.cache.get(ref.key)
        if found is None:
            raise FeaturesUnavailable(
                "the video's features are not in the shared cache; check that cache_root is storage every "
                "replica's node can reach (retry: the FrameEncoder rewrites evicted entries)",
                retry_after_s=self.args.retry_after_s,
            )
        return found

    async def ground(self, item: GroundItem) -> GroundingResult:
        """Ground one question (batched with concurrent ones)."""
        _check_deadline(item.deadline_unix_s)
        with self._working():
            feats = await asyncio.to_thread(self._read, item.ref)
            request = GroundingRequest(item.question, feats, list(item.src_spans_s), item.settings)
            outcome = await self._batched((request, item.deadline_unix_s))
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[GroundingRequest, float]]) -> list[GroundingResult | ServiceError]:
        return await self._run_live(
            [deadline for _, deadline in items], lambda live: self.service.ground_many([items[i][0] for i in live])
        )


@serve.deployment(
    name="Answerer",
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=_HEALTH_CHECK_PERIOD_S,
    max_ongoing_requests=16,
    max_queued_requests=64,
)
class Answerer(_BatchedModel):
    """Continues from a GroundingResult; never reads the patch cache or runs the compressor."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.service = AnsweringService.from_checkpoint(
            self.args.checkpoint_dir, dtype=self.args.dtype, device=self.args.device
        )
        self._init_batching()

    async def answer(self, item: AnswerItem) -> GenerationResult:
        """Answer one grounding (batched with concurrent ones)."""
        _check_deadline(item.deadline_unix_s)
        with self._working():
            outcome = await self._batched(item)
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[AnswerItem]) -> list[GenerationResult | ServiceError]:
        return await self._run_live(
            [item.deadline_unix_s for item in items],
            lambda live: self.service.answer_many(
                [items[i].grounding for i in live], [items[i].settings for i in live]
            ),
        )

    async def answer_stream(self, item: AnswerItem) -> AsyncIterator[StreamToken | GenerationResult]:
        """Answer one grounding token by token; the last item is the full result."""
        _check_deadline(item.deadline_unix_s)
        steps = self.service.stream(item.grounding, item.settings)
        done = object()
        while True:
            step = await asyncio.to_thread(next, steps, done)
            if step is done:
                return
            yield step
            if time.time() >= item.deadline_unix_s:
                return


# --- HTTP --------------------------------------------------------------------------------

API_DESCRIPTION = """Ground and answer questions about videos with D2VLM.

* `POST /v1/ground` — evidence spans (seconds) and per-frame scores for a query.
* `POST /v1/answer` — the answer with interleaved evidence; `"stream": true` sends
  server-sent events (`grounding`, then one `token` per answer token, then `answer`, or `error`).

`video` is a path under the server's media roots or a URL of an allowed scheme; to upload
a file instead, send `multipart/form-data` with a `file` part and a `request` part holding
the JSON body without `video`. Errors are `{"detail", "reason"}` with a 4xx/5xx status.
"""

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (403, "path outside the media roots, or URL scheme not allowed"),
        (413, "video too long, or upload/body too large"),
        (422, "invalid request, or a video that cannot be decoded (or lost too many frames: partial_decode)"),
        (503, "overloaded, or the replica working on it was lost and retries ran out (see Retry-After)"),
        (504, "deadline exceeded"),
    )
}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    name = model.__name__
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "request"],
                        "properties": {
                            "request": {"type": "string", "description": f"JSON {name} without `video`"},
                            "file": {"type": "string", "format": "binary", "description": "the video file"},
                        },
                    }
                },
            },
        }
    }


api = FastAPI(title="d2vlm_ray", version="0.1.0", description=API_DESCRIPTION)


def _openapi() -> dict[str, Any]:
    """OpenAPI with the request schemas registered (the routes parse JSON and multipart by hand)."""
    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    _, defs = models_json_schema(
        [(GroundRequest, "validation"), (AnswerRequest, "validation")], ref_template="#/components/schemas/{model}"
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    api.openapi_schema = schema
    return schema


api.openapi = _openapi  # type: ignore[method-assign]


def _error_response(exc: ServiceError) -> JSONResponse:
    headers = {}
    if exc.status_code == 503:
        headers["Retry-After"] = str(exc.retry_after_s or 1)
    return JSONResponse(status_code=exc.status_code, content=exc.to_dict(), headers=headers)


def _validation_response(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ("body",)) -> JSONResponse:
    detail = [
        {
            "loc": [*prefix, *(str(p) for p in e.get("loc", ()))],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    return JSONResponse(status_code=422, content={"detail": detail, "reason": "validation_error"})


def _record_request(ref: FeatureRef, timings_ms: dict[str, float]) -> None:
    """Dashboard metrics of one served request: cache result and per-stage latencies."""
    telemetry.cache_lookup(ref.cache_hit, 0, "serve")
    for stage in ("features", "ground", "answer", "total"):
        if stage in timings_ms:
            telemetry.latency_ms(f"serve_{stage}", timings_ms[stage])


@api.exception_handler(RequestValidationError)
async def _on_request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": e.get("loc", ()), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
    return _validation_response(errors, ())


@api.exception_handler(ServiceError)
async def _on_service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return _error_response(unwrap_service_error(exc) or exc)


@api.exception_handler(Exception)
async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in the d2vlm_ray ingress", exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": "internal error", "reason": "internal"})


def _replica_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the replica serving the call died or became unreachable."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, _REPLICA_GONE):
            return True
        current = getattr(current, "cause", None) or current.__cause__
    return False


def _as_service_error(exc: BaseException, retry_after_s: int) -> ServiceError | None:
    """The typed error for a failed handle call, or ``None`` for a bug (answered 500 and logged)."""
    found = unwrap_service_error(exc)
    if found is not None:
        return found
    if isinstance(exc, BackPressureError) or isinstance(getattr(exc, "cause", None), BackPressureError):
        return Overloaded("a deployment's queue is full; retry later", retry_after_s=retry_after_s)
    if _replica_gone(exc):
        return ReplicaLost(
            f"the replica working on the request was lost ({type(exc).__name__}); retry later",
            retry_after_s=retry_after_s,
        )
    return None


async def _replay_form(scope: dict[str, Any], body: bytes) -> Any:
    """Parse a multipart body that has already been read (under a size limit)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(scope, receive).form(max_files=1, max_fields=4)


def _event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _error_event(exc: ServiceError) -> str:
    """The in-band ``error`` event: the body, the status, and for a 503 the ``Retry-After`` seconds."""
    data: dict[str, Any] = {**exc.to_dict(), "status": exc.status_code}
    if exc.status_code == 503:
        data["retry_after_s"] = exc.retry_after_s or 1
    return _event("error", data)


async def _awaitable(response: Any) -> Any:
    return await response


# Everything the Ingress's methods use must be defined above it: Serve serialises the
# ingress class when the decorator runs.
@dataclass
class _Parsed:
    request: GroundRequest | AnswerRequest
    upload: bytes | None
    filename: str


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=_HEALTH_CHECK_PERIOD_S,
    max_ongoing_requests=64,
    max_queued_requests=64,
)
@serve.ingress(api)
class Ingress:
    """FastAPI front end: validates, enforces limits and deadlines, composes the other deployments."""

    def __init__(
        self,
        args: dict[str, Any],
        frame_encoder: DeploymentHandle,
        grounder: DeploymentHandle,
        answerer: DeploymentHandle,
    ) -> None:
        self.args = ServeArgs.model_validate(args)
        self.frame_encoder = frame_encoder
        self.grounder = grounder
        self.answerer = answerer
        self.tokenizer, self.preset, self.family = load_llm_tokenizer_for(self.args.checkpoint_dir)
        self.inflight: dict[int, float] = {}
        self._next_slot = 0
        self._encoder_info: dict[str, str] | None = None
        # Call kinds ("ground", ...) whose replica was lost and that have not succeeded since:
        # their deployment may have no replica until Serve's replacement is up.
        self._replacing: set[str] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply hot-tunable limits from ``user_config`` (in-flight bound, token bounds, deadlines, body sizes)."""
        self.args = _retuned(self.args, user_config, _INGRESS_KNOBS, "Ingress")

    # --- plumbing ---

    def _admit(self, deadline_unix_s: float) -> int:
        """Take an in-flight slot or raise 503; a slot lapses at its deadline (plus grace).

        The lapse bounds the damage of a slot whose release never runs (a streaming
        response whose client vanished before the body started).
        """
        now = time.time()
        for slot, until in list(self.inflight.items()):
            if until < now:
                del self.inflight[slot]
        if len(self.inflight) >= self.args.max_inflight_requests:
            raise Overloaded(
                f"the server is at capacity ({self.args.max_inflight_requests} requests in flight); retry later",
                retry_after_s=self.args.retry_after_s,
            )
        self._next_slot += 1
        self.inflight[self._next_slot] = deadline_unix_s + _SLOT_GRACE_S
        return self._next_slot

    def _release(self, slot: int) -> None:
        self.inflight.pop(slot, None)

    async def _await(self, response: Any, deadline_unix_s: float) -> Any:
        """Await a handle call within the deadline; on expiry cancel it and raise 504."""
        remaining = deadline_unix_s - time.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(_awaitable(response), remaining)
        except asyncio.TimeoutError:
            if inspect.iscoroutine(response):
                response.close()  # a stream's next step, never started; the stream is cancelled by its owner
            else:
                response.cancel()
            raise DeadlineExceeded("the request did not finish within its deadline") from None
        except ServiceError:
            raise
        except Exception as exc:
            err = _as_service_error(exc, self.args.retry_after_s)
            if err is None:
                raise
            raise err from None

    async def _call(self, start: Callable[[], Any], deadline_unix_s: float, what: str) -> Any:
        """Run an idempotent handle call, again on a healthy replica if its replica dies.

        ``start`` issues the call (``handle.method.remote(...)``); it is called once more
        per retry, at most ``max_replica_retries`` times, and only while the deadline
        allows. The work is idempotent (the cache is content-addressed; grounding and
        answering keep no state), so a repeat is safe. When no retry is left, or the
        deadline passes while a replacement starts, the client gets 503 + ``Retry-After``
        (:class:`ReplicaLost`), not a 500 and not a 504: the request was lost, not slow.
        The same holds for a request that never met the dead replica but queued behind
        its loss: while a call of this kind has seen a lost replica and none has succeeded
        since, its deadline expiring is a 503 too. A loss no call saw (a replica killed
        while idle) is not known here, so requests queued behind it can still get 504.
        """
        retries = 0
        while True:
            try:
                result = await self._await(start(), deadline_unix_s)
                self._replacing.discard(what)
                return result
            except ReplicaLost as lost:
                self._replacing.add(what)
                if retries >= self.args.max_replica_retries:
                    raise ReplicaLost(
                        f"{what}: the replica was lost {retries + 1} times; retry later",
                        retry_after_s=self.args.retry_after_s,
                    ) from None
                pause_s = _RETRY_BACKOFF_S * 2**retries
                if time.time() + pause_s >= deadline_unix_s:
                    raise lost from None
                retries += 1
                logger.warning("%s: retrying on another replica (%d/%d)", what, retries, self.args.max_replica_retries)
                await asyncio.sleep(pause_s)
            except DeadlineExceeded:
                if retries == 0 and what not in self._replacing:
                    raise
                raise ReplicaLost(
                    f"{what}: the replica was lost and no replacement finished the work within the deadline; "
                    "retry later",
                    retry_after_s=self.args.retry_after_s,
                ) from None

    async def _read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"body: {declared} bytes exceed the limit of {limit}", reason="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"body: more than {limit} bytes", reason="body_too_large")
        return bytes(body)

    async def _parse(
        self, request: Request, model: type[GroundRequest] | type[AnswerRequest]
    ) -> _Parsed | JSONResponse:
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        if not multipart:
            body = await self._read_body(request, self.args.max_json_bytes)
            try:
                payload = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidRequest("body: not valid JSON", reason="invalid_json") from None
            upload, filename = None, ""
        else:
            body = await self._read_body(request, self.args.max_upload_bytes + _MULTIPART_OVERHEAD_BYTES)
            try:
                form = await _replay_form(request.scope, body)
            except MultiPartException as exc:
                message = f"body: invalid multipart data ({exc.message})"
                raise InvalidRequest(message, reason="invalid_multipart") from None
            file = form.get("file")
            if file is None or isinstance(file, str):
                raise InvalidRequest("file: a multipart request needs a 'file' part", reason="missing_file")
            upload = await file.read()
            filename = file.filename or ""
            if len(upload) > self.args.max_upload_bytes:
                limit = self.args.max_upload_bytes
                raise TooLarge(f"file: the upload exceeds {limit} bytes", reason="upload_too_large")
            meta = form.get("request", "{}")
            try:
                payload = json.loads(meta if isinstance(meta, str) else await meta.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidRequest("request: the 'request' part is not valid JSON", reason="invalid_json") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("body: expected a JSON object", reason="invalid_json")
        try:
            parsed = model.model_validate(payload, context=self.args.validation_context(upload=upload is not None))
        except ValidationError as exc:
            return _validation_response(exc.errors(include_url=False, include_input=False, include_context=False))
        return _Parsed(parsed, upload, filename)

    async def _ground(
        self, parsed: _Parsed, question: str, deadline_unix_s: float
    ) -> tuple[GroundingResult, FeatureRef, dict[str, float]]:
        """FrameEncoder, then Grounder; returns the grounding, the feature ref and timings."""
        req = parsed.request
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if parsed.upload is not None:
            upload, filename = parsed.upload, parsed.filename

            def call() -> Any:
                return self.frame_encoder.features_upload.remote(upload, filename, deadline_unix_s)
        else:

            def call() -> Any:
                return self.frame_encoder.features.remote(req.video, deadline_unix_s)

        ref: FeatureRef = await self._call(call, deadline_unix_s, "features")
        timings["features"] = round((time.perf_counter() - start) * 1000.0, 3)
        for name, value in ref.timings_ms.items():
            timings[f"features.{name}"] = value
        bound = req.options.max_grounding_tokens or self.args.default_max_grounding_tokens
        spans = [tuple(s) for s in req.src_spans_s or []]
        item = GroundItem(ref, question, spans, req.options.settings(bound), deadline_unix_s)
        start = time.perf_counter()
        grounding: GroundingResult = await self._call(
            lambda: self.grounder.ground.remote(item), deadline_unix_s, "ground"
        )
        timings["ground"] = round((time.perf_counter() - start) * 1000.0, 3)
        return grounding, ref, timings

    def _deadline(self, req: GroundRequest | AnswerRequest) -> float:
        return time.time() + (req.options.deadline_s or self.args.default_deadline_s)

    async def _guarded(self, work: Callable[[int], Awaitable[Response]]) -> Response:
        """Admission control and error mapping around one request.

        The slot is released when the response is complete; a streaming response takes
        it over and releases it when the stream ends.
        """
        try:
            slot = self._admit(time.time() + self.args.max_deadline_s)
        except ServiceError as exc:
            return _error_response(exc)
        handed_over = False
        try:
            response = await work(slot)
            handed_over = isinstance(response, StreamingResponse)
            return response
        except ServiceError as exc:
            return _error_response(exc)
        finally:
            if not handed_over:
                self._release(slot)

    # --- routes ---

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        """Liveness of the ingress."""
        return HealthResponse(status="ok")

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        """The served model and its limits."""
        if self._encoder_info is None:
            deadline = time.time() + self.args.default_deadline_s
            self._encoder_info = await self._call(lambda: self.frame_encoder.info.remote(), deadline, "info")
        a = self.args
        info = ModelInfo(
            id=a.model_id,
            preset=self.preset,
            family=self.family,
            encoder_id=self._encoder_info["encoder_id"],
            dtype=a.dtype,
            fps=a.features.fps,
            max_frames=a.features.max_frames,
            max_video_duration_s=a.max_video_duration_s,
            max_new_tokens=a.max_new_tokens,
            max_grounding_tokens=a.max_grounding_tokens,
        )
        return ModelsResponse(data=[info])

    @api.post("/v1/ground", response_model=GroundResponse, responses=_ERRORS, openapi_extra=_body_doc(GroundRequest))
    async def ground(self, request: Request) -> Response:
        """Ground a query in a video: spans in seconds and per-frame scores."""

        async def work(slot: int) -> Response:  # noqa: ARG001
            parsed = await self._parse(request, GroundRequest)
            if isinstance(parsed, JSONResponse):
                return parsed
            req = parsed.request
            assert isinstance(req, GroundRequest)
            total = time.perf_counter()
            grounding, ref, timings = await self._ground(parsed, req.query, self._deadline(req))
            timings["total"] = round((time.perf_counter() - total) * 1000.0, 3)
            _record_request(ref, timings)
            body = grounding_payload(
                grounding,
                self.tokenizer,
                cache_hit=ref.cache_hit,
                timings_ms=timings,
                warnings=ref.warnings,
                missing_timestamps_s=ref.missing_timestamps_s,
            )
            return JSONResponse(GroundResponse.model_validate(body).model_dump(mode="json"))

        return await self._guarded(work)

    @api.post("/v1/answer", response_model=AnswerResponse, responses=_ERRORS, openapi_extra=_body_doc(AnswerRequest))
    async def answer(self, request: Request) -> Response:
        """Ground, then answer with interleaved evidence (``stream: true`` for server-sent events)."""

        async def work(slot: int) -> Response:
            parsed = await self._parse(request, AnswerRequest)
            if isinstance(parsed, JSONResponse):
                return parsed
            req = parsed.request
            assert isinstance(req, AnswerRequest)
            total = time.perf_counter()
            deadline = self._deadline(req)
            grounding, ref, timings = await self._ground(parsed, req.question, deadline)
            settings = req.options.settings(req.options.max_new_tokens or self.args.default_max_new_tokens)
            item = AnswerItem(grounding, settings, deadline)
            if req.stream:
                return StreamingResponse(
                    self._sse(item, ref, timings, total, slot),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            start = time.perf_counter()
            result: GenerationResult = await self._call(lambda: self.answerer.answer.remote(item), deadline, "answer")
            timings["answer"] = round((time.perf_counter() - start) * 1000.0, 3)
            timings["total"] = round((time.perf_counter() - total) * 1000.0, 3)
            _record_request(ref, timings)
            telemetry.evidence_spans(len(result.spans_idx), "serve")
            body = answer_payload(
                grounding,
                result,
                self.tokenizer,
                cache_hit=ref.cache_hit,
                timings_ms=timings,
                warnings=ref.warnings,
                missing_timestamps_s=ref.missing_timestamps_s,
            )
            return JSONResponse(AnswerResponse.model_validate(body).model_dump(mode="json"))

        return await self._guarded(work)

    async def _sse(
        self, item: AnswerItem, ref: FeatureRef, timings: dict[str, float], total: float, slot: int
    ) -> AsyncIterator[str]:
        """Server-sent events: ``grounding``, ``token`` per answer token, then ``answer`` (or ``error``)."""
        stream = None
        finished = False
        try:
            ground_body = grounding_payload(
                item.grounding,
                self.tokenizer,
                cache_hit=ref.cache_hit,
                timings_ms={},
                warnings=ref.warnings,
                missing_timestamps_s=ref.missing_timestamps_s,
            )
            yield _event("grounding", ground_body)
            start = time.perf_counter()
            stream = self.answerer.options(stream=True).answer_stream.remote(item)
            restarts = 0
            started = False
            while True:
                try:
                    step = await self._await(stream.__anext__(), item.deadline_unix_s)
                except StopAsyncIteration:
                    break
                except DeadlineExceeded:
                    if not restarts:
                        raise
                    raise ReplicaLost(
                        "answer: the replica was lost and no replacement streamed within the deadline; retry later",
                        retry_after_s=self.args.retry_after_s,
                    ) from None
                except ReplicaLost:
                    # Before its first token a stream is as idempotent as a plain answer: start it
                    # again on a healthy replica. After it, the client holds tokens a new stream
                    # might not repeat, so the loss is reported in-band (503, with retry_after_s).
                    if started or restarts >= self.args.max_replica_retries:
                        raise
                    restarts += 1
                    logger.warning("answer_stream: restarting on another replica (%d)", restarts)
                    stream = self.answerer.options(stream=True).answer_stream.remote(item)
                    continue
                started = True
                if isinstance(step, StreamToken):
                    yield _event(
                        "token",
                        {
                            "index": step.index,
                            "token_id": step.token_id,
                            "text": step.text,
                            "span_s": list(step.span_s) if step.span_s is not None else None,
                        },
                    )
                    continue
                timings["answer"] = round((time.perf_counter() - start) * 1000.0, 3)
                timings["total"] = round((time.perf_counter() - total) * 1000.0, 3)
                body = answer_payload(
                    item.grounding,
                    step,
                    self.tokenizer,
                    cache_hit=ref.cache_hit,
                    timings_ms=timings,
                    warnings=ref.warnings,
                    missing_timestamps_s=ref.missing_timestamps_s,
                )
                finished = True
                yield _event("answer", AnswerResponse.model_validate(body).model_dump(mode="json"))
                return
            if time.time() >= item.deadline_unix_s:
                raise DeadlineExceeded("the request did not finish within its deadline")
        except ServiceError as exc:
            yield _error_event(exc)
        except Exception as exc:  # the status line is already sent: report in-band, never a traceback
            err = _as_service_error(exc, self.args.retry_after_s)
            if err is None:
                logger.exception("unhandled error while streaming an answer", exc_info=exc)
                yield _event("error", {"detail": "internal error", "reason": "internal", "status": 500})
            else:
                yield _error_event(err)
        finally:
            if stream is not None and not finished:
                stream.cancel()
            self._release(slot)
